//! Flows: one per TCP connection the stack accepts from the TUN.
//!
//! Stage: between the stack (which owns the smoltcp interface and moves packets) and
//! the upstream proxy. Each flow is a task with its own tracing span
//! (`flow{id, proto, src, dst}`) that dials the proxy, then copies bytes between its
//! smoltcp socket and the proxy stream. A flow shares exactly one thing with the
//! stack: [`TcpFlow`], its one-socket `SocketSet` behind a mutex, plus a "poll me"
//! signal. A flow must not touch the interface, the device or another flow; its
//! failure never reaches beyond itself.
//!
//! A flow's smoltcp rings are sized by [`buffers`]: none while its SYN waits for the
//! CONNECT, small ones after, growing while it moves data and shrinking when it idles,
//! all under one memory budget.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

pub mod buffers;
pub mod tcp;
pub mod udp;

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp::Socket as TcpSocket;
use tokio::sync::Notify;

use buffers::{Buffers, Sizer};

/// A flow's number, unique within one run.
pub type FlowId = u64;

/// A connection's addresses as the application sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FourTuple {
    /// The application's side.
    pub src: SocketAddr,
    /// The destination the application connected to.
    pub dst: SocketAddr,
}

impl fmt::Display for FourTuple {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.src, self.dst)
    }
}

/// What the stack and one TCP flow's task share.
#[derive(Debug)]
pub struct TcpFlow {
    /// The flow's number.
    pub id: FlowId,
    /// Its addresses.
    pub tuple: FourTuple,
    /// Where the proxy is asked to connect: the destination address, or a name (a
    /// fake-IP destination, which the proxy resolves).
    pub target: crate::socks::Address,
    /// The sequence number of the application's SYN (an ICMP error about the
    /// connection attempt quotes it).
    pub syn_seq: u32,
    /// A set holding exactly the flow's TCP socket. Per-flow sets keep every stack
    /// operation O(1) in the number of flows (smoltcp walks the whole set on egress).
    sockets: Mutex<SocketSet<'static>>,
    /// The socket's handle in `sockets`.
    pub handle: SocketHandle,
    /// The size of the socket's rings and their charge to the budget. Locked after
    /// `sockets`, never before.
    sizer: Mutex<Sizer>,
    /// Set while the flow's id sits in the stack's "poll me" queue.
    queued: AtomicBool,
    /// Set when the flow's task has ended; the stack then drops the flow once its
    /// socket is closed.
    task_done: AtomicBool,
    /// Bytes the task has taken out of the socket's receive ring so far (the ring
    /// sizing policy measures the flow's pace by it).
    rx_read: AtomicU64,
}

impl TcpFlow {
    /// A flow around a socket set that holds its one socket at `handle`.
    pub fn new(
        id: FlowId,
        tuple: FourTuple,
        syn_seq: u32,
        target: crate::socks::Address,
        sockets: SocketSet<'static>,
        handle: SocketHandle,
        buffers: Arc<Buffers>,
    ) -> Self {
        TcpFlow {
            id,
            tuple,
            syn_seq,
            target,
            sockets: Mutex::new(sockets),
            handle,
            sizer: Mutex::new(Sizer::new(buffers)),
            queued: AtomicBool::new(false),
            task_done: AtomicBool::new(false),
            rx_read: AtomicU64::new(0),
        }
    }

    /// Records that the task has taken `total` bytes out of the receive ring so far.
    pub fn note_read(&self, total: u64) {
        self.rx_read.store(total, Ordering::Relaxed);
    }

