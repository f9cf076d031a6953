//! The reference server spoken to with hand-written bytes (not our codec), on random
//! loopback ports: every reply code the server can produce to CONNECT, policy and
//! logins, SOCKS4/4a, hostile input, limits, relaying and shutdown. BIND and UDP
//! ASSOCIATE are in `server_protocol_bind_udp.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tun2socks::server::ServerConfig;
use tun2socks::socks::{Credentials, ServerPolicy, Users};

fn v4_bytes(addr: SocketAddr) -> Vec<u8> {
    let SocketAddr::V4(a) = addr else {
        panic!("{addr}")
    };
    let mut out = a.port().to_be_bytes().to_vec();
    out.extend_from_slice(&a.ip().octets());
    out
}

fn config_with_users(users: &[(&str, &str)]) -> ServerConfig {
    let users = users
        .iter()
        .map(|(u, p)| Credentials::new(*u, *p).unwrap())
        .collect();
    ServerConfig {
        policy: ServerPolicy {
            users: Arc::new(Users::new(users)),
            ..ServerPolicy::default()
        },
        ..ServerConfig::default()
    }
}

#[tokio::test]
async fn connect_reports_the_real_outbound_address_and_relays() {
    let server = TestServer::start(ServerConfig::default()).await;
    let echo = tcp_echo("127.0.0.1").await;
    let mut s = v5_session(server.addr).await;
    s.write_all(&v5_request(1, echo)).await.unwrap();
    let (rep, bound) = v5_reply_v4(&mut s).await;
    assert_eq!(rep, 0);
    assert_eq!(
        bound.ip(),
        Ipv4Addr::LOCALHOST,
        "BND.ADDR must not be 0.0.0.0"
    );
    assert_ne!(bound.port(), 0);
    s.write_all(b"hello").await.unwrap();
    assert_eq!(read_exact_timeout(&mut s, 5, 5).await, b"hello");
}

#[tokio::test]
async fn refused_destination_gets_0x05() {
    let server = TestServer::start(ServerConfig::default()).await;
    // Bind then drop a listener: the port is closed.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let mut s = v5_session(server.addr).await;
    s.write_all(&v5_request(1, closed)).await.unwrap();
    assert_eq!(v5_reply_v4(&mut s).await.0, 0x05);
    assert!(closed_within(&mut s, 5).await);
}

#[tokio::test]
async fn unknown_command_gets_0x07_and_unknown_atyp_0x08() {
    let server = TestServer::start(ServerConfig::default()).await;
    let mut s = v5_session(server.addr).await;
    s.write_all(&[5, 0x09, 0, 1, 127, 0, 0, 1, 0, 80])
        .await
        .unwrap();
    assert_eq!(v5_reply_v4(&mut s).await.0, 0x07);
    assert!(closed_within(&mut s, 5).await);

    let mut s = v5_session(server.addr).await;
    s.write_all(&[5, 1, 0, 0x05, 1, 2, 3, 4, 0, 80])
        .await
        .unwrap();
    assert_eq!(v5_reply_v4(&mut s).await.0, 0x08);
    assert!(closed_within(&mut s, 5).await);
}

#[tokio::test]
async fn udp_disabled_gets_0x07() {
    let config = ServerConfig {
        policy: ServerPolicy {
            udp_associate: false,
            ..ServerPolicy::default()
        },
        ..ServerConfig::default()
    };
    let server = TestServer::start(config).await;
    let mut s = v5_session(server.addr).await;
    s.write_all(&v5_request(3, "0.0.0.0:0".parse().unwrap()))
        .await
        .unwrap();
    assert_eq!(v5_reply_v4(&mut s).await.0, 0x07);
}

