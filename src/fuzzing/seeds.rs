//! Seed inputs for the packet and DNS targets, built from real packets and queries
//! (etherparse, hickory): `tests/fuzz_corpus.rs` checks that the committed
//! `seed-*` files are exactly these, and rewrites them with `T2S_WRITE_SEEDS=1`.

use std::net::Ipv4Addr;

use etherparse::{PacketBuilder, PacketBuilderStep, UdpHeader};
use hickory_proto::op::{Edns, Message, MessageType, Query};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use super::fix_checksums;

/// A seed: target, file name, bytes.
pub type Seed = (&'static str, String, Vec<u8>);

const APP4: [u8; 4] = [198, 18, 0, 2];
const DST4: [u8; 4] = [198, 19, 2, 2];
const APP6: [u8; 16] = [0xfd, 0x18, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const DST6: [u8; 16] = [0xfd, 0x19, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
/// The first address of the default fake-IP pool.
const FAKE4: [u8; 4] = [198, 18, 128, 1];

/// Every seed of the four targets.
pub fn all() -> Vec<Seed> {
    let mut seeds = Vec::new();
    seeds.extend(dns_messages());
    seeds.extend(frames());
    seeds.extend(ingress());
    seeds.extend(stack());
    seeds.extend(super::offload::seeds());
    seeds
}

/// A DNS query for `name` `qtype`, with an OPT record when `edns`.
pub fn query(id: u16, name: &str, qtype: RecordType, edns: bool) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(id).set_recursion_desired(true);
    if let Ok(name) = Name::from_ascii(name) {
        m.add_query(Query::query(name, qtype));
    }
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(4096);
        m.set_edns(e);
    }
    m.to_vec().unwrap_or_default()
}

fn dns_messages() -> Vec<Seed> {
    let long = [
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(61),
    ]
    .join(".");
    let mut seeds: Vec<(&str, Vec<u8>)> = vec![
        ("a", query(1, "example.com.", RecordType::A, false)),
        ("a-edns", query(2, "example.com.", RecordType::A, true)),
        (
            "aaaa-edns",
            query(3, "Www.Example.COM.", RecordType::AAAA, true),
        ),
        ("mx", query(4, "example.com.", RecordType::MX, false)),
        ("any", query(5, "example.org.", RecordType::ANY, true)),
        ("root", query(6, ".", RecordType::NS, false)),
        (
            "longest",
            query(7, &format!("{long}."), RecordType::A, false),
        ),
        ("wildcard", query(8, "*.example.com.", RecordType::A, false)),
        ("none", query(9, "", RecordType::A, false)),
        ("short", vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0]),
    ];
    let mut two = Message::new();
    two.set_id(10);
    for name in ["one.example.", "two.example."] {
        if let Ok(n) = Name::from_ascii(name) {
            two.add_query(Query::query(n, RecordType::A));
        }
    }
    seeds.push(("two-questions", two.to_vec().unwrap_or_default()));
    let mut chaos = query(11, "version.bind.", RecordType::TXT, false);
    if let Some(class) = chaos
        .len()
        .checked_sub(2)
        .and_then(|at| chaos.get_mut(at..))
    {
        class.copy_from_slice(&u16::from(DNSClass::CH).to_be_bytes());
    }
    seeds.push(("chaos", chaos));
    let mut status = query(12, "example.com.", RecordType::A, false);
    if let Some(flags) = status.get_mut(2) {
        *flags |= 2 << 3; // opcode STATUS
    }
    seeds.push(("opcode-status", status));
    let mut response = Message::new();
    response.set_id(13).set_message_type(MessageType::Response);
    if let Ok(n) = Name::from_ascii("example.com.") {
        response.add_query(Query::query(n.clone(), RecordType::A));
        for i in 0..40u8 {
            let a = RData::A(A(Ipv4Addr::new(192, 0, 2, i)));
            response.add_answer(Record::from_rdata(n.clone(), 300, a));
        }
    }
    seeds.push(("big-response", response.to_vec().unwrap_or_default()));
    seeds.push((
        "odd-label",
        b"\x00\x0e\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03a b\x04a.b\xff\x00\x00\x01\x00\x01"
            .to_vec(),
    ));
    seeds
        .into_iter()
        .map(|(name, bytes)| ("dns_message", format!("seed-{name}"), bytes))
        .collect()
}

