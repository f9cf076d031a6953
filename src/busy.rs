//! When a loop keeps polling for a moment instead of going to sleep.
//!
//! Stage: a policy inside the stack's loop and inside the reference server's UDP
//! relay; sans-IO (time is passed in), it never touches the device or a socket.
//!
//! On a virtual machine, waking a sleeping thread whose CPU is halted costs tens of
//! microseconds: a request/response exchange through the tunnel wakes it twice (the
//! request from the TUN, the reply from the proxy), which is most of its latency over
//! the kernel's own path. Polling for a short window after work (busy polling, as
//! Linux's `SO_BUSY_POLL` does for a socket) keeps the thread awake for the reply.
//!
//! Spinning pays only when the next packet comes soon, so the loop spins only while
//! the average gap between bursts of work is within the window: a chat that trickles
//! a packet a second never spins, a request/response exchange does. While it spins it
//! yields to the runtime on every pass, so flows and UDP associations keep running.
//! An idle tunnel never spins: a spin only follows work.
//!
//! Nor does a bulk transfer: a pass that moved [`BULK_BYTES`] or more (a TSO
//! super-segment in, a 64 KiB segment out) marks throughput traffic, whose next
//! packet comes anyway, and the loop does not spin until [`BULK_HOLD`] windows have
//! passed without such a pass (the small passes between big ones, a lone ACK, would
//! otherwise each start a spin). Spinning there only takes CPU from the application
//! and the proxy that share the machine: in a single-stream download it cost a
//! fifth of the tunnel's cycles per byte.

use std::time::{Duration, Instant};

/// The busy-poll window of the tunnel and of the server's UDP relay by default
/// (their `--busy-poll`).
pub const DEFAULT_WINDOW: Duration = Duration::from_micros(200);

/// Bytes through the stack in one pass (packets read plus written) from which the
/// pass is bulk transfer and is not followed by a spin.
pub const BULK_BYTES: usize = 64 * 1024;
/// After a bulk pass, no spin for this many windows.
pub const BULK_HOLD: u32 = 8;

/// The busy-poll policy.
#[derive(Debug, Clone)]
pub struct BusyPoll {
    /// The longest spin without work; zero turns busy polling off.
    window: Duration,
    /// When work was last seen.
    last_work: Option<Instant>,
    /// Smoothed gap between bursts of work (1/8 gain, as TCP's SRTT).
    gap: Duration,
    /// When a pass last moved [`BULK_BYTES`] or more.
    last_bulk: Option<Instant>,
}

impl BusyPoll {
    /// A policy that spins for at most `window` after work.
    pub fn new(window: Duration) -> Self {
        BusyPoll {
            window,
            last_work: None,
            // Start pessimistic: the loop spins only once a short gap has been seen.
            gap: window.saturating_mul(8),
            last_bulk: None,
        }
    }

    /// Records that the pass at `now` moved `bytes` through the stack.
    pub fn moved(&mut self, now: Instant, bytes: usize) {
        if bytes >= BULK_BYTES {
            self.last_bulk = Some(now);
        }
    }

    /// Whether a bulk pass happened within [`BULK_HOLD`] windows before `now`.
    fn bulk(&self, now: Instant) -> bool {
        self.last_bulk.is_some_and(|at| {
            now.saturating_duration_since(at) < self.window.saturating_mul(BULK_HOLD)
        })
    }

    /// Records work (a packet, a flow's request) found at `now`.
    pub fn work(&mut self, now: Instant) {
        if let Some(last) = self.last_work {
            let gap = now.saturating_duration_since(last);
            // Cap one sample, so one long silence does not keep the loop from
            // spinning for the next dozen exchanges.
            let sample = gap.min(self.window.saturating_mul(8));
            self.gap = self.gap - self.gap / 8 + sample / 8;
        }
        self.last_work = Some(now);
    }

    /// Should the loop spin now (right after handling work)? Returns the spin's
    /// deadline when it should.
    pub fn spin_until(&self, now: Instant) -> Option<Instant> {
        if self.window.is_zero() || self.gap > self.window || self.bulk(now) {
            return None;
        }
        now.checked_add(self.window)
    }

    /// The deadline after work that moved `moved` bytes, found at `now` during a
    /// spin (`None`: stop spinning).
    pub fn extend(&mut self, now: Instant, moved: usize) -> Option<Instant> {
        self.work(now);
        self.moved(now, moved);
        self.spin_until(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    /// A policy of `window` that has seen 40 bursts of work `every` apart from `t0`.
    fn after_bursts(window: Duration, t0: Instant, every: Duration) -> BusyPoll {
        let mut busy = BusyPoll::new(window);
        for i in 0..40 {
            busy.work(t0 + every * i);
        }
        busy
    }

    #[test]
    fn off_never_spins() {
        let mut busy = BusyPoll::new(Duration::ZERO);
        let t0 = Instant::now();
        for i in 0..100 {
            busy.work(t0 + US * i);
        }
        assert_eq!(busy.spin_until(t0 + US * 100), None);
    }

    #[test]
    fn spins_for_request_response_but_not_for_a_trickle() {
        let window = US * 200;
        let t0 = Instant::now();

        assert_eq!(
            BusyPoll::new(window).spin_until(t0),
            None,
            "no spin before a gap is known"
        );
        let busy = after_bursts(window, t0, US * 60);
        let now = t0 + US * 60 * 40;
        assert_eq!(busy.spin_until(now), Some(now + window));

        let trickle = after_bursts(window, t0, Duration::from_millis(100));
        assert_eq!(trickle.spin_until(t0 + Duration::from_secs(5)), None);
    }

    #[test]
    fn traffic_that_slows_down_stops_the_spin() {
        let window = US * 200;
        let t0 = Instant::now();
        let mut busy = BusyPoll::new(window);
        let mut now = t0;
        for _ in 0..40 {
            now += US * 50;
            busy.work(now);
        }
        assert!(busy.spin_until(now).is_some());
        let mut spins = 0;
        for _ in 0..40 {
            now += Duration::from_millis(10);
            busy.work(now);
            if busy.spin_until(now).is_some() {
                spins += 1;
            }
        }
        assert!(spins < 20, "kept spinning for {spins} of 40 slow packets");
        assert_eq!(busy.spin_until(now), None);
    }

    #[test]
    fn work_during_a_spin_extends_it() {
        let window = US * 100;
        let t0 = Instant::now();
        let mut busy = after_bursts(window, t0, US * 10);
        let now = t0 + US * 400 + US * 30;
        assert_eq!(busy.extend(now, 1500), Some(now + window));
    }

    #[test]
    fn bulk_transfer_never_spins() {
        let window = US * 200;
        let t0 = Instant::now();
        let mut busy = after_bursts(window, t0, US * 10);
        let now = t0 + US * 400;
        busy.moved(now, 600);
        assert_eq!(busy.spin_until(now), Some(now + window), "small: spins");
        busy.moved(now, BULK_BYTES);
        assert_eq!(busy.spin_until(now), None, "a super-segment");
        // The small passes between big ones (an ACK) do not spin either.
        assert_eq!(busy.extend(now + US * 50, 100), None);
        assert_eq!(busy.extend(now + US * 900, 100), None);
        // Once the bulk transfer is over for a while, request/response spins again.
        let later = now + window * BULK_HOLD + US;
        assert_eq!(busy.extend(later, 100), Some(later + window));
    }
}