#[tokio::test]
async fn deny_private_refuses_local_destinations_by_address_and_by_name() {
    let server = TestServer::start(ServerConfig {
        deny_private: true,
        ..ServerConfig::default()
    })
    .await;
    let echo = tcp_echo("127.0.0.1").await;
    let mut s = v5_session(server.addr).await;
    s.write_all(&v5_request(1, echo)).await.unwrap();
    assert_eq!(v5_reply_v4(&mut s).await.0, 0x02, "127.0.0.1 by address");
    // A name that resolves to loopback (what DNS rebinding does) is refused too.
    let mut s = v5_session(server.addr).await;
    let mut req = vec![5, 1, 0, 3, 9];
    req.extend_from_slice(b"localhost");
    req.extend_from_slice(&echo.port().to_be_bytes());
    s.write_all(&req).await.unwrap();
    let reply = read_exact_timeout(&mut s, 4, 5).await;
    assert_eq!((reply[0], reply[1]), (5, 0x02), "localhost by name");
    // Without the option the same destination is served.
    let open = TestServer::start(ServerConfig::default()).await;
    let mut s = v5_session(open.addr).await;
    s.write_all(&v5_request(1, echo)).await.unwrap();
    assert_eq!(v5_reply_v4(&mut s).await.0, 0);
}

#[tokio::test]
async fn deny_rule_gets_0x02_and_socks4_91() {
    let config = ServerConfig {
        deny: vec!["127.0.0.0/8".parse::<IpNet>().unwrap()],
        ..ServerConfig::default()
    };
    let server = TestServer::start(config).await;
    let echo = tcp_echo("127.0.0.1").await;
    let mut s = v5_session(server.addr).await;
    s.write_all(&v5_request(1, echo)).await.unwrap();
    assert_eq!(v5_reply_v4(&mut s).await.0, 0x02);

    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let mut req = vec![4, 1];
    req.extend(v4_bytes(echo));
    req.push(0);
    s.write_all(&req).await.unwrap();
    assert_eq!(read_exact_timeout(&mut s, 8, 5).await[..2], [0, 91]);
}

#[tokio::test]
async fn client_outside_allow_list_is_closed_before_any_byte_is_read() {
    let config = ServerConfig {
        allow: vec!["10.0.0.0/8".parse::<IpNet>().unwrap()],
        ..ServerConfig::default()
    };
    let server = TestServer::start(config).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    // No method selection comes back (it would for a client inside the list): the
    // connection is closed at accept, whatever the client sends.
    let _ = s.write_all(&[5, 1, 0]).await;
    assert!(
        closed_within(&mut s, 5).await,
        "a refused client got an answer"
    );
    // A client inside the list is served as usual.
    let inside = TestServer::start(ServerConfig {
        allow: vec!["127.0.0.0/8".parse::<IpNet>().unwrap()],
        ..ServerConfig::default()
    })
    .await;
    let _ = v5_session(inside.addr).await;
}

#[tokio::test]
async fn auth_required_no_auth_offer_gets_0xff() {
    let server = TestServer::start(config_with_users(&[("alice", "secret")])).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(&[5, 1, 0]).await.unwrap();
    assert_eq!(read_exact_timeout(&mut s, 2, 5).await, [5, 0xFF]);
    assert!(closed_within(&mut s, 5).await);
}

#[tokio::test]
async fn failed_logins_are_answered_later_and_later() {
    let server = TestServer::start(config_with_users(&[("alice", "secret")])).await;
    let mut waits = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        s.write_all(&[5, 1, 2]).await.unwrap();
        assert_eq!(read_exact_timeout(&mut s, 2, 5).await, [5, 2]);
        let sent = std::time::Instant::now();
        s.write_all(b"\x01\x05alice\x05guess").await.unwrap();
        let status = read_exact_timeout(&mut s, 2, 10).await;
        assert_eq!(status[0], 1);
        assert_ne!(status[1], 0);
        waits.push(sent.elapsed());
    }
    // 250 ms, then 500 ms, then 1 s (lower bounds: sleeps never end early).
    for (wait, least) in waits.iter().zip([250u64, 500, 1000]) {
        assert!(
            *wait >= Duration::from_millis(least),
            "failure answered after {wait:?}, expected at least {least} ms: {waits:?}"
        );
    }
}

