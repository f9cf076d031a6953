//! Failed logins cost time: each RFC 1929 failure from a source delays that source's
//! failure replies more (250 ms, doubling, at most 8 s), so guessing passwords gets
//! slow while a user who mistyped once barely notices. Sources are forgotten after 10
//! minutes without a failure, and the table is bounded (cleared when full).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// The delay of a source's first failure.
const FIRST: Duration = Duration::from_millis(250);
/// The longest delay.
const MAX: Duration = Duration::from_secs(8);
/// A source without failures for this long starts afresh.
const FORGET: Duration = Duration::from_secs(600);
/// Sources remembered at once.
const CAPACITY: usize = 4096;

/// Recent login failures by source address.
#[derive(Debug, Default)]
pub(super) struct LoginFailures {
    sources: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl LoginFailures {
    /// Records a failure from `ip` at `now`; returns how long to wait before the
    /// failure reply.
    pub(super) fn failed(&self, ip: IpAddr, now: Instant) -> Duration {
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        if sources.len() >= CAPACITY && !sources.contains_key(&ip) {
            sources.retain(|_, (_, last)| now.saturating_duration_since(*last) < FORGET);
            if sources.len() >= CAPACITY {
                sources.clear();
            }
        }
        let entry = sources.entry(ip.to_canonical()).or_insert((0, now));
        if now.saturating_duration_since(entry.1) >= FORGET {
            entry.0 = 0;
        }
        entry.0 = entry.0.saturating_add(1);
        entry.1 = now;
        delay(entry.0)
    }

    /// A successful login from `ip` clears its record.
    pub(super) fn succeeded(&self, ip: IpAddr) {
        self.sources
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&ip.to_canonical());
    }
}

/// The delay after the `n`th failure (n >= 1).
fn delay(n: u32) -> Duration {
    let doublings = n.saturating_sub(1).min(10);
    FIRST.saturating_mul(1 << doublings).min(MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_cap_and_are_forgotten() {
        let f = LoginFailures::default();
        let ip: IpAddr = [10, 0, 0, 1].into();
        let t0 = Instant::now();
        let seen: Vec<u128> = (0..8).map(|_| f.failed(ip, t0).as_millis()).collect();
        assert_eq!(seen, [250, 500, 1000, 2000, 4000, 8000, 8000, 8000]);
        // Another source is not punished for this one.
        assert_eq!(f.failed([10, 0, 0, 2].into(), t0), FIRST);
        // Ten quiet minutes later it starts afresh; a success clears it at once.
        assert_eq!(f.failed(ip, t0 + FORGET), FIRST);
        assert_eq!(f.failed(ip, t0 + FORGET), FIRST * 2);
        f.succeeded(ip);
        assert_eq!(f.failed(ip, t0 + FORGET), FIRST);
    }

    #[test]
    fn the_table_is_bounded() {
        let f = LoginFailures::default();
        let t0 = Instant::now();
        for i in 0..(CAPACITY as u32 + 10) {
            f.failed(IpAddr::from(i.to_be_bytes()), t0);
        }
        assert!(f.sources.lock().unwrap().len() <= CAPACITY);
    }
}
