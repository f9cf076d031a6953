#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use super::*;
use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
use proptest::prelude::*;

const SRC: [u8; 16] = [0xfd, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x77];
const DST: [u8; 16] = [0xfd, 0x19, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

/// A TCP SYN from SRC to DST (no extension headers).
fn tcp_syn() -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv6(SRC, DST, 64)
        .tcp(40000, 7000, 1000, 65535)
        .syn()
        .write(&mut out, b"")
        .unwrap();
    out
}

/// `packet` with the extension headers `exts` (each a header whose first octet is
/// rewritten to chain to the next) inserted after the fixed header.
fn with_exts(packet: &[u8], exts: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let upper = packet[6];
    let mut out = packet[..40].to_vec();
    let mut chain = Vec::new();
    for (i, (_, header)) in exts.iter().enumerate() {
        let mut header = header.clone();
        header[0] = exts.get(i + 1).map_or(upper, |(kind, _)| *kind);
        chain.extend_from_slice(&header);
    }
    out[6] = exts.first().map_or(upper, |(kind, _)| *kind);
    out.extend_from_slice(&chain);
    out.extend_from_slice(&packet[40..]);
    let payload = (out.len() - 40) as u16;
    out[4..6].copy_from_slice(&payload.to_be_bytes());
    out
}

/// An options header (Hop-by-Hop or Destination Options) holding `options`, padded
/// to a multiple of 8 octets with PadN / Pad1.
fn options_header(options: &[u8]) -> Vec<u8> {
    let mut h = vec![0, 0];
    h.extend_from_slice(options);
    let pad = (8 - h.len() % 8) % 8;
    match pad {
        0 => {}
        1 => h.push(0),
        n => {
            h.push(1);
            h.push((n - 2) as u8);
            h.resize(h.len() + n - 2, 0);
        }
    }
    h[1] = (h.len() / 8 - 1) as u8;
    h
}

fn pad_n() -> Vec<u8> {
    options_header(&[1, 4, 0, 0, 0, 0])
}

fn routing(segments_left: u8) -> Vec<u8> {
    // Type 0 with one address would be 24 octets; an empty one is enough here.
    vec![0, 0, 0, segments_left, 0, 0, 0, 0]
}

#[test]
fn a_plain_segment_goes_on() {
    assert_eq!(
        walk(&tcp_syn()),
        Chain::Upper {
            protocol: 6,
            offset: 40
        }
    );
    assert!(!has_extensions(&tcp_syn()));
}

#[test]
fn known_headers_are_skipped() {
    let syn = tcp_syn();
    for exts in [
        vec![(HOP_BY_HOP, pad_n())],
        vec![(DESTINATION_OPTIONS, pad_n())],
        vec![(ROUTING, routing(0))],
        vec![(FRAGMENT, vec![0, 0, 0, 0, 0, 0, 0x12, 0x34])],
        vec![(AUTHENTICATION, {
            // SPI, sequence number and a 96-bit ICV: 24 octets, length field 4.
            let mut ah = vec![0; 24];
            ah[1] = 4;
            ah
        })],
        vec![
            (HOP_BY_HOP, options_header(&[0, 0, 0])),
            (DESTINATION_OPTIONS, pad_n()),
            (ROUTING, routing(0)),
            (DESTINATION_OPTIONS, options_header(&[0x1e, 2, 9, 9])),
        ],
    ] {
        let packet = with_exts(&syn, &exts);
        let len: usize = exts.iter().map(|(_, h)| h.len()).sum();
        assert_eq!(
            walk(&packet),
            Chain::Upper {
                protocol: 6,
                offset: 40 + len
            },
            "{exts:?}"
        );
        assert!(has_extensions(&packet));
    }
}

