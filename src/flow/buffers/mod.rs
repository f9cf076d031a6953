//! How big each TCP flow's smoltcp rings are: the memory-per-flow policy.
//!
//! Stage: flow (policy only). A paused SYN has no ring at all; the flow gets a small
//! receive ring when its CONNECT succeeds ([`open`]) and a small send ring when the
//! proxy first has data for it ([`open_send`]); each poll of the flow by the stack
//! ([`resize`]) grows a ring that limits the flow (doubling, up to `--tcp-buffer`)
//! and, once the flow has been idle for a while, shrinks its rings back. Every byte of
//! ring is charged to one global [`Budget`] (`--memory-limit`): when it is spent,
//! rings stop growing (smaller windows: backpressure), and no flow is ever refused or
//! aborted for memory. This module does no I/O and reads no clock: time is passed in.
//!
//! A receive ring never shrinks below the window already advertised to the peer
//! (smoltcp's `recv_capacity_needed`): a window offered is not taken back.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use smoltcp::socket::tcp;

use crate::metrics::Metrics;

/// Ring sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferConfig {
    /// Size of the receive ring when a flow's CONNECT succeeds, of the send ring when
    /// the proxy first sends, and of the receive ring after the flow idled (an idle
    /// flow's empty send ring is freed). At `max_tx` and `max_rx`: fixed rings, both
    /// made at CONNECT.
    pub initial: usize,
    /// Largest receive ring (the window offered to the application).
    pub max_rx: usize,
    /// Largest send ring.
    pub max_tx: usize,
    /// A flow that moved no data for this long gets its rings shrunk.
    pub idle: Duration,
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            initial: DEFAULT_INITIAL,
            max_rx: 512 * 1024,
            max_tx: 512 * 1024,
            idle: Duration::from_secs(5),
        }
    }
}

/// A receive ring holding at most `1 / DRAINED_FRACTION` of its capacity at a poll
/// counts as drained (its reader keeps up).
const DRAINED_FRACTION: usize = 4;

/// A receive ring whose reader took a whole ring's worth of bytes within this
/// period moves at least `capacity / TURNOVER_PERIOD`: it doubles (while the budget
/// lasts), so a ring settles near the bytes its flow moves in this time. Longer than
/// a round trip through the tunnel on a loaded machine (the application's kernel,
/// the tunnel and the proxy take turns on the CPUs for a few milliseconds each);
/// short enough that a slow flow (a few Mbit/s) keeps its small ring.
const TURNOVER_PERIOD: Duration = Duration::from_millis(5);

/// Ring size of a newly connected flow.
pub const DEFAULT_INITIAL: usize = 4096;

/// The global memory budget for TCP rings, in bytes. Its use, peak and refusals are
/// the tunnel's counters (`Metrics::stack.ring_*`), so a scrape sees them live.
#[derive(Debug)]
pub struct Budget {
    limit: u64,
    metrics: Arc<Metrics>,
}

impl Budget {
    /// A budget of `limit` bytes with counters of its own.
    pub fn new(limit: usize) -> Budget {
        Budget::with_metrics(limit, Arc::new(Metrics::new()))
    }

    /// A budget of `limit` bytes counted in `metrics`.
    pub fn with_metrics(limit: usize, metrics: Arc<Metrics>) -> Budget {
        Budget {
            limit: u64::try_from(limit).unwrap_or(u64::MAX),
            metrics,
        }
    }

    fn used_counter(&self) -> &AtomicU64 {
        &self.metrics.stack.ring_bytes
    }

    fn raise_peak(&self, now: u64) {
        self.metrics
            .stack
            .ring_bytes_peak
            .fetch_max(now, Ordering::Relaxed);
    }

