//! A snapshot of every counter at one moment, and its summary line.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::{Metrics, SocksCommand};
use crate::stack::classify::DropReason;

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Relaxed)
}

/// A SOCKS error count's labels: the command and the kind (see
/// [`super::SOCKS_ERROR_CODES`]).
pub type SocksErrorKey = (&'static str, &'static str);

/// A snapshot of the DNS counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DnsStats {
    /// Queries seen.
    pub queries: u64,
    /// Relayed as UDP (`udp` mode).
    pub via_udp: u64,
    /// Sent over TCP (decisions; `tcp` mode and fake-ip's other queries).
    pub via_tcp: u64,
    /// Answered over TCP and handed back.
    pub tcp_answers: u64,
    /// Answered from the fake-IP pool.
    pub answered_fake: u64,
    /// A / AAAA answered with no records (no pool of that family).
    pub answered_empty: u64,
    /// Answers truncated to the client's UDP limit.
    pub truncated: u64,
    /// SERVFAIL built here (fake-IP pool exhausted, or a query over TCP failed).
    pub servfail: u64,
    /// Queries that did not decode (FORMERR, or dropped when shorter than a header).
    pub malformed: u64,
    /// Datagrams dropped for another reason (a response sent to port 53).
    pub dropped: u64,
    /// Queries over TCP that failed (connection lost twice, or deadline).
    pub tcp_errors: u64,
    /// Of those, deadline reached.
    pub tcp_timeouts: u64,
    /// Queries retried after their connection failed.
    pub tcp_retries: u64,
    /// DNS-over-TCP connections opened.
    pub tcp_connections: u64,
    /// Fake-IP entries recycled for a new name.
    pub fake_recycled: u64,
    /// Flows to a fake address that no name holds.
    pub fake_unknown: u64,
    /// Names held in the fake-IP map now (both families).
    pub fake_entries: u64,
}

impl DnsStats {
    /// Reads the DNS counters of `metrics`.
    pub fn of(metrics: &Metrics) -> Self {
        let d = &metrics.dns;
        DnsStats {
            queries: get(&d.queries),
            via_udp: get(&d.via_udp),
            via_tcp: get(&d.via_tcp),
            tcp_answers: get(&d.tcp_answers),
            answered_fake: get(&d.answered_fake),
            answered_empty: get(&d.answered_empty),
            truncated: get(&d.truncated),
            servfail: get(&d.servfail),
            malformed: get(&d.malformed),
            dropped: get(&d.dropped),
            tcp_errors: get(&d.tcp_errors),
            tcp_timeouts: get(&d.tcp.timeouts),
            tcp_retries: get(&d.tcp.retries),
            tcp_connections: get(&d.tcp.connections),
            fake_recycled: get(&d.fake_recycled),
            fake_unknown: get(&d.fake_unknown),
            fake_entries: get(&d.fake_entries),
        }
    }
}

