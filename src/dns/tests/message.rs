//! Hex vectors for what we read and what we build; every built message is decoded
//! again by hickory-proto.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::op::{Message as HMessage, MessageType, ResponseCode};
use hickory_proto::rr::{DNSClass, RData, RecordType};

use super::{hex, query};
use crate::dns::message::*;

/// `example.com A`, ID 0x1234, RD.
const QUERY_A: &str = "1234 0100 0001 0000 0000 0000 076578616d706c65 03636f6d 00 0001 0001";
/// The same, with an OPT record advertising 4096 bytes.
const QUERY_A_EDNS: &str = "1234 0100 0001 0000 0000 0001 076578616d706c65 03636f6d 00 0001 0001 00 0029 1000 00000000 0000";

#[test]
fn decodes_header_question_and_edns() {
    let bytes = hex(QUERY_A);
    let q = Message::decode_query(&bytes).unwrap();
    assert_eq!(q.id(), 0x1234);
    assert!(q.is_standard_query());
    assert_eq!(q.question_count(), 1);
    let question = q.question().unwrap();
    assert_eq!(question.name.to_ascii(), "example.com.");
    assert_eq!(question.qtype, RecordType::A);
    assert_eq!(question.qclass, DNSClass::IN);
    assert_eq!(q.edns(), None);
    assert_eq!(q.udp_limit(1452), 512);
    assert_eq!(q.udp_limit(300), 300);
    assert_eq!(q.question_wire_len(), 17);

    let bytes = hex(QUERY_A_EDNS);
    let q = Message::decode_query(&bytes).unwrap();
    assert_eq!(q.edns(), Some(Edns { udp_size: 4096 }));
    assert_eq!(q.udp_limit(1452), 1452);
    assert_eq!(q.udp_limit(65_507), 4096);
}

#[test]
fn small_edns_size_reads_as_512() {
    let bytes = query(7, "a.b.", RecordType::A, Some(100));
    let q = Message::decode_query(&bytes).unwrap();
    assert_eq!(q.udp_limit(9000), 512);
}

#[test]
fn rejects_short_responses_and_garbage() {
    assert!(matches!(
        Message::decode_query(&[0; 11]),
        Err(MessageError::Short { len: 11 })
    ));
    let mut response = hex(QUERY_A);
    response[2] |= 0x80;
    assert!(matches!(
        Message::decode_query(&response),
        Err(MessageError::NotQuery)
    ));
    // QDCOUNT 1 but the name runs past the end.
    let cut = hex("1234 0100 0001 0000 0000 0000 07657861");
    assert!(matches!(
        Message::decode_query(&cut),
        Err(MessageError::Malformed { .. })
    ));
    // A hostile QDCOUNT with no questions behind it.
    let many = hex("1234 0100 ffff 0000 0000 0000");
    assert!(Message::decode_query(&many).is_err());
}

#[test]
fn builds_an_a_answer() {
    let bytes = hex(QUERY_A);
    let q = Message::decode_query(&bytes).unwrap();
    let mut out = Vec::new();
    address_answer(&q, IpAddr::V4(Ipv4Addr::new(198, 18, 128, 1)), 60, &mut out);
    let expected = hex(
        "1234 8180 0001 0001 0000 0000 076578616d706c65 03636f6d 00 0001 0001 \
         c00c 0001 0001 0000003c 0004 c6128001",
    );
    assert_eq!(out, expected);
    let m = HMessage::from_vec(&out).unwrap();
    assert_eq!(m.message_type(), MessageType::Response);
    assert_eq!(m.id(), 0x1234);
    assert!(m.recursion_desired() && m.recursion_available());
    assert_eq!(m.answers().len(), 1);
    let rr = &m.answers()[0];
    assert_eq!(rr.name().to_ascii(), "example.com.");
    assert_eq!(rr.ttl(), 60);
    assert_eq!(rr.data(), &RData::A(Ipv4Addr::new(198, 18, 128, 1).into()));
}

