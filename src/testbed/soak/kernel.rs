//! The kernel's own drop counters in each namespace, read before and after the load:
//! where a lost datagram went (a full socket buffer in the app, the proxy or the
//! target; a TUN queue the tunnel did not drain) and how much TCP retransmitted.

use std::io;

use super::super::context;
use super::super::namespace::Namespace;

/// Drop and retransmission counters of one namespace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelCounters {
    /// UDP datagrams dropped for a full receive buffer (`Udp: RcvbufErrors`).
    pub udp_rcvbuf_errors: u64,
    /// UDP datagrams that could not be delivered (`Udp: InErrors`, includes the above).
    pub udp_in_errors: u64,
    /// TCP segments retransmitted (`Tcp: RetransSegs`).
    pub tcp_retrans: u64,
    /// Packets dropped on transmit by the device the reading was asked about: for a TUN
    /// device, packets the kernel had for the tunnel while its queue was full.
    pub dev_tx_dropped: u64,
}

impl KernelCounters {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &KernelCounters) -> KernelCounters {
        KernelCounters {
            udp_rcvbuf_errors: self
                .udp_rcvbuf_errors
                .saturating_sub(earlier.udp_rcvbuf_errors),
            udp_in_errors: self.udp_in_errors.saturating_sub(earlier.udp_in_errors),
            tcp_retrans: self.tcp_retrans.saturating_sub(earlier.tcp_retrans),
            dev_tx_dropped: self.dev_tx_dropped.saturating_sub(earlier.dev_tx_dropped),
        }
    }
}

/// Reads the counters of `ns` (from a thread inside it: `/proc/thread-self/net`), with
/// the transmit drops of device `dev` if given (0 if it does not exist).
pub fn read(ns: &Namespace, dev: Option<&'static str>) -> io::Result<KernelCounters> {
    ns.within(move || {
        let snmp_path = "/proc/thread-self/net/snmp";
        let snmp = std::fs::read_to_string(snmp_path).map_err(context(snmp_path))?;
        let dev_path = "/proc/thread-self/net/dev";
        let devs = std::fs::read_to_string(dev_path).map_err(context(dev_path))?;
        Ok(KernelCounters {
            udp_rcvbuf_errors: snmp_value(&snmp, "Udp", "RcvbufErrors").unwrap_or(0),
            udp_in_errors: snmp_value(&snmp, "Udp", "InErrors").unwrap_or(0),
            tcp_retrans: snmp_value(&snmp, "Tcp", "RetransSegs").unwrap_or(0),
            dev_tx_dropped: dev.and_then(|d| tx_dropped(&devs, d)).unwrap_or(0),
        })
    })
}

/// The value of `field` in the `proto` lines of `/proc/net/snmp` (a line of names,
/// then a line of values, both starting with `proto:`).
fn snmp_value(snmp: &str, proto: &str, field: &str) -> Option<u64> {
    let prefix = format!("{proto}:");
    let mut lines = snmp.lines().filter(|l| l.starts_with(&prefix));
    let names = lines.next()?;
    let values = lines.next()?;
    let at = names.split_whitespace().position(|n| n == field)?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// The transmit drops of `dev` in `/proc/net/dev` (after `dev:`, 8 receive counters,
/// then tx bytes, packets, errs, drop).
fn tx_dropped(devs: &str, dev: &str) -> Option<u64> {
    let prefix = format!("{dev}:");
    let line = devs
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(&prefix))?;
    line.get(prefix.len()..)?
        .split_whitespace()
        .nth(11)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_snmp_and_dev_counters() {
        let snmp = "Tcp: RtoAlgorithm RtoMin RetransSegs InErrs\n\
                    Tcp: 1 200 77 0\n\
                    Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors\n\
                    Udp: 1000 3 12 900 11\n";
        assert_eq!(snmp_value(snmp, "Udp", "RcvbufErrors"), Some(11));
        assert_eq!(snmp_value(snmp, "Udp", "InErrors"), Some(12));
        assert_eq!(snmp_value(snmp, "Tcp", "RetransSegs"), Some(77));
        assert_eq!(snmp_value(snmp, "Udp", "Nothing"), None);
        let devs = "Inter-|   Receive |  Transmit\n face |bytes ...\n\
                    \x20 tun0: 100 2 0 0 0 0 0 0 300 4 0 9 0 0 0 0\n\
                    \x20   lo: 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n";
        assert_eq!(tx_dropped(devs, "tun0"), Some(9));
        assert_eq!(tx_dropped(devs, "eth9"), None);
        let later = KernelCounters {
            udp_rcvbuf_errors: 5,
            ..KernelCounters::default()
        };
        assert_eq!(later.since(&KernelCounters::default()).udp_rcvbuf_errors, 5);
    }
}
