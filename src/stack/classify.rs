//! Sorts each packet read from the TUN before smoltcp sees it (etherparse, no
//! checksum work): which flow it belongs to, whether it opens a new one, or why it is
//! dropped. Never panics on any input.

use std::net::{IpAddr, SocketAddr};

use etherparse::{NetSlice, SlicedPacket, TransportSlice};

use super::ipv6_ext::{self, Chain, ParamProblem};
use crate::flow::FourTuple;

/// What a packet is, as far as the stack cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A TCP segment. `syn` is a connection request (SYN without ACK or RST).
    Tcp {
        /// Its flow.
        tuple: FourTuple,
        /// Opens a new connection.
        syn: bool,
        /// The segment's sequence number (a refused SYN's ICMP error quotes it).
        seq: u32,
    },
    /// A UDP datagram whose length and checksum are right.
    Udp {
        /// Its addresses.
        tuple: FourTuple,
        /// Where its payload lies in the packet: offset and length.
        payload: (usize, usize),
    },
    /// Not for the stack.
    Drop(DropReason),
    /// An IPv6 packet whose extension headers ask for it to be discarded with an
    /// ICMPv6 Parameter Problem to its source (an unknown option whose type says so,
    /// a Routing header with segments left, a misplaced Hop-by-Hop header; see
    /// [`super::ipv6_ext`]). Counted as [`DropReason::Ipv6Extension`].
    Ipv6Error(ParamProblem),
}

/// Why a packet is not handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Not a well-formed IPv4/IPv6 packet (bad version, lengths, headers).
    Malformed,
    /// An IP fragment that could not be reassembled (malformed, overlapping, too
    /// large, too many at once, or its datagram did not arrive whole in time; see
    /// the stack's `reassembly`). Fragments are first handed to reassembly.
    Fragment,
    /// ICMP, ICMPv6 (no flow to hand it to).
    Icmp,
    /// Another transport protocol.
    OtherProtocol,
    /// Source or destination is unspecified, or a port is 0.
    NotUnicast,
    /// To a multicast group (mDNS, LLMNR, SSDP, ...): never sent to the proxy.
    Multicast,
    /// To a broadcast address (DHCP, NetBIOS, ...): never sent to the proxy.
    Broadcast,
    /// UDP to a link-local address: it only means something on the local link.
    LinkLocal,
    /// A UDP checksum that does not match (or the IPv6 checksum 0, which is invalid).
    BadChecksum,
    /// IPv6 extension headers that say to discard the packet (RFC 8200 4.2: an
    /// unknown option whose type says so; a Routing header with segments left; a
    /// Hop-by-Hop header that is not first).
    Ipv6Extension,
}

impl DropReason {
    /// How many reasons there are.
    pub const COUNT: usize = 10;

    /// Every reason, in [`DropReason::index`] order.
    pub const ALL: [DropReason; DropReason::COUNT] = [
        DropReason::Malformed,
        DropReason::Fragment,
        DropReason::Icmp,
        DropReason::OtherProtocol,
        DropReason::NotUnicast,
        DropReason::Multicast,
        DropReason::Broadcast,
        DropReason::LinkLocal,
        DropReason::BadChecksum,
        DropReason::Ipv6Extension,
    ];

    /// The reason's place in [`DropReason::ALL`] (a counter array's index).
    pub fn index(self) -> usize {
        self as usize
    }

    /// A short name for counters and logs.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::Fragment => "fragment",
            DropReason::Icmp => "icmp",
            DropReason::OtherProtocol => "other-protocol",
            DropReason::NotUnicast => "not-unicast",
            DropReason::Multicast => "multicast",
            DropReason::Broadcast => "broadcast",
            DropReason::LinkLocal => "link-local",
            DropReason::BadChecksum => "bad-checksum",
            DropReason::Ipv6Extension => "ipv6-extension",
        }
    }
}

/// Why a destination is not an ordinary unicast address, if it is not.
fn special_destination(ip: IpAddr) -> Option<DropReason> {
    if ip.is_unspecified() {
        Some(DropReason::NotUnicast)
    } else if ip.is_multicast() {
        Some(DropReason::Multicast)
    } else if ip == IpAddr::from([255, 255, 255, 255]) {
        Some(DropReason::Broadcast)
    } else {
        None
    }
}

/// Is `ip` link-local (169.254.0.0/16, fe80::/10)?
pub fn is_link_local(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments().first().is_some_and(|s| s & 0xffc0 == 0xfe80),
    }
}

/// The Internet checksum (RFC 1071) of a UDP datagram or TCP segment (`protocol` 17
/// or 6) with its pseudo-header is right: the ones' complement sum over both is all
/// ones.
fn checksum_ok(src: IpAddr, dst: IpAddr, protocol: u8, segment: &[u8]) -> bool {
    let Some(pseudo) = crate::offload::pseudo_header_sum(src, dst, protocol, segment.len()) else {
        return false;
    };
    let sum = crate::offload::sum_words(u64::from(pseudo), segment);
    crate::offload::fold(sum) == 0xffff
}

