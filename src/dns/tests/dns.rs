//! [`Dns`]'s synchronous decisions in each mode, and a bench loop for fake answers.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message as HMessage, ResponseCode};
use hickory_proto::rr::{RData, RecordType};

use super::{hex, query};
use crate::dns::{Decision, Dns, DnsConfig, DnsMode, Target};
use crate::socks::Address;
use crate::upstream::{DialOptions, Upstream};

fn upstream() -> Upstream {
    Upstream::new(
        "socks5://127.0.0.1:9".parse().unwrap(),
        DialOptions::default(),
    )
}

fn dns(mode: DnsMode, f: impl FnOnce(&mut DnsConfig)) -> Dns {
    let mut c = DnsConfig {
        mode,
        ..DnsConfig::default()
    };
    f(&mut c);
    Dns::new(c, upstream())
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

const SRC: &str = "198.18.0.1:40000";
const DST: &str = "8.8.8.8:53";

fn answer(d: Decision) -> HMessage {
    match d {
        Decision::Answer(bytes) => HMessage::from_vec(&bytes).unwrap(),
        other => panic!("expected an answer, got {other:?}"),
    }
}

fn fake_ip(m: &HMessage) -> IpAddr {
    match m.answers()[0].data() {
        RData::A(a) => IpAddr::V4(a.0),
        RData::AAAA(a) => IpAddr::V6(a.0),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn udp_mode_relays_to_the_queried_address_or_the_server() {
    let now = Instant::now();
    let q = query(1, "example.com.", RecordType::A, None);
    let d = dns(DnsMode::Udp, |_| {});
    assert_eq!(
        d.on_query(&q, sa(SRC), sa(DST), now),
        Decision::Relay { resolver: sa(DST) }
    );
    let d = dns(DnsMode::Udp, |c| {
        c.server = Some("10.0.0.53".parse().unwrap())
    });
    assert_eq!(
        d.on_query(&q, sa(SRC), sa(DST), now),
        Decision::Relay {
            resolver: sa("10.0.0.53:53")
        }
    );
    assert_eq!(d.stats().via_udp, 1);
    // In udp mode nothing is fake.
    assert_eq!(
        d.target_for(sa("198.18.128.1:80"), now),
        Target::Direct(sa("198.18.128.1:80"))
    );
}

#[test]
fn tcp_mode_sends_queries_over_tcp_and_answers_garbage_with_formerr() {
    let now = Instant::now();
    let d = dns(DnsMode::Tcp, |_| {});
    let q = query(1, "example.com.", RecordType::A, None);
    assert_eq!(
        d.on_query(&q, sa(SRC), sa(DST), now),
        Decision::Tcp { resolver: sa(DST) }
    );
    let m = answer(d.on_query(
        &hex("abcd 0100 0001 0000 0000 0000 3f"),
        sa(SRC),
        sa(DST),
        now,
    ));
    assert_eq!(m.response_code(), ResponseCode::FormErr);
    assert_eq!(m.id(), 0xabcd);
    assert!(matches!(
        d.on_query(&[0; 5], sa(SRC), sa(DST), now),
        Decision::Drop(_)
    ));
    let mut response = q.clone();
    response[2] |= 0x80;
    assert!(matches!(
        d.on_query(&response, sa(SRC), sa(DST), now),
        Decision::Drop(_)
    ));
    let s = d.stats();
    assert_eq!((s.queries, s.via_tcp, s.malformed, s.dropped), (4, 1, 2, 1));
}

#[test]
fn fake_ip_answers_a_and_aaaa_and_maps_flows_back_to_names() {
    let now = Instant::now();
    let d = dns(DnsMode::FakeIp, |_| {});
    let a = answer(d.on_query(
        &query(7, "Www.Example.com.", RecordType::A, None),
        sa(SRC),
        sa(DST),
        now,
    ));
    assert_eq!(a.id(), 7);
    assert_eq!(a.answers()[0].ttl(), 60);
    let ip4 = fake_ip(&a);
    assert_eq!(ip4, "198.18.128.1".parse::<IpAddr>().unwrap());
    let aaaa = answer(d.on_query(
        &query(8, "www.example.com", RecordType::AAAA, Some(1232)),
        sa(SRC),
        sa(DST),
        now,
    ));
    let ip6 = fake_ip(&aaaa);
    assert_eq!(ip6, "fd18::8000:0:0:1".parse::<IpAddr>().unwrap());
    // Same name again: same address.
    let again = answer(d.on_query(
        &query(9, "WWW.EXAMPLE.COM", RecordType::A, None),
        sa(SRC),
        sa(DST),
        now,
    ));
    assert_eq!(fake_ip(&again), ip4);

    let expected = Target::Name(Address::domain("www.example.com", 443).unwrap());
    assert_eq!(d.target_for(SocketAddr::new(ip4, 443), now), expected);
    assert_eq!(d.target_for(SocketAddr::new(ip6, 443), now), expected);
    assert_eq!(d.target_for(sa("198.18.200.7:443"), now), Target::Unknown);
    assert_eq!(
        d.target_for(sa("192.0.2.1:443"), now),
        Target::Direct(sa("192.0.2.1:443"))
    );
    assert_eq!(d.fake_address_of("www.EXAMPLE.com.", false), Some(ip4));
    assert_eq!(d.fake_address_of("www.example.com", true), Some(ip6));
    assert_eq!(d.fake_address_of("other.example", false), None);
    let s = d.stats();
    assert_eq!((s.answered_fake, s.fake_unknown, s.fake_entries), (3, 1, 2));
}

#[test]
fn fake_ip_sends_other_queries_over_tcp() {
    let now = Instant::now();
    let d = dns(DnsMode::FakeIp, |c| {
        c.server = Some("10.0.0.53".parse().unwrap())
    });
    for rtype in [
        RecordType::MX,
        RecordType::TXT,
        RecordType::HTTPS,
        RecordType::PTR,
    ] {
        let q = query(1, "example.com.", rtype, None);
        assert_eq!(
            d.on_query(&q, sa(SRC), sa(DST), now),
            Decision::Tcp {
                resolver: sa("10.0.0.53:53")
            }
        );
    }
    // The root name cannot be handed to a proxy: upstream too.
    let q = query(1, ".", RecordType::A, None);
    assert!(matches!(
        d.on_query(&q, sa(SRC), sa(DST), now),
        Decision::Tcp { .. }
    ));
}

#[test]
fn fake_ip_without_a_pool_of_the_family_answers_no_data() {
    let now = Instant::now();
    let d = dns(DnsMode::FakeIp, |c| {
        c.fake_pools = vec!["198.18.128.0/17".parse().unwrap()]
    });
    let m = answer(d.on_query(
        &query(3, "example.com.", RecordType::AAAA, None),
        sa(SRC),
        sa(DST),
        now,
    ));
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert!(m.answers().is_empty());
    assert_eq!(d.stats().answered_empty, 1);
    assert_eq!(
        d.target_for(sa("[fd18::8000:0:0:1]:80"), now),
        Target::Direct(sa("[fd18::8000:0:0:1]:80"))
    );
}

#[test]
fn fake_ip_exhaustion_answers_servfail_and_an_unused_entry_is_recycled_later() {
    let t0 = Instant::now();
    let d = dns(DnsMode::FakeIp, |c| {
        c.fake_pools = vec!["198.18.128.0/30".parse().unwrap()];
        c.fake_ttl = Duration::from_secs(5);
        c.fake_grace = Duration::from_secs(5);
    });
    let ask =
        |name: &str, now| d.on_query(&query(1, name, RecordType::A, None), sa(SRC), sa(DST), now);
    let a = fake_ip(&answer(ask("a.test", t0)));
    fake_ip(&answer(ask("b.test", t0)));
    let m = answer(ask("c.test", t0 + Duration::from_secs(3)));
    assert_eq!(m.response_code(), ResponseCode::ServFail);
    // A flow keeps `b` alive; `a` is unused past TTL + grace and goes to `c`.
    let b_flow = d.target_for(sa("198.18.128.2:80"), t0 + Duration::from_secs(8));
    assert!(matches!(b_flow, Target::Name(_)));
    let c = fake_ip(&answer(ask("c.test", t0 + Duration::from_secs(11))));
    assert_eq!(c, a);
    assert_eq!(
        d.target_for(SocketAddr::new(a, 80), t0 + Duration::from_secs(11)),
        Target::Name(Address::domain("c.test", 80).unwrap())
    );
    let s = d.stats();
    assert_eq!((s.servfail, s.fake_recycled), (1, 1));
}

#[test]
fn servfail_helper_echoes_the_query() {
    let d = dns(DnsMode::Tcp, |_| {});
    let q = query(0x4242, "example.com.", RecordType::MX, Some(1232));
    let m = HMessage::from_vec(&d.servfail(&q).unwrap()).unwrap();
    assert_eq!(m.id(), 0x4242);
    assert_eq!(m.response_code(), ResponseCode::ServFail);
    assert_eq!(m.queries()[0].query_type(), RecordType::MX);
    assert!(d.servfail(&[1, 2, 3]).is_none());
}

#[test]
fn dns_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Dns>();
}

/// Not a timing assertion: prints the cost of one fake answer (new and repeated names).
#[test]
fn bench_fake_answers() {
    let d = dns(DnsMode::FakeIp, |_| {});
    let names: Vec<Vec<u8>> = (0..20_000)
        .map(|i| {
            query(
                i as u16,
                &format!("host{i}.example.com."),
                RecordType::A,
                Some(1232),
            )
        })
        .collect();
    let now = Instant::now();
    let start = Instant::now();
    for q in &names {
        assert!(matches!(
            d.on_query(q, sa(SRC), sa(DST), now),
            Decision::Answer(_)
        ));
    }
    let fresh = start.elapsed();
    let start = Instant::now();
    for q in &names {
        assert!(matches!(
            d.on_query(q, sa(SRC), sa(DST), now),
            Decision::Answer(_)
        ));
    }
    let repeat = start.elapsed();
    let per = |t: Duration| t.as_nanos() / names.len() as u128;
    eprintln!(
        "fake-ip on_query: {} ns/query (new names), {} ns/query (known names)",
        per(fresh),
        per(repeat)
    );
}

#[test]
fn touch_keeps_a_live_flow_s_address_from_being_recycled() {
    let t0 = Instant::now();
    let d = dns(DnsMode::FakeIp, |c| {
        c.fake_pools = vec!["198.18.128.0/31".parse().unwrap()];
        c.fake_ttl = Duration::from_secs(5);
        c.fake_grace = Duration::from_secs(5);
    });
    let ask =
        |name: &str, now| d.on_query(&query(1, name, RecordType::A, None), sa(SRC), sa(DST), now);
    let a = fake_ip(&answer(ask("a.test", t0)));
    fake_ip(&answer(ask("b.test", t0)));
    // A long flow to `a` reports itself every few seconds.
    for s in [4, 8, 12, 16] {
        d.touch(a, t0 + Duration::from_secs(s));
    }
    let c = fake_ip(&answer(ask("c.test", t0 + Duration::from_secs(17))));
    assert_ne!(c, a, "the touched address went to another name");
    assert_eq!(
        d.target_for(SocketAddr::new(a, 80), t0 + Duration::from_secs(17)),
        Target::Name(Address::domain("a.test", 80).unwrap())
    );
    // Touching a real address is harmless.
    d.touch("192.0.2.1".parse().unwrap(), t0);
}
