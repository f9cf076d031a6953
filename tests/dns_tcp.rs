//! DNS over TCP through SOCKS on loopback: our SOCKS server in-process, and a small
//! TCP DNS responder written here that can delay, answer out of order, close mid-way,
//! stay silent or answer big. Checks ID restoring and rewriting, pipelining over a
//! capped number of connections, retry once, deadlines, truncation, idle close; and a
//! real resolver (dnsmasq) when installed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::TestServer;
use hickory_proto::op::{Edns, Message, MessageType, Query};
use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::BinEncodable;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tun2socks::dns::{Dns, DnsConfig, DnsError, DnsMode, TcpError};
use tun2socks::server::ServerConfig;
use tun2socks::upstream::{DialOptions, Upstream};

/// What the responder does.
#[derive(Clone, Copy, Debug)]
enum Behaviour {
    /// Answer each query after this delay (concurrently: fast ones overtake slow ones).
    Delay(Duration),
    /// Collect this many queries, then answer them last first.
    Reverse(usize),
    /// The first connection reads one query and closes; later ones answer at once.
    DropFirst,
    /// Every connection reads one query and closes.
    AlwaysDrop,
    /// Read and never answer.
    Silent,
    /// The first connection reads and never answers; later ones answer at once.
    SilentFirst,
    /// Answer with 30 TXT records of 100 bytes (about 3.5 KB).
    Large,
}

#[derive(Default)]
struct Seen {
    accepts: AtomicUsize,
    /// (connection number, message ID on the wire) of every query received.
    ids: Mutex<Vec<(usize, u16)>>,
}

/// The address encoded in the answer for `q{i}.test`.
fn address_for(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, (i / 256) as u8, (i % 256) as u8)
}

fn query(id: u16, name: &str, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(id);
    m.set_recursion_desired(true);
    let rtype = if name.starts_with("big") {
        RecordType::TXT
    } else {
        RecordType::A
    };
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m.to_bytes().unwrap()
}

fn respond(query: &[u8], large: bool) -> Vec<u8> {
    let mut m = Message::from_vec(query).unwrap();
    m.set_message_type(MessageType::Response);
    m.set_recursion_available(true);
    let name = m.queries()[0].name().clone();
    if large {
        for _ in 0..30 {
            let txt = TXT::new(vec!["y".repeat(100)]);
            m.add_answer(Record::from_rdata(name.clone(), 60, RData::TXT(txt)));
        }
    } else {
        let label = name.iter().next().unwrap();
        let i: usize = std::str::from_utf8(&label[1..]).unwrap().parse().unwrap();
        m.add_answer(Record::from_rdata(
            name,
            60,
            RData::A(address_for(i).into()),
        ));
    }
    m.to_bytes().unwrap()
}

async fn responder(behaviour: Behaviour) -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let shared = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let conn = shared.accepts.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(stream, conn, behaviour, shared.clone()));
        }
    });
    (addr, seen)
}

async fn serve(stream: tokio::net::TcpStream, conn: usize, behaviour: Behaviour, seen: Arc<Seen>) {
    let (mut rd, wr) = stream.into_split();
    let wr = Arc::new(tokio::sync::Mutex::new(wr));
    let mut held = Vec::new();
    loop {
        let Ok(len) = rd.read_u16().await else { return };
        let mut q = vec![0u8; usize::from(len)];
        if rd.read_exact(&mut q).await.is_err() {
            return;
        }
        seen.ids
            .lock()
            .unwrap()
            .push((conn, u16::from_be_bytes([q[0], q[1]])));
        let answer = match behaviour {
            Behaviour::DropFirst if conn == 0 => return,
            Behaviour::AlwaysDrop => return,
            Behaviour::Silent => continue,
            Behaviour::SilentFirst if conn == 0 => continue,
            Behaviour::Reverse(n) => {
                held.push(q);
                if held.len() == n {
                    let mut w = wr.lock().await;
                    for q in held.drain(..).rev() {
                        write_frame(&mut w, &respond(&q, false)).await;
                    }
                }
                continue;
            }
            Behaviour::Large => respond(&q, true),
            Behaviour::Delay(_) | Behaviour::DropFirst | Behaviour::SilentFirst => {
                respond(&q, false)
            }
        };
        let delay = match behaviour {
            Behaviour::Delay(d) => d,
            _ => Duration::ZERO,
        };
        let wr = wr.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            write_frame(&mut *wr.lock().await, &answer).await;
        });
    }
}

