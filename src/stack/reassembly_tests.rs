#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use super::*;
use etherparse::{IpFragOffset, Ipv6FragmentHeader, PacketBuilder, SlicedPacket, TransportSlice};

const SRC4: [u8; 4] = [10, 99, 0, 1];
const DST4: [u8; 4] = [198, 19, 2, 2];
const SRC6: [u8; 16] = [0xfd, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const DST6: [u8; 16] = [0xfd, 0x19, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 13 % 251) as u8).collect()
}

/// A whole UDP datagram (v4 or v6) as one IP packet.
fn udp_packet(v6: bool, data: &[u8]) -> Vec<u8> {
    let b = if v6 {
        PacketBuilder::ipv6(SRC6, DST6, 64)
    } else {
        PacketBuilder::ipv4(SRC4, DST4, 64)
    };
    let b = b.udp(40000, 9007);
    let mut out = Vec::new();
    b.write(&mut out, data).unwrap();
    out
}

/// Cuts the IP payload of `whole` (a packet from [`udp_packet`]) into fragments
/// of at most `chunk` data bytes (a multiple of 8), with identification `id`.
fn fragments(whole: &[u8], chunk: usize, id: u32) -> Vec<Vec<u8>> {
    let v6 = whole[0] >> 4 == 6;
    let header = if v6 { 40 } else { 20 };
    let body = &whole[header..];
    (0..body.len())
        .step_by(chunk)
        .map(|start| {
            let end = (start + chunk).min(body.len());
            let offset = (start / 8) as u16;
            fragment(v6, id, offset, end < body.len(), &body[start..end])
        })
        .collect()
}

/// One UDP fragment from [`SRC4`]/[`SRC6`] carrying `data` at `offset` (in 8-byte
/// units).
fn fragment(v6: bool, id: u32, offset: u16, more: bool, data: &[u8]) -> Vec<u8> {
    let offset = IpFragOffset::try_new(offset).unwrap();
    let mut p = Vec::new();
    if v6 {
        let h = Ipv6Header {
            traffic_class: 0,
            flow_label: Ipv6FlowLabel::ZERO,
            payload_length: (Ipv6FragmentHeader::LEN + data.len()) as u16,
            next_header: IpNumber::IPV6_FRAGMENTATION_HEADER,
            hop_limit: 64,
            source: SRC6,
            destination: DST6,
        };
        p.extend_from_slice(&h.to_bytes());
        p.extend_from_slice(&Ipv6FragmentHeader::new(IpNumber::UDP, offset, more, id).to_bytes());
    } else {
        let mut h = Ipv4Header::new(data.len() as u16, 64, IpNumber::UDP, SRC4, DST4).unwrap();
        h.dont_fragment = false;
        h.identification = id as u16;
        h.more_fragments = more;
        h.fragment_offset = offset;
        h.header_checksum = h.calc_header_checksum();
        p.extend_from_slice(&h.to_bytes());
    }
    p.extend_from_slice(data);
    p
}

/// The UDP payload of a whole packet, checking its checksum as the stack would.
fn udp_payload(packet: &[u8]) -> Vec<u8> {
    assert!(
        matches!(
            crate::stack::classify::classify(packet),
            crate::stack::classify::Class::Udp { .. }
        ),
        "the rebuilt packet classifies as UDP with a good checksum"
    );
    let sliced = SlicedPacket::from_ip(packet).unwrap();
    let Some(TransportSlice::Udp(udp)) = sliced.transport else {
        panic!("not UDP");
    };
    udp.payload().to_vec()
}

/// The outcome of one fragment: the whole datagram, nothing yet, or why refused.
fn outcome(added: Added) -> Result<Option<Vec<u8>>, Discard> {
    match added.reason {
        Some(reason) => Err(reason),
        None => Ok(added.whole),
    }
}

fn feed(
    r: &mut Reassembly,
    packets: &[Vec<u8>],
    now: Instant,
) -> Vec<Result<Option<Vec<u8>>, Discard>> {
    packets.iter().map(|p| outcome(r.add(p, now))).collect()
}

