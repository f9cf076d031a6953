//! UDP clients for the services of [`udp`](super::udp), run inside a namespace (the
//! app's, usually): echo checks that verify every payload, a latency probe, a
//! fixed-rate sender that counts replies, many source ports at once, and the
//! full-cone check. They only use ordinary sockets, so they measure the kernel path
//! and the tunnel alike.
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
use super::udp::{CONE_PORT, CONE_REPLY_PORT, bind_udp, cone_reply, cone_request};

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

fn wildcard(target: SocketAddr) -> SocketAddr {
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
    let socket = connected_socket(ns, target)?;
    socket
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .map_err(context("udp echo: read timeout"))?;
    let window = window.max(1);
    let mut report = EchoReport::default();
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

fn is_timeout(e: &io::Error) -> bool {
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

/// Round trips of single datagrams of `payload` bytes (one at a time): use
/// [`EchoReport::percentile`] for p50 and p99.
pub fn udp_latency(
    ns: &Namespace,
    target: SocketAddr,
    count: usize,
    payload: usize,
) -> io::Result<EchoReport> {
    udp_echo_check(ns, target, count, payload..=payload)
}

/// Sends one datagram from a connected socket in `ns` to `target` (where nothing
/// listens, or through a proxy without UDP) and waits up to `timeout` for the ICMP /
/// ICMPv6 port unreachable, which a connected socket reports as `ECONNREFUSED` on
/// its next receive. Returns how long it took; a reply, silence until `timeout` or
/// another error is an error.
pub fn udp_expect_unreachable(
    ns: &Namespace,
    target: SocketAddr,
    timeout: Duration,
) -> io::Result<Duration> {
    let socket = connected_socket(ns, target)?;
    socket
        .set_read_timeout(Some(timeout))
        .map_err(context("unreachable: read timeout"))?;
    let start = Instant::now();
    socket
        .send(&echo_payload(0, 64))
        .map_err(context(format!("unreachable: send to {target}")))?;
    let mut buf = [0u8; 2048];
    match recv_retrying(&socket, &mut buf) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(start.elapsed()),
        Err(e) if is_timeout(&e) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no port unreachable from {target} within {timeout:?}"),
        )),
        Err(e) => Err(context(format!("unreachable: recv from {target}"))(e)),
        Ok(n) => Err(io::Error::other(format!(
            "{target} answered ({n} bytes) instead of port unreachable"
        ))),
    }
}

/// Sends `count` datagrams to the IPv4 broadcast address `255.255.255.255:port` from
/// `ns` (SO_BROADCAST set). Whether they go anywhere is the caller's question: with
/// the sink's port, [`UdpServices::sink_received`](super::udp::UdpServices::sink_received)
/// tells whether one was forwarded to the target.
pub fn udp_send_broadcast(ns: &Namespace, port: u16, count: usize) -> io::Result<()> {
    let socket = ns.within(|| bind_udp(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))))?;
    socket
        .set_broadcast(true)
        .map_err(context("SO_BROADCAST"))?;
    let to = SocketAddr::from((Ipv4Addr::BROADCAST, port));
    for i in 0..count {
        socket
            .send_to(&echo_payload(i as u64, 64), to)
            .map_err(context(format!("send to {to}")))?;
    }
    Ok(())
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

/// Many UDP sockets of one namespace, each on its own source port; held open until
/// dropped (for "200 ports at once" and for idle associations).
#[derive(Debug)]
pub struct UdpFanout {
    sockets: Vec<UdpSocket>,
}

/// What [`UdpFanout::echo_once`] saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FanoutReport {
    /// Sockets that sent.
    pub sockets: usize,
    /// Sockets that got their own payload back.
    pub answered: usize,
    /// Replies with another socket's payload or altered bytes.
    pub wrong: usize,
}

impl UdpFanout {
    /// Opens `count` UDP sockets in `ns`, of `family`'s address family (`family` is
    /// any address of it, e.g. the target's), each bound to its own ephemeral port.
    pub fn open(ns: &Namespace, family: IpAddr, count: usize) -> io::Result<UdpFanout> {
        let any = wildcard(SocketAddr::new(family, 0));
        let sockets = ns.within(move || {
            (0..count)
                .map(|_| {
                    let socket = UdpSocket::bind(any).map_err(context(format!("bind {any}")))?;
                    socket
                        .set_nonblocking(true)
                        .map_err(context("nonblocking"))?;
                    Ok(socket)
                })
                .collect::<io::Result<Vec<_>>>()
        })?;
        Ok(UdpFanout { sockets })
    }

