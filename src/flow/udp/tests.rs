#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use super::*;
use crate::egress::PacketSink;
use crate::metrics::Metrics;
use crate::server::{self, ServerConfig};
use crate::socks::ServerPolicy;
use crate::upstream::DialOptions;
use etherparse::{SlicedPacket, TransportSlice};
use std::io;
use tokio::net::{TcpListener, UdpSocket};

/// Packets written to the "TUN".
#[derive(Default)]
struct Capture {
    packets: Mutex<Vec<Vec<u8>>>,
    notify: Notify,
}

impl PacketSink for Capture {
    fn send_packet(&self, packet: &[u8]) -> io::Result<()> {
        self.packets.lock().unwrap().push(packet.to_vec());
        self.notify.notify_one();
        Ok(())
    }
    fn max_packet(&self) -> usize {
        1500
    }
}

impl Capture {
    /// Waits until `n` packets were written (or 5 s), returns them.
    async fn wait_for(&self, n: usize) -> Vec<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let notified = self.notify.notified();
            {
                let p = self.packets.lock().unwrap();
                if p.len() >= n {
                    return p.clone();
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.packets.lock().unwrap().clone();
            }
        }
    }
}

/// (source, destination, payload) of a UDP packet, or the ICMP type for errors.
enum Seen {
    Udp(SocketAddr, SocketAddr, Vec<u8>),
    Unreachable,
}

fn parse(p: &[u8]) -> Seen {
    let s = SlicedPacket::from_ip(p).unwrap();
    let (src, dst) = match &s.net {
        Some(etherparse::NetSlice::Ipv4(ip)) => (
            IpAddr::from(ip.header().source_addr()),
            IpAddr::from(ip.header().destination_addr()),
        ),
        Some(etherparse::NetSlice::Ipv6(ip)) => (
            IpAddr::from(ip.header().source_addr()),
            IpAddr::from(ip.header().destination_addr()),
        ),
        _ => panic!(),
    };
    match s.transport {
        Some(TransportSlice::Udp(u)) => Seen::Udp(
            SocketAddr::new(src, u.source_port()),
            SocketAddr::new(dst, u.destination_port()),
            u.payload().to_vec(),
        ),
        Some(TransportSlice::Icmpv4(_) | TransportSlice::Icmpv6(_)) => Seen::Unreachable,
        _ => panic!("unexpected packet"),
    }
}

async fn server(policy: ServerPolicy) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = ServerConfig {
        policy,
        ..ServerConfig::default()
    };
    tokio::spawn(server::run(vec![listener], config, std::future::pending()));
    addr
}

/// A UDP echo on loopback; a datagram "CONE" is answered from a second socket too.
async fn echo() -> (SocketAddr, SocketAddr) {
    let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (aa, ba) = (a.local_addr().unwrap(), b.local_addr().unwrap());
    // Room for a burst: the server relays one with a system call per batch, faster
    // than this task echoes it, and the default buffer (~208 KiB) holds only ~270
    // small datagrams.
    socket2::SockRef::from(&a)
        .set_recv_buffer_size(4 << 20)
        .unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            let (n, from) = a.recv_from(&mut buf).await.unwrap();
            if &buf[..n] == b"CONE" {
                b.send_to(b"from b", from).await.unwrap();
            } else {
                a.send_to(&buf[..n], from).await.unwrap();
            }
        }
    });
    (aa, ba)
}

fn nat(proxy: SocketAddr, scheme: &str, capture: Arc<Capture>, config: UdpConfig) -> UdpNat {
    let url = format!("{scheme}://{proxy}").parse().unwrap();
    let upstream = Upstream::new(url, DialOptions::default());
    UdpNat::new(upstream, Arc::new(Egress::new(capture)), config)
}

const APP: &str = "198.18.0.1:40000";

fn send(nat: &mut UdpNat, dst: SocketAddr, payload: &[u8]) {
    queue(nat, dst, payload);
    nat.flush();
}

/// [`UdpNat::send`] without the flush that ends a burst.
fn queue(nat: &mut UdpNat, dst: SocketAddr, payload: &[u8]) {
    let target = Address::from(dst);
    nat.send(
        Outgoing {
            app: APP.parse().unwrap(),
            dst,
            target: &target,
            payload,
        },
        Instant::now(),
    );
}

