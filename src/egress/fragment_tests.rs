#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use super::*;
use etherparse::defrag::IpDefragPool;
use etherparse::{NetSlice, SlicedPacket};

fn v4(port: u16, last: u8) -> SocketAddr {
    SocketAddr::from(([198, 19, 2, last], port))
}

fn v6(port: u16, last: u16) -> SocketAddr {
    SocketAddr::from(([0xfd19, 2, 0, 0, 0, 0, 0, last], port))
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

/// Fragments `payload`, returning the packets sent.
fn fragments(from: SocketAddr, to: SocketAddr, payload: &[u8], mtu: usize) -> Vec<Vec<u8>> {
    let mut sent = Vec::new();
    let mut buf = Vec::new();
    let all = udp_fragments((from, to), payload, (mtu, 0x1234_5678), 64, &mut buf, |p| {
        sent.push(p.to_vec());
        true
    });
    assert_eq!(all, Ok(true));
    sent
}

/// Reassembles with etherparse's own pool (an independent implementation) and
/// checks the UDP header and checksum of the result; returns the payload.
fn reassemble(packets: &[Vec<u8>], from: SocketAddr, to: SocketAddr) -> Vec<u8> {
    let mut pool = IpDefragPool::<(), ()>::new();
    let mut whole = None;
    for p in packets {
        let sliced = SlicedPacket::from_ip(p).unwrap();
        if let Some(done) = pool.process_sliced_packet(&sliced, (), ()).unwrap() {
            assert!(whole.is_none(), "completed twice");
            whole = Some(done);
        }
    }
    let whole = whole.expect("the fragments make a whole datagram");
    assert_eq!(whole.ip_number, IpNumber::UDP);
    let (udp, rest) = UdpHeader::from_slice(&whole.payload).unwrap();
    assert_eq!(
        (udp.source_port, udp.destination_port),
        (from.port(), to.port())
    );
    assert_eq!(usize::from(udp.length), whole.payload.len());
    let expected = match (from, to) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => udp
            .calc_checksum_ipv4_raw(s.ip().octets(), d.ip().octets(), rest)
            .unwrap(),
        (SocketAddr::V6(s), SocketAddr::V6(d)) => udp
            .calc_checksum_ipv6_raw(s.ip().octets(), d.ip().octets(), rest)
            .unwrap(),
        _ => unreachable!(),
    };
    assert_eq!(
        udp.checksum, expected,
        "UDP checksum over the whole datagram"
    );
    rest.to_vec()
}

#[test]
fn ipv4_fragments_fit_the_mtu_and_reassemble() {
    let (from, to) = (v4(53, 2), v4(40000, 1));
    for (len, mtu, count) in [
        (4000, 1500, 3),
        (1473, 1500, 2),
        (2952, 1500, 2),
        (9000, 576, 17),
    ] {
        let data = payload(len);
        let sent = fragments(from, to, &data, mtu);
        assert_eq!(sent.len(), count, "{len} bytes at MTU {mtu}");
        for (i, p) in sent.iter().enumerate() {
            assert!(p.len() <= mtu, "fragment {i}: {} > {mtu}", p.len());
            let sliced = SlicedPacket::from_ip(p).unwrap();
            let Some(NetSlice::Ipv4(ip)) = &sliced.net else {
                panic!("not IPv4");
            };
            let h = ip.header().to_header();
            assert!(!h.dont_fragment);
            assert_eq!(h.identification, 0x5678);
            assert_eq!(h.more_fragments, i + 1 < sent.len(), "MF of fragment {i}");
            assert_eq!(h.header_checksum, h.calc_header_checksum());
            if i + 1 < sent.len() {
                assert_eq!(
                    (p.len() - 20) % 8,
                    0,
                    "data of a middle fragment is 8-aligned"
                );
            }
        }
        assert_eq!(
            reassemble(&sent, from, to),
            data,
            "{len} bytes at MTU {mtu}"
        );
    }
}

#[test]
fn ipv6_fragments_carry_a_fragment_header_and_reassemble() {
    let (from, to) = (v6(53, 2), v6(40000, 1));
    for (len, mtu, count) in [(4000, 1500, 3), (1500, 1280, 2), (65_527, 1500, 46)] {
        let data = payload(len);
        let sent = fragments(from, to, &data, mtu);
        assert_eq!(sent.len(), count, "{len} bytes at MTU {mtu}");
        for (i, p) in sent.iter().enumerate() {
            assert!(p.len() <= mtu);
            let sliced = SlicedPacket::from_ip(p).unwrap();
            let Some(NetSlice::Ipv6(ip)) = &sliced.net else {
                panic!("not IPv6");
            };
            assert!(ip.payload().fragmented, "fragment {i} is marked as one");
            assert_eq!(ip.payload().ip_number, IpNumber::UDP);
        }
        assert_eq!(
            reassemble(&sent, from, to),
            data,
            "{len} bytes at MTU {mtu}"
        );
    }
}

#[test]
fn the_largest_datagrams_fit_and_larger_ones_are_refused() {
    let data = payload(MAX_UDP_PAYLOAD_V4);
    let sent = fragments(v4(1, 2), v4(2, 1), &data, 1500);
    assert_eq!(reassemble(&sent, v4(1, 2), v4(2, 1)), data);
    let mut sends = 0;
    let mut unfit = |ends: (SocketAddr, SocketAddr), len: usize, mtu: usize| {
        let mut buf = Vec::new();
        udp_fragments(ends, &payload(len), (mtu, 1), 64, &mut buf, |_| {
            sends += 1;
            true
        })
    };
    let cases = [
        (
            (v4(1, 2), v4(2, 1)),
            MAX_UDP_PAYLOAD_V4 + 1,
            1500,
            Unfit::TooLarge,
        ),
        (
            (v6(1, 2), v6(2, 1)),
            MAX_UDP_PAYLOAD_V6 + 1,
            1500,
            Unfit::TooLarge,
        ),
        ((v4(1, 2), v6(2, 1)), 10, 1500, Unfit::Families),
        ((v4(1, 2), v4(2, 1)), 10, 27, Unfit::TinyMtu),
    ];
    for (ends, len, mtu, why) in cases {
        assert_eq!(unfit(ends, len, mtu), Err(why), "{len} bytes at MTU {mtu}");
    }
    assert_eq!(
        sends, 0,
        "nothing is sent for a datagram that cannot be fragmented"
    );
}

#[test]
fn a_refused_fragment_ends_the_datagram() {
    let mut buf = Vec::new();
    let mut sends = 0;
    let taken = udp_fragments(
        (v4(1, 2), v4(2, 1)),
        &payload(10_000),
        (1500, 1),
        64,
        &mut buf,
        |_| {
            sends += 1;
            sends < 2
        },
    );
    assert_eq!(taken, Ok(false));
    assert_eq!(sends, 2, "no fragment after the refused one");
}
