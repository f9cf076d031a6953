//! When each flow's socket next needs a poll (retransmission, delayed ACK, close
//! timers): a min-heap with lazy deletion, so the stack never walks all flows.
//!
//! A flow keeps at most one live entry: a later deadline than the one scheduled is
//! not pushed (the earlier one fires, the flow is polled, and its real deadline is
//! scheduled then), an earlier one replaces it and the old entry is skipped when it
//! surfaces.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::Instant;

use crate::flow::FlowId;

/// Deadlines by flow.
#[derive(Debug, Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<(Instant, FlowId)>>,
    scheduled: HashMap<FlowId, Instant>,
}

impl Timers {
    /// Asks for `flow` to be polled at `at` (or earlier).
    pub fn schedule(&mut self, flow: FlowId, at: Instant) {
        match self.scheduled.get(&flow) {
            Some(&current) if current <= at => {}
            _ => {
                self.scheduled.insert(flow, at);
                self.heap.push(Reverse((at, flow)));
            }
        }
    }

    /// Forgets `flow` (its heap entries are skipped when they surface).
    pub fn cancel(&mut self, flow: FlowId) {
        self.scheduled.remove(&flow);
    }

    /// The earliest live deadline.
    pub fn next(&mut self) -> Option<Instant> {
        while let Some(Reverse((at, flow))) = self.heap.peek().copied() {
            if self.scheduled.get(&flow) == Some(&at) {
                return Some(at);
            }
            self.heap.pop();
        }
        None
    }

    /// Moves every flow whose deadline is at or before `now` into `out`.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<FlowId>) {
        while let Some(Reverse((at, flow))) = self.heap.peek().copied() {
            if at > now {
                break;
            }
            self.heap.pop();
            if self.scheduled.get(&flow) == Some(&at) {
                self.scheduled.remove(&flow);
                out.push(flow);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn earliest_wins_and_stale_entries_are_skipped() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut t = Timers::default();
        t.schedule(1, ms(50));
        t.schedule(1, ms(80)); // later: ignored
        t.schedule(2, ms(30));
        t.schedule(2, ms(10)); // earlier: replaces
        assert_eq!(t.next(), Some(ms(10)));
        let mut out = Vec::new();
        t.expire(ms(40), &mut out);
        assert_eq!(out, vec![2]); // the stale 30 ms entry of flow 2 is not reported
        t.cancel(1);
        assert_eq!(t.next(), None);
        t.expire(ms(100), &mut out);
        assert_eq!(out, vec![2]);
        assert!(t.scheduled.is_empty());
    }

    #[test]
    fn heap_stays_small_under_repeated_rescheduling() {
        let t0 = Instant::now();
        let mut t = Timers::default();
        for i in 0..10_000u64 {
            // Ever later deadlines for the same flow push nothing.
            t.schedule(7, t0 + Duration::from_millis(100 + i));
        }
        assert_eq!(t.heap.len(), 1);
    }
}
