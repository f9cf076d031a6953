//! The stack driven through an in-memory device with hand-built packets (no TUN, no
//! root): what an application's kernel would see for new, unknown and refused
//! connections, and a full handshake with data through our SOCKS server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use common::memdev::{MTU, MemDevice};
use common::*;
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot};
use tun2socks::config::ProxyUrl;
use tun2socks::server::ServerConfig;
use tun2socks::stack::{self, StackConfig, StackStats};
use tun2socks::upstream::{DialOptions, Upstream};

/// The application's side of the device, and the running stack.
struct Harness {
    to_stack: mpsc::Sender<Vec<u8>>,
    from_stack: mpsc::Receiver<Vec<u8>>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<io::Result<StackStats>>,
}

impl Harness {
    fn start(proxy: &str, config: StackConfig) -> Harness {
        let (to_stack, rx) = mpsc::channel(4096);
        let (tx, from_stack) = mpsc::channel(4096);
        let device = MemDevice {
            rx: Mutex::new(rx),
            tx,
        };
        let upstream = Upstream::new(
            proxy.parse::<ProxyUrl>().unwrap(),
            DialOptions {
                connect_timeout: Duration::from_secs(2),
                handshake_timeout: Duration::from_secs(2),
                ..DialOptions::default()
            },
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(stack::run(device, config, upstream, async {
            let _ = stopped.await;
        }));
        Harness {
            to_stack,
            from_stack,
            stop: Some(stop),
            task,
        }
    }

    async fn send(&self, packet: Vec<u8>) {
        self.to_stack.send(packet).await.unwrap();
    }

    /// The next TCP segment from the stack, within `ms`.
    async fn recv(&mut self, ms: u64) -> Option<Segment> {
        let p = tokio::time::timeout(Duration::from_millis(ms), self.from_stack.recv())
            .await
            .ok()??;
        Some(Segment::parse(&p))
    }

    async fn stop(mut self) -> StackStats {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap()
    }
}

/// The fields of a TCP segment that the tests look at.
#[derive(Debug)]
struct Segment {
    src: SocketAddr,
    dst: SocketAddr,
    seq: u32,
    ack: Option<u32>,
    syn: bool,
    rst: bool,
    fin: bool,
    mss: Option<u16>,
    wscale: Option<u8>,
    /// The window field as sent (unscaled).
    window: u16,
    payload: Vec<u8>,
}

impl Segment {
    fn parse(p: &[u8]) -> Segment {
        let s = SlicedPacket::from_ip(p).expect("stack sent a malformed packet");
        let (src, dst): (IpAddr, IpAddr) = match s.net.unwrap() {
            NetSlice::Ipv4(ip) => (
                ip.header().source_addr().into(),
                ip.header().destination_addr().into(),
            ),
            NetSlice::Ipv6(ip) => (
                ip.header().source_addr().into(),
                ip.header().destination_addr().into(),
            ),
            _ => panic!("not IP"),
        };
        let Some(TransportSlice::Tcp(tcp)) = s.transport else {
            panic!("not TCP")
        };
        let mut mss = None;
        let mut wscale = None;
        for opt in tcp.options_iterator() {
            match opt.unwrap() {
                etherparse::TcpOptionElement::MaximumSegmentSize(m) => mss = Some(m),
                etherparse::TcpOptionElement::WindowScale(w) => wscale = Some(w),
                _ => {}
            }
        }
        Segment {
            src: SocketAddr::new(src, tcp.source_port()),
            dst: SocketAddr::new(dst, tcp.destination_port()),
            seq: tcp.sequence_number(),
            ack: tcp.ack().then(|| tcp.acknowledgment_number()),
            syn: tcp.syn(),
            rst: tcp.rst(),
            fin: tcp.fin(),
            mss,
            wscale,
            window: tcp.window_size(),
            payload: tcp.payload().to_vec(),
        }
    }
}

const APP: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(198, 18, 0, 2)), 40000);