fn frame(message: &[u8]) -> Vec<u8> {
    let len = u16::try_from(message.len()).unwrap_or(u16::MAX);
    [&len.to_be_bytes()[..], message].concat()
}

fn frames() -> Vec<Seed> {
    let a = query(1, "example.com.", RecordType::A, true);
    let b = query(2, "example.net.", RecordType::AAAA, false);
    let two = [frame(&a), frame(&b)].concat();
    let with_empty = [frame(&a), vec![0, 0], frame(&b)].concat();
    let partial = [frame(&a), frame(&b).get(..9).unwrap_or_default().to_vec()].concat();
    let cases: [(&str, &[u8], Vec<u8>); 10] = [
        ("whole", &[], two.clone()),
        ("bytes", &[1], two.clone()),
        ("odd", &[3, 7, 2], two),
        ("empty-frame", &[2, 5], with_empty),
        ("partial", &[4], partial),
        ("max-len", &[200], [vec![0xff, 0xff], vec![7; 300]].concat()),
        ("lone-byte", &[], vec![0]),
        ("only-empty", &[1, 1], vec![0; 8]),
        (
            "split-length",
            &[1, 2, 250],
            [frame(&b), frame(&a), frame(&b)].concat(),
        ),
        (
            "many",
            &[1, 2, 3],
            (0u8..20)
                .flat_map(|i| frame(&vec![i; usize::from(i)]))
                .collect(),
        ),
    ];
    cases
        .into_iter()
        .map(|(name, sizes, stream)| {
            let n = u8::try_from(sizes.len()).unwrap_or(0);
            let data = [&[n][..], sizes, &stream].concat();
            ("dns_frames", format!("seed-{name}"), data)
        })
        .collect()
}

/// One packet, built by etherparse.
fn build(b: PacketBuilderStep<UdpHeader>, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = b.write(&mut out, payload);
    out
}

fn udp4(src: [u8; 4], dst: [u8; 4], dport: u16, payload: &[u8]) -> Vec<u8> {
    build(PacketBuilder::ipv4(src, dst, 64).udp(40000, dport), payload)
}

fn udp6(dport: u16, payload: &[u8]) -> Vec<u8> {
    build(
        PacketBuilder::ipv6(APP6, DST6, 64).udp(40000, dport),
        payload,
    )
}

/// A TCP segment from the application; `flags`: S(YN), A(CK), F(IN), R(ST).
fn tcp4(dst: [u8; 4], seq: u32, ack: u32, flags: &str, payload: &[u8]) -> Vec<u8> {
    let mut b = PacketBuilder::ipv4(APP4, dst, 64).tcp(40000, 80, seq, 65535);
    for flag in flags.chars() {
        b = match flag {
            'S' => b.syn(),
            'A' => b.ack(ack),
            'F' => b.fin(),
            'R' => b.rst(),
            _ => b,
        };
    }
    let mut out = Vec::new();
    let _ = b.write(&mut out, payload);
    out
}

fn tcp6_syn() -> Vec<u8> {
    let b = PacketBuilder::ipv6(APP6, DST6, 64)
        .tcp(40000, 443, 1, 65535)
        .syn();
    let mut out = Vec::new();
    let _ = b.write(&mut out, &[]);
    out
}

fn icmp4_echo() -> Vec<u8> {
    let b = PacketBuilder::ipv4(APP4, DST4, 64).icmpv4_echo_request(1, 1);
    let mut out = Vec::new();
    let _ = b.write(&mut out, b"ping");
    out
}