/// Classifies one IP packet, checking its TCP or UDP checksum.
pub fn classify(packet: &[u8]) -> Class {
    classify_offload(packet, false)
}

/// Classifies one IP packet read with an offload header. `checksum_trusted`: the
/// header says the transport checksum is partial (`NEEDS_CSUM`: the packet never
/// crossed a wire, the field holds only the pseudo-header sum) or already checked by
/// the kernel (`DATA_VALID`), so it is not checked again; any other packet is.
pub fn classify_offload(packet: &[u8], checksum_trusted: bool) -> Class {
    if packet.first().is_some_and(|b| b >> 4 == 6) {
        match ipv6_ext::walk(packet) {
            Chain::Upper { .. } => {}
            Chain::Discard(Some(error)) => return Class::Ipv6Error(error),
            Chain::Discard(None) => return Class::Drop(DropReason::Ipv6Extension),
            Chain::Malformed => return Class::Drop(DropReason::Malformed),
        }
    }
    let Ok(sliced) = SlicedPacket::from_ip(packet) else {
        return Class::Drop(DropReason::Malformed);
    };
    let (src, dst, fragmented) = match &sliced.net {
        Some(NetSlice::Ipv4(ip)) => (
            IpAddr::V4(ip.header().source_addr()),
            IpAddr::V4(ip.header().destination_addr()),
            ip.is_payload_fragmented(),
        ),
        Some(NetSlice::Ipv6(ip)) => (
            IpAddr::V6(ip.header().source_addr()),
            IpAddr::V6(ip.header().destination_addr()),
            ip.is_payload_fragmented(),
        ),
        _ => return Class::Drop(DropReason::Malformed),
    };
    if fragmented {
        return Class::Drop(DropReason::Fragment);
    }
    let tuple = |sport: u16, dport: u16| -> Result<FourTuple, DropReason> {
        if let Some(reason) = special_destination(dst) {
            return Err(reason);
        }
        if src.is_unspecified() || src.is_multicast() || sport == 0 || dport == 0 {
            return Err(DropReason::NotUnicast);
        }
        Ok(FourTuple {
            src: SocketAddr::new(src, sport),
            dst: SocketAddr::new(dst, dport),
        })
    };
    match &sliced.transport {
        Some(TransportSlice::Tcp(tcp)) => match tuple(tcp.source_port(), tcp.destination_port()) {
            // Checked here, before a SYN can open a flow, and counted (smoltcp, which
            // would drop it silently, is told not to check again).
            Ok(_) if !checksum_trusted && !checksum_ok(src, dst, 6, tcp.slice()) => {
                Class::Drop(DropReason::BadChecksum)
            }
            Ok(tuple) => Class::Tcp {
                tuple,
                syn: tcp.syn() && !tcp.ack() && !tcp.rst(),
                seq: tcp.sequence_number(),
            },
            Err(reason) => Class::Drop(reason),
        },
        Some(TransportSlice::Udp(udp)) => {
            let tuple = match tuple(udp.source_port(), udp.destination_port()) {
                Ok(_) if is_link_local(dst) => return Class::Drop(DropReason::LinkLocal),
                Ok(tuple) => tuple,
                Err(reason) => return Class::Drop(reason),
            };
            let checksum = udp.checksum();
            let checked = if checksum_trusted {
                true
            } else if checksum == 0 {
                // "No checksum": allowed in IPv4 only (RFC 768; RFC 8200 8.1).
                src.is_ipv4()
            } else {
                checksum_ok(src, dst, 17, udp.slice())
            };
            if !checked {
                return Class::Drop(DropReason::BadChecksum);
            }
            let payload = udp.payload();
            let offset = (payload.as_ptr() as usize).saturating_sub(packet.as_ptr() as usize);
            Class::Udp {
                tuple,
                payload: (offset, payload.len()),
            }
        }
        Some(TransportSlice::Icmpv4(_) | TransportSlice::Icmpv6(_)) => {
            Class::Drop(DropReason::Icmp)
        }
        _ => Class::Drop(DropReason::OtherProtocol),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;
    use proptest::prelude::*;

    fn tcp_v4(syn: bool, ack: bool) -> Vec<u8> {
        let mut b =
            PacketBuilder::ipv4([10, 0, 0, 2], [93, 184, 216, 34], 64).tcp(40000, 443, 1, 65535);
        if syn {
            b = b.syn();
        }
        if ack {
            b = b.ack(5);
        }
        let mut out = Vec::new();
        b.write(&mut out, &[]).unwrap();
        out
    }

    #[test]
    fn syn_opens_and_syn_ack_does_not() {
        let Class::Tcp { tuple, syn, .. } = classify(&tcp_v4(true, false)) else {
            panic!()
        };
        assert!(syn);
        assert_eq!(tuple.src, "10.0.0.2:40000".parse().unwrap());
        assert_eq!(tuple.dst, "93.184.216.34:443".parse().unwrap());
        assert!(matches!(
            classify(&tcp_v4(true, true)),
            Class::Tcp { syn: false, .. }
        ));
        assert!(matches!(
            classify(&tcp_v4(false, true)),
            Class::Tcp { syn: false, .. }
        ));
    }

    #[test]
    fn ipv6_udp_and_icmp() {
        let mut out = Vec::new();
        PacketBuilder::ipv6([0xfd; 16], [0x20; 16], 64)
            .udp(5353, 53)
            .write(&mut out, b"q")
            .unwrap();
        let Class::Udp { payload, .. } = classify(&out) else {
            panic!()
        };
        assert_eq!(&out[payload.0..payload.0 + payload.1], b"q");
        let mut out = Vec::new();
        PacketBuilder::ipv4([10, 0, 0, 2], [10, 0, 0, 1], 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut out, b"ping")
            .unwrap();
        assert_eq!(classify(&out), Class::Drop(DropReason::Icmp));
    }

    #[test]
    fn truncated_and_garbage_are_malformed() {
        let p = tcp_v4(true, false);
        for len in 0..p.len() {
            assert!(
                matches!(classify(&p[..len]), Class::Drop(_)),
                "prefix of {len} bytes"
            );
        }
        assert_eq!(classify(&[0x60]), Class::Drop(DropReason::Malformed));
        assert_eq!(classify(&[0x45; 40]), Class::Drop(DropReason::Malformed));
    }

    #[test]
    fn zero_port_and_multicast_are_dropped() {
        let mut out = Vec::new();
        PacketBuilder::ipv4([10, 0, 0, 2], [224, 0, 0, 1], 64)
            .udp(1, 2)
            .write(&mut out, b"")
            .unwrap();
        assert_eq!(classify(&out), Class::Drop(DropReason::Multicast));
        let mut out = Vec::new();
        PacketBuilder::ipv4([10, 0, 0, 2], [255, 255, 255, 255], 64)
            .udp(68, 67)
            .write(&mut out, b"dhcp")
            .unwrap();
        assert_eq!(classify(&out), Class::Drop(DropReason::Broadcast));
        let mut out = Vec::new();
        PacketBuilder::ipv6(
            [0xfd; 16],
            [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 3],
            64,
        )
        .udp(5355, 5355)
        .write(&mut out, b"llmnr")
        .unwrap();
        assert_eq!(classify(&out), Class::Drop(DropReason::Multicast));
        let mut out = Vec::new();
        PacketBuilder::ipv4([10, 0, 0, 2], [169, 254, 1, 1], 64)
            .udp(5000, 5000)
            .write(&mut out, b"ll")
            .unwrap();
        assert_eq!(classify(&out), Class::Drop(DropReason::LinkLocal));
        let mut out = Vec::new();
        PacketBuilder::ipv4([10, 0, 0, 2], [10, 0, 0, 1], 64)
            .tcp(0, 80, 1, 100)
            .syn()
            .write(&mut out, b"")
            .unwrap();
        assert_eq!(classify(&out), Class::Drop(DropReason::NotUnicast));
    }

    #[test]
    fn udp_checksums_are_checked() {
        for v6 in [false, true] {
            let mut out = Vec::new();
            let b = if v6 {
                PacketBuilder::ipv6([0xfd; 16], [0x20; 16], 64)
            } else {
                PacketBuilder::ipv4([10, 0, 0, 2], [10, 0, 0, 1], 64)
            };
            b.udp(4000, 53).write(&mut out, b"odd").unwrap();
            assert!(matches!(classify(&out), Class::Udp { .. }), "v6={v6}");
            let last = out.len() - 1;
            out[last] ^= 1;
            assert_eq!(classify(&out), Class::Drop(DropReason::BadChecksum));
            // Checksum 0: "none" over IPv4, invalid over IPv6.
            out[last] ^= 1;
            let at = out.len() - 3 - 2;
            out[at] = 0;
            out[at + 1] = 0;
            let expected = if v6 {
                Class::Drop(DropReason::BadChecksum)
            } else {
                classify(&out)
            };
            assert_eq!(classify(&out), expected);
            if !v6 {
                assert!(matches!(classify(&out), Class::Udp { .. }));
            }
        }
    }

    #[test]
    fn tcp_checksums_are_checked_before_a_syn_opens_a_flow() {
        for v6 in [false, true] {
            let mut out = Vec::new();
            let b = if v6 {
                PacketBuilder::ipv6([0xfd; 16], [0x20; 16], 64)
            } else {
                PacketBuilder::ipv4([10, 0, 0, 2], [10, 0, 0, 1], 64)
            };
            b.tcp(40000, 80, 7, 1000)
                .syn()
                .write(&mut out, b"odd")
                .unwrap();
            assert!(
                matches!(classify(&out), Class::Tcp { syn: true, .. }),
                "v6={v6}"
            );
            let last = out.len() - 1;
            out[last] ^= 1;
            assert_eq!(
                classify(&out),
                Class::Drop(DropReason::BadChecksum),
                "v6={v6}"
            );
        }
    }

    #[test]
    fn a_checksum_the_offload_header_vouches_for_is_not_checked() {
        for (v6, udp) in [(false, false), (true, false), (false, true), (true, true)] {
            let b = if v6 {
                PacketBuilder::ipv6([0xfd; 16], [0x20; 16], 64)
            } else {
                PacketBuilder::ipv4([10, 0, 0, 2], [10, 0, 0, 1], 64)
            };
            let mut out = Vec::new();
            if udp {
                b.udp(40000, 5000).write(&mut out, b"partial").unwrap();
            } else {
                b.tcp(40000, 80, 7, 1000)
                    .ack(1)
                    .write(&mut out, b"partial")
                    .unwrap();
            }
            // A partial checksum: the field holds the pseudo-header sum only.
            let at = if v6 { 40 } else { 20 } + if udp { 6 } else { 16 };
            out[at..at + 2].copy_from_slice(&[0x12, 0x34]);
            let case = format!("v6={v6} udp={udp}");
            assert_eq!(
                classify(&out),
                Class::Drop(DropReason::BadChecksum),
                "{case}"
            );
            assert_eq!(
                classify_offload(&out, false),
                Class::Drop(DropReason::BadChecksum)
            );
            let class = classify_offload(&out, true);
            if udp {
                assert!(matches!(class, Class::Udp { .. }), "{case}: {class:?}");
            } else {
                assert!(
                    matches!(class, Class::Tcp { syn: false, .. }),
                    "{case}: {class:?}"
                );
            }
        }
    }

    #[test]
    fn an_ipv6_atomic_fragment_is_the_whole_datagram() {
        // RFC 6946: a Fragment header with offset 0 and no more fragments is no
        // fragment; the datagram behind it is handled as is.
        let (src, dst) = ([0xfd; 16], [0x20; 16]);
        let mut udp = Vec::new();
        PacketBuilder::ipv6(src, dst, 64)
            .udp(40000, 53)
            .write(&mut udp, b"atomic")
            .unwrap();
        let mut p = udp[..40].to_vec();
        p[4..6].copy_from_slice(&((udp.len() - 40 + 8) as u16).to_be_bytes());
        p[6] = 44;
        p.extend_from_slice(&[17, 0, 0, 0, 0, 0, 0x12, 0x34]);
        p.extend_from_slice(&udp[40..]);
        let class = classify(&p);
        assert!(matches!(class, Class::Udp { .. }), "{class:?}");
    }

    #[test]
    fn ipv6_extension_headers_before_tcp() {
        let (src, dst) = ([0xfd; 16], [0x20; 16]);
        let mut syn = Vec::new();
        PacketBuilder::ipv6(src, dst, 64)
            .tcp(40000, 443, 1, 65535)
            .syn()
            .write(&mut syn, &[])
            .unwrap();
        let behind = |options: [u8; 6]| {
            let mut p = syn[..40].to_vec();
            p[4..6].copy_from_slice(&((syn.len() - 40 + 8) as u16).to_be_bytes());
            p[6] = 60;
            p.extend_from_slice(&[6, 0]);
            p.extend_from_slice(&options);
            p.extend_from_slice(&syn[40..]);
            p
        };
        // PadN: an ordinary SYN (smoltcp gets it without the header: the stack).
        let class = classify(&behind([1, 4, 0, 0, 0, 0]));
        assert!(matches!(class, Class::Tcp { syn: true, .. }), "{class:?}");
        // An unknown option of type 10xxxxxx: a Parameter Problem pointing at it.
        assert_eq!(
            classify(&behind([0x8a, 4, 0, 0, 0, 0])),
            Class::Ipv6Error(ParamProblem {
                code: 2,
                pointer: 42
            })
        );
        // Of type 01xxxxxx: dropped, no error.
        assert_eq!(
            classify(&behind([0x4a, 4, 0, 0, 0, 0])),
            Class::Drop(DropReason::Ipv6Extension)
        );
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = classify(&bytes);
            let _ = classify_offload(&bytes, true);
        }

        #[test]
        fn mutated_packets_never_panic(flip in 0usize..60, value in any::<u8>()) {
            let mut p = tcp_v4(true, false);
            if let Some(b) = p.get_mut(flip) { *b = value; }
            let _ = classify(&p);
        }
    }
}
