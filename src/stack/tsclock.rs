//! The TCP timestamp clock (RFC 7323 TSval) every socket of every stack reads.
//!
//! Stage: a helper of the stack's loop. smoltcp asks for a TSval for every segment it
//! emits; reading the system clock each time cost about 3% of the tunnel's cycles in
//! a bulk download. The loop already reads the clock once per pass, so it stores that
//! reading here ([`tick`]) and segments take it ([`tsval`]): one clock in
//! milliseconds, monotonic across all stacks (a stack whose reading is older never
//! moves it back), at most one pass stale — well within RFC 7323's 1 ms..1 s tick.
//! It must not do more than that: no I/O, no locks.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

/// Milliseconds since [`start`], wrapping (as TSval does), as last ticked.
static NOW_MS: AtomicU32 = AtomicU32::new(0);

/// The clock's origin: the first tick (or read).
fn start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// Advances the clock to `now` (a stack's reading of the system clock for this pass).
/// Readings older than one already stored are ignored: the clock never goes back.
pub fn tick(now: Instant) {
    let millis = now.saturating_duration_since(start()).as_millis();
    // Wrapping is what TSval does (RFC 7323 compares them modulo 2^32).
    let millis = (millis & u128::from(u32::MAX)) as u32;
    let mut current = NOW_MS.load(Ordering::Relaxed);
    // Compared modulo 2^32 (as TSvals are): a reading "behind" the stored one by
    // less than half the range is older, and is not stored.
    while (millis.wrapping_sub(current) as i32) > 0 {
        match NOW_MS.compare_exchange_weak(current, millis, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => break,
            Err(seen) => current = seen,
        }
    }
}

/// The TSval for a segment sent now: the last tick's milliseconds.
pub fn tsval() -> u32 {
    NOW_MS.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn follows_ticks_and_never_goes_back() {
        let base = start() + Duration::from_secs(1000);
        tick(base);
        let t0 = tsval();
        assert!(t0 >= 1_000_000, "{t0}");
        tick(base + Duration::from_millis(25));
        let t1 = tsval();
        assert!(t1.wrapping_sub(t0) >= 25, "{t0} -> {t1}");
        // An older reading (another stack's pass that started earlier) is ignored.
        tick(base + Duration::from_millis(5));
        assert_eq!(tsval(), t1, "went back");
    }
}
