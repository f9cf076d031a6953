//! DNS over TCP through our SOCKS server to a real resolver: dnsmasq (Debian's
//! dnsmasq-base) on loopback, answering a host record. Concurrent queries share the
//! connections. Skips outside CI when dnsmasq is missing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::{TestServer, require_program};
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use hickory_proto::serialize::binary::BinEncodable;
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tun2socks::dns::{Dns, DnsConfig, DnsMode};
use tun2socks::server::ServerConfig;
use tun2socks::upstream::{DialOptions, Upstream};

const V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 77);

fn query(id: u16, name: &str, rtype: RecordType) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(id);
    m.set_recursion_desired(true);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    m.to_bytes().unwrap()
}

/// dnsmasq on a free loopback port, killed when dropped.
async fn dnsmasq() -> (SocketAddr, Child) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("dnsmasq")
        .args([
            // Not --no-daemon: in that debug mode dnsmasq serves one TCP connection at a
            // time, inline, so a second pipelined connection waits for the first to close.
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--pid-file=",
            "--host-record=fake.test,192.0.2.77,2001:db8::77",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            &format!("--port={port}"),
        ])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    for _ in 0..100 {
        if TcpStream::connect(addr).await.is_ok() {
            return (addr, child);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("dnsmasq did not listen on {addr}");
}

#[tokio::test]
async fn dnsmasq_answers_over_tcp_through_socks() {
    if !require_program("dnsmasq") {
        return;
    }
    let (resolver, _dnsmasq) = dnsmasq().await;
    let server = TestServer::start(ServerConfig::default()).await;
    let config = DnsConfig {
        mode: DnsMode::Tcp,
        tcp_connections: 2,
        ..DnsConfig::default()
    };
    let proxy = format!("socks5://{}", server.addr).parse().unwrap();
    let dns = Arc::new(Dns::new(
        config,
        Upstream::new(proxy, DialOptions::default()),
    ));

    let tasks: Vec<_> = (0..20u16)
        .map(|i| {
            let dns = dns.clone();
            tokio::spawn(async move {
                let rtype = if i % 2 == 0 {
                    RecordType::A
                } else {
                    RecordType::AAAA
                };
                let q = query(0x2000 + i, "Fake.Test.", rtype);
                (i, rtype, dns.query_tcp(resolver, &q, 1452).await.unwrap())
            })
        })
        .collect();
    for task in tasks {
        let (i, rtype, answer) = task.await.unwrap();
        let m = Message::from_vec(&answer).unwrap();
        assert_eq!(m.id(), 0x2000 + i);
        assert_eq!(m.queries()[0].query_type(), rtype);
        let expected = match rtype {
            RecordType::A => RData::A(V4.into()),
            _ => RData::AAAA("2001:db8::77".parse::<Ipv6Addr>().unwrap().into()),
        };
        assert_eq!(m.answers()[0].data(), &expected, "answer to query {i}");
    }
    let s = dns.stats();
    assert_eq!(s.tcp_answers, 20);
    assert!(s.tcp_connections <= 2, "{s:?}");
}
