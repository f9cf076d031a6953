//! What the stacks of a multi-queue tunnel share: one stack runs per TUN queue, each
//! on its own thread and current-thread runtime, and the TCP path of each is its
//! own (smoltcp interface, sockets, flow tasks, upstream sockets: no lock per
//! packet). Shared are only the things that must be one for the whole tunnel:
//!
//! - the flow limits: `--max-flows` permits and the backlog of pending CONNECTs;
//! - the ring memory budget (atomics);
//! - the UDP associations ([`NatTable`]): the kernel picks a queue per packet by flow
//!   hash, so one application endpoint talking to two destinations can show up on
//!   two queues; one table (std locks, UDP path only) keeps one association per
//!   endpoint, so full-cone mapping holds. Steering each datagram to the stack that
//!   owns its endpoint would cost a copy, a channel hop and a cross-thread wake-up
//!   per datagram on the latency path; a shared table costs one short lock;
//! - the fake-IP map ([`FakeIps`]), which must be one map; DNS-over-TCP connections
//!   stay per stack (their tasks run on the runtime that opened them);
//! - the counters ([`Metrics`], atomics), so stats and the metrics endpoint sum all
//!   stacks.
//!
//! This module only builds and hands out the shared parts; it does no I/O.

use std::sync::Arc;

use tokio::sync::Semaphore;

use super::{MAX_PENDING, StackConfig};
use crate::dns::FakeIps;
use crate::flow::buffers::{Budget, BufferConfig, Buffers};
use crate::flow::udp::NatTable;
use crate::metrics::Metrics;

/// The parts of the tunnel every stack shares (see the module doc). Build one with
/// [`Shared::new`] and pass it to [`super::run_queue`] for each queue.
#[derive(Debug)]
pub struct Shared {
    pub(super) metrics: Arc<Metrics>,
    /// `--max-flows`: one permit per TCP flow.
    pub(super) permits: Arc<Semaphore>,
    /// Flows whose CONNECT has not finished ([`MAX_PENDING`]).
    pub(super) pending: Arc<Semaphore>,
    /// Ring sizes and the memory budget.
    pub(super) buffers: Arc<Buffers>,
    pub(super) udp: NatTable,
    pub(super) fake_ips: FakeIps,
}

impl Shared {
    /// The shared parts for stacks that all run with `config`, counting into
    /// `metrics`.
    pub fn new(config: &StackConfig, metrics: Arc<Metrics>) -> Shared {
        let buffers = Buffers {
            config: BufferConfig {
                initial: config.tcp_initial_buffer,
                max_rx: config.tcp_rx_buffer,
                max_tx: config.tcp_tx_buffer,
                idle: config.tcp_idle_shrink,
            },
            budget: Budget::with_metrics(config.memory_limit, metrics.clone()),
        };
        Shared {
            metrics,
            permits: Arc::new(Semaphore::new(config.max_flows)),
            pending: Arc::new(Semaphore::new(MAX_PENDING)),
            buffers: Arc::new(buffers),
            udp: NatTable::default(),
            fake_ips: FakeIps::new(&config.dns),
        }
    }

    /// The counters of the whole tunnel.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Bytes of TCP rings held now, by all stacks.
    pub fn ring_bytes(&self) -> u64 {
        self.buffers.budget.used() as u64
    }
}
