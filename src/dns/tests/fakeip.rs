//! The fake-IP table: allocation order, lookups, exhaustion, recycling only after the
//! hold time, touches, capacity, several pools, both families.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::dns::fakeip::{Assigned, Exhausted, FakeTable, Lookup};

const HOLD: Duration = Duration::from_secs(360);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn pools(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

fn table(list: &[&str], v6: bool, max: usize) -> FakeTable {
    FakeTable::new(&pools(list), v6, max, HOLD).unwrap()
}

#[test]
fn hands_out_addresses_in_order_and_keeps_them() {
    let t0 = Instant::now();
    let mut t = table(&["198.18.128.0/17"], false, 65_536);
    assert_eq!(t.capacity(), 32_766);
    assert_eq!(
        t.assign("a.example", t0),
        Ok((ip("198.18.128.1"), Assigned::Fresh))
    );
    assert_eq!(
        t.assign("b.example", t0),
        Ok((ip("198.18.128.2"), Assigned::Fresh))
    );
    assert_eq!(
        t.assign("a.example", t0),
        Ok((ip("198.18.128.1"), Assigned::Existing))
    );
    assert_eq!(t.len(), 2);
    assert_eq!(t.address_of("b.example"), Some(ip("198.18.128.2")));
    assert_eq!(t.address_of("c.example"), None);
}

#[test]
fn lookups_tell_real_unmapped_and_mapped_addresses_apart() {
    let t0 = Instant::now();
    let mut t = table(&["198.18.128.0/30"], false, 10);
    t.assign("x", t0).unwrap();
    assert_eq!(t.lookup(ip("10.0.0.1"), t0, true), Lookup::NotFake);
    assert_eq!(
        t.lookup(ip("198.18.128.1"), t0, true),
        Lookup::Name("x".into())
    );
    assert_eq!(t.lookup(ip("198.18.128.2"), t0, true), Lookup::Unmapped);
    // Network and broadcast addresses of the pool are never handed out.
    assert_eq!(t.lookup(ip("198.18.128.0"), t0, true), Lookup::Unmapped);
    assert_eq!(t.lookup(ip("198.18.128.3"), t0, true), Lookup::Unmapped);
}

#[test]
fn exhaustion_then_recycling_only_after_the_hold_time() {
    let t0 = Instant::now();
    let mut t = table(&["198.18.128.0/30"], false, 10);
    assert_eq!(t.capacity(), 2);
    let (a, _) = t.assign("a", t0).unwrap();
    let (b, _) = t.assign("b", t0 + Duration::from_secs(1)).unwrap();
    assert_eq!(t.assign("c", t0), Err(Exhausted));
    // Exactly the hold time is not enough: strictly longer is needed.
    assert_eq!(t.assign("c", t0 + HOLD), Err(Exhausted));
    let later = t0 + HOLD + Duration::from_millis(1);
    assert_eq!(t.assign("c", later), Ok((a, Assigned::Recycled)));
    // `a`'s address now means `c`; `a` itself is gone; `b` untouched.
    assert_eq!(t.lookup(a, later, false), Lookup::Name("c".into()));
    assert_eq!(t.address_of("a"), None);
    assert_eq!(t.lookup(b, later, false), Lookup::Name("b".into()));
    assert_eq!(t.len(), 2);
    // `b` was used at t0+1 s: not recyclable until 1 s later.
    assert_eq!(t.assign("d", later), Err(Exhausted));
    assert_eq!(
        t.assign("d", t0 + HOLD + Duration::from_millis(1001)),
        Ok((b, Assigned::Recycled))
    );
}

#[test]
fn a_touch_or_a_repeated_query_protects_an_entry() {
    let t0 = Instant::now();
    let mut t = table(&["198.18.128.0/30"], false, 10);
    let (a, _) = t.assign("a", t0).unwrap();
    t.assign("b", t0).unwrap();
    // A flow uses `a` halfway through; `b` is queried again a bit later.
    t.lookup(a, t0 + HOLD / 2, true);
    t.assign("b", t0 + HOLD / 2 + Duration::from_secs(1))
        .unwrap();
    let t1 = t0 + HOLD + Duration::from_secs(10);
    assert_eq!(t.assign("c", t1), Err(Exhausted));
    // A lookup without touch does not refresh.
    t.lookup(a, t1, false);
    let t2 = t0 + HOLD / 2 + HOLD + Duration::from_millis(500);
    assert_eq!(t.assign("c", t2), Ok((a, Assigned::Recycled)));
}

#[test]
fn a_clock_read_before_the_lock_never_moves_an_entry_back() {
    let t0 = Instant::now();
    let mut t = table(&["198.18.128.0/30"], false, 10);
    let (a, _) = t.assign("a", t0 + Duration::from_secs(100)).unwrap();
    t.assign("b", t0).unwrap();
    t.lookup(a, t0, true);
    // `b` (used at t0) is the one to go, not `a` (used at t0+100 s).
    let (got, how) = t.assign("c", t0 + HOLD + Duration::from_secs(1)).unwrap();
    assert_eq!(how, Assigned::Recycled);
    assert_ne!(got, a);
}

#[test]
fn capacity_is_capped_by_the_maximum() {
    let t0 = Instant::now();
    let mut t = table(&["198.18.128.0/17"], false, 3);
    assert_eq!(t.capacity(), 3);
    for n in ["a", "b", "c"] {
        t.assign(n, t0).unwrap();
    }
    assert_eq!(t.assign("d", t0), Err(Exhausted));
    // Addresses beyond the capacity are unmapped, never a name.
    assert_eq!(t.lookup(ip("198.18.128.4"), t0, true), Lookup::Unmapped);
}

#[test]
fn several_pools_are_used_in_order() {
    let t0 = Instant::now();
    let mut t = table(&["198.18.128.0/30", "10.99.0.0/30"], false, 10);
    assert_eq!(t.capacity(), 4);
    let got: Vec<IpAddr> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| t.assign(n, t0).unwrap().0)
        .collect();
    assert_eq!(
        got,
        vec![
            ip("198.18.128.1"),
            ip("198.18.128.2"),
            ip("10.99.0.1"),
            ip("10.99.0.2")
        ]
    );
    assert_eq!(
        t.lookup(ip("10.99.0.2"), t0, false),
        Lookup::Name("d".into())
    );
}