    /// Locks the flow's socket set. A poisoned lock (a panic while it was held) is
    /// taken over: the socket state is still consistent for smoltcp.
    pub fn sockets(&self) -> MutexGuard<'_, SocketSet<'static>> {
        self.sockets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Gives the flow's socket its first rings (its SYN had none); called once the
    /// CONNECT succeeded, before the SYN-ACK goes out.
    pub fn open_buffers(&self, socket: &mut TcpSocket<'static>, now: Instant) {
        buffers::open(socket, &mut self.sizer(), now);
    }

    /// Gives the flow's socket a send ring if it has none (the proxy has data for it).
    pub fn open_send_buffer(&self, socket: &mut TcpSocket<'static>, now: Instant) {
        buffers::open_send(socket, &mut self.sizer(), now);
    }

    /// Grows or shrinks the socket's rings after a poll (see [`buffers::resize`]);
    /// returns when to poll again to shrink them if the flow stays idle.
    pub fn resize_buffers(&self, socket: &mut TcpSocket<'static>, now: Instant) -> Option<Instant> {
        let read = self.rx_read.load(Ordering::Relaxed);
        buffers::resize(socket, &mut self.sizer(), now, read)
    }

    fn sizer(&self) -> MutexGuard<'_, Sizer> {
        self.sizer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Has the flow's task ended?
    pub fn task_done(&self) -> bool {
        self.task_done.load(Ordering::Acquire)
    }

    /// Clears the queued mark; the stack calls it before it polls the flow.
    pub fn take_queued(&self) {
        self.queued.store(false, Ordering::Release);
    }
}

/// The flows' way to ask the stack to poll them (after they consumed received data,
/// queued data to send, or changed state).
#[derive(Debug, Default)]
pub struct Signal {
    queue: Mutex<Vec<FlowId>>,
    notify: Notify,
}

impl Signal {
    /// Asks the stack to poll `flow` soon. Each flow is in the queue at most once, so
    /// the queue is bounded by the number of flows.
    pub fn mark(&self, flow: &TcpFlow) {
        if !flow.queued.swap(true, Ordering::AcqRel) {
            self.queue
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(flow.id);
            self.notify.notify_one();
        }
    }

    /// Marks the flow's task as ended and asks for a last poll.
    pub fn finished(&self, flow: &TcpFlow) {
        flow.task_done.store(true, Ordering::Release);
        self.mark(flow);
    }

    /// Moves the queued flow ids into `out`.
    pub fn drain_into(&self, out: &mut Vec<FlowId>) {
        let mut queue = self
            .queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        out.append(&mut queue);
    }

    /// Is some flow waiting in the queue?
    pub fn pending(&self) -> bool {
        !self
            .queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_empty()
    }

    /// Resolves when some flow has been marked since the last call.
    pub async fn notified(&self) {
        self.notify.notified().await;
    }
}

/// Counters shared by all flows (they live in the one set of counters).
pub use crate::metrics::FlowStats;

/// Logs the first failure of a burst and counts the rest, so a dead proxy yields one
/// line per interval instead of one per connection attempt.
#[derive(Debug)]
pub struct BurstLog {
    interval: Duration,
    state: Mutex<Option<(Instant, u64)>>,
}

impl BurstLog {
    /// A limiter that logs at most once per `interval`.
    pub fn new(interval: Duration) -> Self {
        BurstLog {
            interval,
            state: Mutex::new(None),
        }
    }

    /// Should this event be logged? Returns `Some(suppressed)` (events swallowed since
    /// the last logged one) when it should.
    pub fn check(&self, now: Instant) -> Option<u64> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &mut *state {
            Some((last, suppressed)) if now.saturating_duration_since(*last) < self.interval => {
                *suppressed = suppressed.saturating_add(1);
                None
            }
            other => {
                let suppressed = other.map_or(0, |(_, n)| n);
                *other = Some((now, 0));
                Some(suppressed)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_log_logs_once_per_interval_and_counts_the_rest() {
        let log = BurstLog::new(Duration::from_secs(5));
        let t0 = Instant::now();
        assert_eq!(log.check(t0), Some(0));
        assert_eq!(log.check(t0 + Duration::from_secs(1)), None);
        assert_eq!(log.check(t0 + Duration::from_secs(2)), None);
        assert_eq!(log.check(t0 + Duration::from_secs(6)), Some(2));
        assert_eq!(log.check(t0 + Duration::from_secs(7)), None);
    }
}