#[tokio::test]
async fn auth_wrong_password_fails_right_one_passes() {
    let server = TestServer::start(config_with_users(&[("alice", "secret")])).await;
    let echo = tcp_echo("127.0.0.1").await;

    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(&[5, 2, 0, 2]).await.unwrap();
    assert_eq!(read_exact_timeout(&mut s, 2, 5).await, [5, 2]);
    s.write_all(b"\x01\x05alice\x05wrong").await.unwrap();
    let status = read_exact_timeout(&mut s, 2, 5).await;
    assert_eq!(status[0], 1);
    assert_ne!(status[1], 0);
    assert!(closed_within(&mut s, 5).await);

    // Greeting, login, request and payload in one segment (pipelined).
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let mut all = vec![5, 1, 2];
    all.extend_from_slice(b"\x01\x05alice\x06secret");
    all.extend(v5_request(1, echo));
    all.extend_from_slice(b"early data");
    s.write_all(&all).await.unwrap();
    assert_eq!(read_exact_timeout(&mut s, 4, 5).await, [5, 2, 1, 0]);
    assert_eq!(v5_reply_v4(&mut s).await.0, 0);
    assert_eq!(read_exact_timeout(&mut s, 10, 5).await, b"early data");
}

#[tokio::test]
async fn socks4_is_refused_when_logins_are_required() {
    let server = TestServer::start(config_with_users(&[("alice", "secret")])).await;
    let echo = tcp_echo("127.0.0.1").await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let mut req = vec![4, 1];
    req.extend(v4_bytes(echo));
    req.extend_from_slice(b"alice\0");
    s.write_all(&req).await.unwrap();
    assert_eq!(read_exact_timeout(&mut s, 8, 5).await[..2], [0, 91]);
    assert!(closed_within(&mut s, 5).await);
}

#[tokio::test]
async fn socks4a_connects_by_name() {
    let server = TestServer::start(ServerConfig::default()).await;
    let echo = tcp_echo("127.0.0.1").await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let mut req = vec![4, 1];
    req.extend_from_slice(&echo.port().to_be_bytes());
    req.extend_from_slice(&[0, 0, 0, 7]);
    req.extend_from_slice(b"user\0localhost\0");
    s.write_all(&req).await.unwrap();
    let reply = read_exact_timeout(&mut s, 8, 5).await;
    assert_eq!(reply[..2], [0, 90], "{reply:?}");
    s.write_all(b"4a").await.unwrap();
    assert_eq!(read_exact_timeout(&mut s, 2, 5).await, b"4a");
}

#[tokio::test]
async fn garbage_closes_the_connection_and_the_server_keeps_serving() {
    let server = TestServer::start(ServerConfig::default()).await;
    for junk in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0x00, 0xa5][..],
        &[0xFF; 600][..],
        &[0x00][..],
    ] {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        let _ = s.write_all(junk).await;
        assert!(closed_within(&mut s, 5).await, "{junk:02x?} not closed");
    }
    // A SOCKS4 user id that never ends is cut off with 91 at the cap.
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let mut req = vec![4, 1, 0, 80, 127, 0, 0, 1];
    req.extend(std::iter::repeat_n(b'u', 300));
    s.write_all(&req).await.unwrap();
    assert_eq!(read_exact_timeout(&mut s, 8, 5).await[..2], [0, 91]);

    let echo = tcp_echo("127.0.0.1").await;
    let mut s = v5_session(server.addr).await;
    s.write_all(&v5_request(1, echo)).await.unwrap();
    assert_eq!(v5_reply_v4(&mut s).await.0, 0);
}