/// A segment from the application to `dst`.
fn segment(
    src: SocketAddr,
    dst: SocketAddr,
    seq: u32,
    ack: Option<u32>,
    flags: &str,
    payload: &[u8],
) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) else {
        panic!("v4 only")
    };
    let mut b =
        PacketBuilder::ipv4(s.octets(), d.octets(), 64).tcp(src.port(), dst.port(), seq, 65535);
    if flags.contains('S') {
        b = b.syn();
    }
    if flags.contains('F') {
        b = b.fin();
    }
    if flags.contains('R') {
        b = b.rst();
    }
    if let Some(a) = ack {
        b = b.ack(a);
    }
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

fn dead_proxy() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("socks5://127.0.0.1:{port}")
}

#[tokio::test]
async fn unknown_connection_gets_rst() {
    let mut h = Harness::start(&dead_proxy(), StackConfig::default());
    let dst: SocketAddr = "10.20.30.40:443".parse().unwrap();
    h.send(segment(APP, dst, 1000, Some(77), "A", b"stray"))
        .await;
    let r = h.recv(2000).await.expect("no answer to a stray segment");
    assert!(r.rst, "{r:?}");
    assert_eq!((r.src, r.dst), (dst, APP));
    h.stop().await;
}

#[tokio::test]
async fn dead_proxy_means_connection_refused_at_once() {
    let mut h = Harness::start(&dead_proxy(), StackConfig::default());
    let dst: SocketAddr = "10.20.30.40:80".parse().unwrap();
    let started = std::time::Instant::now();
    h.send(segment(APP, dst, 5000, None, "S", b"")).await;
    let r = h.recv(3000).await.expect("no answer to the SYN");
    assert!(r.rst, "expected RST, got {r:?}");
    assert_eq!(r.ack, Some(5001), "the RST must acknowledge the SYN");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let stats = h.stop().await;
    assert_eq!(stats.flows_failed, 1);
}

#[tokio::test]
async fn socks_error_reply_becomes_icmp_for_the_syn_then_rst() {
    // Our server refuses the destination with 0x02 (not allowed).
    let server = TestServer::start(ServerConfig {
        deny: vec!["10.0.0.0/8".parse().unwrap()],
        ..ServerConfig::default()
    })
    .await;
    let mut h = Harness::start(&format!("socks5://{}", server.addr), StackConfig::default());
    let seq = 0x1234_5678;
    h.send(segment(
        APP,
        "10.1.1.1:22".parse().unwrap(),
        seq,
        None,
        "S",
        b"",
    ))
    .await;
    // First ICMP "communication administratively prohibited" from the destination,
    // quoting the SYN (its sequence number: what the application's stack checks).
    let icmp = tokio::time::timeout(Duration::from_secs(3), h.from_stack.recv())
        .await
        .expect("no answer")
        .unwrap();
    assert_eq!(&icmp[12..16], &[10, 1, 1, 1], "from the destination");
    assert_eq!((icmp[9], icmp[20], icmp[21]), (1, 3, 13), "ICMP 3/13");
    let quote = &icmp[28..];
    assert_eq!(quote[9], 6, "quotes a TCP segment");
    assert_eq!(&quote[22..24], &22u16.to_be_bytes());
    assert_eq!(&quote[24..28], &seq.to_be_bytes());
    // Then the reset, for a stack that does not take ICMP while connecting.
    let r = h.recv(3000).await.expect("no reset");
    assert!(r.rst && r.ack == Some(seq + 1), "{r:?}");
}