async fn write_frame(w: &mut tokio::net::tcp::OwnedWriteHalf, message: &[u8]) {
    let mut frame = (message.len() as u16).to_be_bytes().to_vec();
    frame.extend_from_slice(message);
    let _ = w.write_all(&frame).await;
}

fn dns_via(server: &TestServer, scheme: &str, f: impl FnOnce(&mut DnsConfig)) -> Arc<Dns> {
    let mut config = DnsConfig {
        mode: DnsMode::Tcp,
        ..DnsConfig::default()
    };
    f(&mut config);
    let proxy = format!("{scheme}://{}", server.addr).parse().unwrap();
    Arc::new(Dns::new(
        config,
        Upstream::new(proxy, DialOptions::default()),
    ))
}

fn a_record(answer: &[u8]) -> (u16, String, Ipv4Addr) {
    let m = Message::from_vec(answer).unwrap();
    let name = m.queries()[0].name().to_ascii();
    match m.answers()[0].data() {
        RData::A(a) => (m.id(), name, a.0),
        other => panic!("unexpected record {other:?}"),
    }
}

#[tokio::test]
async fn answers_come_back_with_the_client_id() {
    let server = TestServer::start(ServerConfig::default()).await;
    let (resolver, seen) = responder(Behaviour::Delay(Duration::ZERO)).await;
    let dns = dns_via(&server, "socks5", |_| {});
    let answer = dns
        .query_tcp(resolver, &query(0x1111, "q5.test.", None), 1452)
        .await
        .unwrap();
    assert_eq!(
        a_record(&answer),
        (0x1111, "q5.test.".into(), address_for(5))
    );
    assert_eq!(seen.accepts.load(Ordering::SeqCst), 1);
    let s = dns.stats();
    assert_eq!((s.tcp_answers, s.tcp_connections, s.truncated), (1, 1, 0));
}

#[tokio::test]
async fn concurrent_queries_are_pipelined_over_capped_connections() {
    let server = TestServer::start(ServerConfig::default()).await;
    let (resolver, seen) = responder(Behaviour::Delay(Duration::from_millis(50))).await;
    let dns = dns_via(&server, "socks5", |c| {
        c.tcp_connections = 2;
        c.tcp_pipeline = 8;
    });
    // 40 clients, all using the same message ID.
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let dns = dns.clone();
            tokio::spawn(async move {
                let q = query(0x0707, &format!("q{i}.test."), None);
                (i, dns.query_tcp(resolver, &q, 1452).await)
            })
        })
        .collect();
    for task in tasks {
        let (i, answer) = task.await.unwrap();
        let answer = answer.unwrap();
        assert_eq!(
            a_record(&answer),
            (0x0707, format!("q{i}.test."), address_for(i))
        );
    }
    let accepts = seen.accepts.load(Ordering::SeqCst);
    assert!(
        (1..=2).contains(&accepts),
        "{accepts} connections for a cap of 2"
    );
    // IDs were rewritten: unique within each connection.
    let ids = seen.ids.lock().unwrap().clone();
    assert_eq!(ids.len(), 40);
    let mut unique = ids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), 40, "duplicate IDs on one connection: {ids:?}");
}