    /// Takes `n` bytes if they fit under the limit.
    pub fn try_charge(&self, n: usize) -> bool {
        let n = u64::try_from(n).unwrap_or(u64::MAX);
        match self
            .used_counter()
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&total| total <= self.limit)
            }) {
            Ok(before) => {
                self.raise_peak(before.saturating_add(n));
                true
            }
            Err(_) => {
                self.metrics
                    .stack
                    .ring_growth_denied
                    .fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Takes `n` bytes even beyond the limit (the small rings every connected flow
    /// needs: a flow is never refused for memory).
    pub fn force_charge(&self, n: usize) {
        let n = u64::try_from(n).unwrap_or(u64::MAX);
        let before = self.used_counter().fetch_add(n, Ordering::AcqRel);
        self.raise_peak(before.saturating_add(n));
    }

    /// Gives back `n` bytes.
    pub fn release(&self, n: usize) {
        let n = u64::try_from(n).unwrap_or(u64::MAX);
        let _ = self
            .used_counter()
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(n))
            });
    }

    /// Bytes charged now.
    pub fn used(&self) -> usize {
        usize::try_from(self.used_counter().load(Ordering::Acquire)).unwrap_or(usize::MAX)
    }

    /// Most bytes charged at once.
    pub fn peak(&self) -> usize {
        usize::try_from(self.metrics.stack.ring_bytes_peak.load(Ordering::Relaxed))
            .unwrap_or(usize::MAX)
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        usize::try_from(self.limit).unwrap_or(usize::MAX)
    }

    /// Growths refused so far because the budget was spent.
    pub fn denied(&self) -> u64 {
        self.metrics
            .stack
            .ring_growth_denied
            .load(Ordering::Relaxed)
    }
}

/// The configuration and the budget, shared by all flows of a stack.
#[derive(Debug)]
pub struct Buffers {
    /// Ring sizes.
    pub config: BufferConfig,
    /// The budget every ring is charged to.
    pub budget: Budget,
}

/// What a poll of one flow saw of its rings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rings {
    /// Unread bytes in the receive ring.
    pub rx_len: usize,
    /// Receive ring capacity.
    pub rx_cap: usize,
    /// The smallest receive ring allowed now (data held, window advertised).
    pub rx_needed: usize,
    /// The largest window the connection can offer (window scale).
    pub rx_max_window: usize,
    /// Queued bytes in the send ring (unacknowledged and unsent).
    pub tx_len: usize,
    /// Send ring capacity.
    pub tx_cap: usize,
    /// The window the application last offered.
    pub tx_peer_window: usize,
    /// Bytes the flow has taken out of its receive ring so far.
    pub rx_read: u64,
}

impl Rings {
    /// Reads a socket's rings.
    pub fn of(socket: &tcp::Socket<'_>) -> Rings {
        Rings {
            rx_len: socket.recv_queue(),
            rx_cap: socket.recv_capacity(),
            rx_needed: socket.recv_capacity_needed(),
            rx_max_window: socket.max_recv_window(),
            tx_len: socket.send_queue(),
            tx_cap: socket.send_capacity(),
            tx_peer_window: socket.send_window(),
            rx_read: 0,
        }
    }
}

/// New ring sizes; growth is already charged to the budget.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Plan {
    /// New receive ring capacity.
    pub rx: Option<usize>,
    /// New send ring capacity.
    pub tx: Option<usize>,
}

/// One flow's share of the budget and what the policy remembers about it.
#[derive(Debug)]
pub struct Sizer {
    buffers: Arc<Buffers>,
    /// Bytes charged for this flow's rings.
    charged: usize,
    /// Last poll that saw data in a ring.
    last_active: Option<Instant>,
    /// The receive ring was seen at most a quarter full since it last grew: the
    /// flow's reader keeps up, so a ring that fills up is the window limiting the
    /// flow (not a stuck proxy). Not "seen empty": with several busy flows on a
    /// loaded machine the stack rarely polls a flow at the instant its ring is
    /// empty, and 8 upload streams kept 4-16 KiB windows for whole transfers.
    rx_drained: bool,
    /// Start of the current turnover period: when, and `rx_read` then.
    turnover: Option<(Instant, u64)>,
    /// The reader took a whole receive ring within one turnover period since the
    /// ring last grew.
    rx_fast: bool,
}

impl Sizer {
    /// A sizer with nothing charged (a paused SYN has no rings).
    pub fn new(buffers: Arc<Buffers>) -> Sizer {
        Sizer {
            buffers,
            charged: 0,
            last_active: None,
            rx_drained: true,
            turnover: None,
            rx_fast: false,
        }
    }

    /// Bytes charged for this flow now.
    pub fn charged(&self) -> usize {
        self.charged
    }

