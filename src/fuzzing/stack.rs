//! `packet_stack`: a sequence of packets through the whole stack
//! ([`crate::stack::run`]) on a current-thread runtime, over an in-memory device,
//! with the proxy at a closed local port (flows, UDP associations and DNS over TCP
//! are refused at once; nothing leaves the host). The stack must take every
//! packet, write only well-formed packets with correct checksums, and stop cleanly
//! when asked.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use etherparse::SlicedPacket;

use super::fix_checksums;
use crate::config::ProxyUrl;
use crate::dns::{DnsConfig, DnsMode};
use crate::flow::udp::UdpConfig;
use crate::stack::{self, PacketIo, StackConfig, StackStats};
use crate::upstream::{DialOptions, Upstream};

/// The device's MTU.
const MTU: usize = 1500;
/// Most packets taken from one input (the rest of the input is ignored).
const MAX_PACKETS: usize = 64;
/// Packets the device keeps from the stack; further sends fail as from a full queue.
const MAX_SENT: usize = 1024;
/// A stack that has not stopped after this long has hung.
const DEADLINE: Duration = Duration::from_secs(10);

/// An upstream whose proxy is a closed port on 127.0.0.1 (picked once per process:
/// bound, then released).
pub fn closed_upstream() -> Upstream {
    static PORT: OnceLock<u16> = OnceLock::new();
    let port = *PORT.get_or_init(|| {
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map_or(1, |a| a.port())
    });
    let proxy: ProxyUrl = format!("socks5://127.0.0.1:{port}")
        .parse()
        .unwrap_or_else(|e| panic!("proxy URL: {e}"));
    Upstream::new(
        proxy,
        DialOptions {
            connect_timeout: Duration::from_millis(200),
            handshake_timeout: Duration::from_millis(200),
            ..DialOptions::default()
        },
    )
}

/// `| len (2, BE) | packet | ...` into at most [`MAX_PACKETS`] packets; a last
/// packet shorter than its length takes what is left.
pub fn split_packets(mut data: &[u8], fix: bool) -> Vec<Vec<u8>> {
    let mut packets = Vec::new();
    while let [a, b, rest @ ..] = data {
        if packets.len() == MAX_PACKETS {
            break;
        }
        let len = usize::from(u16::from_be_bytes([*a, *b])).min(rest.len());
        let (packet, tail) = rest.split_at(len);
        let mut packet = packet.to_vec();
        if fix {
            fix_checksums(&mut packet);
        }
        packets.push(packet);
        data = tail;
    }
    packets
}

/// What the device and the harness share.
#[derive(Debug, Default)]
struct Shared {
    inbox: Mutex<VecDeque<Vec<u8>>>,
    /// Woken when the inbox becomes empty.
    drained: Mutex<Option<Waker>>,
    sent: Mutex<Vec<Vec<u8>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The in-memory device: hands out the input's packets, keeps what the stack sends.
#[derive(Debug)]
struct FuzzDevice(Arc<Shared>);

impl PacketIo for FuzzDevice {
    fn poll_recv(&self, _cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        // Nothing arrives later: when the inbox is empty the stack waits for its
        // timers, its flows, or the shutdown.
        match self.try_recv(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
            other => Poll::Ready(other),
        }
    }

    fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut inbox = lock(&self.0.inbox);
        let Some(packet) = inbox.pop_front() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        if inbox.is_empty() {
            if let Some(waker) = lock(&self.0.drained).take() {
                waker.wake();
            }
        }
        let n = packet.len().min(buf.len());
        if let (Some(to), Some(from)) = (buf.get_mut(..n), packet.get(..n)) {
            to.copy_from_slice(from);
        }
        Ok(n)
    }

    fn try_send(&self, packet: &[u8]) -> io::Result<()> {
        let mut sent = lock(&self.0.sent);
        if sent.len() >= MAX_SENT {
            return Err(io::Error::other("full"));
        }
        sent.push(packet.to_vec());
        Ok(())
    }

    fn mtu(&self) -> usize {
        MTU
    }
}

/// Stack settings for `flags` (see the module doc of [`super`]): small buffers and
/// limits, so that an input costs little.
fn config(flags: u8) -> StackConfig {
    let (mode, server) = match (flags >> 1) & 3 {
        0 => (DnsMode::Udp, None),
        1 => (DnsMode::Tcp, None),
        2 => (DnsMode::FakeIp, None),
        _ => (
            DnsMode::FakeIp,
            Some(IpAddr::V4(Ipv4Addr::new(198, 19, 2, 53))),
        ),
    };
    StackConfig {
        tcp_rx_buffer: 4096,
        tcp_tx_buffer: 4096,
        max_flows: 8,
        tcp_timeout: Duration::from_secs(5),
        // The fuzzer feeds packets as fast as it can: spinning would only slow it.
        busy_poll: Duration::ZERO,
        udp: UdpConfig {
            max_associations: 8,
            pending: 4,
            local_nets: ["198.18.0.0/15", "fd18::/64"]
                .iter()
                .filter_map(|n| n.parse().ok())
                .collect(),
            ..UdpConfig::default()
        },
        dns: DnsConfig {
            mode,
            server,
            ..DnsConfig::default()
        },
        ..StackConfig::default()
    }
}

/// `| flags | len | packet | len | packet | ...` through the whole stack.
pub fn packet_stack(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let packets = split_packets(rest, flags & 1 != 0);
    let linger = usize::from(flags >> 3) * 4;
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    let shared = Arc::new(Shared {
        inbox: Mutex::new(packets.iter().cloned().collect()),
        ..Shared::default()
    });
    let device = FuzzDevice(shared.clone());
    let drained = shared.clone();
    let shutdown = async move {
        poll_fn(|cx| {
            let inbox = lock(&drained.inbox);
            if inbox.is_empty() {
                return Poll::Ready(());
            }
            *lock(&drained.drained) = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        // Let flow tasks, the UDP NAT and DNS run against the refusing proxy.
        for _ in 0..linger {
            tokio::task::yield_now().await;
        }
    };
    let run = stack::run(device, config(flags), closed_upstream(), shutdown);
    let stats = match runtime.block_on(async { tokio::time::timeout(DEADLINE, run).await }) {
        Ok(Ok(stats)) => stats,
        Ok(Err(e)) => panic!("the stack failed: {e}"),
        Err(_) => panic!("the stack did not stop within {DEADLINE:?}"),
    };
    drop(runtime);
    check_stats(&stats, packets.len());
    for packet in lock(&shared.sent).iter() {
        check_sent(packet);
    }
}

fn check_stats(stats: &StackStats, fed: usize) {
    assert_eq!(stats.packets_in, fed as u64, "packets taken: {stats:?}");
    let dropped: u64 = stats.dropped.values().sum();
    assert!(dropped <= stats.packets_in, "{stats:?}");
    assert!(stats.flows_opened <= stats.packets_in, "{stats:?}");
    assert!(
        stats.flows_connected == 0,
        "connected to a closed port: {stats:?}"
    );
}

/// A packet the stack wrote: whole, within the MTU, with correct checksums.
fn check_sent(packet: &[u8]) {
    assert!(
        packet.len() <= MTU,
        "{}-byte packet, MTU {MTU}",
        packet.len()
    );
    if let Err(e) = SlicedPacket::from_ip(packet) {
        panic!("the stack wrote a malformed packet ({e}): {packet:02x?}");
    }
    let mut fixed = packet.to_vec();
    fix_checksums(&mut fixed);
    assert_eq!(
        fixed, packet,
        "the stack wrote a packet with a wrong checksum"
    );
}
