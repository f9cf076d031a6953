//! UDP clients for the services of [`udp`](super::udp), run inside a namespace (the
//! app's, usually): echo checks that verify every payload, a latency probe and a
//! fixed-rate sender that counts replies (one-off probes are in
//! [`udp_probes`](super::udp_probes)). They only use ordinary sockets, so they
//! measure the kernel path and the tunnel alike.
//!
//! Every datagram an echo check sends starts with its sequence number (8 bytes, little
//! endian) followed by [`blob`]`(len - 8, seq)`, so a reply is matched to its request
//! and checked byte for byte.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use super::context;
use super::namespace::Namespace;
use super::services::blob;
use super::udp::bind_udp;

// The one-off probes moved to `udp_probes`; these paths stay for existing callers.
pub use super::udp_probes::{
    ConeReply, FanoutReport, UdpFanout, udp_cone, udp_cone_check, udp_many_ports,
};

/// The smallest payload an echo check sends: the sequence number.
pub const MIN_PAYLOAD: usize = 8;
/// How long a client waits for a reply before it counts the datagram as lost.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// The largest UDP payload that fits an IP packet of `mtu` bytes without fragments.
pub fn max_udp_payload(mtu: usize, ipv6: bool) -> usize {
    let headers = if ipv6 { 40 + 8 } else { 20 + 8 };
    mtu.saturating_sub(headers)
}

/// What an echo check saw.
#[derive(Debug, Clone, Default)]
pub struct EchoReport {
    /// Datagrams sent.
    pub sent: usize,
    /// Replies that matched a datagram in flight, byte for byte.
    pub received: usize,
    /// Datagrams that got no reply in time.
    pub lost: usize,
    /// Replies that came back altered (wrong length or bytes), or for no datagram.
    pub corrupted: usize,
    /// Replies that came after their datagram was counted lost (not in `received`).
    pub late: usize,
    /// Round-trip time of each intact reply.
    pub rtts: Vec<Duration>,
    /// The probe socket's own address (a later socket may be given its port once it
    /// is closed: tests that count associations count distinct endpoints).
    pub local: Option<SocketAddr>,
}

impl EchoReport {
    /// The `p`-th percentile (0-100) of the round trips, or `None` with none.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        percentile(&self.rtts, p)
    }

    /// Everything came back intact.
    pub fn all_ok(&self) -> bool {
        self.sent > 0 && self.received == self.sent && self.lost == 0 && self.corrupted == 0
    }
}

impl std::fmt::Display for EchoReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sent {}, received {}, lost {}, corrupted {}, late {}",
            self.sent, self.received, self.lost, self.corrupted, self.late
        )?;
        if let (Some(p50), Some(p99)) = (self.percentile(50.0), self.percentile(99.0)) {
            write!(
                f,
                ", p50 {} µs, p99 {} µs",
                p50.as_micros(),
                p99.as_micros()
            )?;
        }
        Ok(())
    }
}

/// The `p`-th percentile (0-100, nearest rank) of `samples`.
pub fn percentile(samples: &[Duration], p: f64) -> Option<Duration> {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let last = sorted.len().checked_sub(1)?;
    let rank = ((p.clamp(0.0, 100.0) / 100.0) * last as f64).round() as usize;
    sorted.get(rank.min(last)).copied()
}

/// The payload of datagram `seq` with `len` bytes (at least [`MIN_PAYLOAD`]).
pub fn echo_payload(seq: u64, len: usize) -> Vec<u8> {
    let mut payload = seq.to_le_bytes().to_vec();
    payload.extend_from_slice(&blob(len.saturating_sub(MIN_PAYLOAD), seq));
    payload
}

/// The size of datagram `i` of `count`: spread over `sizes` (the first is the largest,
/// the second the smallest, the rest scattered between), never below [`MIN_PAYLOAD`].
pub fn echo_size(i: usize, sizes: &RangeInclusive<usize>) -> usize {
    let (low, high) = (
        (*sizes.start()).max(MIN_PAYLOAD),
        (*sizes.end()).max(MIN_PAYLOAD),
    );
    let span = high.saturating_sub(low).saturating_add(1);
    match i {
        0 => high,
        1 => low,
        _ => low.saturating_add(i.wrapping_mul(7919) % span),
    }
}

/// A UDP socket in `ns` bound to the wildcard address of `target`'s family, connected
/// to `target`.
pub fn connected_socket(ns: &Namespace, target: SocketAddr) -> io::Result<UdpSocket> {
    ns.within(move || {
        let socket = bind_udp(wildcard(target))?;
        socket
            .connect(target)
            .map_err(context(format!("connect udp {target}")))?;
        Ok(socket)
    })
}