    /// The rings a newly connected flow starts with (the send ring only with fixed
    /// rings: 0 otherwise), charged even over the limit.
    pub fn initial(&mut self, now: Instant) -> (usize, usize) {
        let config = &self.buffers.config;
        let rx = config.initial.min(config.max_rx);
        let tx = if self.fixed_send() { config.max_tx } else { 0 };
        self.charge_forced(rx.saturating_add(tx));
        self.last_active = Some(now);
        (rx, tx)
    }

    /// The send ring a flow gets when the proxy first has data for it, charged even
    /// over the limit.
    pub fn initial_send(&mut self, now: Instant) -> usize {
        let config = &self.buffers.config;
        let tx = config.initial.min(config.max_tx);
        self.charge_forced(tx);
        self.last_active = Some(now);
        tx
    }

    /// Fixed send rings (`initial` at the maximum): made at CONNECT, never freed.
    fn fixed_send(&self) -> bool {
        let config = &self.buffers.config;
        config.initial >= config.max_tx
    }

    /// The send ring an idle flow keeps.
    fn idle_send(&self) -> usize {
        if self.fixed_send() {
            self.buffers.config.max_tx
        } else {
            0
        }
    }

    fn charge_forced(&mut self, n: usize) {
        self.buffers.budget.force_charge(n);
        self.charged = self.charged.saturating_add(n);
    }

    /// Gives back the charge of a ring that went from `from` to `to` bytes (a
    /// shrink that happened, or a planned growth that did not).
    pub fn released(&mut self, from: usize, to: usize) {
        let n = from.saturating_sub(to).min(self.charged);
        self.buffers.budget.release(n);
        self.charged -= n;
    }

    /// Decides new ring sizes from what a poll saw at `now`.
    pub fn plan(&mut self, rings: &Rings, now: Instant) -> Plan {
        let active = rings.rx_len > 0 || rings.tx_len > 0;
        if rings.rx_len <= rings.rx_cap / DRAINED_FRACTION {
            self.rx_drained = true;
        }
        self.watch_turnover(rings, now);
        if active {
            self.last_active = Some(now);
            return Plan {
                rx: self.grow_rx(rings),
                tx: self.grow_tx(rings),
            };
        }
        if self.idle_since(now) {
            return self.shrink(rings);
        }
        Plan::default()
    }

    /// When the flow's rings are due to shrink if it stays idle (None: already small).
    pub fn shrink_at(&self, rings: &Rings) -> Option<Instant> {
        let initial = self.buffers.config.initial;
        if rings.rx_cap <= initial && rings.tx_cap <= self.idle_send() {
            return None;
        }
        self.last_active.map(|at| at + self.buffers.config.idle)
    }

    fn idle_since(&self, now: Instant) -> bool {
        self.last_active
            .is_some_and(|at| now.saturating_duration_since(at) >= self.buffers.config.idle)
    }

    /// Notes whether the reader took a whole ring within the current turnover
    /// period, and starts a new period when it has passed.
    fn watch_turnover(&mut self, rings: &Rings, now: Instant) {
        match self.turnover {
            Some((since, read)) if now.saturating_duration_since(since) <= TURNOVER_PERIOD => {
                let cap = u64::try_from(rings.rx_cap).unwrap_or(u64::MAX);
                if cap > 0 && rings.rx_read.saturating_sub(read) >= cap {
                    self.rx_fast = true;
                    self.turnover = Some((now, rings.rx_read));
                }
            }
            _ => self.turnover = Some((now, rings.rx_read)),
        }
    }

    /// A receive ring that limits the flow doubles: one at least half full after a
    /// batch of packets whose reader keeps up, or one whose reader took a whole ring
    /// within [`TURNOVER_PERIOD`] (several busy flows on a loaded machine: the
    /// application sends what each small window allows, in small segments, and the
    /// ring is rarely seen half full).
    fn grow_rx(&mut self, rings: &Rings) -> Option<usize> {
        let config = &self.buffers.config;
        let ceiling = config.max_rx.min(rings.rx_max_window);
        let filled = self.rx_drained && rings.rx_len.saturating_mul(2) >= rings.rx_cap;
        if !(filled || self.rx_fast) || rings.rx_cap >= ceiling {
            return None;
        }
        let target = rings
            .rx_cap
            .saturating_mul(2)
            .clamp(config.initial, ceiling);
        let grown = self.charge(target.saturating_sub(rings.rx_cap))?;
        self.rx_drained = false;
        self.rx_fast = false;
        Some(rings.rx_cap.saturating_add(grown))
    }