#[test]
fn builds_an_aaaa_answer_with_opt() {
    let bytes = query(0xbeef, "Host.Example.", RecordType::AAAA, Some(4096));
    let q = Message::decode_query(&bytes).unwrap();
    let ip: Ipv6Addr = "fd18::8000:0:0:1".parse().unwrap();
    let mut out = Vec::new();
    address_answer(&q, IpAddr::V6(ip), 30, &mut out);
    let m = HMessage::from_vec(&out).unwrap();
    assert_eq!(m.id(), 0xbeef);
    assert_eq!(m.queries()[0].name().to_ascii(), "Host.Example.");
    assert_eq!(m.answers()[0].data(), &RData::AAAA(ip.into()));
    assert_eq!(
        m.extensions().as_ref().unwrap().max_payload(),
        OUR_UDP_PAYLOAD
    );
    // Our OPT record is the last 11 bytes.
    assert_eq!(out[out.len() - 11..], hex("00 0029 04d0 00000000 0000")[..]);
}

#[test]
fn builds_empty_and_servfail() {
    let bytes = hex(QUERY_A);
    let q = Message::decode_query(&bytes).unwrap();
    let mut out = Vec::new();
    empty_response(&q, RCODE_NOERROR, &mut out);
    assert_eq!(
        out,
        hex("1234 8180 0001 0000 0000 0000 076578616d706c65 03636f6d 00 0001 0001")
    );
    out.clear();
    empty_response(&q, RCODE_SERVFAIL, &mut out);
    let m = HMessage::from_vec(&out).unwrap();
    assert_eq!(m.response_code(), ResponseCode::ServFail);
    assert!(m.answers().is_empty());
}

#[test]
fn builds_formerr_from_a_bare_header() {
    let mut out = Vec::new();
    assert!(format_error(&hex("abcd 0100 0001 0000 0000 0000 ff"), &mut out).is_some());
    assert_eq!(out, hex("abcd 8181 0000 0000 0000 0000"));
    let m = HMessage::from_vec(&out).unwrap();
    assert_eq!(m.response_code(), ResponseCode::FormErr);
    assert!(format_error(&[1, 2, 3], &mut Vec::new()).is_none());
}

#[test]
fn truncates_to_header_and_question() {
    let query_bytes = query(0x0102, "big.example.", RecordType::TXT, None);
    let q = Message::decode_query(&query_bytes).unwrap();
    // A response with 20 TXT records of 100 bytes each, built by hickory.
    let mut m = HMessage::from_vec(&query_bytes).unwrap();
    m.set_message_type(MessageType::Response);
    m.set_recursion_available(true);
    let name = m.queries()[0].name().clone();
    for _ in 0..20 {
        m.add_answer(hickory_proto::rr::Record::from_rdata(
            name.clone(),
            300,
            RData::TXT(hickory_proto::rr::rdata::TXT::new(vec!["x".repeat(100)])),
        ));
    }
    let big = hickory_proto::serialize::binary::BinEncodable::to_bytes(&m).unwrap();
    assert!(big.len() > 2000);
    let mut out = Vec::new();
    truncated(&big, &q, &mut out);
    let t = HMessage::from_vec(&out).unwrap();
    assert!(t.truncated());
    assert_eq!(t.id(), 0x0102);
    assert_eq!(t.message_type(), MessageType::Response);
    assert!(t.recursion_available());
    assert_eq!(t.queries(), m.queries());
    assert!(t.answers().is_empty() && t.additionals().is_empty());
    assert_eq!(out.len(), 12 + q.question_wire_len());

    // A response that does not decode: the query's header and question, TC set.
    out.clear();
    truncated(&[0xff; 40], &q, &mut out);
    let t = HMessage::from_vec(&out).unwrap();
    assert!(t.truncated());
    assert_eq!(t.id(), 0x0102);
}