pub(crate) fn wildcard(target: SocketAddr) -> SocketAddr {
    let ip = match target {
        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    SocketAddr::new(ip, 0)
}

/// Sends `count` datagrams to the echo at `target` from one socket in `ns`, one at a
/// time, sizes spread over `sizes`, and checks every reply.
pub fn udp_echo_check(
    ns: &Namespace,
    target: SocketAddr,
    count: usize,
    sizes: RangeInclusive<usize>,
) -> io::Result<EchoReport> {
    udp_echo_windowed(ns, target, count, sizes, 1)
}

/// Like [`udp_echo_check`] with up to `window` datagrams in flight. When no reply
/// comes for [`REPLY_TIMEOUT`], everything in flight is counted lost.
pub fn udp_echo_windowed(
    ns: &Namespace,
    target: SocketAddr,
    count: usize,
    sizes: RangeInclusive<usize>,
    window: usize,
) -> io::Result<EchoReport> {
    echo_run(ns, target, count, sizes, window, REPLY_TIMEOUT)
}

fn echo_run(
    ns: &Namespace,
    target: SocketAddr,
    count: usize,
    sizes: RangeInclusive<usize>,
    window: usize,
    timeout: Duration,
) -> io::Result<EchoReport> {
    let socket = connected_socket(ns, target)?;
    socket
        .set_read_timeout(Some(timeout))
        .map_err(context("udp echo: read timeout"))?;
    let window = window.max(1);
    let mut report = EchoReport {
        local: socket.local_addr().ok(),
        ..EchoReport::default()
    };
    let mut in_flight: HashMap<u64, (Instant, usize)> = HashMap::new();
    let mut lost = HashSet::new();
    let mut buf = vec![0u8; 65_536];
    let mut next = 0usize;
    while next < count || !in_flight.is_empty() {
        while next < count && in_flight.len() < window {
            let len = echo_size(next, &sizes);
            let seq = next as u64;
            let payload = echo_payload(seq, len);
            let sent_at = Instant::now();
            socket
                .send(&payload)
                .map_err(context(format!("udp echo: send to {target}")))?;
            in_flight.insert(seq, (sent_at, len));
            report.sent += 1;
            next += 1;
        }
        match recv_retrying(&socket, &mut buf) {
            Ok(n) => check_reply(
                buf.get(..n).unwrap_or_default(),
                &mut in_flight,
                &lost,
                &mut report,
            ),
            Err(e) if is_timeout(&e) => {
                report.lost += in_flight.len();
                lost.extend(in_flight.drain().map(|(seq, _)| seq));
            }
            Err(e) => return Err(context(format!("udp echo: recv from {target}"))(e)),
        }
    }
    Ok(report)
}

/// Matches a reply to the datagram in flight with its sequence number, and counts it.
fn check_reply(
    reply: &[u8],
    in_flight: &mut HashMap<u64, (Instant, usize)>,
    lost: &HashSet<u64>,
    report: &mut EchoReport,
) {
    let seq = reply
        .get(..MIN_PAYLOAD)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes);
    let Some(seq) = seq else {
        report.corrupted += 1;
        return;
    };
    let Some((sent_at, len)) = in_flight.remove(&seq) else {
        if lost.contains(&seq) {
            report.late += 1;
        } else {
            report.corrupted += 1;
        }
        return;
    };
    if reply.len() == len && reply == echo_payload(seq, len).as_slice() {
        report.received += 1;
        report.rtts.push(sent_at.elapsed());
    } else {
        report.corrupted += 1;
    }
}

