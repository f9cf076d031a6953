//! The stack driven through an in-memory device with hand-built packets (no TUN, no
//! root): what an application's kernel would see for new, unknown and refused
//! connections, and a full handshake with data through our SOCKS server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use common::*;
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot};
use tun2socks::config::ProxyUrl;
use tun2socks::server::ServerConfig;
use tun2socks::stack::{self, PacketIo, StackConfig, StackStats};
use tun2socks::upstream::{DialOptions, Upstream};

const MTU: usize = 1500;

/// A device whose packets come from and go to channels.
struct MemDevice {
    rx: Mutex<mpsc::Receiver<Vec<u8>>>,
    tx: mpsc::Sender<Vec<u8>>,
}

impl PacketIo for MemDevice {
    fn poll_recv(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        match self.rx.lock().unwrap().poll_recv(cx) {
            Poll::Ready(Some(p)) => {
                buf[..p.len()].copy_from_slice(&p);
                Poll::Ready(Ok(p.len()))
            }
            Poll::Ready(None) => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self.rx.lock().unwrap().try_recv() {
            Ok(p) => {
                buf[..p.len()].copy_from_slice(&p);
                Ok(p.len())
            }
            Err(_) => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn try_send(&self, packet: &[u8]) -> io::Result<()> {
        self.tx
            .try_send(packet.to_vec())
            .map_err(|_| io::Error::other("full"))
    }

    fn mtu(&self) -> usize {
        MTU
    }
}

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
async fn socks_error_reply_becomes_rst() {
    // Our server refuses the destination with 0x02.
    let server = TestServer::start(ServerConfig {
        deny: vec!["10.0.0.0/8".parse().unwrap()],
        ..ServerConfig::default()
    })
    .await;
    let mut h = Harness::start(&format!("socks5://{}", server.addr), StackConfig::default());
    h.send(segment(
        APP,
        "10.1.1.1:22".parse().unwrap(),
        1,
        None,
        "S",
        b"",
    ))
    .await;
    let r = h.recv(3000).await.expect("no answer");
    assert!(r.rst && r.ack == Some(2), "{r:?}");
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

#[tokio::test]
async fn fake_ip_answers_through_the_stack_and_unknown_fake_addresses_are_reset() {
    let config = StackConfig {
        dns: tun2socks::dns::DnsConfig {
            mode: tun2socks::dns::DnsMode::FakeIp,
            fake_pools: tun2socks::dns::DnsConfig::default_pools(),
            ..Default::default()
        },
        ..StackConfig::default()
    };
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

// ---- Memory per flow: rings that exist only after CONNECT, grow, shrink, and obey
// ---- the budget.

/// A SYN offering MSS 1460 and window scale `shift`, as Linux sends.
fn syn_scaled(src: SocketAddr, dst: SocketAddr, seq: u32, shift: u8) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) else {
        panic!("v4 only")
    };
    let mut out = Vec::new();
    PacketBuilder::ipv4(s.octets(), d.octets(), 64)
        .tcp(src.port(), dst.port(), seq, 65535)
        .syn()
        .options(&[
            etherparse::TcpOptionElement::MaximumSegmentSize(1460),
            etherparse::TcpOptionElement::WindowScale(shift),
        ])
        .unwrap()
        .write(&mut out, &[])
        .unwrap();
    out
}

/// The application's end of one connection through the stack, driven by hand. It
/// offers window scale 7 and a 65535 << 7 window, and acknowledges all it receives.
struct App {
    src: SocketAddr,
    dst: SocketAddr,
    /// Next sequence number to send.
    seq: u32,
    /// Highest sequence number the stack acknowledged.
    acked: u32,
    /// Next sequence number expected from the stack.
    rcv: u32,
    /// The stack's window scale.
    shift: u8,
    /// The stack's window as last advertised (scaled), and the largest seen.
    window: usize,
    max_window: usize,
    /// Windows advertised, in order (deduplicated).
    windows: Vec<usize>,
}

impl App {
    /// Handshake; returns the connection and the SYN-ACK.
    async fn connect(h: &mut Harness, src: SocketAddr, dst: SocketAddr) -> (App, Segment) {
        h.send(syn_scaled(src, dst, 1000, 7)).await;
        let synack = recv_from(h, dst, src, 5000).await.expect("no SYN-ACK");
        assert!(synack.syn && !synack.rst, "{synack:?}");
        let app = App {
            src,
            dst,
            seq: 1001,
            acked: 1001,
            rcv: synack.seq.wrapping_add(1),
            shift: synack.wscale.unwrap_or(0),
            window: usize::from(synack.window),
            max_window: usize::from(synack.window),
            windows: vec![usize::from(synack.window)],
        };
        h.send(app.segment("A", b"")).await;
        (app, synack)
    }

    fn segment(&self, flags: &str, payload: &[u8]) -> Vec<u8> {
        let (IpAddr::V4(s), IpAddr::V4(d)) = (self.src.ip(), self.dst.ip()) else {
            panic!("v4 only")
        };
        let mut b = PacketBuilder::ipv4(s.octets(), d.octets(), 64)
            .tcp(self.src.port(), self.dst.port(), self.seq, 65535)
            .ack(self.rcv);
        if flags.contains('F') {
            b = b.fin();
        }
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    fn note(&mut self, s: &Segment) {
        assert!(!s.rst, "the stack reset the connection: {s:?}");
        if let Some(ack) = s.ack {
            if ack.wrapping_sub(self.acked) as i32 > 0 {
                self.acked = ack;
            }
            self.window = usize::from(s.window) << self.shift;
            self.max_window = self.max_window.max(self.window);
            if self.windows.last() != Some(&self.window) {
                self.windows.push(self.window);
            }
        }
    }

    /// Sends `total` bytes, never beyond the stack's window, as 1460-byte segments;
    /// like a kernel, it goes back to the last acknowledged byte when no ACK comes
    /// for a second. Returns the number of such timeouts.
    async fn upload(&mut self, h: &mut Harness, total: usize) -> usize {
        let start = self.seq;
        let end = start.wrapping_add(total as u32);
        let mut timeouts = 0;
        while self.acked != end {
            let in_flight = self.seq.wrapping_sub(self.acked) as usize;
            let room = self.window.saturating_sub(in_flight);
            let left = end.wrapping_sub(self.seq) as usize;
            let n = room.min(left).min(1460);
            if n > 0 {
                h.send(self.segment("A", &vec![0x5a; n])).await;
                self.seq = self.seq.wrapping_add(n as u32);
                continue;
            }
            match recv_from(h, self.dst, self.src, 1000).await {
                Some(s) => self.note(&s),
                None => {
                    timeouts += 1;
                    assert!(
                        timeouts < 10,
                        "upload stalled: acked {} of {total}, sent {}, window {}, windows {:?}",
                        self.acked.wrapping_sub(start),
                        self.seq.wrapping_sub(start),
                        self.window,
                        self.windows
                    );
                    self.seq = self.acked;
                }
            }
        }
        timeouts
    }

    /// Receives `total` bytes from the stack, acknowledging each segment.
    async fn download(&mut self, h: &mut Harness, total: usize) {
        let mut got = 0;
        while got < total {
            let s = recv_from(h, self.dst, self.src, 5000)
                .await
                .expect("download stalled");
            self.note(&s);
            if !s.payload.is_empty() && s.seq == self.rcv {
                self.rcv = self.rcv.wrapping_add(s.payload.len() as u32);
                got += s.payload.len();
                h.send(self.segment("A", b"")).await;
            }
        }
    }
}

/// The next segment from `src` to `dst` within `ms` (others are skipped).
async fn recv_from(h: &mut Harness, src: SocketAddr, dst: SocketAddr, ms: u64) -> Option<Segment> {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let s = h.recv(left.as_millis() as u64).await?;
        if s.src == src && s.dst == dst {
            return Some(s);
        }
    }
}

/// A server that counts what it reads and reports the total when the client closes.
async fn tcp_sink() -> (SocketAddr, tokio::sync::watch::Receiver<usize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::watch::channel(0);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut n = 0;
                while let Ok(k) = s.read(&mut buf).await {
                    if k == 0 {
                        break;
                    }
                    n += k;
                    tx.send_replace(n);
                }
            });
        }
    });
    (addr, rx)
}

