//! `packet_ingress`: one packet from the TUN through everything the stack does with
//! it before smoltcp or a socket is involved: [`classify`], the UDP payload
//! extraction, DNS for datagrams to port 53 ([`super::dns::check_query`]), and the
//! packets [`Egress`] builds in reply (a UDP answer, an ICMP port unreachable).
//! Cheap per input; [`super::stack`] drives the whole stack instead.

use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use etherparse::{NetSlice, SlicedPacket, TransportSlice};

use super::fix_checksums;
use crate::egress::{Egress, PacketSink};
use crate::flow::FourTuple;
use crate::stack::classify::{self, Class, DropReason};

/// Device MTUs chosen by flag bits 1-2.
const MTUS: [usize; 4] = [1280, 1500, 9000, 65535];

/// Packets a harness device took, and its MTU.
#[derive(Debug)]
pub struct Capture {
    packets: Mutex<Vec<Vec<u8>>>,
    mtu: usize,
}

impl Capture {
    /// A device that takes every packet up to `mtu` bytes.
    pub fn new(mtu: usize) -> Self {
        Capture {
            packets: Mutex::new(Vec::new()),
            mtu,
        }
    }

    /// The packets sent so far, taken out.
    pub fn take(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.packets.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl PacketSink for Capture {
    fn send_packet(&self, packet: &[u8]) -> io::Result<()> {
        assert!(
            packet.len() <= self.mtu,
            "a {}-byte packet for a device of MTU {}",
            packet.len(),
            self.mtu
        );
        let mut packets = self.packets.lock().unwrap_or_else(PoisonError::into_inner);
        packets.push(packet.to_vec());
        Ok(())
    }

    fn max_packet(&self) -> usize {
        self.mtu
    }
}

/// `| flags | packet |` (see the module doc of [`super`]).
pub fn packet_ingress(data: &[u8]) {
    let Some((&flags, packet)) = data.split_first() else {
        return;
    };
    let mut packet = packet.to_vec();
    if flags & 1 != 0 {
        fix_checksums(&mut packet);
    }
    let mtu = MTUS[usize::from(flags >> 1) & 3];
    let class = classify::classify(&packet);
    check_class(&packet, class, flags & 1 != 0);
    if let Class::Udp {
        tuple,
        payload: (offset, len),
    } = class
    {
        let payload = packet.get(offset..offset + len).unwrap_or_else(|| {
            panic!(
                "payload {offset}+{len} outside a {}-byte packet",
                packet.len()
            )
        });
        if tuple.dst.port() == crate::dns::DNS_PORT {
            super::dns::check_query(payload, tuple.src, tuple.dst);
        }
        check_egress(tuple, payload, mtu);
    }
}

/// What classify said agrees with what etherparse reads from the same bytes.
fn check_class(packet: &[u8], class: Class, checksums_fixed: bool) {
    let Ok(sliced) = SlicedPacket::from_ip(packet) else {
        // An IPv6 extension-header chain that etherparse refuses (a Hop-by-Hop
        // header after another one, say) may be one the stack refuses by RFC 8200
        // first (`stack::ipv6_ext`); anything else unreadable is malformed.
        let ipv6 = packet.first().is_some_and(|b| b >> 4 == 6);
        match class {
            Class::Ipv6Error(_) | Class::Drop(DropReason::Ipv6Extension) if ipv6 => {}
            class => assert_eq!(class, Class::Drop(DropReason::Malformed)),
        }
        return;
    };
    let (src, dst): (IpAddr, IpAddr) = match &sliced.net {
        Some(NetSlice::Ipv4(ip)) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        Some(NetSlice::Ipv6(ip)) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        _ => return,
    };
    match (class, &sliced.transport) {
        (Class::Tcp { tuple, syn, .. }, Some(TransportSlice::Tcp(tcp))) => {
            assert_eq!(
                (tuple.src.ip(), tuple.dst.ip()),
                (src, dst),
                "TCP addresses"
            );
            assert_eq!(
                (tuple.src.port(), tuple.dst.port()),
                (tcp.source_port(), tcp.destination_port())
            );
            assert!(tuple.src.port() != 0 && tuple.dst.port() != 0);
            assert_eq!(syn, tcp.syn() && !tcp.ack() && !tcp.rst());
            check_unicast(tuple);
        }
        (Class::Udp { tuple, payload }, Some(TransportSlice::Udp(udp))) => {
            assert_eq!(
                (tuple.src.ip(), tuple.dst.ip()),
                (src, dst),
                "UDP addresses"
            );
            assert_eq!(
                (tuple.src.port(), tuple.dst.port()),
                (udp.source_port(), udp.destination_port())
            );
            assert!(tuple.src.port() != 0 && tuple.dst.port() != 0);
            let (offset, len) = payload;
            assert_eq!(packet.get(offset..offset + len), Some(udp.payload()));
            assert!(!classify::is_link_local(dst), "UDP to link-local {dst}");
            check_unicast(tuple);
        }
        (Class::Drop(DropReason::BadChecksum), Some(TransportSlice::Udp(_))) => {
            assert!(
                !checksums_fixed,
                "a UDP checksum we just computed was refused"
            );
        }
        (Class::Drop(_) | Class::Ipv6Error(_), _) => {}
        (class, transport) => panic!("classified as {class:?}, but etherparse reads {transport:?}"),
    }
}

/// Fragments of one reply: each within the MTU, and etherparse's own defragmenter
/// (an independent implementation) makes them the datagram again.
fn check_fragments(fragments: &[Vec<u8>], payload: &[u8], mtu: usize) {
    let mut pool = etherparse::defrag::IpDefragPool::<(), ()>::new();
    let mut whole = None;
    for fragment in fragments {
        assert!(
            fragment.len() <= mtu,
            "a fragment of {} bytes, MTU {mtu}",
            fragment.len()
        );
        assert_eq!(
            classify::classify(fragment),
            Class::Drop(DropReason::Fragment)
        );
        let sliced = SlicedPacket::from_ip(fragment).unwrap_or_else(|e| panic!("{e}"));
        if let Some(done) = pool
            .process_sliced_packet(&sliced, (), ())
            .unwrap_or_else(|e| panic!("{e}"))
        {
            assert!(whole.is_none(), "the datagram completed twice");
            whole = Some(done);
        }
    }
    let whole = whole.unwrap_or_else(|| panic!("{} fragments make no datagram", fragments.len()));
    assert_eq!(whole.payload.get(8..), Some(payload));
}

/// The stack only takes flows between ordinary unicast endpoints.
fn check_unicast(tuple: FourTuple) {
    let dst = tuple.dst.ip();
    assert!(
        !dst.is_unspecified() && !dst.is_multicast() && dst != IpAddr::from([255, 255, 255, 255]),
        "flow to {dst}"
    );
    let src = tuple.src.ip();
    assert!(
        !src.is_unspecified() && !src.is_multicast(),
        "flow from {src}"
    );
}

/// The reply and the ICMP error egress builds for this datagram are packets the
/// stack would read back as what they are meant to be.
fn check_egress(tuple: FourTuple, payload: &[u8], mtu: usize) {
    let capture = Arc::new(Capture::new(mtu));
    let egress = Egress::new(capture.clone());
    // IPv4-mapped IPv6 addresses count as IPv4 (the reply is an IPv4 packet).
    let (from, to) = (tuple.dst.ip().to_canonical(), tuple.src.ip().to_canonical());
    let header = if from.is_ipv4() { 20 + 8 } else { 40 + 8 };
    let same_family = from.is_ipv4() == to.is_ipv4();
    let fits = same_family && payload.len() + header <= mtu;
    // A reply larger than the MTU goes as IP fragments, up to what IP carries.
    let largest = if from.is_ipv4() {
        crate::egress::MAX_UDP_PAYLOAD_V4
    } else {
        crate::egress::MAX_UDP_PAYLOAD_V6
    };
    let sendable = same_family && payload.len() <= largest;
    let sent = egress.udp(tuple.dst, tuple.src, payload);
    assert_eq!(
        sent,
        sendable,
        "reply of {} bytes, MTU {mtu}",
        payload.len()
    );
    if sent && !fits {
        check_fragments(&capture.take(), payload, mtu);
        egress.port_unreachable(tuple.src, tuple.dst, payload);
        return;
    }
    for reply in capture.take() {
        match classify::classify(&reply) {
            Class::Udp {
                tuple: back,
                payload: (offset, len),
            } => {
                assert_eq!((back.src.ip(), back.dst.ip()), (from, to));
                assert_eq!(
                    (back.src.port(), back.dst.port()),
                    (tuple.dst.port(), tuple.src.port())
                );
                assert_eq!(reply.get(offset..offset + len), Some(payload));
            }
            // The application's own address as a destination may be one the stack
            // does not take (broadcast, link-local; 0.0.0.0 or multicast when it
            // was IPv4-mapped): the reply is still a well-formed datagram.
            Class::Drop(
                DropReason::Broadcast
                | DropReason::LinkLocal
                | DropReason::NotUnicast
                | DropReason::Multicast,
            ) => {}
            other => panic!("our reply to {tuple} reads as {other:?}"),
        }
    }
    egress.port_unreachable(tuple.src, tuple.dst, payload);
    for error in capture.take() {
        let parsed = SlicedPacket::from_ip(&error);
        assert!(
            matches!(
                parsed.as_ref().map(|p| &p.transport),
                Ok(Some(TransportSlice::Icmpv4(_) | TransportSlice::Icmpv6(_)))
            ),
            "port unreachable does not parse as ICMP: {parsed:?}"
        );
    }
}
