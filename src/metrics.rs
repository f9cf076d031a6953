//! Observability: the one set of counters of a tunnel, its summary line, and the
//! Prometheus text endpoint.
//!
//! Stage: beside the data path. Every stage (stack, flows, UDP NAT, DNS, egress)
//! counts into one [`Metrics`], shared by `Arc`: plain atomics, lock-free, bumped
//! with `Relaxed` ordering (a counter orders nothing). A [`Snapshot`] reads them all
//! at once; its `Display` is the summary line that `--stats-interval` logs and the
//! tunnel's "stopped" line carries. [`prometheus`] encodes a snapshot in the
//! Prometheus / OpenMetrics text format and [`http`] serves it on `GET /metrics`.
//!
//! It must not decide anything: nothing on the data path reads a counter back.

pub mod http;
mod interval;
pub mod prometheus;
mod snapshot;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

pub use interval::{Observers, log_every};
pub use snapshot::{DnsStats, Snapshot, SocksErrorKey};

use crate::stack::classify::DropReason;
use crate::upstream::UpstreamError;

/// Adds one to a counter.
pub fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Relaxed);
}

/// Adds `n` to a counter.
pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Relaxed);
}

/// Every counter of a tunnel, grouped by stage.
#[derive(Debug, Default)]
pub struct Metrics {
    /// The stack's poll loop and the packets it read and wrote.
    pub stack: StackCounters,
    /// TCP flows.
    pub flows: FlowStats,
    /// UDP associations (the NAT).
    pub udp: UdpStats,
    /// Packets built outside smoltcp (UDP replies, DNS answers, ICMP errors).
    pub egress: EgressStats,
    /// DNS, by how each query was handled.
    pub dns: DnsCounters,
    /// Requests the proxy failed, by command and reply code.
    pub socks: SocksErrors,
}

impl Metrics {
    /// A fresh set of counters, all zero.
    pub fn new() -> Self {
        Metrics::default()
    }
}

/// The stack's own counters.
#[derive(Debug, Default)]
pub struct StackCounters {
    /// Passes of the poll loop (each follows a packet, a flow's request or a timer;
    /// an idle stack makes none).
    pub wakeups: AtomicU64,
    /// Busy-poll passes that found work (a packet or a flow's request) instead of
    /// sleeping for it.
    pub spin_hits: AtomicU64,
    /// Packets read from the device.
    pub packets_in: AtomicU64,
    /// Packets smoltcp wrote to the device (egress counts its own).
    pub packets_out: AtomicU64,
    /// Packets from smoltcp the device refused.
    pub packets_out_dropped: AtomicU64,
    /// Packets dropped on the way in, by [`DropReason`] (indexed by
    /// [`DropReason::index`]).
    pub dropped: [AtomicU64; DropReason::COUNT],
    /// Datagrams reassembled from IP fragments.
    pub reassembled: AtomicU64,
    /// Bytes of TCP rings held by flows now (the `--memory-limit` budget's use).
    pub ring_bytes: AtomicU64,
    /// Most bytes of TCP rings held at once.
    pub ring_bytes_peak: AtomicU64,
    /// Ring growths refused because the budget was spent.
    pub ring_growth_denied: AtomicU64,
}

impl StackCounters {
    /// Counts a packet dropped on the way in.
    pub fn drop_packet(&self, reason: DropReason) {
        if let Some(counter) = self.dropped.get(reason.index()) {
            bump(counter);
        }
    }
}

/// Counters shared by all TCP flows.
#[derive(Debug, Default)]
pub struct FlowStats {
    /// Flows opened (a SYN got a socket and a task).
    pub opened: AtomicU64,
    /// Flows whose upstream CONNECT succeeded.
    pub connected: AtomicU64,
    /// Flows reset because the proxy could not be reached or refused.
    pub failed: AtomicU64,
    /// Flow tasks running now.
    pub active: AtomicU64,
    /// SYNs reset because the flow limit was reached.
    pub over_limit: AtomicU64,
    /// TCP SYNs to the proxy's own address and port, reset (they would loop).
    pub loops_refused: AtomicU64,
    /// Bytes from applications to the proxy (counted as they move).
    pub bytes_up: AtomicU64,
    /// Bytes from the proxy to applications (counted as they move).
    pub bytes_down: AtomicU64,
}