    /// A full send ring that the application's window could take whole limits the
    /// flow: double it. (A slow application closes its window: no growth.)
    fn grow_tx(&mut self, rings: &Rings) -> Option<usize> {
        let config = &self.buffers.config;
        // An absent send ring is made by the flow's pump (`open_send`), not here.
        if rings.tx_cap == 0
            || rings.tx_len < rings.tx_cap
            || rings.tx_peer_window < rings.tx_cap
            || rings.tx_cap >= config.max_tx
        {
            return None;
        }
        let target = rings
            .tx_cap
            .saturating_mul(2)
            .clamp(config.initial, config.max_tx);
        let grown = self.charge(target.saturating_sub(rings.tx_cap))?;
        Some(rings.tx_cap.saturating_add(grown))
    }

    fn charge(&mut self, n: usize) -> Option<usize> {
        if n == 0 || !self.buffers.budget.try_charge(n) {
            return None;
        }
        self.charged = self.charged.saturating_add(n);
        Some(n)
    }

    /// Idle: the receive ring back to the initial size (or to what it must keep), the
    /// send ring freed (or back to its fixed size).
    fn shrink(&self, rings: &Rings) -> Plan {
        let initial = self.buffers.config.initial;
        let rx = initial.max(rings.rx_needed);
        let tx = self.idle_send().max(rings.tx_len);
        Plan {
            rx: (rx < rings.rx_cap).then_some(rx),
            tx: (tx < rings.tx_cap).then_some(tx),
        }
    }
}

impl Drop for Sizer {
    fn drop(&mut self) {
        self.buffers.budget.release(self.charged);
    }
}

/// Gives a connected flow's socket its first rings (a paused SYN had none): the
/// receive ring (and, with fixed rings, the send ring).
pub fn open(socket: &mut tcp::Socket<'static>, sizer: &mut Sizer, now: Instant) {
    let (rx, tx) = sizer.initial(now);
    if let Err(refused) = socket.replace_recv_buffer(ring(rx)) {
        sizer.released(refused.capacity(), 0);
    }
    if tx > 0 {
        open_send_ring(socket, sizer, tx);
    }
}

/// Gives a flow without a send ring its first one (the proxy has data for it).
pub fn open_send(socket: &mut tcp::Socket<'static>, sizer: &mut Sizer, now: Instant) {
    if socket.send_capacity() == 0 {
        let tx = sizer.initial_send(now);
        open_send_ring(socket, sizer, tx);
    }
}

fn open_send_ring(socket: &mut tcp::Socket<'static>, sizer: &mut Sizer, tx: usize) {
    match socket.replace_send_buffer(ring(tx)) {
        // The old ring was the empty one of a paused SYN or an idle flow.
        Ok(_) => {}
        Err(refused) => sizer.released(refused.capacity(), 0),
    }
}

/// Applies the policy to a flow's socket after a poll. Returns when the flow should
/// be polled again to shrink if it stays idle.
pub fn resize(
    socket: &mut tcp::Socket<'static>,
    sizer: &mut Sizer,
    now: Instant,
    rx_read: u64,
) -> Option<Instant> {
    if socket.recv_capacity() == 0 && socket.send_capacity() == 0 {
        // A paused SYN, or a flow that never connected: no rings to size.
        return None;
    }
    let rings = Rings {
        rx_read,
        ..Rings::of(socket)
    };
    let plan = sizer.plan(&rings, now);
    if let Some(rx) = plan.rx {
        match socket.replace_recv_buffer(ring(rx)) {
            Ok(old) => sizer.released(old.capacity(), rx),
            Err(refused) => sizer.released(refused.capacity(), rings.rx_cap),
        }
    }
    if let Some(tx) = plan.tx {
        match socket.replace_send_buffer(ring(tx)) {
            Ok(old) => sizer.released(old.capacity(), tx),
            Err(refused) => sizer.released(refused.capacity(), rings.tx_cap),
        }
    }
    sizer.shrink_at(&Rings::of(socket))
}

fn ring(capacity: usize) -> tcp::SocketBuffer<'static> {
    tcp::SocketBuffer::new(vec![0u8; capacity])
}

#[cfg(test)]
mod tests;