#[tokio::test]
async fn full_cone_echo_through_our_server() {
    let proxy = server(ServerPolicy::default()).await;
    let (echo_a, echo_b) = echo().await;
    let capture = Arc::new(Capture::default());
    let mut nat = nat(proxy, "socks5", capture.clone(), UdpConfig::default());
    // Queued while the association comes up, then straight to the relay.
    for i in 0..10u8 {
        send(&mut nat, echo_a, &[i; 100]);
    }
    let seen = capture.wait_for(10).await;
    assert_eq!(seen.len(), 10);
    let mut payloads: Vec<Vec<u8>> = seen
        .iter()
        .map(|p| match parse(p) {
            Seen::Udp(src, dst, payload) => {
                assert_eq!(src, echo_a);
                assert_eq!(dst, APP.parse().unwrap());
                payload
            }
            Seen::Unreachable => panic!("unreachable"),
        })
        .collect();
    payloads.sort();
    assert_eq!(
        payloads,
        (0..10u8).map(|i| vec![i; 100]).collect::<Vec<_>>()
    );
    // The reply from a second remote endpoint reaches the same app endpoint.
    send(&mut nat, echo_a, b"CONE");
    let seen = capture.wait_for(11).await;
    let Seen::Udp(src, dst, payload) = parse(&seen[10]) else {
        panic!()
    };
    assert_eq!(
        (src, dst, payload.as_slice()),
        (echo_b, APP.parse().unwrap(), &b"from b"[..])
    );
    assert_eq!(nat.len(), 1, "one association per app endpoint");
    assert_eq!(nat.stats().associations.load(Relaxed), 1);
    assert_eq!(nat.stats().datagrams_up.load(Relaxed), 11);
    assert_eq!(nat.stats().datagrams_down.load(Relaxed), 11);
}

#[tokio::test]
async fn socks4_answers_port_unreachable_without_a_handshake() {
    // Nothing listens there: a handshake attempt would fail differently.
    let capture = Arc::new(Capture::default());
    let mut nat = nat(
        "127.0.0.1:9".parse().unwrap(),
        "socks4",
        capture.clone(),
        UdpConfig::default(),
    );
    send(&mut nat, "198.19.2.2:7".parse().unwrap(), b"x");
    let seen = capture.wait_for(1).await;
    assert!(matches!(parse(&seen[0]), Seen::Unreachable));
    assert!(nat.is_empty());
    assert_eq!(nat.stats().refused.load(Relaxed), 1);
}

/// Sends "second" to 198.19.2.2:7 from another application endpoint than [`APP`].
fn send_second(nat: &mut UdpNat) {
    let target = Address::from("198.19.2.2:7".parse::<SocketAddr>().unwrap());
    nat.send(
        Outgoing {
            app: "198.18.0.1:40001".parse().unwrap(),
            dst: "198.19.2.2:7".parse().unwrap(),
            target: &target,
            payload: b"second",
        },
        Instant::now(),
    );
    nat.flush();
}

#[tokio::test]
async fn a_refusal_is_answered_and_remembered() {
    let proxy = server(ServerPolicy {
        udp_associate: false,
        ..ServerPolicy::default()
    })
    .await;
    let capture = Arc::new(Capture::default());
    let mut nat = nat(proxy, "socks5", capture.clone(), UdpConfig::default());
    send(&mut nat, "198.19.2.2:7".parse().unwrap(), b"first");
    let seen = capture.wait_for(1).await;
    assert!(matches!(parse(&seen[0]), Seen::Unreachable));
    // The task has ended; the next datagram, from another endpoint, is refused
    // without a handshake.
    tokio::time::sleep(Duration::from_millis(20)).await;
    send_second(&mut nat);
    assert_eq!(capture.packets.lock().unwrap().len(), 2, "answered at once");
    assert!(nat.is_empty());
    assert_eq!(nat.stats().refused.load(Relaxed), 2);
}

