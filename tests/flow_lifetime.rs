//! A flow's lifetime, seen on raw packets through an in-memory device: the idle limit
//! (`--tcp-idle-timeout`) resets an idle flow on both sides and spares an active one;
//! keep-alive probes (`--tcp-keepalive`) go to the application, keep a flow whose
//! application answers them alive past the stack's timeout, and free the flow once
//! the application vanished. The proxy is a minimal SOCKS5 responder in the test that
//! echoes and reports how its connection ended (EOF, or a reset).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tun2socks::config::ProxyUrl;
use tun2socks::stack::{self, StackConfig, StackStats};
use tun2socks::upstream::{DialOptions, Upstream};

use common::memdev::MemDevice;

/// How the proxy's connection for one flow ended.
#[derive(Debug, PartialEq, Eq)]
enum ProxyEnd {
    Eof,
    Reset,
}

/// A SOCKS5 "proxy" that accepts any CONNECT (no auth, IPv4), then echoes; each
/// connection's end is reported on the channel.
async fn echo_proxy() -> (SocketAddr, mpsc::UnboundedReceiver<ProxyEnd>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                common::accept_socks5_connect(&mut s).await.unwrap();
                let mut buf = [0u8; 4096];
                let end = loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break ProxyEnd::Eof,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                break ProxyEnd::Reset;
                            }
                        }
                        Err(_) => break ProxyEnd::Reset,
                    }
                };
                let _ = tx.send(end);
            });
        }
    });
    (addr, rx)
}

struct Harness {
    to_stack: mpsc::Sender<Vec<u8>>,
    from_stack: mpsc::Receiver<Vec<u8>>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<io::Result<StackStats>>,
    /// Every segment received, with when.
    log: Vec<(Instant, Segment)>,
}

impl Harness {
    fn start(proxy: SocketAddr, config: StackConfig, options: DialOptions) -> Harness {
        let (to_stack, rx) = mpsc::channel(4096);
        let (tx, from_stack) = mpsc::channel(4096);
        let device = MemDevice {
            rx: Mutex::new(rx),
            tx,
        };
        let url: ProxyUrl = format!("socks5://{proxy}").parse().unwrap();
        let upstream = Upstream::new(url, options);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(stack::run(device, config, upstream, async {
            let _ = stopped.await;
        }));
        Harness {
            to_stack,
            from_stack,
            stop: Some(stop),
            task,
            log: Vec::new(),
        }
    }

    async fn send(&self, packet: Vec<u8>) {
        self.to_stack.send(packet).await.unwrap();
    }

    async fn recv(&mut self, ms: u64) -> Option<Segment> {
        let p = tokio::time::timeout(Duration::from_millis(ms), self.from_stack.recv())
            .await
            .ok()??;
        let s = Segment::parse(&p);
        self.log.push((Instant::now(), s.clone()));
        Some(s)
    }

    async fn stop(mut self) -> StackStats {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap()
    }
}

#[derive(Debug, Clone)]
struct Segment {
    dst: SocketAddr,
    seq: u32,
    syn: bool,
    rst: bool,
    payload: Vec<u8>,
}

impl Segment {
    fn parse(p: &[u8]) -> Segment {
        let s = SlicedPacket::from_ip(p).expect("stack sent a malformed packet");
        let dst: IpAddr = match s.net.unwrap() {
            NetSlice::Ipv4(ip) => ip.header().destination_addr().into(),
            NetSlice::Ipv6(ip) => ip.header().destination_addr().into(),
            _ => panic!("not IP"),
        };
        let Some(TransportSlice::Tcp(tcp)) = s.transport else {
            panic!("not TCP")
        };
        Segment {
            dst: SocketAddr::new(dst, tcp.destination_port()),
            seq: tcp.sequence_number(),
            syn: tcp.syn(),
            rst: tcp.rst(),
            payload: tcp.payload().to_vec(),
        }
    }
}

fn segment(
    src: SocketAddr,
    dst: SocketAddr,
    seq: u32,
    ack: u32,
    flags: &str,
    data: &[u8],
) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) else {
        panic!("v4 only")
    };
    let mut b =
        PacketBuilder::ipv4(s.octets(), d.octets(), 64).tcp(src.port(), dst.port(), seq, 65535);
    if flags.contains('S') {
        b = b.syn();
    }
    if flags.contains('A') {
        b = b.ack(ack);
    }
    let mut out = Vec::new();
    b.write(&mut out, data).unwrap();
    out
}