    /// The number of sockets.
    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// The local port of every socket.
    pub fn ports(&self) -> io::Result<Vec<u16>> {
        self.sockets
            .iter()
            .map(|s| s.local_addr().map(|a| a.port()))
            .collect()
    }

    /// Every socket sends one datagram (its index and `payload` bytes in all) to the
    /// echo at `target`, all at once; then each waits, up to `timeout` in all, for its
    /// own payload to come back. Nothing is resent.
    pub fn echo_once(
        &self,
        target: SocketAddr,
        payload: usize,
        timeout: Duration,
    ) -> io::Result<FanoutReport> {
        let mut report = FanoutReport {
            sockets: self.sockets.len(),
            ..FanoutReport::default()
        };
        for (i, socket) in self.sockets.iter().enumerate() {
            send_retrying(socket, &echo_payload(i as u64, payload), target)?;
        }
        let mut pending: Vec<usize> = (0..self.sockets.len()).collect();
        let mut buf = vec![0u8; 65_536];
        let deadline = Instant::now() + timeout;
        while !pending.is_empty() && Instant::now() < deadline {
            pending.retain(|&i| {
                let Some(socket) = self.sockets.get(i) else {
                    return false;
                };
                match socket.recv_from(&mut buf) {
                    Ok((n, _from)) => {
                        if buf.get(..n) == Some(echo_payload(i as u64, payload).as_slice()) {
                            report.answered += 1;
                        } else {
                            report.wrong += 1;
                        }
                        false
                    }
                    Err(_) => true,
                }
            });
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(report)
    }
}

/// Sends on a nonblocking socket, waiting briefly while its buffer is full.
fn send_retrying(socket: &UdpSocket, data: &[u8], target: SocketAddr) -> io::Result<()> {
    let deadline = Instant::now() + REPLY_TIMEOUT;
    loop {
        match socket.send_to(data, target) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(context(format!("send to {target}"))(e)),
        }
    }
}

/// `count` sockets in `ns` each send one datagram to the echo at `target` at once,
/// and each must get its own payload back within `timeout` (see [`UdpFanout`]).
pub fn udp_many_ports(
    ns: &Namespace,
    target: SocketAddr,
    count: usize,
    timeout: Duration,
) -> io::Result<FanoutReport> {
    UdpFanout::open(ns, target.ip(), count)?.echo_once(target, 64, timeout)
}

/// What the full-cone check saw: where the reply came from and what it said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConeReply {
    /// The source `recv_from` reported for the reply.
    pub from: SocketAddr,
    /// Whether the reply was the cone service's `CONE-REPLY <port>` for the port asked.
    pub payload_ok: bool,
}

/// One socket in `ns` sends `CONE <reply_port>` to the cone service on `target`
/// ([`CONE_PORT`]) and waits up to `timeout` for the answer, which the service sends
/// from `reply_port`, a port this socket never sent to. The caller checks that
/// [`ConeReply::from`] is `(target, reply_port)` (see [`udp_cone_check`]).
pub fn udp_cone(
    ns: &Namespace,
    target: IpAddr,
    reply_port: u16,
    timeout: Duration,
) -> io::Result<ConeReply> {
    let service = SocketAddr::new(target, CONE_PORT);
    let socket = ns.within(move || bind_udp(wildcard(service)))?;
    socket
        .set_read_timeout(Some(timeout))
        .map_err(context("cone: read timeout"))?;
    socket
        .send_to(&cone_request(reply_port), service)
        .map_err(context(format!("cone: send to {service}")))?;
    let mut buf = vec![0u8; 2048];
    let (n, from) = recv_from_retrying(&socket, &mut buf).map_err(context(format!(
        "cone: no reply from {target} port {reply_port}"
    )))?;
    Ok(ConeReply {
        from,
        payload_ok: buf.get(..n) == Some(cone_reply(reply_port).as_slice()),
    })
}

/// [`udp_cone`] with [`CONE_REPLY_PORT`], failing unless the reply came from
/// `(target, CONE_REPLY_PORT)` with the expected payload.
pub fn udp_cone_check(ns: &Namespace, target: IpAddr) -> io::Result<ConeReply> {
    let reply = udp_cone(ns, target, CONE_REPLY_PORT, REPLY_TIMEOUT)?;
    let expected = SocketAddr::new(target, CONE_REPLY_PORT);
    if reply.from != expected || !reply.payload_ok {
        return Err(io::Error::other(format!(
            "cone: expected the reply from {expected}, got {reply:?}"
        )));
    }
    Ok(reply)
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