#[tokio::test]
async fn flow_limit_resets_new_connections() {
    // A "proxy" that accepts and never answers keeps the first flow connecting.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = format!("socks5://{}", silent.local_addr().unwrap());
    let _keep = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let config = StackConfig {
        max_flows: 1,
        ..StackConfig::default()
    };
    let mut h = Harness::start(&proxy, config);
    let dst: SocketAddr = "10.9.9.9:80".parse().unwrap();
    h.send(segment(APP, dst, 10, None, "S", b"")).await;
    assert!(
        h.recv(300).await.is_none(),
        "SYN-ACK before CONNECT finished"
    );
    // The application retransmits its SYN while the proxy is still silent: no
    // answer, and above all no reset.
    h.send(segment(APP, dst, 10, None, "S", b"")).await;
    if let Some(r) = h.recv(300).await {
        panic!("a retransmitted SYN was answered while CONNECT is pending: {r:?}");
    }
    let other: SocketAddr = "198.18.0.2:40001".parse().unwrap();
    h.send(segment(other, dst, 20, None, "S", b"")).await;
    let r = h.recv(2000).await.expect("second SYN not answered");
    assert!(r.rst && r.dst == other, "{r:?}");
    let stats = h.stop().await;
    assert_eq!(stats.flows_over_limit, 1);
}

#[tokio::test]
async fn syns_beyond_the_backlog_of_pending_connects_are_reset_at_once() {
    // A "proxy" that accepts and never answers: every CONNECT stays pending.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = format!("socks5://{}", silent.local_addr().unwrap());
    let _keep = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let mut h = Harness::start(&proxy, StackConfig::default());
    let dst: SocketAddr = "10.9.9.9:80".parse().unwrap();
    let extra = 5;
    for i in 0..stack::MAX_PENDING + extra {
        let src = SocketAddr::new(
            std::net::Ipv4Addr::from(0x0a00_0000 + 2 + (i as u32 / 60_000)).into(),
            1024 + (i % 60_000) as u16,
        );
        h.send(segment(src, dst, 10, None, "S", b"")).await;
    }
    let mut resets = 0;
    while let Some(r) = h.recv(1000).await {
        assert!(r.rst, "a pending SYN was answered: {r:?}");
        resets += 1;
    }
    assert_eq!(
        resets, extra,
        "SYNs beyond the backlog are reset, the rest wait"
    );
    let stats = h.stop().await;
    assert_eq!(stats.flows_over_limit, extra as u64, "{stats:?}");
    assert_eq!(stats.flows_opened, stack::MAX_PENDING as u64, "{stats:?}");
}