#[test]
fn fragments_in_any_order_make_the_datagram_whole() {
    let now = Instant::now();
    for v6 in [false, true] {
        let data = payload(4000);
        let frags = fragments(&udp_packet(v6, &data), 1480, 7);
        assert_eq!(frags.len(), 3);
        for order in [[0, 1, 2], [2, 1, 0], [1, 2, 0], [2, 0, 1]] {
            let mut r = Reassembly::default();
            let ordered: Vec<Vec<u8>> = order.iter().map(|&i| frags[i].clone()).collect();
            let results = feed(&mut r, &ordered, now);
            assert_eq!(
                results[..2],
                [Ok(None), Ok(None)],
                "v6 {v6}, order {order:?}"
            );
            let whole = results[2].clone().unwrap().expect("whole after the last");
            assert_eq!(udp_payload(&whole), data, "v6 {v6}, order {order:?}");
            assert_eq!(r.pending(), 0);
            assert_eq!(r.bytes, 0, "nothing held once whole");
        }
    }
}

#[test]
fn interleaved_datagrams_are_kept_apart() {
    let now = Instant::now();
    let (a, b) = (
        payload(3000),
        payload(2500).into_iter().rev().collect::<Vec<_>>(),
    );
    let fa = fragments(&udp_packet(false, &a), 1480, 1);
    let fb = fragments(&udp_packet(false, &b), 1480, 2);
    let mut r = Reassembly::default();
    let mut done = Vec::new();
    for p in [&fa[0], &fb[1], &fa[2], &fb[0], &fa[1]] {
        if let Ok(Some(whole)) = outcome(r.add(p, now)) {
            done.push(udp_payload(&whole));
        }
    }
    assert_eq!(done, vec![b, a]);
}

#[test]
fn overlaps_discard_the_datagram_and_duplicates_are_ignored() {
    let now = Instant::now();
    let data = payload(4000);
    let frags = fragments(&udp_packet(false, &data), 1480, 9);
    let mut r = Reassembly::default();
    assert_eq!(outcome(r.add(&frags[0], now)), Ok(None));
    let dup = r.add(&frags[0], now);
    assert_eq!(
        (dup.reason, dup.dropped),
        (Some(Discard::Duplicate), 1),
        "an exact duplicate"
    );
    assert_eq!(r.held(), 1, "the datagram goes on");
    // The second fragment again, but shifted by 8 bytes into the first.
    let shifted = fragments(&udp_packet(false, &data), 8, 9)
        .into_iter()
        .skip(1480 / 8 - 1)
        .take(2)
        .collect::<Vec<_>>();
    let mut changed = shifted[0].clone();
    let last = changed.len() - 1;
    changed[last] ^= 0xff;
    let overlap = r.add(&changed, now);
    assert_eq!(
        (overlap.reason, overlap.dropped),
        (Some(Discard::Overlap), 2),
        "it and the one held"
    );
    assert_eq!(r.pending(), 0, "the datagram went with it");
    // Starting over: the rest alone never completes.
    assert_eq!(feed(&mut r, &frags[1..], now), vec![Ok(None), Ok(None)]);
}

#[test]
fn datagrams_that_never_complete_expire() {
    let t0 = Instant::now();
    let frags = fragments(&udp_packet(true, &payload(4000)), 1448, 3);
    let mut r = Reassembly::default();
    assert_eq!(r.next_expiry(), None);
    assert_eq!(r.add(&frags[0], t0), Added::default());
    assert_eq!(r.add(&frags[2], t0), Added::default());
    // A datagram whose first fragment never came.
    let other = fragments(&udp_packet(false, &payload(2000)), 1480, 4);
    let t1 = t0 + Duration::from_secs(1);
    assert_eq!(r.add(&other[1], t1), Added::default());
    assert_eq!(r.next_expiry(), Some(t0 + TIMEOUT));
    assert!(r.expire(t0 + TIMEOUT - Duration::from_millis(1)).is_empty());
    // The first: its two fragments, and the start of its first one to quote.
    let expired = r.expire(t0 + TIMEOUT);
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].fragments, 2);
    assert_eq!(expired[0].first.as_deref(), Some(&frags[0][..1280 - 48]));
    assert_eq!(r.pending(), 1);
    assert_eq!(r.next_expiry(), Some(t1 + TIMEOUT));
    // The other: no first fragment, so nothing to quote (no ICMP error is sent).
    let expired = r.expire(t1 + TIMEOUT);
    assert_eq!(
        expired,
        [Expired {
            fragments: 1,
            first: None
        }]
    );
    assert_eq!((r.pending(), held_bytes(&r)), (0, 0));
    assert_eq!(r.next_expiry(), None);
    // The late rest of the expired datagram starts a new one that never completes.
    let later = t1 + TIMEOUT;
    assert_eq!(outcome(r.add(&frags[1], later)), Ok(None));
    assert_eq!(outcome(r.add(&frags[2], later)), Ok(None));
}