const DST: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 7, 7, 7)), 80);

fn app(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)), port)
}

/// The application's side of one connection: next sequence numbers each way.
#[derive(Debug, Clone, Copy)]
struct Conn {
    src: SocketAddr,
    seq: u32,
    ack: u32,
}

/// SYN, SYN-ACK, ACK for `src`; segments for other connections are ignored.
async fn open(h: &mut Harness, src: SocketAddr) -> Conn {
    h.send(segment(src, DST, 1000, 0, "S", b"")).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        assert!(Instant::now() < deadline, "no SYN-ACK for {src}");
        let Some(s) = h.recv(3000).await else {
            continue;
        };
        if s.dst == src && s.syn {
            let conn = Conn {
                src,
                seq: 1001,
                ack: s.seq.wrapping_add(1),
            };
            h.send(segment(src, DST, conn.seq, conn.ack, "A", b""))
                .await;
            return conn;
        }
    }
}

fn options(idle: Option<Duration>, keepalive: Option<Duration>) -> DialOptions {
    DialOptions {
        connect_timeout: Duration::from_secs(2),
        handshake_timeout: Duration::from_secs(2),
        idle_timeout: idle,
        keepalive,
        ..DialOptions::default()
    }
}

/// Sends `data` on `conn` and waits for the echo; acknowledges it. Returns the
/// segments for other connections that arrived meanwhile (a reset of another flow
/// may come while this one waits for its echo).
async fn echo(h: &mut Harness, conn: &mut Conn, data: &[u8]) -> Vec<Segment> {
    h.send(segment(conn.src, DST, conn.seq, conn.ack, "A", data))
        .await;
    conn.seq = conn.seq.wrapping_add(data.len() as u32);
    let mut got = 0;
    let mut others = Vec::new();
    while got < data.len() {
        let s = h.recv(3000).await.expect("no echo");
        if s.dst != conn.src {
            others.push(s);
            continue;
        }
        assert!(!s.rst, "the active flow was reset");
        if !s.payload.is_empty() && s.seq == conn.ack {
            got += s.payload.len();
            conn.ack = conn.ack.wrapping_add(s.payload.len() as u32);
        }
    }
    h.send(segment(conn.src, DST, conn.seq, conn.ack, "A", b""))
        .await;
    others
}

#[tokio::test]
async fn an_idle_flow_is_reset_both_ways_and_an_active_one_is_not() {
    let (proxy, mut ends) = echo_proxy().await;
    let idle = Duration::from_millis(1500);
    let mut h = Harness::start(proxy, StackConfig::default(), options(Some(idle), None));
    let quiet = open(&mut h, app(40001)).await;
    let mut busy = open(&mut h, app(40002)).await;
    let started = Instant::now();
    let mut quiet_reset = None;
    // The busy flow talks every 300 ms for 3.5 s: more than twice the limit.
    while started.elapsed() < Duration::from_millis(3500) {
        let during = echo(&mut h, &mut busy, b"ping").await;
        let pause = Instant::now() + Duration::from_millis(300);
        let mut seen = during.into_iter();
        while let Some(s) = match seen.next() {
            Some(s) => Some(s),
            None => {
                h.recv(pause.saturating_duration_since(Instant::now()).as_millis() as u64)
                    .await
            }
        } {
            assert!(
                !(s.rst && s.dst == busy.src),
                "the active flow was reset: {s:?}"
            );
            if s.rst && s.dst == quiet.src && quiet_reset.is_none() {
                quiet_reset = Some(started.elapsed());
            }
        }
    }
    let at = quiet_reset.expect("the idle flow got no RST");
    assert!(
        at >= idle - Duration::from_millis(200) && at < idle + Duration::from_secs(1),
        "idle flow reset after {at:?} (limit {idle:?})"
    );
    let end = tokio::time::timeout(Duration::from_secs(1), ends.recv())
        .await
        .expect("the proxy side of the idle flow stayed open")
        .unwrap();
    assert_eq!(
        end,
        ProxyEnd::Reset,
        "the proxy must see a reset, not a FIN"
    );
    assert!(
        ends.try_recv().is_err(),
        "the active flow's proxy connection ended"
    );
    let stats = h.stop().await;
    assert_eq!(stats.flows_connected, 2, "{stats:?}");
}