#[tokio::test]
async fn malformed_packets_are_dropped_and_counted() {
    let mut h = Harness::start(&dead_proxy(), StackConfig::default());
    for junk in [vec![], vec![0x45], vec![0x60; 39], vec![0xff; 100]] {
        h.send(junk).await;
    }
    assert!(h.recv(300).await.is_none());
    let stats = h.stop().await;
    assert_eq!(stats.dropped.get("malformed"), Some(&4), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_data_and_half_close_through_socks() {
    let server = TestServer::start(ServerConfig::default()).await;
    let echo = tcp_echo("127.0.0.1").await;
    let mut h = Harness::start(&format!("socks5://{}", server.addr), StackConfig::default());
    let dst = echo; // the stack accepts any destination; here it is reachable.

    h.send(segment(APP, dst, 100, None, "S", b"")).await;
    let synack = h.recv(3000).await.expect("no SYN-ACK");
    assert!(synack.syn && synack.ack == Some(101), "{synack:?}");
    assert_eq!(
        synack.mss,
        Some((MTU - 40) as u16),
        "MSS must match the MTU"
    );
    assert!(
        synack.wscale.is_none(),
        "no window scaling unless the SYN offered it"
    );
    let mut seq = 101;
    let their = synack.seq.wrapping_add(1);
    h.send(segment(APP, dst, seq, Some(their), "A", b"")).await;
    h.send(segment(APP, dst, seq, Some(their), "A", b"hello stack"))
        .await;
    seq += 11;

    let mut got = Vec::new();
    let mut acked = false;
    while got.len() < 11 {
        let s = h.recv(3000).await.expect("no echo");
        assert!(!s.rst, "{s:?}");
        acked |= s.ack == Some(seq);
        got.extend_from_slice(&s.payload);
    }
    assert_eq!(got, b"hello stack");
    assert!(acked, "our data was not acknowledged");

    // Half-close: the echo server sees EOF and closes; the FIN comes back.
    let back = their.wrapping_add(11);
    h.send(segment(APP, dst, seq, Some(back), "FA", b"")).await;
    let mut fin = false;
    for _ in 0..5 {
        match h.recv(3000).await {
            Some(s) if s.fin => {
                fin = true;
                break;
            }
            Some(_) => continue,
            None => break,
        }
    }
    assert!(fin, "the destination's FIN did not reach the application");
    let stats = h.stop().await;
    assert_eq!(stats.flows_connected, 1);
    assert_eq!(stats.bytes_up, 11);
    assert_eq!(stats.bytes_down, 11);
}

#[tokio::test]
async fn a_flow_to_the_proxy_itself_is_reset_not_relayed() {
    // The proxy's own address entering the tunnel would loop.
    let server = TestServer::start(ServerConfig::default()).await;
    let mut h = Harness::start(&format!("socks5://{}", server.addr), StackConfig::default());
    h.send(segment(APP, server.addr, 10, None, "S", b"")).await;
    let r = h.recv(2000).await.expect("no answer to the SYN");
    assert!(r.rst && r.ack == Some(11), "{r:?}");
    let stats = h.stop().await;
    assert_eq!(stats.loops_refused, 1);
    assert_eq!(stats.flows_opened, 0);
}

/// A UDP datagram from `src` to `dst`.
fn datagram(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) else {
        panic!("v4 only")
    };
    let mut out = Vec::new();
    PacketBuilder::ipv4(s.octets(), d.octets(), 64)
        .udp(src.port(), dst.port())
        .write(&mut out, payload)
        .unwrap();
    out
}

/// A DNS query for `name`, type A, id 0x1234 (RFC 1035 4.1).
fn a_query(name: &str) -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// The defaults with `--dns fake-ip` and the default pools.
fn fake_ip_config() -> StackConfig {
    StackConfig {
        dns: tun2socks::dns::DnsConfig {
            mode: tun2socks::dns::DnsMode::FakeIp,
            fake_pools: tun2socks::dns::DnsConfig::default_pools(),
            ..Default::default()
        },
        ..StackConfig::default()
    }
}

#[tokio::test]
async fn fake_ip_answers_through_the_stack_and_unknown_fake_addresses_are_reset() {
    let config = fake_ip_config();
    let mut h = Harness::start(&dead_proxy(), config);
    // Any address on port 53: the tunnel answers, from the address asked.
    let resolver: SocketAddr = "203.0.113.53:53".parse().unwrap();
    let app: SocketAddr = "198.18.0.1:5353".parse().unwrap();
    h.send(datagram(app, resolver, &a_query("example.test")))
        .await;
    let p = tokio::time::timeout(Duration::from_secs(2), h.from_stack.recv())
        .await
        .unwrap()
        .unwrap();
    let s = SlicedPacket::from_ip(&p).unwrap();
    let Some(TransportSlice::Udp(udp)) = s.transport else {
        panic!("expected a UDP answer")
    };
    assert_eq!(udp.source_port(), 53);
    let answer = udp.payload();
    assert_eq!(&answer[..2], &[0x12, 0x34], "the client's ID");
    assert_eq!(answer[3] & 0x0f, 0, "NOERROR");
    assert_eq!(
        &answer[answer.len() - 4..],
        &[198, 18, 128, 1],
        "first fake address"
    );
    // A fake address that no name holds: reset, never relayed anywhere.
    h.send(segment(
        APP,
        "198.18.200.1:80".parse().unwrap(),
        1,
        None,
        "S",
        b"",
    ))
    .await;
    let r = h.recv(2000).await.expect("no answer to the SYN");
    assert!(r.rst, "{r:?}");
    let stats = h.stop().await;
    assert_eq!(stats.dns.answered_fake, 1);
    assert_eq!(stats.dns.fake_unknown, 1);
    assert_eq!(stats.flows_opened, 0);
}

#[tokio::test(start_paused = true)]
async fn an_idle_stack_does_not_spin_after_an_hour() {
    // A "far" sleep deadline computed once at start lies in the past an hour later:
    // the loop would then wake without end. Time is paused, so an hour passes at once.
    let h = Harness::start(&dead_proxy(), StackConfig::default());
    tokio::task::yield_now().await;
    for _ in 0..3 {
        tokio::time::advance(Duration::from_secs(3700)).await;
        for _ in 0..1000 {
            tokio::task::yield_now().await;
        }
    }
    let stats = h.stop().await;
    assert!(
        stats.wakeups <= 10,
        "an idle stack woke {} times in three hours",
        stats.wakeups
    );
}

#[tokio::test]
async fn a_reset_during_a_pending_connect_releases_the_flow_and_its_proxy_socket() {
    // A proxy that accepts and then never answers: the CONNECT stays pending.
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("socks5://{}", proxy.local_addr().unwrap());
    let config = StackConfig {
        max_flows: 1,
        ..StackConfig::default()
    };
    let mut h = Harness::start(&url, config);
    let dst: SocketAddr = "10.20.30.40:80".parse().unwrap();
    h.send(segment(APP, dst, 100, None, "S", b"")).await;
    let (mut held, _) = tokio::time::timeout(Duration::from_secs(2), proxy.accept())
        .await
        .expect("the flow did not dial the proxy")
        .unwrap();
    // The application gives up: RST in sequence.
    h.send(segment(APP, dst, 101, None, "R", b"")).await;
    // The flow drops its proxy connection at once (EOF at the proxy), not after the
    // connect timeout.
    let mut buf = [0u8; 64];
    let eof = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match held.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // the greeting
            }
        }
    })
    .await;
    assert!(eof.is_ok(), "the proxy connection was kept after the reset");
    // Its place under --max-flows (1) is free again: a new SYN is accepted, not reset
    // for the limit, and a SYN on the old tuple starts a new flow too.
    for (src, dst) in [(APP, dst), ("10.0.0.2:40001".parse().unwrap(), dst)] {
        tokio::time::sleep(Duration::from_millis(50)).await;
        h.send(segment(src, dst, 500, None, "S", b"")).await;
        let (conn, _) = tokio::time::timeout(Duration::from_secs(2), proxy.accept())
            .await
            .expect("no new flow after the reset")
            .unwrap();
        drop(conn); // the flow fails; its SYN gets a reset
        let r = h.recv(2000).await.expect("no answer to the SYN");
        assert!(r.rst, "{r:?}");
    }
    let stats = h.stop().await;
    assert_eq!(stats.flows_over_limit, 0, "{stats:?}");
    assert_eq!(stats.flows_opened, 3, "{stats:?}");
}

