//! `dns_message` and `dns_frames`: the DNS decoders ([`Message`]), the responses
//! built from what decodes (each re-decoded with hickory), [`Dns::on_query`] in every
//! mode (fake-ip with a roomy and with an exhausted pool), and the DNS-over-TCP
//! splitter ([`Frames`]) fed in arbitrary chunks.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message as Parsed, MessageType, Query};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};

use super::{chunk_plan, chunks};
use crate::dns::frames::Frames;
use crate::dns::message::{self, MAX_NAME_LEN, Message, MessageError};
use crate::dns::{Decision, Dns, DnsConfig, DnsMode, Target};
use crate::socks::Address;

/// The application and the resolver it asked, for `dns_message`.
const APP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)), 40000);
const RESOLVER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 19, 2, 2)), 53);
/// `--dns-server` in the configurations that set one.
const SERVER: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 19, 2, 53));
/// TTL of fake answers.
const FAKE_TTL: Duration = Duration::from_secs(60);

/// One DNS message: every decoder and builder, then every mode of [`Dns`].
pub fn dns_message(data: &[u8]) {
    check_decoders(data);
    check_query(data, APP, RESOLVER);
}

/// The decoders agree with each other, and every response built from what decodes
/// is a message hickory reads back as meant.
fn check_decoders(bytes: &[u8]) {
    let query = Message::decode_query(bytes);
    let head = Message::decode_head(bytes);
    if bytes.len() < message::HEADER_LEN {
        assert!(matches!(query, Err(MessageError::Short { .. })));
        assert!(matches!(head, Err(MessageError::Short { .. })));
    }
    check_format_error(bytes);
    check_ids(bytes);
    if let Ok(head) = &head {
        check_truncated_response(bytes, head);
    }
    let Ok(query) = query else {
        return;
    };
    let head = head.unwrap_or_else(|e| panic!("a query decodes but its head does not: {e}"));
    assert_eq!(bytes.get(2).map(|f| f & 0x80), Some(0), "QR set in a query");
    assert_eq!(head.id(), query.id());
    assert_eq!(head.question(), query.question());
    assert_eq!(head.question_wire_len(), query.question_wire_len());
    assert!(query.question_wire_len() <= bytes.len() - message::HEADER_LEN);
    assert_eq!(query.question().is_some(), query.question_count() > 0);
    for max in [0, 100, 512, 1232, 4096, 65_535] {
        let limit = query.udp_limit(max);
        assert!(limit <= max && limit >= max.min(message::MIN_UDP_PAYLOAD));
    }
    if let Some(question) = query.question() {
        check_map_name(&question.name);
    }
    check_builders(&query);
}

fn check_ids(bytes: &[u8]) {
    let mut copy = bytes.to_vec();
    let written = message::set_id(&mut copy, 0xbeef);
    assert_eq!(written, bytes.len() >= 2);
    assert_eq!(message::id_of(&copy), written.then_some(0xbeef));
    assert_eq!(copy.get(2..), bytes.get(2..));
}

/// A map key is a host name SOCKS can carry: printable, lower-case, no empty label.
fn check_map_name(name: &Name) {
    let mut buf = [0u8; MAX_NAME_LEN];
    let Some(key) = message::map_name(name, &mut buf) else {
        return;
    };
    assert!(!key.is_empty() && key.len() <= MAX_NAME_LEN, "{key:?}");
    assert!(
        key.bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && !b.is_ascii_uppercase()),
        "{key:?}"
    );
    assert!(
        !key.starts_with('.') && !key.ends_with('.') && !key.contains(".."),
        "{key:?}"
    );
    assert!(Address::domain(key, 80).is_ok(), "{key:?} is no SOCKS host");
    assert_eq!(key.split('.').count(), name.iter().count(), "{key:?}");
}

/// FORMERR: built for anything with a header; echoes the ID; no question.
fn check_format_error(bytes: &[u8]) {
    let mut out = Vec::new();
    let built = message::format_error(bytes, &mut out);
    assert_eq!(built.is_some(), bytes.len() >= message::HEADER_LEN);
    if built.is_some() {
        let parsed = reparse(&out);
        assert_eq!(Some(parsed.id()), message::id_of(bytes));
        assert_eq!(parsed.response_code().low(), message::RCODE_FORMERR);
        assert!(parsed.queries().is_empty() && parsed.answers().is_empty());
    }
}