#[tokio::test]
async fn idle_associations_end_and_the_limit_holds() {
    let proxy = server(ServerPolicy::default()).await;
    let (echo_a, _) = echo().await;
    let capture = Arc::new(Capture::default());
    let config = UdpConfig {
        idle_timeout: Duration::from_millis(300),
        max_associations: 2,
        ..UdpConfig::default()
    };
    let mut nat = nat(proxy, "socks5", capture.clone(), config);
    for port in 1..=3u16 {
        let target = Address::from(echo_a);
        nat.send(
            Outgoing {
                app: SocketAddr::new([198, 18, 0, 1].into(), port),
                dst: echo_a,
                target: &target,
                payload: b"hi",
            },
            Instant::now(),
        );
    }
    nat.flush();
    assert_eq!(nat.len(), 2);
    assert_eq!(nat.stats().over_limit.load(Relaxed), 1);
    capture.wait_for(2).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(nat.is_empty(), "idle associations are closed");
    nat.reap();
}

#[tokio::test]
async fn oversized_and_directed_broadcast_are_dropped() {
    let capture = Arc::new(Capture::default());
    let config = UdpConfig {
        local_nets: vec!["198.18.0.1/16".parse().unwrap()],
        ..UdpConfig::default()
    };
    let mut nat = nat("127.0.0.1:9".parse().unwrap(), "socks5", capture, config);
    send(&mut nat, "198.18.255.255:137".parse().unwrap(), b"netbios");
    assert_eq!(nat.stats().broadcast.load(Relaxed), 1);
    let big = vec![0u8; MAX_RELAY_DATAGRAM];
    send(&mut nat, "198.19.2.2:7".parse().unwrap(), &big);
    assert_eq!(nat.stats().oversized.load(Relaxed), 1);
    assert!(nat.is_empty());
}

#[test]
fn replies_are_shown_as_the_address_the_app_used() {
    let assoc = Assoc {
        app: APP.parse().unwrap(),
        state: Mutex::new(AssocState {
            phase: Phase::Pending(VecDeque::new()),
            aliases: VecDeque::new(),
            has_names: false,
            last_sent: None,
        }),
        queued: Notify::new(),
        last_used: AtomicU64::new(0),
        only_dns: AtomicBool::new(true),
    };
    let fake: SocketAddr = "198.18.128.5:443".parse().unwrap();
    let name = Address::domain("example.test", 443).unwrap();
    let resolver: SocketAddr = "198.19.2.2:53".parse().unwrap();
    let queried: SocketAddr = "10.9.9.9:53".parse().unwrap();
    let direct: SocketAddr = "203.0.113.9:443".parse().unwrap();
    {
        let mut state = assoc.state();
        assoc.remember_alias(&mut state, &name, fake);
        assoc.remember_alias(&mut state, &Address::from(resolver), queried);
        assoc.remember_alias(&mut state, &Address::from(direct), direct);
    }
    assert_eq!(assoc.present(&name), Some(fake));
    assert_eq!(assoc.present(&Address::from(resolver)), Some(queried));
    // The real address behind the name, on the name's port.
    let real: SocketAddr = "192.0.2.7:443".parse().unwrap();
    assert_eq!(assoc.present(&Address::from(real)), Some(fake));
    // A destination the app used directly stays itself.
    assert_eq!(assoc.present(&Address::from(direct)), Some(direct));
    let other: SocketAddr = "192.0.2.7:8443".parse().unwrap();
    assert_eq!(assoc.present(&Address::from(other)), Some(other));
    assert_eq!(
        assoc.present(&Address::domain("unknown.test", 443).unwrap()),
        None
    );
}