#[path = "stack_memory/buffers.rs"]
mod buffers;

/// `--dns fake-ip`: a TCP connection to port 53 is answered in the tunnel (the proxy
/// here is dead): SYN-ACK at once, a framed query gets its framed fake answer, and
/// the application's FIN is answered with ours.
#[tokio::test]
async fn fake_ip_answers_dns_over_tcp_in_the_tunnel() {
    let config = fake_ip_config();
    let mut h = Harness::start(&dead_proxy(), config);
    let resolver: SocketAddr = "203.0.113.53:53".parse().unwrap();
    h.send(segment(APP, resolver, 100, None, "S", b"")).await;
    let syn_ack = h.recv(2000).await.expect("no answer to the SYN");
    assert!(syn_ack.syn && !syn_ack.rst, "{syn_ack:?}");
    let mut ours = syn_ack.seq.wrapping_add(1);
    let query = a_query("example.test");
    let mut framed = (query.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&query);
    h.send(segment(APP, resolver, 101, Some(ours), "", b""))
        .await;
    h.send(segment(APP, resolver, 101, Some(ours), "", &framed))
        .await;
    let mut got = Vec::new();
    while got.len() < 2 || got.len() < 2 + usize::from(u16::from_be_bytes([got[0], got[1]])) {
        let s = h.recv(2000).await.expect("no answer over TCP");
        assert!(!s.rst, "{s:?}");
        if !s.payload.is_empty() {
            ours = s.seq.wrapping_add(s.payload.len() as u32);
            got.extend_from_slice(&s.payload);
        }
    }
    let answer = &got[2..];
    assert_eq!(&answer[..2], &[0x12, 0x34], "the client's ID");
    assert_eq!(answer[3] & 0x0f, 0, "NOERROR");
    assert_eq!(&answer[answer.len() - 4..], &[198, 18, 128, 1]);
    // The application closes; the tunnel closes too.
    let at = 101 + framed.len() as u32;
    h.send(segment(APP, resolver, at, Some(ours), "F", b""))
        .await;
    let mut fin = false;
    for _ in 0..4 {
        match h.recv(2000).await {
            Some(s) if s.fin => {
                fin = true;
                break;
            }
            Some(s) => assert!(!s.rst, "{s:?}"),
            None => break,
        }
    }
    assert!(fin, "no FIN from the tunnel");
    let stats = h.stop().await;
    assert_eq!(stats.dns.answered_fake, 1);
    assert_eq!(stats.flows_failed, 0);
}

