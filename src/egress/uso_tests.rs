//! UDP super-packets: how a burst of replies is grouped and built.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use super::*;
use crate::offload::{FLAG_NEEDS_CSUM, gso, pseudo_header_sum};
use etherparse::Ipv4Header;
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use std::sync::atomic::AtomicUsize;

/// A device that takes super-packets (or refuses them with `refuse`).
#[derive(Default)]
struct UsoCapture {
    packets: Mutex<Vec<(VnetHdr, Vec<u8>)>>,
    refuse: Option<io::ErrorKind>,
    offered: AtomicUsize,
}

impl PacketSink for UsoCapture {
    fn send_packet(&self, packet: &[u8]) -> io::Result<()> {
        self.packets
            .lock()
            .unwrap()
            .push((VnetHdr::NONE, packet.to_vec()));
        Ok(())
    }
    fn max_packet(&self) -> usize {
        1500
    }
    fn udp_offload(&self) -> bool {
        true
    }
    fn send_offload(&self, hdr: &VnetHdr, packet: &[u8]) -> io::Result<()> {
        self.offered.fetch_add(1, Relaxed);
        if let Some(kind) = self.refuse {
            return Err(kind.into());
        }
        self.packets.lock().unwrap().push((*hdr, packet.to_vec()));
        Ok(())
    }
}

fn packets(c: &UsoCapture) -> Vec<(VnetHdr, Vec<u8>)> {
    c.packets.lock().unwrap().clone()
}

const APP: &str = "198.18.0.1:5000";
const REMOTE: &str = "198.19.2.2:7";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Cuts a super-packet as the kernel does: each datagram with its own lengths and
/// a full checksum; checks the result against etherparse.
fn segment(hdr: &VnetHdr, packet: &[u8]) -> Vec<Vec<u8>> {
    let s = SlicedPacket::from_ip(packet).unwrap();
    let Some(TransportSlice::Udp(udp)) = s.transport else {
        panic!("not UDP")
    };
    let (src, dst) = match &s.net {
        Some(NetSlice::Ipv4(ip)) => (
            IpAddr::from(ip.header().source_addr()),
            IpAddr::from(ip.header().destination_addr()),
        ),
        Some(NetSlice::Ipv6(ip)) => (
            IpAddr::from(ip.header().source_addr()),
            IpAddr::from(ip.header().destination_addr()),
        ),
        _ => panic!(),
    };
    // The checksum field holds the pseudo-header sum for the whole length.
    assert_eq!(
        udp.checksum(),
        pseudo_header_sum(src, dst, 17, usize::from(udp.length())).unwrap()
    );
    assert_eq!(usize::from(udp.length()), 8 + udp.payload().len());
    let (sp, dp) = (udp.source_port(), udp.destination_port());
    udp.payload()
        .chunks(usize::from(hdr.gso_size))
        .map(|chunk| {
            let mut out = Vec::new();
            let b = match (src, dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), TTL),
                (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), TTL),
                _ => panic!(),
            };
            b.udp(sp, dp).write(&mut out, chunk).unwrap();
            out
        })
        .collect()
}

#[test]
fn a_burst_of_equal_datagrams_is_one_super_packet() {
    let cap = Arc::new(UsoCapture::default());
    let egress = Egress::new(cap.clone());
    let mut payloads: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 100]).collect();
    payloads.push(vec![0xee; 40]);
    let batch: Vec<(SocketAddr, &[u8])> = payloads.iter().map(|p| (addr(REMOTE), &p[..])).collect();
    assert_eq!(egress.udp_batch(addr(APP), &batch), (11, 1040));
    let sent = packets(&cap);
    assert_eq!(sent.len(), 1, "one write");
    let (hdr, packet) = &sent[0];
    assert_eq!(hdr.gso_type, gso::UDP_L4);
    assert_eq!(hdr.flags, FLAG_NEEDS_CSUM);
    assert_eq!(
        (hdr.gso_size, hdr.csum_start, hdr.csum_offset),
        (100, 20, 6)
    );
    assert_eq!(hdr.hdr_len, 28);
    assert_eq!(packet.len(), 20 + 8 + 1040);
    let ip = Ipv4Header::from_slice(packet).unwrap().0;
    assert_eq!(usize::from(ip.total_len), packet.len());
    assert_eq!(ip.header_checksum, ip.calc_header_checksum());
    assert_eq!(ip.source, [198, 19, 2, 2]);
    let datagrams = segment(hdr, packet);
    assert_eq!(datagrams.len(), 11);
    for (datagram, payload) in datagrams.iter().zip(&payloads) {
        let s = SlicedPacket::from_ip(datagram).unwrap();
        let Some(TransportSlice::Udp(udp)) = s.transport else {
            panic!()
        };
        assert_eq!(udp.payload(), &payload[..]);
        assert_eq!((udp.source_port(), udp.destination_port()), (7, 5000));
    }
    assert_eq!(egress.stats().sent.load(Relaxed), 11);
}