/// A server that sends `total` bytes to each client, then waits for it to close.
async fn tcp_source(total: usize) -> SocketAddr {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(&vec![0xa5; total]).await;
                let mut buf = [0u8; 64];
                let _ = s.read(&mut buf).await;
            });
        }
    });
    addr
}

const KIB: usize = 1024;

fn memory_config() -> StackConfig {
    StackConfig {
        tcp_idle_shrink: Duration::from_millis(300),
        ..StackConfig::default()
    }
}

#[tokio::test]
async fn a_paused_syn_has_no_rings() {
    // A proxy that accepts and never answers: every SYN stays paused.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = format!("socks5://{}", silent.local_addr().unwrap());
    let _keep = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let mut h = Harness::start(&proxy, memory_config());
    for port in 0..50u16 {
        let src = SocketAddr::new(APP.ip(), 41000 + port);
        h.send(syn_scaled(src, "10.9.9.9:80".parse().unwrap(), 7, 7))
            .await;
    }
    assert!(h.recv(300).await.is_none(), "a paused SYN was answered");
    let stats = h.stop().await;
    assert_eq!(stats.flows_opened, 50);
    assert_eq!(stats.ring_bytes, 0, "{stats:?}");
    assert_eq!(stats.ring_bytes_peak, 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_syn_ack_after_connect_offers_small_rings_with_the_scale_for_the_largest() {
    let server = TestServer::start(ServerConfig::default()).await;
    let echo = tcp_echo("127.0.0.1").await;
    let mut h = Harness::start(&format!("socks5://{}", server.addr), memory_config());
    let (mut app, synack) = App::connect(&mut h, APP, echo).await;
    // 512 KiB needs shift 4 (65535 << 4 >= 512 KiB); the SYN-ACK's own window field is
    // never scaled: the initial 4 KiB ring.
    assert_eq!(synack.wscale, Some(4), "{synack:?}");
    assert_eq!(synack.window, 4096, "{synack:?}");
    assert_eq!(synack.mss, Some((MTU - 40) as u16));
    // And the connection works.
    h.send(app.segment("A", b"ping")).await;
    app.seq = app.seq.wrapping_add(4);
    let mut got = Vec::new();
    while got.len() < 4 {
        let s = h.recv(3000).await.expect("no echo");
        app.note(&s);
        got.extend_from_slice(&s.payload);
    }
    assert_eq!(got, b"ping");
    let stats = h.stop().await;
    assert_eq!(stats.ring_bytes, 8 * KIB, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_rings_grow_under_a_bulk_download_and_shrink_back_after_idle() {
    let server = TestServer::start(ServerConfig::default()).await;
    let source = tcp_source(2 * 1024 * KIB).await;
    let mut h = Harness::start(&format!("socks5://{}", server.addr), memory_config());
    let (mut down, _) = App::connect(&mut h, APP, source).await;
    down.download(&mut h, 2 * 1024 * KIB).await;
    // Idle for longer than tcp_idle_shrink (300 ms).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let stats = h.stop().await;
    assert!(
        stats.ring_bytes_peak >= 64 * KIB,
        "the send ring did not grow: {stats:?}"
    );
    // The receive ring is back to 4 KiB, the empty send ring is freed.
    assert_eq!(
        stats.ring_bytes,
        4 * KIB,
        "the rings did not shrink back after idle: {stats:?}"
    );
    assert_eq!(stats.ring_growth_denied, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_rings_grow_under_a_bulk_upload_and_shrink_to_the_window_they_advertised() {
    let server = TestServer::start(ServerConfig::default()).await;
    let (sink, mut counted) = tcp_sink().await;
    let mut h = Harness::start(&format!("socks5://{}", server.addr), memory_config());
    let (mut up, _) = App::connect(&mut h, APP, sink).await;
    let timeouts = up.upload(&mut h, 4 * 1024 * KIB).await;
    eprintln!(
        "upload: {timeouts} retransmission timeouts; windows {:?}",
        up.windows
    );
    assert_eq!(up.windows[0], 4096);
    assert!(
        up.max_window >= 256 * KIB,
        "the receive window did not grow: {:?}",
        up.windows
    );
    tokio::time::timeout(
        Duration::from_secs(5),
        counted.wait_for(|&n| n == 4 * 1024 * KIB),
    )
    .await
    .expect("the sink stalled")
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Late window updates count as advertised too.
    while let Some(s) = recv_from(&mut h, up.dst, up.src, 100).await {
        up.note(&s);
    }
    let stats = h.stop().await;
    // Idle: no send ring (the proxy never sent); the receive ring keeps exactly the
    // window last offered to the application (TCP does not take a window back), at
    // least 4 KiB.
    let promised = up.window.max(4 * KIB);
    assert!(
        stats.ring_bytes <= promised,
        "rings after idle: {} bytes; last window {}; {stats:?}",
        stats.ring_bytes,
        up.window
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_budget_keeps_windows_small_and_aborts_nothing() {
    let server = TestServer::start(ServerConfig::default()).await;
    let (sink, mut counted) = tcp_sink().await;
    let config = StackConfig {
        // The first flow's own receive ring spends it all.
        memory_limit: 4 * KIB,
        ..memory_config()
    };
    let mut h = Harness::start(&format!("socks5://{}", server.addr), config);
    let (mut up, _) = App::connect(&mut h, APP, sink).await;
    let timeouts = up.upload(&mut h, 512 * KIB).await;
    eprintln!("upload: {timeouts} retransmission timeouts");
    assert_eq!(
        up.max_window, 4096,
        "the window grew past a spent budget: {:?}",
        up.windows
    );
    tokio::time::timeout(
        Duration::from_secs(5),
        counted.wait_for(|&n| n == 512 * KIB),
    )
    .await
    .expect("the sink stalled")
    .unwrap();
    let stats = h.stop().await;
    assert!(stats.ring_growth_denied > 0, "{stats:?}");
    assert_eq!(stats.ring_bytes_peak, 4 * KIB, "{stats:?}");
}