/// Two stacks' NATs over one table (a multi-queue tunnel): datagrams from one app
/// endpoint that arrive on either share one association, whose replies go out through
/// the egress of the stack that opened it.
#[tokio::test]
async fn nats_sharing_a_table_keep_one_association_per_endpoint() {
    let proxy = server(ServerPolicy::default()).await;
    let (echo_a, echo_b) = echo().await;
    let metrics = Arc::new(Metrics::new());
    let table = NatTable::default();
    let url: crate::config::ProxyUrl = format!("socks5://{proxy}").parse().unwrap();
    let upstream = Upstream::new(url, DialOptions::default());
    let make = |capture: Arc<Capture>| {
        let egress = Arc::new(Egress::with_metrics(capture, metrics.clone()));
        UdpNat::with_table(upstream.clone(), egress, UdpConfig::default(), &table)
    };
    let (first, second) = (Arc::new(Capture::default()), Arc::new(Capture::default()));
    let mut nat_a = make(first.clone());
    let mut nat_b = make(second.clone());
    send(&mut nat_a, echo_a, b"one");
    // The other stack looked before the insert and now opens: it gets the same one.
    let app: SocketAddr = APP.parse().unwrap();
    let a = nat_a.shared.table().get(&app).cloned().unwrap();
    let b = nat_b.open(app, Instant::now()).unwrap();
    assert!(Arc::ptr_eq(&a, &b), "a second association for one endpoint");
    assert!(nat_b.tasks.is_empty(), "no second association task");
    send(&mut nat_b, echo_a, b"CONE");
    let seen = first.wait_for(2).await;
    let mut sources: Vec<SocketAddr> = seen
        .iter()
        .map(|p| match parse(p) {
            Seen::Udp(src, dst, _) => {
                assert_eq!(dst, app);
                src
            }
            Seen::Unreachable => panic!("unreachable"),
        })
        .collect();
    sources.sort();
    let mut expected = vec![echo_a, echo_b];
    expected.sort();
    assert_eq!(sources, expected, "the echo and the cone reply");
    assert!(
        second.packets.lock().unwrap().is_empty(),
        "replies left by the opener"
    );
    assert_eq!((nat_a.len(), nat_b.len()), (1, 1));
    assert_eq!(metrics.udp.associations.load(Relaxed), 1);
    assert_eq!(metrics.udp.datagrams_up.load(Relaxed), 2);
}

#[tokio::test]
async fn a_burst_comes_back_in_batches_and_an_oversized_reply_in_fragments() {
    let proxy = server(ServerPolicy::default()).await;
    let (echo_a, _) = echo().await;
    let capture = Arc::new(Capture::default());
    let config = UdpConfig {
        pending: 512,
        ..UdpConfig::default()
    };
    let mut nat = nat(proxy, "socks5", capture.clone(), config);
    // Longer than the device carries (MTU 1500): it comes back as two IP fragments.
    send(&mut nat, echo_a, &[0xee; 2000]);
    // More than one receive batch and one wake-up's worth.
    for i in 0..300u16 {
        send(&mut nat, echo_a, &i.to_be_bytes());
    }
    let seen = capture.wait_for(302).await;
    assert_eq!(seen.len(), 302);
    let (fragments, small): (Vec<_>, Vec<_>) = seen.iter().partition(|p| p.len() > 100);
    assert_eq!(fragments.len(), 2);
    assert!(fragments.iter().all(|p| p.len() <= 1500));
    let mut got: Vec<u16> = small
        .iter()
        .map(|p| match parse(p) {
            Seen::Udp(_, _, payload) => u16::from_be_bytes([payload[0], payload[1]]),
            Seen::Unreachable => panic!("unreachable"),
        })
        .collect();
    got.sort_unstable();
    assert_eq!(got, (0..300u16).collect::<Vec<_>>());
    assert_eq!(nat.stats().datagrams_down.load(Relaxed), 301);
    assert_eq!(nat.shared.metrics.egress.fragmented.load(Relaxed), 1);
    assert_eq!(nat.shared.metrics.egress.unsendable.load(Relaxed), 0);
}