impl FlowStats {
    /// Marks one flow task as running until the guard drops.
    pub fn active_guard(&self) -> ActiveFlow<'_> {
        bump(&self.active);
        ActiveFlow(&self.active)
    }

    /// Adds the bytes moved since the last call: `counted` is what was added
    /// before, `now` the flow's running totals (up, down).
    pub fn count_bytes(&self, counted: &mut (u64, u64), now: (u64, u64)) {
        add(&self.bytes_up, now.0.saturating_sub(counted.0));
        add(&self.bytes_down, now.1.saturating_sub(counted.1));
        *counted = now;
    }
}

/// A running flow task; see [`FlowStats::active_guard`].
#[derive(Debug)]
pub struct ActiveFlow<'a>(&'a AtomicU64);

impl Drop for ActiveFlow<'_> {
    fn drop(&mut self) {
        // Never below zero, even if a guard were dropped twice by mistake.
        let _ = self
            .0
            .fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_sub(1)));
    }
}

/// UDP counters.
#[derive(Debug, Default)]
pub struct UdpStats {
    /// Associations set up with the proxy (re-associations included).
    pub associations: AtomicU64,
    /// Associations open now.
    pub active: AtomicU64,
    /// Control connections the proxy closed while the association was in use.
    pub reassociations: AtomicU64,
    /// Datagrams from applications sent to the relay.
    pub datagrams_up: AtomicU64,
    /// Datagrams from the relay written to the TUN.
    pub datagrams_down: AtomicU64,
    /// Payload bytes from applications.
    pub bytes_up: AtomicU64,
    /// Payload bytes from the relay.
    pub bytes_down: AtomicU64,
    /// Datagrams answered with port unreachable (no UDP at the proxy, or it failed).
    pub refused: AtomicU64,
    /// Port unreachables the relay socket reported, passed on to the application
    /// (a relay that is not listening, or a destination's that the proxy forwarded).
    pub relay_unreachable: AtomicU64,
    /// Dropped: the association's set-up queue was full.
    pub queue_full: AtomicU64,
    /// Dropped: the relay socket's buffer was full.
    pub relay_busy: AtomicU64,
    /// Dropped: `max_associations` reached.
    pub over_limit: AtomicU64,
    /// Dropped: too large for a relay datagram.
    pub oversized: AtomicU64,
    /// Dropped: to a broadcast address of the device's networks.
    pub broadcast: AtomicU64,
    /// Dropped: a reply the application cannot be shown (a source name we cannot map,
    /// or a family that is not the application's).
    pub unmappable: AtomicU64,
}

impl UdpStats {
    /// The drop counters with their reason names (prefixed `udp-`).
    pub fn drops(&self) -> [(&'static str, &AtomicU64); 6] {
        [
            ("udp-queue-full", &self.queue_full),
            ("udp-relay-busy", &self.relay_busy),
            ("udp-over-limit", &self.over_limit),
            ("udp-oversized", &self.oversized),
            ("udp-broadcast", &self.broadcast),
            ("udp-unmappable", &self.unmappable),
        ]
    }
}

/// What egress did.
#[derive(Debug, Default)]
pub struct EgressStats {
    /// Packets written.
    pub sent: AtomicU64,
    /// Packets the device refused (its queue was full).
    pub device_full: AtomicU64,
    /// Packets not built: larger than IP can carry, or a source and destination of
    /// different families.
    pub unsendable: AtomicU64,
    /// UDP datagrams larger than the device's MTU, sent as IP fragments.
    pub fragmented: AtomicU64,
}

/// DNS counters.
#[derive(Debug, Default)]
pub struct DnsCounters {
    /// Queries seen.
    pub queries: AtomicU64,
    /// Relayed as UDP (`udp` mode).
    pub via_udp: AtomicU64,
    /// Sent over TCP (`tcp` mode and fake-ip's other queries).
    pub via_tcp: AtomicU64,
    /// Answered over TCP.
    pub tcp_answers: AtomicU64,
    /// Answered from the fake-IP pool.
    pub answered_fake: AtomicU64,
    /// A / AAAA answered with no records (no pool of that family).
    pub answered_empty: AtomicU64,
    /// Answers truncated to the client's UDP limit.
    pub truncated: AtomicU64,
    /// SERVFAIL built here.
    pub servfail: AtomicU64,
    /// Queries that did not decode.
    pub malformed: AtomicU64,
    /// Datagrams dropped by the DNS module (a response sent to port 53).
    pub dropped: AtomicU64,
    /// Datagrams dropped by the stack: not a query, or too many queries over TCP
    /// in flight.
    pub seam_dropped: AtomicU64,
    /// Queries over TCP that failed (connection lost twice, or deadline).
    pub tcp_errors: AtomicU64,
    /// Fake-IP entries recycled for a new name.
    pub fake_recycled: AtomicU64,
    /// Flows to a fake address that no name holds.
    pub fake_unknown: AtomicU64,
    /// Names held in the fake-IP map now (both families).
    pub fake_entries: AtomicU64,
    /// The DNS-over-TCP client.
    pub tcp: DnsTcpCounters,
}

/// Counters of the DNS-over-TCP client.
#[derive(Debug, Default)]
pub struct DnsTcpCounters {
    /// Connections opened (SOCKS CONNECT attempted).
    pub connections: AtomicU64,
    /// Connections that failed to set up or died with queries outstanding.
    pub failures: AtomicU64,
    /// Queries sent again after their connection failed.
    pub retries: AtomicU64,
    /// Queries that reached their deadline.
    pub timeouts: AtomicU64,
    /// Answers whose ID matched no outstanding query (late, or bogus).
    pub unmatched: AtomicU64,
}

/// The SOCKS request a failure answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocksCommand {
    /// CONNECT (a TCP flow).
    Connect,
    /// UDP ASSOCIATE.
    UdpAssociate,
}