#[test]
fn an_unknown_option_does_what_its_type_says() {
    let syn = tcp_syn();
    let at = |kind: u8| {
        with_exts(
            &syn,
            &[(DESTINATION_OPTIONS, options_header(&[1, 0, kind, 2, 7, 7]))],
        )
    };
    // Skip.
    assert!(matches!(walk(&at(0x3e)), Chain::Upper { .. }));
    // Discard silently.
    assert_eq!(walk(&at(0x7e)), Chain::Discard(None));
    // Discard and tell the source: the pointer is the option's type octet (after
    // the fixed header, the two octets of the header and a two-octet PadN).
    let error = ParamProblem {
        code: 2,
        pointer: 40 + 2 + 2,
    };
    assert_eq!(walk(&at(0xbe)), Chain::Discard(Some(error)));
    assert_eq!(walk(&at(0xfe)), Chain::Discard(Some(error)));
    // The same in Hop-by-Hop options.
    let hbh = with_exts(
        &syn,
        &[(HOP_BY_HOP, options_header(&[0xc2, 4, 0, 1, 0, 0]))],
    );
    assert_eq!(
        walk(&hbh),
        Chain::Discard(Some(ParamProblem {
            code: 2,
            pointer: 42
        }))
    );
}

#[test]
fn no_error_goes_to_a_multicast_group_or_an_unspecified_source() {
    let header = [(DESTINATION_OPTIONS, options_header(&[0xbe, 0]))];
    let mut to_group = with_exts(&tcp_syn(), &header);
    to_group[24] = 0xff;
    assert_eq!(walk(&to_group), Chain::Discard(None));
    let mut from_nobody = with_exts(&tcp_syn(), &header);
    from_nobody[8..24].fill(0);
    assert_eq!(walk(&from_nobody), Chain::Discard(None));
}

#[test]
fn no_error_about_an_icmpv6_error() {
    let mut unreachable = Vec::new();
    PacketBuilder::ipv6(SRC, DST, 64)
        .icmpv6(etherparse::Icmpv6Type::DestinationUnreachable(
            etherparse::icmpv6::DestUnreachableCode::Port,
        ))
        .write(&mut unreachable, &[0; 48])
        .unwrap();
    let mut echo = Vec::new();
    PacketBuilder::ipv6(SRC, DST, 64)
        .icmpv6_echo_request(1, 1)
        .write(&mut echo, b"ping")
        .unwrap();
    let header = [(DESTINATION_OPTIONS, options_header(&[0xbe, 0]))];
    assert_eq!(
        walk(&with_exts(&unreachable, &header)),
        Chain::Discard(None)
    );
    assert!(matches!(
        walk(&with_exts(&echo, &header)),
        Chain::Discard(Some(_))
    ));
}

#[test]
fn a_routing_header_with_segments_left_is_refused() {
    let packet = with_exts(
        &tcp_syn(),
        &[(DESTINATION_OPTIONS, pad_n()), (ROUTING, routing(1))],
    );
    // The pointer is the routing type octet.
    assert_eq!(
        walk(&packet),
        Chain::Discard(Some(ParamProblem {
            code: 0,
            pointer: 48 + 2
        }))
    );
}

#[test]
fn hop_by_hop_only_first() {
    let packet = with_exts(
        &tcp_syn(),
        &[(DESTINATION_OPTIONS, pad_n()), (HOP_BY_HOP, pad_n())],
    );
    // The pointer is the Destination Options header's Next Header octet.
    assert_eq!(
        walk(&packet),
        Chain::Discard(Some(ParamProblem {
            code: 1,
            pointer: 40
        }))
    );
}

#[test]
fn a_fragment_stops_the_walk_unless_atomic() {
    let syn = tcp_syn();
    // Offset 0 with more fragments; offset 8 without.
    for field in [[0u8, 1], [0, 8]] {
        let mut packet = with_exts(
            &syn,
            &[(FRAGMENT, vec![0, 0, field[0], field[1], 0, 0, 0x12, 0x34])],
        );
        // The next header claims options whose octets are only in the first
        // fragment: they must not be read.
        packet[40] = DESTINATION_OPTIONS;
        assert_eq!(
            walk(&packet),
            Chain::Upper {
                protocol: FRAGMENT,
                offset: 40
            }
        );
    }
    // Atomic, reserved bits set: skipped.
    let packet = with_exts(&syn, &[(FRAGMENT, vec![0, 0, 0, 0b110, 0, 0, 0, 1])]);
    assert_eq!(
        walk(&packet),
        Chain::Upper {
            protocol: 6,
            offset: 48
        }
    );
}