/// A query for `name` of type `qtype` (AXFR is 252), id 0x1234, framed for TCP.
fn framed_query(name: &str, qtype: u16) -> Vec<u8> {
    let mut query = a_query(name);
    let at = query.len() - 4;
    query[at..at + 2].copy_from_slice(&qtype.to_be_bytes());
    let mut framed = (query.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&query);
    framed
}

/// A SOCKS5 proxy that is also the resolver behind it: it takes one CONNECT, sends
/// where it was asked to go, reads one framed query and answers it with `answers`
/// (already framed), then closes.
async fn transfer_proxy(answers: Vec<u8>) -> (SocketAddr, oneshot::Receiver<(Vec<u8>, Vec<u8>)>) {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut greeting = [0u8; 3];
        s.read_exact(&mut greeting).await.unwrap();
        s.write_all(&[5, 0]).await.unwrap();
        let mut request = [0u8; 10];
        s.read_exact(&mut request).await.unwrap();
        s.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0]).await.unwrap();
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await.unwrap();
        let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut query).await.unwrap();
        s.write_all(&answers).await.unwrap();
        s.shutdown().await.unwrap();
        let _ = tx.send((request.to_vec(), query));
    });
    (addr, rx)
}

/// The application's side of one TCP connection through the harness: the bytes of
/// the stream that come back, until the tunnel's FIN.
async fn read_to_fin(h: &mut Harness, resolver: SocketAddr, at: u32) -> Vec<u8> {
    let mut got = Vec::new();
    loop {
        let s = h.recv(3000).await.expect("no FIN from the tunnel");
        assert!(!s.rst, "{s:?}");
        if !s.payload.is_empty() {
            got.extend_from_slice(&s.payload);
            let acked = s.seq.wrapping_add(s.payload.len() as u32);
            h.send(segment(APP, resolver, at, Some(acked), "A", b""))
                .await;
        }
        if s.fin {
            return got;
        }
    }
}

/// Opens a TCP connection from the application to a resolver's port 53 (sequence
/// 100): the resolver's address, and the first sequence number of ours.
async fn open_to_resolver(h: &mut Harness) -> (SocketAddr, u32) {
    let resolver: SocketAddr = "203.0.113.53:53".parse().unwrap();
    h.send(segment(APP, resolver, 100, None, "S", b"")).await;
    let syn_ack = h.recv(2000).await.expect("no answer to the SYN");
    assert!(syn_ack.syn && !syn_ack.rst, "{syn_ack:?}");
    (resolver, syn_ack.seq.wrapping_add(1))
}