#[tokio::test]
async fn silent_client_is_cut_off_by_the_handshake_timeout() {
    let config = ServerConfig {
        handshake_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let server = TestServer::start(config).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(&[5]).await.unwrap();
    assert!(closed_within(&mut s, 5).await);
}

#[tokio::test]
async fn connection_limit_closes_extra_clients_at_once() {
    let config = ServerConfig {
        max_connections: 2,
        ..ServerConfig::default()
    };
    let server = TestServer::start(config).await;
    let _a = v5_session(server.addr).await;
    let _b = v5_session(server.addr).await;
    let mut c = TcpStream::connect(server.addr).await.unwrap();
    let _ = c.write_all(&[5, 1, 0]).await;
    assert!(closed_within(&mut c, 5).await, "third client not closed");
    drop((_a, _b));
    // Permits come back once sessions end.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _d = v5_session(server.addr).await;
}

#[tokio::test]
async fn two_hundred_parallel_sessions() {
    let server = TestServer::start(ServerConfig::default()).await;
    let echo = tcp_echo("127.0.0.1").await;
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let proxy = server.addr;
        tasks.push(tokio::spawn(async move {
            let mut s = v5_session(proxy).await;
            s.write_all(&v5_request(1, echo)).await.unwrap();
            assert_eq!(v5_reply_v4(&mut s).await.0, 0);
            let data = pattern(4096, i);
            s.write_all(&data).await.unwrap();
            assert_eq!(read_exact_timeout(&mut s, data.len(), 20).await, data);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn half_close_is_carried_both_ways() {
    let server = TestServer::start(ServerConfig::default()).await;
    // A target that reads to EOF, then answers with the byte count.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.unwrap();
        s.write_all(format!("{}", all.len()).as_bytes())
            .await
            .unwrap();
    });
    let mut s = v5_session(server.addr).await;
    s.write_all(&v5_request(1, target)).await.unwrap();
    assert_eq!(v5_reply_v4(&mut s).await.0, 0);
    // More than SPLICE_AFTER: the upload switches to splice, and its FIN still passes.
    s.write_all(&pattern(1_000_000, 1)).await.unwrap();
    s.shutdown().await.unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    assert_eq!(answer, "1000000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_both_ways_through_the_splice_path() {
    let server = TestServer::start(ServerConfig::default()).await;
    let echo = tcp_echo("127.0.0.1").await;
    let mut s = v5_session(server.addr).await;
    s.write_all(&v5_request(1, echo)).await.unwrap();
    assert_eq!(v5_reply_v4(&mut s).await.0, 0);
    let data = pattern(8 * 1024 * 1024, 9);
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut back = Vec::new();
    let ((), got) = tokio::join!(send, r.read_to_end(&mut back));
    got.unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "8 MiB echoed through splice differs");
}

#[tokio::test]
async fn shutdown_closes_sessions_and_returns() {
    let server = TestServer::start(ServerConfig::default()).await;
    let echo = tcp_echo("127.0.0.1").await;
    let mut s = v5_session(server.addr).await;
    s.write_all(&v5_request(1, echo)).await.unwrap();
    assert_eq!(v5_reply_v4(&mut s).await.0, 0);
    let addr = server.addr;
    tokio::time::timeout(Duration::from_secs(3), server.stop())
        .await
        .expect("run did not return after shutdown")
        .unwrap();
    assert!(closed_within(&mut s, 3).await, "session survived shutdown");
    assert!(TcpStream::connect(addr).await.is_err(), "still listening");
}

#[tokio::test]
async fn ipv6_listener_and_destination() {
    let server = TestServer::start_on("::1", ServerConfig::default()).await;
    let echo = tcp_echo("::1").await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(&[5, 1, 0]).await.unwrap();
    assert_eq!(read_exact_timeout(&mut s, 2, 5).await, [5, 0]);
    let mut req = vec![5, 1, 0, 4];
    req.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
    req.extend_from_slice(&echo.port().to_be_bytes());
    s.write_all(&req).await.unwrap();
    let reply = read_exact_timeout(&mut s, 22, 5).await;
    assert_eq!(reply[..4], [5, 0, 0, 4]);
    assert_eq!(reply[4..20], std::net::Ipv6Addr::LOCALHOST.octets());
    s.write_all(b"v6").await.unwrap();
    assert_eq!(read_exact_timeout(&mut s, 2, 5).await, b"v6");
}