#[test]
fn a_first_fragment_is_quoted_up_to_the_ipv6_minimum_mtu() {
    let t0 = Instant::now();
    let frags = fragments(&udp_packet(false, &payload(9000)), 4000, 5);
    let mut r = Reassembly::default();
    r.add(&frags[0], t0);
    let expired = r.expire(t0 + TIMEOUT);
    assert_eq!(expired[0].first.as_deref(), Some(&frags[0][..1280 - 48]));
}

#[test]
fn limits_bound_what_is_held() {
    let now = Instant::now();
    let mut r = Reassembly::default();
    for id in 0..MAX_PARTIALS as u32 {
        let frags = fragments(&udp_packet(false, &payload(3000)), 1480, id);
        assert_eq!(outcome(r.add(&frags[0], now)), Ok(None));
    }
    let frags = fragments(&udp_packet(false, &payload(3000)), 1480, 999);
    assert_eq!(outcome(r.add(&frags[0], now)), Err(Discard::Full));
    assert_eq!(r.pending(), MAX_PARTIALS);
    assert!(r.bytes <= MAX_BYTES);
}

#[test]
fn malformed_and_oversized_fragments_are_refused() {
    let now = Instant::now();
    let mut r = Reassembly::default();
    let frags = fragments(&udp_packet(false, &payload(4000)), 1480, 5);
    // A middle fragment whose data is not a multiple of 8.
    let mut odd = frags[0].clone();
    odd.pop();
    let len = (odd.len()) as u16;
    odd[2..4].copy_from_slice(&len.to_be_bytes());
    let mut h = Ipv4Header::from_slice(&odd).unwrap().0;
    h.header_checksum = h.calc_header_checksum();
    odd[..20].copy_from_slice(&h.to_bytes());
    assert_eq!(outcome(r.add(&odd, now)), Err(Discard::Malformed));
    assert_eq!(outcome(r.add(&[0x45, 0, 0], now)), Err(Discard::Malformed));
    // A fragment reaching past 65,535 bytes.
    let mut far = frags[1].clone();
    let mut h = Ipv4Header::from_slice(&far).unwrap().0;
    h.fragment_offset = IpFragOffset::try_new(8190).unwrap();
    h.header_checksum = h.calc_header_checksum();
    far[..20].copy_from_slice(&h.to_bytes());
    assert_eq!(outcome(r.add(&far, now)), Err(Discard::Oversized));
    // Two last fragments that disagree on the end.
    assert_eq!(outcome(r.add(&frags[2], now)), Ok(None));
    let mut short = frags[2].clone();
    short.truncate(short.len() - 8);
    let len = short.len() as u16;
    short[2..4].copy_from_slice(&len.to_be_bytes());
    let mut h = Ipv4Header::from_slice(&short).unwrap().0;
    h.header_checksum = h.calc_header_checksum();
    short[..20].copy_from_slice(&h.to_bytes());
    assert_eq!(outcome(r.add(&short, now)), Err(Discard::Oversized));
    assert_eq!(r.pending(), 0);
}

#[test]
fn the_largest_datagram_reassembles() {
    let now = Instant::now();
    let data = payload(65_507);
    let frags = fragments(&udp_packet(false, &data), 1480, 11);
    let mut r = Reassembly::default();
    let mut whole = None;
    for p in &frags {
        if let Ok(Some(w)) = outcome(r.add(p, now)) {
            whole = Some(w);
        }
    }
    assert_eq!(udp_payload(&whole.unwrap()), data);
}