/// hickory reads `bytes` as a response, or the harness fails.
fn reparse(bytes: &[u8]) -> Parsed {
    let parsed = Parsed::from_vec(bytes)
        .unwrap_or_else(|e| panic!("hickory cannot read our message {bytes:02x?}: {e}"));
    assert_eq!(parsed.message_type(), MessageType::Response);
    parsed
}

/// A response to `query` as built here: ID, opcode, RCODE, the query's questions,
/// `answers` records, an OPT record exactly when the query had one.
fn check_response(query: &Message<'_>, out: &[u8], rcode: u8, answers: usize) -> Parsed {
    let parsed = reparse(out);
    assert_eq!(parsed.id(), query.id());
    assert_eq!(parsed.response_code().low(), rcode);
    assert_eq!(parsed.answers().len(), answers);
    assert_eq!(parsed.extensions().is_some(), query.edns().is_some());
    check_questions(query, parsed.queries());
    parsed
}

fn check_questions(query: &Message<'_>, questions: &[Query]) {
    assert_eq!(questions.len(), usize::from(query.question_count()));
    if let (Some(ours), Some(theirs)) = (query.question(), questions.first()) {
        assert_eq!(ours.name.to_ascii(), theirs.name().to_ascii());
        assert_eq!(ours.qtype, theirs.query_type());
        assert_eq!(ours.qclass, theirs.query_class());
    }
}

/// The builders `Dns` calls on a query that decoded.
fn check_builders(query: &Message<'_>) {
    for rcode in [message::RCODE_NOERROR, message::RCODE_SERVFAIL] {
        let mut out = Vec::new();
        message::empty_response(query, rcode, &mut out);
        check_response(query, &out, rcode, 0);
    }
    // Answers are only built for a query with a question (their name points at it).
    if query.question().is_some() {
        let ips = [
            IpAddr::V4(Ipv4Addr::new(198, 18, 128, 1)),
            IpAddr::V6(Ipv6Addr::new(0xfd18, 0, 0, 0, 0x8000, 0, 0, 1)),
        ];
        for (ip, ttl) in ips.into_iter().zip([60, u32::MAX]) {
            let mut out = Vec::new();
            message::address_answer(query, ip, ttl, &mut out);
            let parsed = check_response(query, &out, message::RCODE_NOERROR, 1);
            check_address_record(&parsed, ip, ttl);
        }
    }
    // A resolver's answer that does not decode: the query's own head, truncated.
    let mut out = Vec::new();
    message::truncated(&[0xff; 3], query, &mut out);
    let parsed = check_response(query, &out, message::RCODE_NOERROR, 0);
    assert!(parsed.truncated());
}

/// The one answer record holds `ip` with `ttl`, named as the question.
fn check_address_record(parsed: &Parsed, ip: IpAddr, ttl: u32) {
    let record = parsed
        .answers()
        .first()
        .unwrap_or_else(|| panic!("no answer"));
    assert_eq!(record.ttl(), ttl);
    let got = match record.data() {
        RData::A(a) => IpAddr::V4(a.0),
        RData::AAAA(a) => IpAddr::V6(a.0),
        other => panic!("answer holds {other:?}"),
    };
    assert_eq!(got, ip);
    if let Some(question) = parsed.queries().first() {
        assert_eq!(record.name().to_ascii(), question.name().to_ascii());
    }
}

/// `bytes` as a resolver's answer (from the proxy: untrusted) truncated for a client.
fn check_truncated_response(bytes: &[u8], head: &Message<'_>) {
    let Ok(client) = Message::decode_query(CLIENT_QUERY) else {
        panic!("the fixed client query does not decode");
    };
    let mut out = Vec::new();
    message::truncated(bytes, &client, &mut out);
    let parsed = Parsed::from_vec(&out)
        .unwrap_or_else(|e| panic!("hickory cannot read our truncated answer {out:02x?}: {e}"));
    assert!(parsed.truncated());
    assert_eq!(parsed.id(), head.id());
    assert!(parsed.answers().is_empty() && parsed.name_servers().is_empty());
    assert_eq!(parsed.extensions().is_some(), client.edns().is_some());
    check_questions(head, parsed.queries());
}

