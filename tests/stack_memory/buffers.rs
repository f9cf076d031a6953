//! Memory per flow through the in-memory stack: rings that exist only after CONNECT,
//! grow, shrink, and obey the budget.

use super::*;

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
    assert_eq!(stats.ring_bytes, 8 * KIB as u64, "{stats:?}");
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
        stats.ring_bytes_peak >= 64 * KIB as u64,
        "the send ring did not grow: {stats:?}"
    );
    // The receive ring is back to 4 KiB, the empty send ring is freed.
    assert_eq!(
        stats.ring_bytes,
        4 * KIB as u64,
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
        stats.ring_bytes <= promised as u64,
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
    assert_eq!(stats.ring_bytes_peak, 4 * KIB as u64, "{stats:?}");
}