#[tokio::test]
async fn a_burst_waits_in_the_outbox_until_flushed_and_a_full_outbox_flushes_itself() {
    let proxy = server(ServerPolicy::default()).await;
    let (echo_a, _) = echo().await;
    let capture = Arc::new(Capture::default());
    let mut nat = nat(proxy, "socks5", capture.clone(), UdpConfig::default());
    send(&mut nat, echo_a, b"up");
    capture.wait_for(1).await;
    let up = |nat: &UdpNat| nat.stats().datagrams_up.load(Relaxed);
    assert_eq!(up(&nat), 1);
    for i in 0..3u8 {
        queue(&mut nat, echo_a, &[i]);
    }
    // The first of a burst goes at once (a lone request waits for nothing).
    assert_eq!(up(&nat), 2);
    assert_eq!(capture.wait_for(2).await.len(), 2);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(up(&nat), 2, "the rest waits for the flush");
    assert_eq!(capture.packets.lock().unwrap().len(), 2);
    nat.flush();
    assert_eq!(up(&nat), 4);
    assert_eq!(capture.wait_for(4).await.len(), 4);
    // Bounded: past its capacity the outbox sends what waits before taking more.
    for i in 0..(outbox::MAX_DATAGRAMS + 10) {
        queue(&mut nat, echo_a, &(i as u16).to_be_bytes());
    }
    assert_eq!(up(&nat), 4 + 1 + outbox::MAX_DATAGRAMS as u64);
    nat.flush();
    assert_eq!(up(&nat), 4 + outbox::MAX_DATAGRAMS as u64 + 10);
    assert_eq!(nat.stats().relay_busy.load(Relaxed), 0);
}

/// A SOCKS5 server that grants every UDP ASSOCIATE with `relay` as the relay, where
/// the test decides what listens (as ss-local without `-u` grants one with nothing
/// behind it). The control connection stays open.
async fn granting_server(relay: SocketAddr) -> SocketAddr {
    let SocketAddr::V4(relay) = relay else {
        panic!()
    };
    let mut reply = vec![5, 0, 0, 1];
    reply.extend(relay.ip().octets());
    reply.extend(relay.port().to_be_bytes());
    granting_server_replying(reply).await
}

/// [`granting_server`] announcing the relay by name (ATYP 0x03).
async fn granting_server_named(name: &str, port: u16) -> SocketAddr {
    let mut reply = vec![5, 0, 0, 3, name.len() as u8];
    reply.extend(name.as_bytes());
    reply.extend(port.to_be_bytes());
    granting_server_replying(reply).await
}