/// A query for example.com A with an OPT record (payload size 4096).
const CLIENT_QUERY: &[u8] = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x01\
    \x07example\x03com\x00\x00\x01\x00\x01\
    \x00\x00\x29\x10\x00\x00\x00\x00\x00\x00\x00";

/// One datagram to port 53 from `src` to `dst`, in every DNS mode.
pub fn check_query(payload: &[u8], src: SocketAddr, dst: SocketAddr) {
    let now = Instant::now();
    let query = Message::decode_query(payload).ok();
    let dropped = payload.len() < message::HEADER_LEN
        || payload.get(2).is_some_and(|flags| flags & 0x80 != 0);
    for server in [None, Some(SERVER)] {
        let resolver = server.map_or(dst, |ip| SocketAddr::new(ip, 53));
        let dns = dns(DnsMode::Udp, server, crate::dns::config::DEFAULT_POOL_V4);
        let decision = dns.on_query(payload, src, dst, now);
        if dropped {
            assert!(matches!(decision, Decision::Drop(_)), "{decision:?}");
        } else {
            assert_eq!(decision, Decision::Relay { resolver });
        }
        let dns = dns_tcp(server);
        match (dns.on_query(payload, src, dst, now), &query) {
            (Decision::Drop(_), _) => assert!(dropped),
            (Decision::Tcp { resolver: r }, Some(_)) => assert_eq!(r, resolver),
            (Decision::Answer(out), None) => {
                assert_eq!(reparse(&out).response_code().low(), message::RCODE_FORMERR);
            }
            (decision, query) => panic!("tcp mode: {decision:?} for {query:?}"),
        }
    }
    let Some(query) = query else {
        return;
    };
    if let Some(out) = dns_tcp(None).servfail(payload) {
        check_response(&query, &out, message::RCODE_SERVFAIL, 0);
    }
    check_fake(&query, payload, src, dst, now);
}

fn dns(mode: DnsMode, server: Option<IpAddr>, v4_pool: &str) -> Dns {
    let mut pools = DnsConfig::default_pools();
    if let Some(v4) = pools.first_mut() {
        *v4 = v4_pool.parse().unwrap_or(*v4);
    }
    let config = DnsConfig {
        mode,
        server,
        fake_pools: pools,
        fake_ttl: FAKE_TTL,
        fake_grace: Duration::ZERO,
        ..DnsConfig::default()
    };
    Dns::new(config, super::stack::closed_upstream())
}

fn dns_tcp(server: Option<IpAddr>) -> Dns {
    dns(DnsMode::Tcp, server, crate::dns::config::DEFAULT_POOL_V4)
}

/// The name fake-ip mode answers for, and its family, if it answers this query.
fn fake_name(query: &Message<'_>) -> Option<(String, bool)> {
    let question = query.question()?;
    let v6 = match question.qtype {
        RecordType::A => false,
        RecordType::AAAA => true,
        _ => return None,
    };
    if !query.is_standard_query() || query.question_count() != 1 || question.qclass != DNSClass::IN
    {
        return None;
    }
    let mut buf = [0u8; MAX_NAME_LEN];
    message::map_name(&question.name, &mut buf).map(|name| (name.to_owned(), v6))
}

/// fake-ip mode with a roomy pool, then with a full one (SERVFAIL) that recycles
/// once the TTL has passed.
fn check_fake(query: &Message<'_>, payload: &[u8], src: SocketAddr, dst: SocketAddr, now: Instant) {
    let expected = fake_name(query);
    let roomy = dns(DnsMode::FakeIp, None, crate::dns::config::DEFAULT_POOL_V4);
    let decision = roomy.on_query(payload, src, dst, now);
    let Some((name, v6)) = expected else {
        assert_eq!(decision, Decision::Tcp { resolver: dst });
        return;
    };
    let ip = check_fake_answer(&roomy, query, &decision, &name, v6, now);
    // The same name again: the same address.
    let again = roomy.on_query(payload, src, dst, now);
    assert_eq!(check_fake_answer(&roomy, query, &again, &name, v6, now), ip);
    if v6 {
        return;
    }
    // A /30 holds two names: fill it, then the query gets SERVFAIL until the TTL of
    // the others has passed, and then an address recycled from one of them.
    let full = dns(DnsMode::FakeIp, None, "198.18.128.0/30");
    let mut others = Vec::new();
    for other in ["fill-a.invalid", "fill-b.invalid"] {
        let bytes = a_query(other);
        let Ok(q) = Message::decode_query(&bytes) else {
            panic!("our own query for {other} does not decode");
        };
        let d = full.on_query(&bytes, src, dst, now);
        others.push((other, check_fake_answer(&full, &q, &d, other, false, now)));
    }
    if others.iter().any(|(other, _)| *other == name) {
        return;
    }
    match full.on_query(payload, src, dst, now) {
        Decision::Answer(out) => {
            check_response(query, &out, message::RCODE_SERVFAIL, 0);
        }
        other => panic!("full pool: {other:?}"),
    }
    let later = now + FAKE_TTL + Duration::from_secs(1);
    let decision = full.on_query(payload, src, dst, later);
    let ip = check_fake_answer(&full, query, &decision, &name, false, later);
    for (other, old) in others {
        if old.is_some() && old == ip {
            assert_eq!(
                full.fake_address_of(other, false),
                None,
                "{other} kept {old:?}"
            );
        }
    }
}