fn ingress() -> Vec<Seed> {
    let q = query(1, "example.com.", RecordType::A, true);
    let q6 = query(2, "example.com.", RecordType::AAAA, false);
    let mut no_checksum = udp4(APP4, DST4, 9999, b"hello");
    if let Some(c) = no_checksum.get_mut(26..28) {
        c.copy_from_slice(&[0, 0]);
    }
    let mut fragment = udp4(APP4, DST4, 9999, b"first part");
    if let Some(f) = fragment.get_mut(6) {
        *f |= 0x20; // more fragments
    }
    fix_checksums(&mut fragment);
    let mapped: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 19, 2, 2];
    let cases: Vec<(&str, u8, Vec<u8>)> = vec![
        ("tcp-syn", 0, tcp4(DST4, 1, 0, "S", &[])),
        (
            "tcp-data",
            0,
            tcp4(DST4, 2, 9, "A", b"GET / HTTP/1.0\r\n\r\n"),
        ),
        ("tcp-rst", 1, tcp4(DST4, 2, 9, "RA", &[])),
        ("tcp6-syn", 0, tcp6_syn()),
        ("dns", 0, udp4(APP4, DST4, 53, &q)),
        ("dns6", 2, udp6(53, &q6)),
        ("udp", 4, udp4(APP4, DST4, 443, &[0x5a; 1400])),
        ("udp6", 6, udp6(443, b"quic")),
        ("udp-no-checksum", 0, no_checksum),
        ("broadcast", 1, udp4(APP4, [255; 4], 67, b"dhcp")),
        ("multicast", 1, udp4(APP4, [224, 0, 0, 251], 5353, b"mdns")),
        ("link-local", 1, udp4(APP4, [169, 254, 1, 1], 9999, b"x")),
        ("from-broadcast", 1, udp4([255; 4], DST4, 9999, b"x")),
        (
            "mapped",
            1,
            build(PacketBuilder::ipv6(mapped, mapped, 64).udp(1, 53), &q),
        ),
        ("icmp", 0, icmp4_echo()),
        ("fragment", 0, fragment),
        ("garbage", 1, vec![0x45, 0, 0]),
    ];
    cases
        .into_iter()
        .map(|(name, flags, packet)| {
            let data = [&[flags][..], &packet].concat();
            ("packet_ingress", format!("seed-{name}"), data)
        })
        .collect()
}

/// `flags | len | packet | ...`.
fn sequence(flags: u8, packets: &[Vec<u8>]) -> Vec<u8> {
    let mut data = vec![flags];
    for p in packets {
        data.extend(frame(p));
    }
    data
}

fn stack() -> Vec<Seed> {
    let q = query(1, "example.com.", RecordType::A, true);
    let mx = query(2, "example.com.", RecordType::MX, false);
    let connection = vec![
        tcp4(DST4, 1, 0, "S", &[]),
        tcp4(DST4, 2, 1, "A", &[]),
        tcp4(DST4, 2, 1, "A", b"GET / HTTP/1.0\r\n\r\n"),
        tcp4(DST4, 20, 1, "FA", &[]),
    ];
    let linger = 8 << 3;
    let cases: Vec<(&str, u8, Vec<Vec<u8>>)> = vec![
        ("connection", linger, connection),
        ("unknown-ack", 0, vec![tcp4(DST4, 5, 5, "A", b"x")]),
        ("rst", 0, vec![tcp4(DST4, 5, 5, "R", &[])]),
        ("syn6", linger, vec![tcp6_syn()]),
        ("dns-udp", linger, vec![udp4(APP4, DST4, 53, &q)]),
        ("dns-tcp", linger | 2, vec![udp4(APP4, DST4, 53, &q)]),
        (
            "dns-fake",
            linger | 4,
            vec![udp4(APP4, DST4, 53, &q), tcp4(FAKE4, 1, 0, "S", &[])],
        ),
        (
            "dns-fake-other",
            linger | 4,
            vec![udp4(APP4, DST4, 53, &mx)],
        ),
        (
            "dns-fake-server",
            linger | 6,
            vec![udp4(APP4, DST4, 53, &q), udp6(53, &mx)],
        ),
        (
            "fake-unknown",
            4,
            vec![tcp4([198, 18, 200, 9], 1, 0, "S", &[])],
        ),
        (
            "udp",
            linger,
            vec![
                udp4(APP4, DST4, 9999, b"one"),
                udp4(APP4, DST4, 9999, b"two"),
            ],
        ),
        (
            "mixed",
            1,
            vec![vec![0x45], icmp4_echo(), udp4(APP4, [255; 4], 67, b"dhcp")],
        ),
    ];
    let mut seeds: Vec<Seed> = cases
        .into_iter()
        .map(|(name, flags, packets)| {
            (
                "packet_stack",
                format!("seed-{name}"),
                sequence(flags, &packets),
            )
        })
        .collect();
    let syns: Vec<Vec<u8>> = (0..10u8)
        .map(|i| tcp4([198, 19, 2, i + 1], 1, 0, "S", &[]))
        .collect();
    seeds.push((
        "packet_stack",
        "seed-over-limit".into(),
        sequence(linger, &syns),
    ));
    seeds
}