#[tokio::test]
async fn keepalive_probes_keep_an_answering_app_and_free_a_vanished_one() {
    let (proxy, mut ends) = echo_proxy().await;
    let config = StackConfig {
        // Shorter than the time the flow idles below: without keep-alive answers
        // keeping it alive, smoltcp would end the flow after this long.
        tcp_timeout: Duration::from_secs(1),
        ..StackConfig::default()
    };
    let every = Duration::from_secs(1);
    let mut h = Harness::start(proxy, config, options(None, Some(every)));
    let conn = open(&mut h, app(40003)).await;
    // The proxy side: kernel keep-alive on the tunnel's socket to the proxy.
    let upstream = proxy_socket_timers(proxy).await;
    assert!(upstream.contains("keepalive"), "{upstream}");
    let started = Instant::now();
    // Phase 1: answer every probe for 4.5 s (past the timeout of max(1 s, 2 × 1 s + 1 s)).
    let mut probes = 0;
    while started.elapsed() < Duration::from_millis(4500) {
        let Some(s) = h.recv(500).await else { continue };
        assert!(
            !s.rst,
            "the flow was reset while its application answered: {s:?}"
        );
        if s.dst == conn.src && s.payload.len() <= 1 && s.seq == conn.ack.wrapping_sub(1) {
            probes += 1;
            h.send(segment(conn.src, DST, conn.seq, conn.ack, "A", b""))
                .await;
        }
    }
    assert!(
        (3..=6).contains(&probes),
        "{probes} keep-alive probes in 4.5 s (every 1 s)"
    );
    assert!(
        ends.try_recv().is_err(),
        "the flow ended while its application answered"
    );
    // Phase 2: the application vanishes (answers nothing): the flow must go, with a
    // reset to the proxy, within the timeout (3 s) plus a probe interval.
    let vanished = Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(6), ends.recv())
        .await
        .expect("a vanished application's flow was kept")
        .unwrap();
    let took = vanished.elapsed();
    assert_eq!(end, ProxyEnd::Reset);
    assert!(
        took >= Duration::from_millis(1500),
        "freed after only {took:?}"
    );
    // The flow is gone: a segment on its tuple is answered with a reset.
    tokio::time::sleep(Duration::from_millis(100)).await;
    while h.recv(50).await.is_some() {}
    h.send(segment(conn.src, DST, conn.seq, conn.ack, "A", b"late"))
        .await;
    let r = h
        .recv(2000)
        .await
        .expect("no answer after the flow was freed");
    assert!(r.rst, "{r:?}");
    h.stop().await;
}

/// `ss -tnoH state established dport = :PORT`: the tunnel's sockets to the proxy with
/// their timers, once none shows a retransmit timer (up to 2 s).
async fn proxy_socket_timers(proxy: SocketAddr) -> String {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let out = std::process::Command::new("ss")
            .args([
                "-tnoH",
                "state",
                "established",
                &format!("dport = :{}", proxy.port()),
            ])
            .output()
            .expect("ss (iproute2) is required");
        let out = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.is_empty() && !out.contains("timer:(on") || Instant::now() > deadline {
            return out;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn without_keepalive_an_idle_flow_outlives_the_stack_timeout() {
    let (proxy, mut ends) = echo_proxy().await;
    let config = StackConfig {
        tcp_timeout: Duration::from_secs(1),
        ..StackConfig::default()
    };
    let mut h = Harness::start(proxy, config, options(None, None));
    let mut conn = open(&mut h, app(40004)).await;
    echo(&mut h, &mut conn, b"before").await;
    let upstream = proxy_socket_timers(proxy).await;
    assert!(
        !upstream.is_empty() && !upstream.contains("keepalive"),
        "{upstream}"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    while let Some(s) = h.recv(50).await {
        assert!(!s.rst, "the idle flow was reset: {s:?}");
    }
    echo(&mut h, &mut conn, b"after").await;
    assert!(
        ends.try_recv().is_err(),
        "the idle flow's proxy connection ended"
    );
    h.stop().await;
}