#[test]
fn runs_end_at_a_new_source_a_new_size_and_the_segment_limit() {
    let cap = Arc::new(UsoCapture::default());
    let egress = Egress::new(cap.clone());
    let other = addr("198.19.2.3:7");
    let (a, b) = (vec![1u8; 50], vec![2u8; 60]);
    let mut batch: Vec<(SocketAddr, &[u8])> = vec![
        (addr(REMOTE), &a),
        (addr(REMOTE), &a),
        (other, &a),
        (other, &a),
        (other, &b),
        (other, &b),
        (addr(REMOTE), &a),
    ];
    batch.extend(std::iter::repeat_n((addr(REMOTE), &a[..]), 99));
    assert_eq!(egress.udp_batch(addr(APP), &batch).0, batch.len());
    let sent = packets(&cap);
    let sizes: Vec<(u8, usize)> = sent
        .iter()
        .map(|(h, p)| (h.gso_type, p.len() - 28))
        .collect();
    assert_eq!(
        sizes,
        vec![
            (gso::UDP_L4, 100),
            (gso::UDP_L4, 100),
            (gso::UDP_L4, 120),
            (gso::UDP_L4, 64 * 50),
            (gso::UDP_L4, 36 * 50),
        ]
    );
    // A datagram alone is an ordinary packet.
    assert_eq!(egress.udp_batch(addr(APP), &[(other, &b)]), (1, 60));
    assert_eq!(packets(&cap).last().unwrap().0, VnetHdr::NONE);
}

#[test]
fn ipv6_super_packets_fragments_and_unsendable_datagrams() {
    let cap = Arc::new(UsoCapture::default());
    let egress = Egress::new(cap.clone());
    let (remote, app) = (addr("[fd19:2::2]:7"), addr("[fd18::1]:5000"));
    let (p, big) = (vec![3u8; 200], vec![4u8; 1453]);
    let batch: Vec<(SocketAddr, &[u8])> = vec![(remote, &p), (remote, &p), (remote, &big)];
    // 1453 bytes do not fit a 1500-byte packet with IPv6 headers: two fragments,
    // not part of the super-packet.
    assert_eq!(egress.udp_batch(app, &batch), (3, 1853));
    assert_eq!(egress.stats().fragmented.load(Relaxed), 1);
    let sent = packets(&cap);
    assert_eq!(sent.len(), 3);
    assert!(
        sent[1..]
            .iter()
            .all(|(h, p)| *h == VnetHdr::NONE && p.len() <= 1500)
    );
    let (hdr, packet) = &sent[0];
    assert_eq!((hdr.csum_start, hdr.hdr_len, hdr.gso_size), (40, 48, 200));
    assert_eq!(segment(hdr, packet).len(), 2);
    // A source of the other family is unsendable, and never merged.
    let v4 = addr(REMOTE);
    assert_eq!(egress.udp_batch(app, &[(v4, &p), (v4, &p)]), (0, 0));
    assert_eq!(egress.stats().unsendable.load(Relaxed), 2);
}

#[test]
fn a_device_that_refuses_gets_datagrams_one_by_one_from_then_on() {
    let cap = Arc::new(UsoCapture {
        refuse: Some(io::ErrorKind::InvalidInput),
        ..UsoCapture::default()
    });
    let egress = Egress::new(cap.clone());
    let p = vec![5u8; 30];
    let batch: Vec<(SocketAddr, &[u8])> = vec![(addr(REMOTE), &p); 4];
    assert_eq!(egress.udp_batch(addr(APP), &batch), (4, 120));
    assert_eq!(egress.udp_batch(addr(APP), &batch), (4, 120));
    assert_eq!(cap.offered.load(Relaxed), 1, "asked once");
    let sent = packets(&cap);
    assert_eq!(sent.len(), 8);
    assert!(
        sent.iter()
            .all(|(h, p)| *h == VnetHdr::NONE && p.len() == 58)
    );
}

#[test]
fn a_full_device_drops_the_run_and_counts_each_datagram() {
    let cap = Arc::new(UsoCapture {
        refuse: Some(io::ErrorKind::WouldBlock),
        ..UsoCapture::default()
    });
    let egress = Egress::new(cap.clone());
    let p = vec![6u8; 30];
    let batch: Vec<(SocketAddr, &[u8])> = vec![(addr(REMOTE), &p); 5];
    assert_eq!(egress.udp_batch(addr(APP), &batch), (0, 0));
    assert_eq!(egress.stats().device_full.load(Relaxed), 5);
    // Full is not a refusal: the next burst is offered whole again.
    egress.udp_batch(addr(APP), &batch);
    assert_eq!(cap.offered.load(Relaxed), 2);
}

#[test]
fn without_offload_every_datagram_is_its_own_packet() {
    #[derive(Default)]
    struct Plain(Mutex<usize>);
    impl PacketSink for Plain {
        fn send_packet(&self, _packet: &[u8]) -> io::Result<()> {
            *self.0.lock().unwrap() += 1;
            Ok(())
        }
        fn max_packet(&self) -> usize {
            1500
        }
    }
    let sink = Arc::new(Plain::default());
    let egress = Egress::new(sink.clone());
    let p = vec![7u8; 10];
    let batch: Vec<(SocketAddr, &[u8])> = vec![(addr(REMOTE), &p); 3];
    assert_eq!(egress.udp_batch(addr(APP), &batch), (3, 30));
    assert_eq!(*sink.0.lock().unwrap(), 3);
}