pub(crate) fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// `recv` that tries again when a signal interrupts it: with `SO_RCVTIMEO` set, a
/// signal handler anywhere in the process (the test harness, tokio's SIGCHLD) makes a
/// blocking receive fail with `EINTR` even under `SA_RESTART`.
pub(crate) fn recv_retrying(socket: &UdpSocket, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match socket.recv(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// `recv_from` that tries again when a signal interrupts it (see [`recv_retrying`]).
pub(crate) fn recv_from_retrying(
    socket: &UdpSocket,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr)> {
    loop {
        match socket.recv_from(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// How long the latency probe waits for one reply before it counts it lost.
pub const LATENCY_TIMEOUT: Duration = Duration::from_millis(500);

/// Round trips of single datagrams of `payload` bytes (one at a time): use
/// [`EchoReport::percentile`] for p50 and p99. A probe without a reply within
/// [`LATENCY_TIMEOUT`] is counted lost, so a lossy path costs little time.
pub fn udp_latency(
    ns: &Namespace,
    target: SocketAddr,
    count: usize,
    payload: usize,
) -> io::Result<EchoReport> {
    echo_run(ns, target, count, payload..=payload, 1, LATENCY_TIMEOUT)
}

/// What a fixed-rate run saw.
#[derive(Debug, Clone, Copy, Default)]
pub struct RateReport {
    /// The rate asked for, datagrams/s.
    pub offered: u64,
    /// Datagrams sent.
    pub sent: u64,
    /// Replies received (until a short drain after the last send).
    pub received: u64,
    /// Sends the kernel refused at once (a full queue, an unreachable route).
    pub send_errors: u64,
    /// How long the sending took.
    pub elapsed: Duration,
}

impl RateReport {
    /// Datagrams sent per second.
    pub fn sent_per_sec(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Replies received per second of sending.
    pub fn received_per_sec(&self) -> f64 {
        self.received as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Share of sent datagrams without a reply, in percent.
    pub fn loss_percent(&self) -> f64 {
        if self.sent == 0 {
            return 100.0;
        }
        100.0 * self.sent.saturating_sub(self.received) as f64 / self.sent as f64
    }
}

/// How often the rate sender catches up with its schedule.
const RATE_TICK: Duration = Duration::from_millis(1);
/// How long replies are still counted after the last send.
const RATE_DRAIN: Duration = Duration::from_millis(500);

/// Sends `payload`-byte datagrams to the echo at `target` at `rate` per second for
/// `duration` (paced every millisecond), from one socket in `ns`, and counts the
/// replies on a second thread.
pub fn udp_rate(
    ns: &Namespace,
    target: SocketAddr,
    rate: u64,
    duration: Duration,
    payload: usize,
) -> io::Result<RateReport> {
    let socket = connected_socket(ns, target)?;
    let receiver = socket.try_clone().map_err(context("udp rate: clone"))?;
    receiver
        .set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(context("udp rate: read timeout"))?;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let counter = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            let mut received = 0u64;
            let mut drain_until: Option<Instant> = None;
            loop {
                if drain_until.is_none() && done.load(std::sync::atomic::Ordering::Acquire) {
                    drain_until = Some(Instant::now() + RATE_DRAIN);
                }
                if drain_until.is_some_and(|t| Instant::now() >= t) {
                    return received;
                }
                if recv_retrying(&receiver, &mut buf).is_ok() {
                    received += 1;
                }
            }
        })
    };
    let data = echo_payload(0, payload);
    let start = Instant::now();
    let (mut sent, mut send_errors) = (0u64, 0u64);
    loop {
        let elapsed = start.elapsed();
        if elapsed >= duration {
            break;
        }
        let due = (rate as f64 * elapsed.as_secs_f64()) as u64;
        while sent + send_errors < due {
            match socket.send(&data) {
                Ok(_) => sent += 1,
                Err(_) => send_errors += 1,
            }
        }
        std::thread::sleep(RATE_TICK);
    }
    let elapsed = start.elapsed();
    done.store(true, std::sync::atomic::Ordering::Release);
    let received = counter
        .join()
        .map_err(|_| io::Error::other("udp rate: the counting thread panicked"))?;
    Ok(RateReport {
        offered: rate,
        sent,
        received,
        send_errors,
        elapsed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_cover_both_ends_and_stay_in_range() {
        let sizes = 8..=1472;
        assert_eq!(echo_size(0, &sizes), 1472);
        assert_eq!(echo_size(1, &sizes), 8);
        assert!((2..1000).all(|i| sizes.contains(&echo_size(i, &sizes))));
        assert_eq!(echo_size(5, &(0..=3)), MIN_PAYLOAD);
    }

    #[test]
    fn payloads_carry_their_sequence() {
        let p = echo_payload(42, 100);
        assert_eq!(p.len(), 100);
        assert_eq!(p.get(..8), Some(&42u64.to_le_bytes()[..]));
        assert_ne!(echo_payload(43, 100), p);
    }

    #[test]
    fn replies_are_matched_and_checked() {
        let mut report = EchoReport::default();
        let mut in_flight = HashMap::new();
        in_flight.insert(1, (Instant::now(), 50));
        in_flight.insert(2, (Instant::now(), 50));
        in_flight.insert(3, (Instant::now(), 50));
        let lost = HashSet::from([7]);
        check_reply(&echo_payload(1, 50), &mut in_flight, &lost, &mut report);
        let mut bad = echo_payload(2, 50);
        bad[30] ^= 1;
        check_reply(&bad, &mut in_flight, &lost, &mut report);
        check_reply(&echo_payload(9, 50), &mut in_flight, &lost, &mut report);
        check_reply(&echo_payload(7, 50), &mut in_flight, &lost, &mut report);
        check_reply(b"abc", &mut in_flight, &lost, &mut report);
        assert_eq!((report.received, report.corrupted, report.late), (1, 3, 1));
        assert_eq!(in_flight.len(), 1);
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let ms: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&ms, 50.0), Some(Duration::from_millis(51)));
        assert_eq!(percentile(&ms, 99.0), Some(Duration::from_millis(99)));
        assert_eq!(percentile(&ms, 100.0), Some(Duration::from_millis(100)));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(max_udp_payload(1500, false), 1472);
        assert_eq!(max_udp_payload(1500, true), 1452);
    }
}
