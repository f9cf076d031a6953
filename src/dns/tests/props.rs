//! Properties: no input makes the decoders or builders panic; what we build from any
//! query that hickory encodes decodes back to the same question and address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::op::Message as HMessage;
use hickory_proto::rr::{RData, RecordType};
use proptest::prelude::*;

use super::query;
use crate::dns::message::*;

fn name() -> impl Strategy<Value = String> {
    prop::collection::vec("[a-zA-Z0-9][a-zA-Z0-9-]{0,20}", 1..6).prop_map(|l| l.join("."))
}

proptest! {
    /// Length-prefixed messages come out whole and in order whatever the chunking.
    #[test]
    fn frames_survive_any_split(
        messages in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 1..8),
        cuts in prop::collection::vec(1usize..200, 1..20),
    ) {
        let mut stream = Vec::new();
        for m in &messages {
            stream.extend_from_slice(&(m.len() as u16).to_be_bytes());
            stream.extend_from_slice(m);
        }
        let mut frames = crate::dns::frames::Frames::default();
        let mut got = Vec::new();
        let mut rest = &stream[..];
        let mut cuts = cuts.iter().cycle();
        while !rest.is_empty() {
            let n = (*cuts.next().unwrap()).min(rest.len());
            frames.push(&rest[..n]);
            rest = &rest[n..];
            while let Some(m) = frames.next_message() {
                got.push(m);
            }
        }
        let expected: Vec<Vec<u8>> = messages.into_iter().filter(|m| !m.is_empty()).collect();
        prop_assert_eq!(got, expected);
    }

    #[test]
    fn decoders_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let q = Message::decode_query(&bytes);
        let _ = Message::decode_head(&bytes);
        let mut out = Vec::new();
        let _ = format_error(&bytes, &mut out);
        if let Ok(q) = q {
            let _ = q.udp_limit(1500);
            let mut buf = [0u8; MAX_NAME_LEN];
            if let Some(question) = q.question() {
                let _ = map_name(&question.name, &mut buf);
            }
            out.clear();
            address_answer(&q, IpAddr::V4(Ipv4Addr::LOCALHOST), 1, &mut out);
            HMessage::from_vec(&out).unwrap();
            out.clear();
            empty_response(&q, RCODE_SERVFAIL, &mut out);
            out.clear();
            truncated(&bytes, &q, &mut out);
        }
    }

    /// Every split point and every byte flipped of a valid query: still no panic.
    #[test]
    fn mutated_queries_never_panic(n in name(), id in any::<u16>(), at in 0usize..64, byte in any::<u8>()) {
        let mut bytes = query(id, &n, RecordType::A, Some(1232));
        let at = at % bytes.len();
        let _ = Message::decode_query(&bytes[..at]);
        bytes[at] = byte;
        if let Ok(q) = Message::decode_query(&bytes) {
            let mut out = Vec::new();
            truncated(&bytes, &q, &mut out);
            address_answer(&q, IpAddr::V6(Ipv6Addr::LOCALHOST), 1, &mut out);
        }
    }

    #[test]
    fn answers_decode_to_what_was_asked(
        n in name(),
        id in any::<u16>(),
        v6 in any::<bool>(),
        edns in prop::option::of(512u16..9000),
        addr in any::<u128>(),
        ttl in 1u32..86_400,
    ) {
        let rtype = if v6 { RecordType::AAAA } else { RecordType::A };
        let bytes = query(id, &n, rtype, edns);
        let q = Message::decode_query(&bytes).unwrap();
        prop_assert_eq!(q.id(), id);
        prop_assert_eq!(q.edns().map(|e| e.udp_size), edns);
        let mut buf = [0u8; MAX_NAME_LEN];
        let question = q.question().unwrap();
        let lower = n.to_ascii_lowercase();
        prop_assert_eq!(map_name(&question.name, &mut buf), Some(lower.as_str()));
        let ip = if v6 {
            IpAddr::V6(Ipv6Addr::from(addr))
        } else {
            IpAddr::V4(Ipv4Addr::from(addr as u32))
        };
        let mut out = Vec::new();
        address_answer(&q, ip, ttl, &mut out);
        let m = HMessage::from_vec(&out).unwrap();
        prop_assert_eq!(m.id(), id);
        prop_assert_eq!(m.queries()[0].name().to_ascii(), format!("{n}."));
        prop_assert_eq!(m.queries()[0].query_type(), rtype);
        prop_assert_eq!(m.answers().len(), 1);
        prop_assert_eq!(m.answers()[0].ttl(), ttl);
        let expected = match ip {
            IpAddr::V4(a) => RData::A(a.into()),
            IpAddr::V6(a) => RData::AAAA(a.into()),
        };
        prop_assert_eq!(m.answers()[0].data(), &expected);
        prop_assert_eq!(m.extensions().is_some(), edns.is_some());
    }
}