/// What `bytes` must equal: the data held by every datagram in progress.
fn held_bytes(r: &Reassembly) -> usize {
    r.partials.values().map(|p| p.data.len()).sum()
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any datagram, cut at any 8-byte multiple, its fragments in any order and
        /// some sent twice, comes out whole exactly once and equal to what was sent.
        #[test]
        fn any_order_with_duplicates_reassembles(
            v6 in any::<bool>(),
            len in 1usize..9000,
            chunk8 in 1usize..200,
            seed in any::<u64>(),
            dups in proptest::collection::vec(any::<prop::sample::Index>(), 0..4),
        ) {
            let data = payload(len);
            let mut frags = fragments(&udp_packet(v6, &data), chunk8 * 8, 77);
            prop_assume!(frags.len() > 1);
            // A deterministic shuffle from the seed.
            let mut state = seed | 1;
            for i in (1..frags.len()).rev() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                frags.swap(i, (state % (i as u64 + 1)) as usize);
            }
            // Each duplicate right after its original, never of the last fragment
            // (a copy after the datagram completed would open a new one, which
            // waits for its timeout as any lone fragment does).
            let last = frags.len() - 1;
            let mut twice: Vec<usize> = dups.iter().map(|d| d.index(last)).collect();
            twice.sort_unstable();
            twice.dedup();
            let mut all = Vec::new();
            for (i, f) in frags.iter().enumerate() {
                all.push(f.clone());
                if twice.binary_search(&i).is_ok() {
                    all.push(f.clone());
                }
            }
            let mut r = Reassembly::default();
            let now = Instant::now();
            let mut wholes = Vec::new();
            for p in &all {
                let added = r.add(p, now);
                if let Some(w) = added.whole {
                    wholes.push(w);
                }
                prop_assert_eq!(r.bytes, held_bytes(&r));
            }
            prop_assert_eq!(wholes.len(), 1);
            prop_assert_eq!(udp_payload(&wholes[0]), data);
            prop_assert_eq!(r.pending(), 0);
            prop_assert_eq!(r.bytes, 0);
        }

        /// Arbitrary fragments (random ids, offsets, flags, lengths) never panic,
        /// keep the byte count exact and within bounds, and every packet they
        /// complete is a well-formed IP packet.
        #[test]
        fn arbitrary_fragments_stay_bounded(
            frags in proptest::collection::vec(
                (any::<bool>(), 0u32..4, 0u16..8192, any::<bool>(), 0usize..3000),
                1..60,
            ),
        ) {
            let mut r = Reassembly::default();
            let t0 = Instant::now();
            for (i, (v6, id, offset, more, len)) in frags.into_iter().enumerate() {
                let p = fragment(v6, id, offset, more, &payload(len));
                let now = t0 + Duration::from_secs(i as u64);
                let added = r.add(&p, now);
                if let Some(whole) = added.whole {
                    // A whole IP packet (its payload is whatever was sent).
                    prop_assert!(whole.len() <= 65_535);
                    prop_assert!(etherparse::IpSlice::from_slice(&whole).is_ok());
                }
                prop_assert_eq!(r.bytes, held_bytes(&r));
                prop_assert!(r.bytes <= MAX_BYTES);
                prop_assert!(r.pending() <= MAX_PARTIALS);
            }
        }
    }
}

#[test]
fn no_error_is_kept_about_icmp_errors_or_for_groups() {
    let t0 = Instant::now();
    let expire_first = |packet: Vec<u8>| {
        let mut r = Reassembly::default();
        assert_eq!(r.add(&packet, t0), Added::default());
        r.expire(t0 + TIMEOUT).pop().unwrap().first
    };
    // An ordinary first fragment: kept to quote.
    assert!(expire_first(fragment(false, 1, 0, true, &[9; 16])).is_some());
    assert!(expire_first(fragment(true, 1, 0, true, &[9; 16])).is_some());
    // ICMP: an echo request is quoted, a destination unreachable is not.
    let icmp4 = |kind: u8| {
        let mut p = fragment(false, 2, 0, true, &[kind, 0, 0, 0, 0, 0, 0, 0]);
        p[9] = 1;
        p
    };
    assert!(expire_first(icmp4(8)).is_some());
    assert!(expire_first(icmp4(3)).is_none());
    // ICMPv6 (the Fragment header's next header): echo request 128, an error 1.
    let icmp6 = |kind: u8| {
        let mut p = fragment(true, 3, 0, true, &[kind, 0, 0, 0, 0, 0, 0, 0]);
        p[40] = 58;
        p
    };
    assert!(expire_first(icmp6(128)).is_some());
    assert!(expire_first(icmp6(1)).is_none());
    // To a multicast group, or from nobody.
    let mut group = fragment(false, 4, 0, true, &[9; 16]);
    group[16] = 224;
    assert!(expire_first(group).is_none());
    let mut nobody = fragment(true, 5, 0, true, &[9; 16]);
    nobody[8..24].fill(0);
    assert!(expire_first(nobody).is_none());
}