/// A fake-ip answer: one address from the pool that maps back to `name`.
fn check_fake_answer(
    dns: &Dns,
    query: &Message<'_>,
    decision: &Decision,
    name: &str,
    v6: bool,
    now: Instant,
) -> Option<IpAddr> {
    let Decision::Answer(out) = decision else {
        panic!("fake-ip gave {decision:?} for {name}");
    };
    let parsed = reparse(out);
    if parsed.answers().is_empty() {
        // No pool of this family: "no data".
        check_response(query, out, message::RCODE_NOERROR, 0);
        return None;
    }
    let parsed = check_response(query, out, message::RCODE_NOERROR, 1);
    let ip = match parsed.answers().first().map(|r| r.data()) {
        Some(RData::A(a)) if !v6 => IpAddr::V4(a.0),
        Some(RData::AAAA(a)) if v6 => IpAddr::V6(a.0),
        other => panic!("fake-ip answered {name} (v6: {v6}) with {other:?}"),
    };
    check_address_record(&parsed, ip, u32::try_from(FAKE_TTL.as_secs()).unwrap_or(0));
    assert_eq!(dns.fake_address_of(name, v6), Some(ip));
    let expected = Address::domain(name, 443).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(
        dns.target_for(SocketAddr::new(ip, 443), now),
        Target::Name(expected)
    );
    Some(ip)
}

/// A query for `name` A, built by hickory.
fn a_query(name: &str) -> Vec<u8> {
    let mut m = Parsed::new();
    m.set_id(7);
    if let Ok(name) = Name::from_ascii(name) {
        m.add_query(Query::query(name, RecordType::A));
    }
    m.to_vec().unwrap_or_default()
}

/// `| n | sizes... | stream |`: the splitter yields the stream's complete, non-empty
/// messages in order, however the bytes arrive and however often it is asked.
pub fn dns_frames(data: &[u8]) {
    let (sizes, stream) = chunk_plan(data);
    let expected = reference_frames(stream);
    let pieces = chunks(stream, &sizes);
    // Ask after every piece until it has nothing.
    let mut frames = Frames::default();
    let mut got = Vec::new();
    for piece in &pieces {
        frames.push(piece);
        got.extend(std::iter::from_fn(|| frames.next_message()));
    }
    assert_eq!(got, expected, "drained after every push");
    // Everything first, then ask.
    let mut frames = Frames::default();
    for piece in &pieces {
        frames.push(piece);
    }
    let got: Vec<Vec<u8>> = std::iter::from_fn(|| frames.next_message()).collect();
    assert_eq!(got, expected, "drained at the end");
    // At most one message per push, the rest at the end.
    let mut frames = Frames::default();
    let mut got = Vec::new();
    for piece in &pieces {
        frames.push(piece);
        got.extend(frames.next_message());
    }
    got.extend(std::iter::from_fn(|| frames.next_message()));
    assert_eq!(got, expected, "one message per push");
}

/// The complete non-empty messages of `stream`, read the plain way.
fn reference_frames(stream: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = stream;
    while let [a, b, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*a, *b]));
        let Some(body) = tail.get(..len) else {
            break;
        };
        if len > 0 {
            out.push(body.to_vec());
        }
        rest = tail.get(len..).unwrap_or_default();
    }
    out
}
