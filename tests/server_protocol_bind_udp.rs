//! The reference server spoken to with hand-written bytes (not our codec), on random
//! loopback ports: BIND v4/v5 (two replies, wrong peer, timeout) and the UDP ASSOCIATE
//! rules (source in the header, strangers and fragments dropped, lifetime, IPv6 and
//! names). CONNECT and everything else is in `server_protocol.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UdpSocket};
use tun2socks::server::ServerConfig;

#[tokio::test]
async fn bind_v5_two_replies_then_relay() {
    let server = TestServer::start(ServerConfig::default()).await;
    let mut s = v5_session(server.addr).await;
    s.write_all(&v5_request(2, "127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap();
    let (rep, bound) = v5_reply_v4(&mut s).await;
    assert_eq!(rep, 0);
    assert_eq!(
        bound.ip(),
        Ipv4Addr::LOCALHOST,
        "first reply must be reachable"
    );
    assert_ne!(bound.port(), 0);
    let mut peer = TcpStream::connect(bound).await.unwrap();
    let (rep, announced) = v5_reply_v4(&mut s).await;
    assert_eq!(rep, 0);
    assert_eq!(
        announced,
        peer.local_addr().unwrap(),
        "second reply names the peer"
    );
    peer.write_all(b"from peer").await.unwrap();
    assert_eq!(read_exact_timeout(&mut s, 9, 5).await, b"from peer");
    s.write_all(b"to peer").await.unwrap();
    assert_eq!(read_exact_timeout(&mut peer, 7, 5).await, b"to peer");
}

#[tokio::test]
async fn bind_v5_unexpected_peer_gets_0x02() {
    let server = TestServer::start(ServerConfig::default()).await;
    let mut s = v5_session(server.addr).await;
    // Expect 127.0.0.2; the peer will come from 127.0.0.1.
    s.write_all(&v5_request(2, "127.0.0.2:0".parse().unwrap()))
        .await
        .unwrap();
    let (rep, bound) = v5_reply_v4(&mut s).await;
    assert_eq!(rep, 0);
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let _peer = socket.connect(bound).await.unwrap();
    assert_eq!(v5_reply_v4(&mut s).await.0, 0x02);
    assert!(closed_within(&mut s, 5).await);
}

#[tokio::test]
async fn bind_v5_times_out_with_0x06() {
    let config = ServerConfig {
        bind_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let server = TestServer::start(config).await;
    let mut s = v5_session(server.addr).await;
    s.write_all(&v5_request(2, "127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap();
    assert_eq!(v5_reply_v4(&mut s).await.0, 0);
    assert_eq!(v5_reply_v4(&mut s).await.0, 0x06);
}

#[tokio::test]
async fn bind_v4_two_replies_and_wrong_peer_91() {
    let server = TestServer::start(ServerConfig::default()).await;
    let request = |ip: [u8; 4]| {
        let mut r = vec![4, 2, 0, 0];
        r.extend_from_slice(&ip);
        r.extend_from_slice(b"ftp\0");
        r
    };
    let reply4 = |r: Vec<u8>| {
        let ip = Ipv4Addr::new(r[4], r[5], r[6], r[7]);
        (
            r[0],
            r[1],
            SocketAddr::from((ip, u16::from_be_bytes([r[2], r[3]]))),
        )
    };

    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(&request([127, 0, 0, 1])).await.unwrap();
    let (vn, cd, bound) = reply4(read_exact_timeout(&mut s, 8, 5).await);
    assert_eq!((vn, cd), (0, 90));
    assert_eq!(bound.ip(), Ipv4Addr::LOCALHOST);
    let mut peer = TcpStream::connect(bound).await.unwrap();
    let (_, cd, announced) = reply4(read_exact_timeout(&mut s, 8, 5).await);
    assert_eq!(cd, 90);
    assert_eq!(announced, peer.local_addr().unwrap());
    peer.write_all(b"x").await.unwrap();
    assert_eq!(read_exact_timeout(&mut s, 1, 5).await, b"x");

    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(&request([127, 0, 0, 2])).await.unwrap();
    let (_, cd, bound) = reply4(read_exact_timeout(&mut s, 8, 5).await);
    assert_eq!(cd, 90);
    let _peer = TcpStream::connect(bound).await.unwrap();
    let (_, cd, _) = reply4(read_exact_timeout(&mut s, 8, 5).await);
    assert_eq!(cd, 91);
}

/// Opens a UDP association declaring `declared`; returns (control, relay address).
async fn associate(server: SocketAddr, declared: SocketAddr) -> (TcpStream, SocketAddr) {
    let mut control = v5_session(server).await;
    control.write_all(&v5_request(3, declared)).await.unwrap();
    let (rep, relay) = v5_reply_v4(&mut control).await;
    assert_eq!(rep, 0);
    assert!(!relay.ip().is_unspecified(), "relay announced as 0.0.0.0");
    (control, relay)
}

fn udp_datagram(frag: u8, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut d = vec![0, 0, frag];
    d.extend(v5_request(0, dst)[3..].to_vec());
    d.extend_from_slice(payload);
    d
}

async fn recv_within(socket: &UdpSocket, ms: u64) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 65536];
    match tokio::time::timeout(Duration::from_millis(ms), socket.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

#[tokio::test]
async fn udp_relays_with_source_in_header_and_drops_strangers_and_fragments() {
    let server = TestServer::start(ServerConfig::default()).await;
    let echo = udp_echo("127.0.0.1").await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (_control, relay) = associate(server.addr, client.local_addr().unwrap()).await;

    client
        .send_to(&udp_datagram(0, echo, b"ping"), relay)
        .await
        .unwrap();
    let reply = recv_within(&client, 2000).await.expect("no echo");
    assert_eq!(reply, udp_datagram(0, echo, b"ping"), "source in header");

    // A stranger (another port than the declared one) is ignored.
    let stranger = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    stranger
        .send_to(&udp_datagram(0, echo, b"sneak"), relay)
        .await
        .unwrap();
    assert_eq!(recv_within(&stranger, 300).await, None);
    assert_eq!(recv_within(&client, 300).await, None);

    // Fragments are dropped.
    client
        .send_to(&udp_datagram(1, echo, b"frag"), relay)
        .await
        .unwrap();
    assert_eq!(recv_within(&client, 300).await, None);

    // And the association still works.
    client
        .send_to(&udp_datagram(0, echo, b"again"), relay)
        .await
        .unwrap();
    assert_eq!(
        recv_within(&client, 2000).await,
        Some(udp_datagram(0, echo, b"again"))
    );
}

#[tokio::test]
async fn udp_port_zero_locks_to_the_first_sender() {
    let server = TestServer::start(ServerConfig::default()).await;
    let echo = udp_echo("127.0.0.1").await;
    let (_control, relay) = associate(server.addr, "0.0.0.0:0".parse().unwrap()).await;
    let first = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let second = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    first
        .send_to(&udp_datagram(0, echo, b"one"), relay)
        .await
        .unwrap();
    assert!(recv_within(&first, 2000).await.is_some());
    second
        .send_to(&udp_datagram(0, echo, b"two"), relay)
        .await
        .unwrap();
    assert_eq!(recv_within(&second, 300).await, None);
    assert_eq!(recv_within(&first, 300).await, None);
}

#[tokio::test]
async fn udp_association_ends_with_its_tcp_connection() {
    let server = TestServer::start(ServerConfig::default()).await;
    let echo = udp_echo("127.0.0.1").await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (control, relay) = associate(server.addr, client.local_addr().unwrap()).await;
    client
        .send_to(&udp_datagram(0, echo, b"alive"), relay)
        .await
        .unwrap();
    assert!(recv_within(&client, 2000).await.is_some());
    drop(control);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = client.send_to(&udp_datagram(0, echo, b"dead"), relay).await;
    assert_eq!(recv_within(&client, 500).await, None);
}

#[tokio::test]
async fn udp_association_idle_timeout() {
    let config = ServerConfig {
        udp_idle_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let server = TestServer::start(config).await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (mut control, _relay) = associate(server.addr, client.local_addr().unwrap()).await;
    assert!(
        closed_within(&mut control, 5).await,
        "idle association kept open"
    );
}

#[tokio::test]
async fn udp_to_ipv6_and_by_name() {
    let server = TestServer::start(ServerConfig::default()).await;
    let echo6 = udp_echo("::1").await;
    let echo4 = udp_echo("127.0.0.1").await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (_control, relay) = associate(server.addr, client.local_addr().unwrap()).await;

    let mut d = vec![0, 0, 0, 4];
    d.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
    d.extend_from_slice(&echo6.port().to_be_bytes());
    let header_len = d.len();
    d.extend_from_slice(b"six");
    client.send_to(&d, relay).await.unwrap();
    let reply = recv_within(&client, 2000).await.expect("no IPv6 echo");
    assert_eq!(reply, d);
    assert_eq!(&reply[header_len..], b"six");

    // ATYP 3: "localhost" resolves on the server.
    let mut d = vec![0, 0, 0, 3, 9];
    d.extend_from_slice(b"localhost");
    d.extend_from_slice(&echo4.port().to_be_bytes());
    d.extend_from_slice(b"name");
    client.send_to(&d, relay).await.unwrap();
    let reply = recv_within(&client, 2000).await.expect("no echo by name");
    assert!(reply.ends_with(b"name"));
}
