//! What each kind of soak load has done so far: operations, errors, losses, bytes;
//! shared between the load threads (which count) and the sampler (which reads).

use std::fmt::Display;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

/// How many error messages are kept (the count goes on).
const KEPT_MESSAGES: usize = 20;

/// The kinds of load the soak runs at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A rate-limited bulk TCP transfer, alternating upload and download.
    Bulk,
    /// Short TCP connections: connect, request, echoed response, close.
    Short,
    /// UDP datagrams to the echo in the target, each checked byte for byte.
    Udp,
    /// DNS queries to dnsmasq in the target, each answer checked.
    Dns,
}

impl Kind {
    /// Every kind, in table order.
    pub const ALL: [Kind; 4] = [Kind::Bulk, Kind::Short, Kind::Udp, Kind::Dns];

    /// The column name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Bulk => "bulk",
            Kind::Short => "short",
            Kind::Udp => "udp",
            Kind::Dns => "dns",
        }
    }
}

/// The counts of one kind at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindTotals {
    /// Operations completed and checked: bulk transfers, short connections, echoed
    /// datagrams, answered queries.
    pub ops: u64,
    /// Operations that failed (see [`Kind`] and the module docs of
    /// [`soak`](super) for what counts).
    pub errors: u64,
    /// UDP only: datagrams (udp) or query transmissions (dns) that got no answer in
    /// time. Loss, not error: it is judged against an allowed rate.
    pub lost: u64,
    /// UDP only: datagrams or query transmissions sent (the loss denominator).
    pub sent: u64,
    /// Payload bytes carried (both directions, as the client counts them).
    pub bytes: u64,
}

#[derive(Debug, Default)]
struct Tally {
    ops: AtomicU64,
    errors: AtomicU64,
    lost: AtomicU64,
    sent: AtomicU64,
    bytes: AtomicU64,
}

/// The live counters of all kinds, and the first error messages.
#[derive(Debug, Default)]
pub struct Counters {
    bulk: Tally,
    short: Tally,
    udp: Tally,
    dns: Tally,
    messages: Mutex<Vec<String>>,
}

impl Counters {
    fn tally(&self, kind: Kind) -> &Tally {
        match kind {
            Kind::Bulk => &self.bulk,
            Kind::Short => &self.short,
            Kind::Udp => &self.udp,
            Kind::Dns => &self.dns,
        }
    }

    /// Counts one completed operation of `kind` that carried `bytes`.
    pub fn op(&self, kind: Kind, bytes: u64) {
        let t = self.tally(kind);
        t.ops.fetch_add(1, Ordering::Relaxed);
        t.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts `n` datagrams or query transmissions of `kind` sent.
    pub fn sent(&self, kind: Kind, n: u64) {
        self.tally(kind).sent.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts `n` datagrams or transmissions of `kind` lost.
    pub fn lost(&self, kind: Kind, n: u64) {
        self.tally(kind).lost.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts one error of `kind`, keeping its message if it is among the first.
    pub fn error(&self, kind: Kind, what: impl Display) {
        self.tally(kind).errors.fetch_add(1, Ordering::Relaxed);
        let mut messages = self.messages.lock().unwrap_or_else(PoisonError::into_inner);
        if messages.len() < KEPT_MESSAGES {
            messages.push(format!("{}: {what}", kind.name()));
        }
    }

    /// The counts of `kind` now.
    pub fn totals(&self, kind: Kind) -> KindTotals {
        let t = self.tally(kind);
        KindTotals {
            ops: t.ops.load(Ordering::Relaxed),
            errors: t.errors.load(Ordering::Relaxed),
            lost: t.lost.load(Ordering::Relaxed),
            sent: t.sent.load(Ordering::Relaxed),
            bytes: t.bytes.load(Ordering::Relaxed),
        }
    }

    /// The counts of every kind now, in [`Kind::ALL`] order.
    pub fn all(&self) -> [KindTotals; 4] {
        Kind::ALL.map(|kind| self.totals(kind))
    }

    /// The first error messages (up to 20), each prefixed with its kind.
    pub fn messages(&self) -> Vec<String> {
        self.messages
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_kind_and_keeps_the_first_messages() {
        let c = Counters::default();
        c.op(Kind::Bulk, 100);
        c.op(Kind::Bulk, 50);
        c.sent(Kind::Udp, 10);
        c.lost(Kind::Udp, 1);
        for i in 0..30 {
            c.error(Kind::Dns, i);
        }
        let bulk = c.totals(Kind::Bulk);
        assert_eq!((bulk.ops, bulk.bytes, bulk.errors), (2, 150, 0));
        let udp = c.totals(Kind::Udp);
        assert_eq!((udp.sent, udp.lost), (10, 1));
        assert_eq!(c.totals(Kind::Dns).errors, 30);
        let messages = c.messages();
        assert_eq!(messages.len(), KEPT_MESSAGES);
        assert_eq!(messages[0], "dns: 0");
        assert_eq!(c.all()[3].errors, 30);
    }
}