impl SocksCommand {
    /// Every command, in label order.
    pub const ALL: [SocksCommand; 2] = [SocksCommand::Connect, SocksCommand::UdpAssociate];

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            SocksCommand::Connect => "connect",
            SocksCommand::UdpAssociate => "udp-associate",
        }
    }

    fn index(self) -> usize {
        match self {
            SocksCommand::Connect => 0,
            SocksCommand::UdpAssociate => 1,
        }
    }
}

/// Labels of the SOCKS error kinds: the SOCKS5 reply codes 0x01-0x08 (SOCKS4
/// refusals count as 0x01), `other` (another code, a refused login, a malformed
/// reply, a timeout) and `unreachable` (no connection to the proxy at all).
pub const SOCKS_ERROR_CODES: [&str; 10] = [
    "0x01",
    "0x02",
    "0x03",
    "0x04",
    "0x05",
    "0x06",
    "0x07",
    "0x08",
    "other",
    "unreachable",
];

/// Requests the proxy failed, by command and kind ([`SOCKS_ERROR_CODES`]).
#[derive(Debug, Default)]
pub struct SocksErrors {
    counts: [[AtomicU64; SOCKS_ERROR_CODES.len()]; SocksCommand::ALL.len()],
}

impl SocksErrors {
    /// Counts one failed request.
    pub fn record(&self, command: SocksCommand, error: &UpstreamError) {
        let kind = if error.proxy_unreachable() {
            9
        } else {
            match error.reply_code() {
                Some(code) if (1..=8).contains(&code.0) => usize::from(code.0 - 1),
                _ => 8,
            }
        };
        if let Some(counter) = self
            .counts
            .get(command.index())
            .and_then(|row| row.get(kind))
        {
            bump(counter);
        }
    }

    /// The count for `command` and the label `code` (one of [`SOCKS_ERROR_CODES`]).
    pub fn get(&self, command: SocksCommand, code: &str) -> u64 {
        let kind = SOCKS_ERROR_CODES.iter().position(|c| *c == code);
        kind.and_then(|k| self.counts.get(command.index())?.get(k))
            .map_or(0, |c| c.load(Relaxed))
    }

    /// Every (command, code, count).
    pub fn each(&self) -> impl Iterator<Item = (SocksCommand, &'static str, u64)> + '_ {
        SocksCommand::ALL.into_iter().flat_map(move |command| {
            SOCKS_ERROR_CODES
                .iter()
                .zip(self.counts.get(command.index()).into_iter().flatten())
                .map(move |(code, count)| (command, *code, count.load(Relaxed)))
        })
    }
}

#[cfg(test)]
mod tests;
