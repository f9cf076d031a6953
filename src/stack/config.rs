//! The stack's settings and their defaults, including the flow limit that follows the
//! open-files limit.

use std::time::Duration;

use crate::dns::DnsConfig;
use crate::flow::buffers::BufferConfig;
use crate::flow::udp::UdpConfig;

/// The default `--busy-poll` window.
pub const DEFAULT_BUSY_POLL: Duration = crate::busy::DEFAULT_WINDOW;

/// Default budget for TCP rings: 256 MiB (512 flows with both rings at 256 KiB, or
/// 32,768 flows with their initial 2 x 4 KiB).
pub const DEFAULT_MEMORY_LIMIT: usize = 256 * 1024 * 1024;

/// Descriptors kept out of the flow count: the TUN, the runtime, logs, DNS over TCP.
const RESERVED_FILES: u64 = 256;

/// The default flow limit for an open-files limit of `open_files`: each TCP flow holds
/// one descriptor (its proxy connection), each UDP association two; three quarters of
/// what is left after a reserve go to TCP flows. With 1,024 descriptors: 576 flows;
/// with 20,000: 14,808; memory per flow is bounded by the buffer policy, not by a
/// small fixed cap.
pub fn default_max_flows(open_files: u64) -> usize {
    let flows = open_files.saturating_sub(RESERVED_FILES) / 4 * 3;
    usize::try_from(flows).unwrap_or(usize::MAX).max(1)
}

/// Stack settings.
#[derive(Debug, Clone)]
pub struct StackConfig {
    /// Largest receive ring per TCP flow (bytes); it is the largest window offered to
    /// applications, and the window scale is chosen for it.
    pub tcp_rx_buffer: usize,
    /// Largest send ring per TCP flow (bytes).
    pub tcp_tx_buffer: usize,
    /// Ring size of a flow whose CONNECT succeeded, and after it idled (bytes); rings
    /// grow from it while a flow moves data. Equal to the maximum: fixed rings.
    pub tcp_initial_buffer: usize,
    /// A flow that moved no data for this long gets its rings shrunk back.
    pub tcp_idle_shrink: Duration,
    /// Budget for all TCP rings (bytes): when spent, rings stop growing (smaller
    /// windows); a connected flow always gets its initial rings.
    pub memory_limit: usize,
    /// Flows at once; SYNs beyond are reset.
    pub max_flows: usize,
    /// A flow whose application stops acknowledging data for this long is reset.
    pub tcp_timeout: Duration,
    /// UDP associations.
    pub udp: UdpConfig,
    /// DNS (`--dns` mode, resolver, fake-IP pools).
    pub dns: DnsConfig,
    /// How long the loop keeps polling after work before it sleeps (`--busy-poll`);
    /// zero never spins. See [`busy`].
    pub busy_poll: Duration,
}

impl Default for StackConfig {
    fn default() -> Self {
        StackConfig {
            tcp_rx_buffer: 512 * 1024,
            tcp_tx_buffer: 512 * 1024,
            tcp_initial_buffer: crate::flow::buffers::DEFAULT_INITIAL,
            tcp_idle_shrink: BufferConfig::default().idle,
            memory_limit: DEFAULT_MEMORY_LIMIT,
            max_flows: 8192,
            tcp_timeout: Duration::from_secs(120),
            udp: UdpConfig::default(),
            dns: DnsConfig::default(),
            busy_poll: DEFAULT_BUSY_POLL,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_flow_limit_follows_the_descriptor_limit() {
        assert_eq!(default_max_flows(1024), 576);
        assert_eq!(default_max_flows(20_000), 14_808);
        assert!(default_max_flows(20_000) >= 9_000);
        // Flows plus UDP associations (two each) fit under the limit with the reserve.
        for limit in [1024u64, 4096, 20_000, 1 << 20] {
            let flows = default_max_flows(limit) as u64;
            let udp = (limit - RESERVED_FILES - flows) / 2;
            assert!(flows + 2 * udp + RESERVED_FILES <= limit);
            assert!(udp > 0);
        }
        assert_eq!(default_max_flows(10), 1, "never zero");
    }
}