#[test]
fn map_name_lowercases_and_rejects_what_socks_cannot_carry() {
    let mut buf = [0u8; MAX_NAME_LEN];
    let name = hickory_proto::rr::Name::from_ascii("WWW.Example.COM.").unwrap();
    assert_eq!(map_name(&name, &mut buf), Some("www.example.com"));
    let single = hickory_proto::rr::Name::from_ascii("intranet").unwrap();
    assert_eq!(map_name(&single, &mut buf), Some("intranet"));
    assert_eq!(map_name(&hickory_proto::rr::Name::root(), &mut buf), None);
    let odd = hickory_proto::rr::Name::from_labels(vec![b"a b".to_vec(), b"com".to_vec()]).unwrap();
    assert_eq!(map_name(&odd, &mut buf), None);
    let dotted =
        hickory_proto::rr::Name::from_labels(vec![b"a.b".to_vec(), b"com".to_vec()]).unwrap();
    assert_eq!(map_name(&dotted, &mut buf), None);
    // The longest name a wire message can carry: 253 characters of text.
    let label = "a".repeat(63);
    let long = format!("{label}.{label}.{label}.{}", "b".repeat(61));
    assert_eq!(long.len(), 253);
    let long_name = hickory_proto::rr::Name::from_ascii(&long).unwrap();
    assert_eq!(map_name(&long_name, &mut buf), Some(long.as_str()));
}

#[test]
fn question_case_is_echoed() {
    let bytes = query(9, "MiXeD.ExAmPlE.", RecordType::A, None);
    let q = Message::decode_query(&bytes).unwrap();
    let mut out = Vec::new();
    address_answer(&q, IpAddr::V4(Ipv4Addr::new(198, 18, 128, 9)), 60, &mut out);
    assert_eq!(
        out[12..12 + q.question_wire_len()],
        bytes[12..12 + q.question_wire_len()]
    );
}

#[test]
fn ids_read_and_written() {
    let mut m = hex(QUERY_A);
    assert_eq!(id_of(&m), Some(0x1234));
    assert!(set_id(&mut m, 0xabcd));
    assert_eq!(&m[..2], &[0xab, 0xcd]);
    assert_eq!(id_of(&[1]), None);
    assert!(!set_id(&mut [1], 2));
}

#[test]
fn a_compressed_question_name_is_refused() {
    // Two questions; the second name is a pointer to the first (0xc00c): legal DNS,
    // but answers copy the question bytes, where the pointer would land in our header.
    let bytes =
        hex("1234 0100 0002 0000 0000 0000 076578616d706c65 03636f6d 00 0001 0001 c00c 0001 0001");
    assert!(matches!(
        Message::decode_query(&bytes),
        Err(MessageError::CompressedQuestion)
    ));
    // A pointer into the header itself (the fuzzer's first finding).
    let bytes = hex("1234 0100 0001 0000 0000 0000 c002 0001 0001");
    assert!(Message::decode_query(&bytes).is_err());
    // Plain names still decode.
    assert!(Message::decode_query(&hex(QUERY_A)).is_ok());
}

#[test]
fn zone_transfers_are_told_apart() {
    for rtype in [RecordType::AXFR, RecordType::IXFR] {
        assert!(
            is_zone_transfer(&query(7, "zone.test.", rtype, None)),
            "{rtype}"
        );
    }
    for rtype in [RecordType::A, RecordType::SOA, RecordType::ANY] {
        assert!(
            !is_zone_transfer(&query(7, "zone.test.", rtype, None)),
            "{rtype}"
        );
    }
    assert!(!is_zone_transfer(&hex("1234 0100 0001")), "truncated");
    assert!(!is_zone_transfer(&[]));
}

#[test]
fn frames_give_back_what_is_not_a_message_yet() {
    let mut frames = crate::dns::frames::Frames::default();
    frames.push(&[0, 2, b'a', b'b', 0, 3, b'c']);
    assert_eq!(frames.next_message().as_deref(), Some(&b"ab"[..]));
    assert_eq!(frames.take_rest(), [0, 3, b'c']);
    assert_eq!(frames.take_rest(), Vec::<u8>::new());
    frames.push(&[0, 1, b'd']);
    assert_eq!(frames.next_message().as_deref(), Some(&b"d"[..]));
}