async fn granting_server_replying(reply: Vec<u8>) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut control, _) = listener.accept().await.unwrap();
            let reply = reply.clone();
            tokio::spawn(async move {
                let mut head = [0u8; 2];
                control.read_exact(&mut head).await.unwrap();
                let mut methods = vec![0u8; usize::from(head[1])];
                control.read_exact(&mut methods).await.unwrap();
                control.write_all(&[5, 0]).await.unwrap();
                let mut request = [0u8; 4];
                control.read_exact(&mut request).await.unwrap();
                let rest = if request[3] == 4 { 18 } else { 6 };
                control.read_exact(&mut vec![0u8; rest]).await.unwrap();
                control.write_all(&reply).await.unwrap();
                let _ = control.read(&mut [0u8; 1]).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_relay_announced_by_name_is_reached() {
    // `localhost` resolves from /etc/hosts (no DNS); it may also name ::1, which a
    // v4 association must not pick.
    let relay = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = relay.local_addr().unwrap().port();
    let proxy = granting_server_named("localhost", port).await;
    let capture = Arc::new(Capture::default());
    let mut nat = nat(proxy, "socks5", capture.clone(), UdpConfig::default());
    let dst: SocketAddr = "198.19.2.2:7".parse().unwrap();
    let target = Address::from(dst);
    let mut buf = [0u8; 100];
    for i in 0..5u16 {
        // A new source port each time: a new association, and the name again.
        let payload = format!("datagram {i}");
        nat.send(
            Outgoing {
                app: SocketAddr::new("198.18.0.1".parse().unwrap(), 41000 + i),
                dst,
                target: &target,
                payload: payload.as_bytes(),
            },
            Instant::now(),
        );
        nat.flush();
        let n = tokio::time::timeout(Duration::from_secs(5), relay.recv(&mut buf))
            .await
            .expect("nothing reached the named relay")
            .unwrap();
        assert!(buf[..n].ends_with(payload.as_bytes()), "{:?}", &buf[..n]);
    }
    assert_eq!(nat.stats().associations.load(Relaxed), 5);
    assert_eq!(nat.stats().refused.load(Relaxed), 0);
    assert!(
        capture.packets.lock().unwrap().is_empty(),
        "no error to the app"
    );
}

/// A loopback port where nothing listens (bound, then closed).
fn closed_port() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The destination and payload start an ICMPv4 port unreachable quotes.
fn quoted_v4(p: &[u8]) -> (SocketAddr, Vec<u8>) {
    let outer = usize::from(p[0] & 0x0f) * 4;
    assert_eq!((p[outer], p[outer + 1]), (3, 3), "port unreachable");
    let quote = &p[outer + 8..];
    let inner = usize::from(quote[0] & 0x0f) * 4;
    let dst = std::net::Ipv4Addr::new(quote[16], quote[17], quote[18], quote[19]);
    let port = u16::from_be_bytes([quote[inner + 2], quote[inner + 3]]);
    (
        SocketAddr::new(dst.into(), port),
        quote[inner + 8..].to_vec(),
    )
}

#[tokio::test]
async fn a_relay_that_is_not_listening_is_answered_with_port_unreachable() {
    let proxy = granting_server(closed_port()).await;
    let capture = Arc::new(Capture::default());
    let mut nat = nat(proxy, "socks5", capture.clone(), UdpConfig::default());
    let dst: SocketAddr = "198.19.2.2:7".parse().unwrap();
    for i in 0..3usize {
        let payload = format!("datagram {i}");
        send(&mut nat, dst, payload.as_bytes());
        let seen = capture.wait_for(i + 1).await;
        assert_eq!(seen.len(), i + 1, "no port unreachable for datagram {i}");
        let (to, head) = quoted_v4(&seen[i]);
        assert_eq!((to, head), (dst, payload.into_bytes()));
    }
    assert_eq!(nat.stats().relay_unreachable.load(Relaxed), 3);
    // The association stands; the proxy granted it.
    assert_eq!(nat.stats().associations.load(Relaxed), 1);
    assert_eq!(nat.stats().refused.load(Relaxed), 0);
}

#[tokio::test]
async fn a_port_unreachable_pending_on_the_relay_socket_costs_no_datagram() {
    let relay_addr = closed_port();
    let proxy = granting_server(relay_addr).await;
    let capture = Arc::new(Capture::default());
    let mut nat = nat(proxy, "socks5", capture.clone(), UdpConfig::default());
    let (closed, open): (SocketAddr, SocketAddr) = (
        "198.19.2.2:9".parse().unwrap(),
        "198.19.2.3:7".parse().unwrap(),
    );
    // Up, with nothing at the relay yet: the first datagram is answered.
    send(&mut nat, closed, b"first");
    assert_eq!(capture.wait_for(1).await.len(), 1);
    // Now the relay's port unreachable for "second" waits on the socket (the
    // association's task does not run before the next await) ...
    send(&mut nat, closed, b"second");
    let relay = std::net::UdpSocket::bind(relay_addr).unwrap();
    relay
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    // ... and the next send meets it: "third" must still reach the relay (a
    // connected UDP socket reports the error on its next call and sends nothing).
    send(&mut nat, open, b"third");
    let mut buf = [0u8; 100];
    let n = relay
        .recv(&mut buf)
        .expect("the datagram after the error was lost");
    assert!(buf[..n].ends_with(b"third"), "{:?}", &buf[..n]);
    // The error is blamed on the datagram before it, to its destination.
    let seen = capture.wait_for(2).await;
    assert_eq!(seen.len(), 2);
    assert_eq!(quoted_v4(&seen[1]), (closed, b"second".to_vec()));
    // And the outbox meets one the same way: the first of a burst goes at once
    // (and leaves the error), the rest wait for the flush.
    drop(relay);
    queue(&mut nat, closed, b"fourth");
    let relay = std::net::UdpSocket::bind(relay_addr).unwrap();
    relay
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    for i in 0..4u8 {
        queue(&mut nat, open, &[b'b', i]);
    }
    nat.flush();
    for i in 0..4u8 {
        let n = relay.recv(&mut buf).expect("a burst datagram was lost");
        assert!(buf[..n].ends_with(&[b'b', i]), "{:?}", &buf[..n]);
    }
    let seen = capture.wait_for(3).await;
    assert_eq!(quoted_v4(&seen[2]), (closed, b"fourth".to_vec()));
    assert_eq!(nat.stats().relay_unreachable.load(Relaxed), 3);
    assert_eq!(nat.stats().relay_busy.load(Relaxed), 0);
}
