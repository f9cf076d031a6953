//! The fake-IP table of one address family: pools of addresses, and a bounded map
//! name <-> address in least-recently-used order.
//!
//! Stage: beside the DNS module's fake-IP mode; the stack asks it where a flow to a
//! fake address goes. Sans-IO: time is passed in, nothing here logs or sleeps.
//!
//! Rules it keeps:
//! - an address is handed to a name only while no other name holds it;
//! - an entry is recycled (its address given to a new name) only once it has been
//!   unused — neither answered in a query nor touched by a flow — for longer than
//!   `hold` (the answer TTL plus a grace period), so a client's cache or a live flow
//!   never sees its address change meaning; when no entry is that old, the table is
//!   exhausted and the caller answers SERVFAIL;
//! - the map never holds more than `capacity` entries: the pools' usable size, capped
//!   by the configured maximum. Slots are allocated as names arrive, not up front.
//!
//! Slot `i` is the `i`-th usable address of the pools, in order: the first address of
//! each pool (its network address) is never used, nor the last of an IPv4 pool (its
//! broadcast address), so every handed-out address looks like an ordinary host.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;

const NIL: u32 = u32::MAX;

/// A pool's usable addresses: `count` addresses from `first`.
#[derive(Debug, Clone, Copy)]
struct Range {
    net: IpNet,
    first: u128,
    count: u128,
}

#[derive(Debug)]
struct Slot {
    name: Arc<str>,
    last_used: Instant,
    prev: u32,
    next: u32,
}

/// How a name got its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assigned {
    /// The name was mapped already (its entry is refreshed).
    Existing,
    /// A never-used address.
    Fresh,
    /// The address of an entry unused for longer than the hold time.
    Recycled,
}

/// What an address of this family means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Not inside any pool: a real address.
    NotFake,
    /// Inside a pool, but no name holds it (never handed out, or its entry was
    /// recycled).
    Unmapped,
    /// The name it stands for.
    Name(Arc<str>),
}

/// No entry may be recycled yet, and every address is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exhausted;

/// The fake-IP pools and map of one family.
#[derive(Debug)]
pub struct FakeTable {
    ranges: Vec<Range>,
    capacity: u32,
    hold: Duration,
    slots: Vec<Slot>,
    by_name: HashMap<Arc<str>, u32>,
    /// Most recently used.
    head: u32,
    /// Least recently used: the next candidate for recycling.
    tail: u32,
    last_exhausted_warning: Option<Instant>,
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn from_u128(value: u128, v6: bool) -> Option<IpAddr> {
    if v6 {
        Some(IpAddr::V6(Ipv6Addr::from(value)))
    } else {
        u32::try_from(value)
            .ok()
            .map(|v| IpAddr::V4(Ipv4Addr::from(v)))
    }
}

/// How many addresses of `net` are handed out to names ([`usable`]).
pub fn usable_addresses(net: IpNet) -> u128 {
    usable(net).count
}

/// The usable addresses of a pool: all but its first, and for IPv4 all but its last.
/// An IPv4 /31 or /32 or an IPv6 /128 keeps its addresses (point-to-point use).
fn usable(net: IpNet) -> Range {
    let host_bits = u32::from(net.max_prefix_len().saturating_sub(net.prefix_len()));
    let size = 1u128.checked_shl(host_bits).unwrap_or(u128::MAX);
    let network = to_u128(net.network());
    let (skip_first, skip_last) = match net {
        IpNet::V4(_) if host_bits >= 2 => (1, 1),
        IpNet::V6(_) if host_bits >= 1 => (1, 0),
        _ => (0, 0),
    };
    Range {
        net,
        first: network.saturating_add(skip_first),
        count: size.saturating_sub(skip_first + skip_last),
    }
}

impl FakeTable {
    /// A table over `pools` (those of one family; others are ignored), holding at most
    /// `max_entries` names, each recyclable after `hold` unused. `None` when no pool
    /// of the family `v6` is given.
    pub fn new(pools: &[IpNet], v6: bool, max_entries: usize, hold: Duration) -> Option<Self> {
        let ranges: Vec<Range> = pools
            .iter()
            .filter(|net| matches!(net, IpNet::V6(_)) == v6)
            .map(|net| usable(*net))
            .filter(|r| r.count > 0)
            .collect();
        if ranges.is_empty() {
            return None;
        }
        let total = ranges
            .iter()
            .fold(0u128, |acc, r| acc.saturating_add(r.count));
        let cap = total
            .min(u128::try_from(max_entries).unwrap_or(u128::MAX))
            .min(u128::from(NIL - 1));
        let capacity = u32::try_from(cap).unwrap_or(NIL - 1);
        if capacity == 0 {
            return None;
        }
        Some(FakeTable {
            ranges,
            capacity,
            hold,
            slots: Vec::new(),
            by_name: HashMap::new(),
            head: NIL,
            tail: NIL,
            last_exhausted_warning: None,
        })
    }

    /// How many names the table can hold.
    pub fn capacity(&self) -> usize {
        usize::try_from(self.capacity).unwrap_or(usize::MAX)
    }

