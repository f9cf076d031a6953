//! Sorts each packet read from the TUN before smoltcp sees it (etherparse, no
//! checksum work): which flow it belongs to, whether it opens a new one, or why it is
//! dropped. Never panics on any input.

use std::net::{IpAddr, SocketAddr};

use etherparse::{NetSlice, SlicedPacket, TransportSlice};

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
    },
    /// A UDP datagram.
    Udp {
        /// Its addresses.
        tuple: FourTuple,
    },
    /// Not for the stack.
    Drop(DropReason),
}

/// Why a packet is not handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Not a well-formed IPv4/IPv6 packet (bad version, lengths, headers).
    Malformed,
    /// An IP fragment (TCP over the TUN is never fragmented; not reassembled).
    Fragment,
    /// ICMP, ICMPv6 (no flow to hand it to).
    Icmp,
    /// Another transport protocol.
    OtherProtocol,
    /// Source or destination is not a unicast address, or a port is 0.
    NotUnicast,
}

impl DropReason {
    /// A short name for counters and logs.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::Fragment => "fragment",
            DropReason::Icmp => "icmp",
            DropReason::OtherProtocol => "other-protocol",
            DropReason::NotUnicast => "not-unicast",
        }
    }
}

fn unicast(ip: IpAddr) -> bool {
    !(ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::from([255, 255, 255, 255]))
}

/// Classifies one IP packet.
pub fn classify(packet: &[u8]) -> Class {
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
    let tuple = |sport: u16, dport: u16| -> Option<FourTuple> {
        (unicast(src) && unicast(dst) && sport != 0 && dport != 0).then_some(FourTuple {
            src: SocketAddr::new(src, sport),
            dst: SocketAddr::new(dst, dport),
        })
    };
    match &sliced.transport {
        Some(TransportSlice::Tcp(tcp)) => match tuple(tcp.source_port(), tcp.destination_port()) {
            Some(tuple) => Class::Tcp {
                tuple,
                syn: tcp.syn() && !tcp.ack() && !tcp.rst(),
            },
            None => Class::Drop(DropReason::NotUnicast),
        },
        Some(TransportSlice::Udp(udp)) => match tuple(udp.source_port(), udp.destination_port()) {
            Some(tuple) => Class::Udp { tuple },
            None => Class::Drop(DropReason::NotUnicast),
        },
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
        let Class::Tcp { tuple, syn } = classify(&tcp_v4(true, false)) else {
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
        assert!(matches!(classify(&out), Class::Udp { .. }));
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
        assert_eq!(classify(&out), Class::Drop(DropReason::NotUnicast));
        let mut out = Vec::new();
        PacketBuilder::ipv4([10, 0, 0, 2], [10, 0, 0, 1], 64)
            .tcp(0, 80, 1, 100)
            .syn()
            .write(&mut out, b"")
            .unwrap();
        assert_eq!(classify(&out), Class::Drop(DropReason::NotUnicast));
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = classify(&bytes);
        }

        #[test]
        fn mutated_packets_never_panic(flip in 0usize..60, value in any::<u8>()) {
            let mut p = tcp_v4(true, false);
            if let Some(b) = p.get_mut(flip) { *b = value; }
            let _ = classify(&p);
        }
    }
}