/// Every counter at one moment. Field names are those of the stack's former
/// `StackStats`, which is now this type.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Passes of the stack's poll loop.
    pub wakeups: u64,
    /// Busy-poll passes that found work instead of sleeping for it.
    pub spin_hits: u64,
    /// Bytes of TCP rings held by flows (at the snapshot).
    pub ring_bytes: u64,
    /// Most bytes of TCP rings held at once.
    pub ring_bytes_peak: u64,
    /// Ring growths refused because `--memory-limit` was spent.
    pub ring_growth_denied: u64,
    /// Packets read from the device.
    pub packets_in: u64,
    /// Packets written to the device (smoltcp's and egress's).
    pub packets_out: u64,
    /// Packets from smoltcp the device refused.
    pub packets_out_dropped: u64,
    /// Datagrams reassembled from the applications' IP fragments.
    pub reassembled: u64,
    /// UDP datagrams sent to applications as IP fragments (larger than the MTU).
    pub fragmented: u64,
    /// Packets dropped on the way in, by reason (only reasons that occurred).
    pub dropped: BTreeMap<&'static str, u64>,
    /// TCP flows opened.
    pub flows_opened: u64,
    /// SYNs reset because the flow limit was reached.
    pub flows_over_limit: u64,
    /// Flows whose upstream CONNECT succeeded.
    pub flows_connected: u64,
    /// Flows reset because the proxy could not be reached or refused.
    pub flows_failed: u64,
    /// Flow tasks running now.
    pub flows_active: u64,
    /// Bytes from applications to the proxy.
    pub bytes_up: u64,
    /// Bytes from the proxy to applications.
    pub bytes_down: u64,
    /// TCP SYNs to the proxy's own address and port, reset (they would loop).
    pub loops_refused: u64,
    /// UDP associations set up with the proxy.
    pub udp_associations: u64,
    /// UDP associations open now.
    pub udp_active: u64,
    /// UDP datagrams from applications sent to the proxy.
    pub udp_up: u64,
    /// UDP datagrams from the proxy written to applications.
    pub udp_down: u64,
    /// UDP payload bytes from applications.
    pub udp_bytes_up: u64,
    /// UDP payload bytes to applications.
    pub udp_bytes_down: u64,
    /// UDP datagrams answered with port unreachable (the proxy has or gives no UDP).
    pub udp_refused: u64,
    /// Port unreachables from the proxy's UDP relay passed on to applications.
    pub udp_relay_unreachable: u64,
    /// UDP datagrams dropped (queue or socket full, limit, oversized, broadcast,
    /// unmappable replies).
    pub udp_dropped: u64,
    /// Packets built outside smoltcp (UDP replies, ICMP errors) that the device
    /// refused, or that could not be built.
    pub egress_dropped: u64,
    /// DNS datagrams dropped (not a query, or too many queries over TCP at once).
    pub dns_dropped: u64,
    /// DNS, by mode and outcome.
    pub dns: DnsStats,
    /// Requests the proxy failed, by (command, code); only those that occurred.
    pub socks_errors: BTreeMap<SocksErrorKey, u64>,
}

impl Metrics {
    /// Reads every counter.
    pub fn snapshot(&self) -> Snapshot {
        let (s, f, u, e) = (&self.stack, &self.flows, &self.udp, &self.egress);
        let dropped = DropReason::ALL
            .iter()
            .zip(&s.dropped)
            .map(|(reason, n)| (reason.name(), get(n)))
            .filter(|(_, n)| *n > 0)
            .collect();
        let socks_errors = self
            .socks
            .each()
            .filter(|(_, _, n)| *n > 0)
            .map(|(command, code, n)| ((command.name(), code), n))
            .collect();
        Snapshot {
            wakeups: get(&s.wakeups),
            spin_hits: get(&s.spin_hits),
            ring_bytes: get(&s.ring_bytes),
            ring_bytes_peak: get(&s.ring_bytes_peak),
            ring_growth_denied: get(&s.ring_growth_denied),
            packets_in: get(&s.packets_in),
            packets_out: get(&s.packets_out).saturating_add(get(&e.sent)),
            packets_out_dropped: get(&s.packets_out_dropped),
            reassembled: get(&s.reassembled),
            fragmented: get(&e.fragmented),
            dropped,
            flows_opened: get(&f.opened),
            flows_over_limit: get(&f.over_limit),
            flows_connected: get(&f.connected),
            flows_failed: get(&f.failed),
            flows_active: get(&f.active),
            bytes_up: get(&f.bytes_up),
            bytes_down: get(&f.bytes_down),
            loops_refused: get(&f.loops_refused),
            udp_associations: get(&u.associations),
            udp_active: get(&u.active),
            udp_up: get(&u.datagrams_up),
            udp_down: get(&u.datagrams_down),
            udp_bytes_up: get(&u.bytes_up),
            udp_bytes_down: get(&u.bytes_down),
            udp_refused: get(&u.refused),
            udp_relay_unreachable: get(&u.relay_unreachable),
            udp_dropped: u
                .drops()
                .iter()
                .map(|(_, n)| get(n))
                .fold(0, u64::saturating_add),
            egress_dropped: get(&e.device_full).saturating_add(get(&e.unsendable)),
            dns_dropped: get(&self.dns.seam_dropped),
            dns: DnsStats::of(self),
            socks_errors,
        }
    }
}

impl Snapshot {
    /// The count of a SOCKS error (`code` one of [`super::SOCKS_ERROR_CODES`]).
    pub fn socks_error(&self, command: SocksCommand, code: &str) -> u64 {
        self.socks_errors
            .iter()
            .find(|((c, k), _)| *c == command.name() && *k == code)
            .map_or(0, |(_, n)| *n)
    }
}