    /// How many names it holds now.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when no name has been mapped yet.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The address of slot `slot`.
    fn address(&self, slot: u32) -> Option<IpAddr> {
        let mut rest = u128::from(slot);
        for range in &self.ranges {
            if rest < range.count {
                let v6 = matches!(range.net, IpNet::V6(_));
                return from_u128(range.first.checked_add(rest)?, v6);
            }
            rest -= range.count;
        }
        None
    }

    /// Is `ip` in one of the pools (usable or not)?
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.ranges.iter().any(|r| r.net.contains(&ip))
    }

    /// The slot of `ip`, if it is a usable pool address within the capacity.
    fn slot_of(&self, ip: IpAddr) -> Option<u32> {
        let value = to_u128(ip);
        let mut base = 0u128;
        for range in &self.ranges {
            if range.net.contains(&ip) {
                let offset = value.checked_sub(range.first)?;
                if offset >= range.count {
                    return None;
                }
                let slot = u32::try_from(base.checked_add(offset)?).ok()?;
                return (slot < self.capacity).then_some(slot);
            }
            base = base.saturating_add(range.count);
        }
        None
    }

    /// The address of `name` (map form: lower case, no trailing dot), refreshing its
    /// entry; or a fresh address; or a recycled one.
    pub fn assign(&mut self, name: &str, now: Instant) -> Result<(IpAddr, Assigned), Exhausted> {
        if let Some(&slot) = self.by_name.get(name) {
            self.refresh(slot, now);
            let ip = self.address(slot).ok_or(Exhausted)?;
            return Ok((ip, Assigned::Existing));
        }
        let name: Arc<str> = Arc::from(name);
        let (slot, how) = if self.slots.len() < self.capacity() {
            let slot = u32::try_from(self.slots.len()).map_err(|_| Exhausted)?;
            self.slots.push(Slot {
                name: name.clone(),
                last_used: now,
                prev: NIL,
                next: NIL,
            });
            self.push_front(slot);
            (slot, Assigned::Fresh)
        } else {
            let slot = self.tail;
            let old = self
                .slots
                .get(usize::try_from(slot).map_err(|_| Exhausted)?);
            let Some(old) = old else {
                return Err(Exhausted);
            };
            if now.saturating_duration_since(old.last_used) <= self.hold {
                return Err(Exhausted);
            }
            let old_name = old.name.clone();
            self.by_name.remove(&old_name);
            if let Some(s) = self.slot_mut(slot) {
                s.name = name.clone();
            }
            self.refresh(slot, now);
            (slot, Assigned::Recycled)
        };
        self.by_name.insert(name, slot);
        let ip = self.address(slot).ok_or(Exhausted)?;
        Ok((ip, how))
    }

    /// What `ip` stands for. With `touch`, a mapped entry counts as used at `now`.
    pub fn lookup(&mut self, ip: IpAddr, now: Instant, touch: bool) -> Lookup {
        if !self.contains(ip) {
            return Lookup::NotFake;
        }
        let Some(slot) = self.slot_of(ip) else {
            return Lookup::Unmapped;
        };
        let Some(name) = self.slot(slot).map(|s| s.name.clone()) else {
            return Lookup::Unmapped;
        };
        if touch {
            self.refresh(slot, now);
        }
        Lookup::Name(name)
    }

    /// The address mapped to `name` (map form), without refreshing it.
    pub fn address_of(&self, name: &str) -> Option<IpAddr> {
        let slot = *self.by_name.get(name)?;
        self.address(slot)
    }

    /// True once per burst of exhaustion (at most once every `every`): the caller logs.
    pub fn warn_exhausted(&mut self, now: Instant, every: Duration) -> bool {
        let due = self
            .last_exhausted_warning
            .is_none_or(|last| now.saturating_duration_since(last) >= every);
        if due {
            self.last_exhausted_warning = Some(now);
        }
        due
    }

    fn slot(&self, slot: u32) -> Option<&Slot> {
        self.slots.get(usize::try_from(slot).ok()?)
    }

    fn slot_mut(&mut self, slot: u32) -> Option<&mut Slot> {
        self.slots.get_mut(usize::try_from(slot).ok()?)
    }

    /// Marks `slot` used at `now` and moves it to the front.
    fn refresh(&mut self, slot: u32, now: Instant) {
        if let Some(s) = self.slot_mut(slot) {
            // Callers read the clock before taking the lock: never move time back.
            s.last_used = s.last_used.max(now);
        }
        if self.head != slot {
            self.unlink(slot);
            self.push_front(slot);
        }
    }

    fn unlink(&mut self, slot: u32) {
        let Some((prev, next)) = self.slot(slot).map(|s| (s.prev, s.next)) else {
            return;
        };
        match self.slot_mut(prev) {
            Some(p) => p.next = next,
            None => self.head = next,
        }
        match self.slot_mut(next) {
            Some(n) => n.prev = prev,
            None => self.tail = prev,
        }
        if let Some(s) = self.slot_mut(slot) {
            s.prev = NIL;
            s.next = NIL;
        }
    }

    fn push_front(&mut self, slot: u32) {
        let old_head = self.head;
        if let Some(s) = self.slot_mut(slot) {
            s.prev = NIL;
            s.next = old_head;
        }
        match self.slot_mut(old_head) {
            Some(h) => h.prev = slot,
            None => self.tail = slot,
        }
        self.head = slot;
    }
}