#[tokio::test]
async fn out_of_order_answers_are_matched() {
    let server = TestServer::start(ServerConfig::default()).await;
    let (resolver, seen) = responder(Behaviour::Reverse(5)).await;
    let dns = dns_via(&server, "socks5", |c| {
        c.tcp_connections = 1;
        c.tcp_pipeline = 5;
    });
    let tasks: Vec<_> = (0..5)
        .map(|i| {
            let dns = dns.clone();
            tokio::spawn(async move {
                let q = query(100 + i as u16, &format!("q{i}.test."), None);
                (i, dns.query_tcp(resolver, &q, 1452).await.unwrap())
            })
        })
        .collect();
    for task in tasks {
        let (i, answer) = task.await.unwrap();
        assert_eq!(
            a_record(&answer),
            (100 + i as u16, format!("q{i}.test."), address_for(i))
        );
    }
    assert_eq!(seen.accepts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_dropped_connection_is_retried_once() {
    let server = TestServer::start(ServerConfig::default()).await;
    let (resolver, seen) = responder(Behaviour::DropFirst).await;
    let dns = dns_via(&server, "socks5", |_| {});
    let answer = dns
        .query_tcp(resolver, &query(9, "q9.test.", None), 1452)
        .await
        .unwrap();
    assert_eq!(a_record(&answer), (9, "q9.test.".into(), address_for(9)));
    assert_eq!(seen.accepts.load(Ordering::SeqCst), 2);
    assert_eq!(dns.stats().tcp_retries, 1);
}

#[tokio::test]
async fn a_resolver_that_always_drops_fails_after_one_retry() {
    let server = TestServer::start(ServerConfig::default()).await;
    let (resolver, seen) = responder(Behaviour::AlwaysDrop).await;
    let dns = dns_via(&server, "socks5", |_| {});
    let err = dns
        .query_tcp(resolver, &query(9, "q9.test.", None), 1452)
        .await
        .unwrap_err();
    assert!(matches!(err, DnsError::Tcp(TcpError::Lost { .. })), "{err}");
    assert_eq!(seen.accepts.load(Ordering::SeqCst), 2);
    let s = dns.stats();
    assert_eq!((s.tcp_retries, s.tcp_errors), (1, 1));
    // The failed connection's queries get a SERVFAIL from the helper.
    assert!(dns.servfail(&query(9, "q9.test.", None)).is_some());
}

#[tokio::test]
async fn a_refusing_proxy_fails_the_query_after_one_retry() {
    // A SOCKS server that denies the resolver's address: CONNECT fails twice.
    let server = TestServer::start(ServerConfig {
        deny: vec!["127.0.0.0/8".parse().unwrap()],
        ..ServerConfig::default()
    })
    .await;
    let (resolver, seen) = responder(Behaviour::Delay(Duration::ZERO)).await;
    let dns = dns_via(&server, "socks5", |_| {});
    let err = dns
        .query_tcp(resolver, &query(9, "q9.test.", None), 1452)
        .await
        .unwrap_err();
    assert!(matches!(err, DnsError::Tcp(TcpError::Lost { .. })), "{err}");
    assert_eq!(seen.accepts.load(Ordering::SeqCst), 0);
    assert_eq!(dns.stats().tcp_connections, 2);
}

#[tokio::test]
async fn a_silent_resolver_times_out() {
    let server = TestServer::start(ServerConfig::default()).await;
    let (resolver, _seen) = responder(Behaviour::Silent).await;
    let dns = dns_via(&server, "socks5", |c| {
        c.query_timeout = Duration::from_secs(1);
        c.tcp_connections = 1;
        c.tcp_pipeline = 1;
    });
    let started = Instant::now();
    for id in 0..2 {
        let err = dns
            .query_tcp(resolver, &query(id, "q1.test.", None), 1452)
            .await
            .unwrap_err();
        assert!(
            matches!(err, DnsError::Tcp(TcpError::Timeout { .. })),
            "{err}"
        );
    }
    // Generous bound: two 1 s deadlines, not a hang (the second query got the slot
    // the first one gave up).
    assert!(started.elapsed() < Duration::from_secs(8));
    assert_eq!(dns.stats().tcp_timeouts, 2);
}

#[tokio::test]
async fn a_connection_silent_past_a_deadline_is_replaced() {
    let server = TestServer::start(ServerConfig::default()).await;
    let (resolver, seen) = responder(Behaviour::SilentFirst).await;
    let dns = dns_via(&server, "socks5", |c| {
        c.query_timeout = Duration::from_secs(1);
        c.tcp_connections = 1;
    });
    let err = dns
        .query_tcp(resolver, &query(1, "q1.test.", None), 1452)
        .await
        .unwrap_err();
    assert!(
        matches!(err, DnsError::Tcp(TcpError::Timeout { .. })),
        "{err}"
    );
    // The silent connection is given up: the next query gets a fresh one.
    let answer = dns
        .query_tcp(resolver, &query(2, "q2.test.", None), 1452)
        .await
        .unwrap();
    assert_eq!(a_record(&answer), (2, "q2.test.".into(), address_for(2)));
    assert_eq!(seen.accepts.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn large_answers_are_truncated_to_what_the_client_takes() {
    let server = TestServer::start(ServerConfig::default()).await;
    let (resolver, _seen) = responder(Behaviour::Large).await;
    let dns = dns_via(&server, "socks5", |_| {});
    let check_truncated = |answer: &[u8], id: u16, limit: usize| {
        assert!(answer.len() <= limit, "{} > {limit}", answer.len());
        let m = Message::from_vec(answer).unwrap();
        assert!(m.truncated());
        assert_eq!(m.id(), id);
        assert_eq!(m.queries()[0].name().to_ascii(), "big.test.");
        assert!(m.answers().is_empty());
    };
    // No EDNS: 512 bytes.
    let answer = dns
        .query_tcp(resolver, &query(1, "big.test.", None), 1452)
        .await
        .unwrap();
    check_truncated(&answer, 1, 512);
    // EDNS 4096, but the MTU allows 1452.
    let answer = dns
        .query_tcp(resolver, &query(2, "big.test.", Some(4096)), 1452)
        .await
        .unwrap();
    check_truncated(&answer, 2, 1452);
    // EDNS 1232 with a large MTU: the client's size wins.
    let answer = dns
        .query_tcp(resolver, &query(3, "big.test.", Some(1232)), 65_000)
        .await
        .unwrap();
    check_truncated(&answer, 3, 1232);
    // EDNS 4096 and a large MTU: the whole answer.
    let answer = dns
        .query_tcp(resolver, &query(4, "big.test.", Some(4096)), 65_000)
        .await
        .unwrap();
    let m = Message::from_vec(&answer).unwrap();
    assert!(!m.truncated() && answer.len() > 3000);
    assert_eq!((m.id(), m.answers().len()), (4, 30));
    assert_eq!(dns.stats().truncated, 3);
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let server = TestServer::start(ServerConfig::default()).await;
    let (resolver, seen) = responder(Behaviour::Delay(Duration::ZERO)).await;
    let dns = dns_via(&server, "socks5", |c| {
        c.tcp_idle = Duration::from_millis(200)
    });
    dns.query_tcp(resolver, &query(1, "q1.test.", None), 1452)
        .await
        .unwrap();
    assert_eq!(dns.tcp_connections(resolver), 1);
    let closed_by = Instant::now() + Duration::from_secs(5);
    while dns.tcp_connections(resolver) > 0 {
        assert!(
            Instant::now() < closed_by,
            "the idle connection was not closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    dns.query_tcp(resolver, &query(2, "q2.test.", None), 1452)
        .await
        .unwrap();
    assert_eq!(seen.accepts.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn works_through_socks4() {
    let server = TestServer::start(ServerConfig::default()).await;
    let (resolver, _seen) = responder(Behaviour::Delay(Duration::ZERO)).await;
    let dns = dns_via(&server, "socks4", |_| {});
    let answer = dns
        .query_tcp(resolver, &query(0x4444, "q44.test.", None), 1452)
        .await
        .unwrap();
    assert_eq!(
        a_record(&answer),
        (0x4444, "q44.test.".into(), address_for(44))
    );
}