/// The summary line: `name=value` pairs separated by spaces, every scalar counter
/// always present; drops as `drop.REASON=N` and SOCKS errors as
/// `socks.COMMAND.CODE=N`, only those that occurred.
impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.dns;
        let scalars: [(&str, u64); 47] = [
            ("flows_opened", self.flows_opened),
            ("flows_connected", self.flows_connected),
            ("flows_failed", self.flows_failed),
            ("flows_active", self.flows_active),
            ("flows_over_limit", self.flows_over_limit),
            ("loops_refused", self.loops_refused),
            ("bytes_up", self.bytes_up),
            ("bytes_down", self.bytes_down),
            ("udp_associations", self.udp_associations),
            ("udp_active", self.udp_active),
            ("udp_up", self.udp_up),
            ("udp_down", self.udp_down),
            ("udp_bytes_up", self.udp_bytes_up),
            ("udp_bytes_down", self.udp_bytes_down),
            ("udp_refused", self.udp_refused),
            ("udp_relay_unreachable", self.udp_relay_unreachable),
            ("udp_dropped", self.udp_dropped),
            ("dns_queries", d.queries),
            ("dns_via_udp", d.via_udp),
            ("dns_via_tcp", d.via_tcp),
            ("dns_tcp_answers", d.tcp_answers),
            ("dns_answered_fake", d.answered_fake),
            ("dns_answered_empty", d.answered_empty),
            ("dns_truncated", d.truncated),
            ("dns_servfail", d.servfail),
            ("dns_malformed", d.malformed),
            ("dns_tcp_errors", d.tcp_errors),
            ("dns_tcp_timeouts", d.tcp_timeouts),
            ("dns_tcp_retries", d.tcp_retries),
            ("dns_tcp_connections", d.tcp_connections),
            ("dns_fake_recycled", d.fake_recycled),
            ("dns_fake_unknown", d.fake_unknown),
            ("dns_fake_entries", d.fake_entries),
            ("dns_dropped", self.dns_dropped.saturating_add(d.dropped)),
            ("packets_in", self.packets_in),
            ("packets_out", self.packets_out),
            ("packets_out_dropped", self.packets_out_dropped),
            ("reassembled", self.reassembled),
            ("fragmented", self.fragmented),
            ("egress_dropped", self.egress_dropped),
            ("wakeups", self.wakeups),
            ("spin_hits", self.spin_hits),
            ("ring_bytes", self.ring_bytes),
            ("ring_bytes_peak", self.ring_bytes_peak),
            ("ring_growth_denied", self.ring_growth_denied),
            (
                "dropped",
                self.dropped.values().fold(0, |a, n| a.saturating_add(*n)),
            ),
            (
                "socks_errors",
                self.socks_errors
                    .values()
                    .fold(0, |a, n| a.saturating_add(*n)),
            ),
        ];
        let mut first = true;
        let mut sep = |f: &mut fmt::Formatter<'_>| {
            let s = if first { "" } else { " " };
            first = false;
            f.write_str(s)
        };
        for (name, value) in scalars {
            sep(f)?;
            write!(f, "{name}={value}")?;
        }
        for (reason, n) in &self.dropped {
            sep(f)?;
            write!(f, "drop.{reason}={n}")?;
        }
        for ((command, code), n) in &self.socks_errors {
            sep(f)?;
            write!(f, "socks.{command}.{code}={n}")?;
        }
        Ok(())
    }
}

impl Snapshot {
    /// The value of `name` in a summary line (`name=N`), if the line has it; `line`
    /// may be a whole log line.
    pub fn parse_field(line: &str, name: &str) -> Option<u64> {
        // A log line may glue its field name on: `stats=flows_opened=3`.
        line.split_whitespace()
            .filter_map(|pair| pair.rsplit_once('='))
            .find(|(key, _)| key.rsplit('=').next() == Some(name))
            .and_then(|(_, value)| value.trim_matches('"').parse().ok())
    }

    /// The value of `name` in the last `stopped stats=` line of a tunnel's `log` (a
    /// counter, or a drop reason: `drop.NAME`); 0 when absent (counters print once
    /// non-zero).
    pub fn final_stat(log: &str, name: &str) -> u64 {
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("stopped stats="))
            .unwrap_or_default();
        Snapshot::parse_field(line, name)
            .or_else(|| Snapshot::parse_field(line, &format!("drop.{name}")))
            .unwrap_or(0)
    }
}