#[test]
fn ipv6_pools_and_family_separation() {
    let t0 = Instant::now();
    let both = pools(&["198.18.128.0/17", "fd18::8000:0:0:0/65"]);
    let mut v6 = FakeTable::new(&both, true, 65_536, HOLD).unwrap();
    assert_eq!(v6.capacity(), 65_536);
    assert_eq!(v6.assign("a", t0).unwrap().0, ip("fd18::8000:0:0:1"));
    assert_eq!(v6.lookup(ip("198.18.128.1"), t0, true), Lookup::NotFake);
    assert_eq!(
        v6.lookup(ip("fd18::8000:0:0:1"), t0, true),
        Lookup::Name("a".into())
    );
    // Only a v4 pool: no v6 table at all.
    assert!(FakeTable::new(&pools(&["198.18.128.0/17"]), true, 10, HOLD).is_none());
    // A /128 or /32 pool keeps its single address.
    let mut one = table(&["fd18::9999/128"], true, 10);
    assert_eq!(one.assign("x", t0).unwrap().0, ip("fd18::9999"));
    assert_eq!(one.assign("y", t0), Err(Exhausted));
}

#[test]
fn exhaustion_is_reported_once_per_burst() {
    let t0 = Instant::now();
    let mut t = table(&["198.18.128.0/30"], false, 10);
    let every = Duration::from_secs(10);
    assert!(t.warn_exhausted(t0, every));
    assert!(!t.warn_exhausted(t0 + Duration::from_secs(9), every));
    assert!(t.warn_exhausted(t0 + Duration::from_secs(10), every));
}

#[test]
fn many_names_fill_and_recycle_consistently() {
    let t0 = Instant::now();
    let mut t = table(&["198.18.128.0/24"], false, 100);
    for round in 0u64..5 {
        let now = t0 + (HOLD + Duration::from_secs(1)) * u32::try_from(round).unwrap();
        for i in 0..100 {
            let name = format!("n{round}-{i}");
            let (addr, _) = t.assign(&name, now).unwrap();
            assert_eq!(
                t.lookup(addr, now, false),
                Lookup::Name(name.as_str().into())
            );
        }
        assert_eq!(t.len(), 100);
        assert_eq!(t.assign("one-more", now).unwrap_err(), Exhausted);
    }
}