/// `--dns fake-ip` answers DNS over TCP in the tunnel, one answer per query; a zone
/// transfer is answered by a stream of messages, so a connection whose first query
/// is AXFR goes to the resolver through the proxy as it stands: every message comes
/// back. It used to get the first message only, and then nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_ip_passes_a_zone_transfer_through_whole() {
    let mut answers = Vec::new();
    for message in [&b"SOA first"[..], b"A records", b"SOA again"] {
        answers.extend_from_slice(&(message.len() as u16).to_be_bytes());
        answers.extend_from_slice(message);
    }
    let (proxy, asked) = transfer_proxy(answers.clone()).await;
    let mut h = Harness::start(&format!("socks5://{proxy}"), fake_ip_config());
    let (resolver, ours) = open_to_resolver(&mut h).await;
    let query = framed_query("zone.test", 252);
    h.send(segment(APP, resolver, 101, Some(ours), "", &query))
        .await;
    let at = 101 + query.len() as u32;
    assert_eq!(read_to_fin(&mut h, resolver, at).await, answers);
    let (request, seen) = asked.await.unwrap();
    assert_eq!(
        &request[3..],
        &[1, 203, 0, 113, 53, 0, 53],
        "CONNECT resolver:53"
    );
    assert_eq!(seen, query[2..], "the query reached the resolver unchanged");
    let stats = h.stop().await;
    assert_eq!(stats.flows_connected, 1);
    assert_eq!(stats.dns.answered_fake, 0);
}

/// After other queries on the same connection, a zone transfer cannot be handed
/// over: it is refused (REFUSED), and the connection goes on.
#[tokio::test]
async fn fake_ip_refuses_a_zone_transfer_after_other_queries() {
    let mut h = Harness::start(&dead_proxy(), fake_ip_config());
    let (resolver, ours) = open_to_resolver(&mut h).await;
    let mut stream = framed_query("example.test", 1);
    stream.extend_from_slice(&framed_query("zone.test", 252));
    h.send(segment(APP, resolver, 101, Some(ours), "", &stream))
        .await;
    let mut got = Vec::new();
    let mut messages = Vec::new();
    while messages.len() < 2 {
        let s = h.recv(2000).await.expect("no answers over TCP");
        assert!(!s.rst, "{s:?}");
        got.extend_from_slice(&s.payload);
        while got.len() >= 2 && got.len() >= 2 + usize::from(u16::from_be_bytes([got[0], got[1]])) {
            let len = 2 + usize::from(u16::from_be_bytes([got[0], got[1]]));
            messages.push(got.drain(..len).skip(2).collect::<Vec<u8>>());
        }
    }
    assert_eq!(messages[0][3] & 0x0f, 0, "the A query: NOERROR");
    assert_eq!(&messages[0][messages[0].len() - 4..], &[198, 18, 128, 1]);
    assert_eq!(messages[1][3] & 0x0f, 5, "the transfer: REFUSED");
    let stats = h.stop().await;
    assert_eq!(stats.flows_connected, 0, "nothing went to the proxy");
}

/// A zone transfer whose proxy cannot be reached: the application's connection,
/// already accepted for the tunnel's own DNS answers, is reset (not left hanging).
#[tokio::test]
async fn fake_ip_resets_a_zone_transfer_the_proxy_cannot_carry() {
    let mut h = Harness::start(&dead_proxy(), fake_ip_config());
    let (resolver, ours) = open_to_resolver(&mut h).await;
    let query = framed_query("zone.test", 252);
    h.send(segment(APP, resolver, 101, Some(ours), "", &query))
        .await;
    let mut reset = false;
    for _ in 0..4 {
        match h.recv(3000).await {
            Some(s) if s.rst => {
                reset = true;
                break;
            }
            Some(s) => assert!(s.payload.is_empty(), "an answer came: {s:?}"),
            None => break,
        }
    }
    assert!(reset, "no reset");
    let stats = h.stop().await;
    assert_eq!(stats.flows_failed, 1);
}