#[test]
fn bad_lengths() {
    let syn = tcp_syn();
    // The chain runs past the packet's end.
    let mut long = with_exts(&syn, &[(DESTINATION_OPTIONS, pad_n())]);
    long[41] = 9;
    assert_eq!(walk(&long), Chain::Malformed);
    // The payload length claims more than there is.
    let mut short = syn.clone();
    short[5] += 1;
    assert_eq!(walk(&short), Chain::Malformed);
    assert!(!strip(&short, 6, 40, &mut Vec::new()));
    // An option longer than its header: the pointer is its length octet.
    let overrun = with_exts(&syn, &[(DESTINATION_OPTIONS, vec![0, 0, 1, 9, 0, 0, 0, 0])]);
    assert_eq!(
        walk(&overrun),
        Chain::Discard(Some(ParamProblem {
            code: 0,
            pointer: 43
        }))
    );
    // Too short for a fixed header.
    assert_eq!(walk(&syn[..30]), Chain::Malformed);
}

#[test]
fn stripped_is_the_same_segment_behind_a_bare_header() {
    let mut out = Vec::new();
    PacketBuilder::ipv6(SRC, DST, 64)
        .tcp(40000, 7000, 1000, 65535)
        .ack(5)
        .write(&mut out, b"hello")
        .unwrap();
    let mut packet = with_exts(
        &out,
        &[(HOP_BY_HOP, pad_n()), (DESTINATION_OPTIONS, pad_n())],
    );
    // Bytes past the declared length are not part of it.
    packet.extend_from_slice(&[0xee; 3]);
    let Chain::Upper { protocol, offset } = walk(&packet) else {
        panic!()
    };
    let mut stripped = Vec::new();
    assert!(strip(&packet, protocol, offset, &mut stripped));
    assert_eq!(stripped, out);
    assert!(!has_extensions(&stripped));
    let sliced = SlicedPacket::from_ip(&stripped).unwrap();
    let Some(TransportSlice::Tcp(tcp)) = sliced.transport else {
        panic!()
    };
    assert_eq!(tcp.payload(), b"hello");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Any bytes: no panic; what goes on lies inside the declared packet, and the
    /// stripped packet is the upper layer behind a fixed header.
    #[test]
    fn any_bytes(body in proptest::collection::vec(any::<u8>(), 0..200), first in any::<u8>(), extra in 0usize..8) {
        let mut packet = tcp_syn()[..40].to_vec();
        packet[6] = [0, 43, 44, 51, 60, 6, 17, first][usize::from(first) % 8];
        packet[4..6].copy_from_slice(&(body.len() as u16).to_be_bytes());
        packet.extend_from_slice(&body);
        packet.extend(std::iter::repeat_n(0xee, extra));
        match walk(&packet) {
            Chain::Upper { protocol, offset } => {
                prop_assert!(offset <= 40 + body.len());
                let mut out = Vec::new();
                prop_assert!(strip(&packet, protocol, offset, &mut out));
                prop_assert_eq!(out.len(), 40 + body.len() + 40 - offset);
                prop_assert_eq!(&out[40..], &packet[offset..40 + body.len()]);
                prop_assert_eq!(out[6], protocol);
            }
            Chain::Discard(Some(error)) => {
                prop_assert!((error.pointer as usize) < 40 + body.len());
                prop_assert!(error.code <= 2);
            }
            Chain::Discard(None) | Chain::Malformed => {}
        }
    }
}
