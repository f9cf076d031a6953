use super::*;
use etherparse::PacketBuilder;
use proptest::prelude::*;

const V4_SRC: [u8; 4] = [198, 19, 2, 2];
const V4_DST: [u8; 4] = [198, 19, 1, 1];
const V6_SRC: [u8; 16] = [0xfd, 0x19, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const V6_DST: [u8; 16] = [0xfd, 0x19, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// A TCP segment as the stack emits it, with a full checksum.
fn segment(v6: bool, seq: u32, ack: u32, psh: bool, payload: &[u8]) -> Vec<u8> {
    let b = if v6 {
        PacketBuilder::ipv6(V6_SRC, V6_DST, 64).tcp(443, 40000, seq, 1000)
    } else {
        PacketBuilder::ipv4(V4_SRC, V4_DST, 64).tcp(443, 40000, seq, 1000)
    };
    let b = b.ack(ack);
    let b = if psh { b.psh() } else { b };
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

fn ip_len(packet: &[u8]) -> usize {
    if packet[0] >> 4 == 6 {
        40
    } else {
        usize::from(packet[0] & 15) * 4
    }
}

fn src_dst(packet: &[u8]) -> (IpAddr, IpAddr) {
    if packet[0] >> 4 == 6 {
        let s: [u8; 16] = packet[8..24].try_into().unwrap();
        let d: [u8; 16] = packet[24..40].try_into().unwrap();
        (s.into(), d.into())
    } else {
        let s: [u8; 4] = packet[12..16].try_into().unwrap();
        let d: [u8; 4] = packet[16..20].try_into().unwrap();
        (s.into(), d.into())
    }
}

/// What the kernel does with a super-segment it is handed: cuts it at `gso_size`
/// (sequence numbers, lengths, PSH on the last only) and completes every checksum.
fn kernel_cut(hdr: &VnetHdr, packet: &[u8]) -> Vec<Vec<u8>> {
    let head = usize::from(hdr.hdr_len);
    let ip = ip_len(packet);
    let v6 = packet[0] >> 4 == 6;
    let size = if hdr.gso_kind() == gso::NONE {
        packet.len() - head
    } else {
        usize::from(hdr.gso_size)
    };
    let seq0 = u32::from_be_bytes(packet[ip + 4..ip + 8].try_into().unwrap());
    let mut chunks: Vec<&[u8]> = packet[head..].chunks(size.max(1)).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    let last = chunks.len() - 1;
    let (src, dst) = src_dst(packet);
    chunks
        .iter()
        .enumerate()
        .map(|(i, chunk)| {
            let mut p = packet[..head].to_vec();
            p.extend_from_slice(chunk);
            let total = p.len();
            if v6 {
                p[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
            } else {
                p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
                p[10..12].copy_from_slice(&[0, 0]);
                let sum = !fold(sum_words(0, &p[..ip]));
                p[10..12].copy_from_slice(&sum.to_be_bytes());
            }
            let seq = seq0.wrapping_add((i * size) as u32);
            p[ip + 4..ip + 8].copy_from_slice(&seq.to_be_bytes());
            if i != last {
                p[ip + 13] &= !0x08;
            }
            let pseudo = pseudo_header_sum(src, dst, 6, total - ip).unwrap();
            p[ip + 16..ip + 18].copy_from_slice(&pseudo.to_be_bytes());
            let h = VnetHdr {
                flags: FLAG_NEEDS_CSUM,
                csum_start: ip as u16,
                csum_offset: 16,
                ..VnetHdr::NONE
            };
            complete_checksum(&h, &mut p).unwrap();
            p
        })
        .collect()
}

/// Feeds `packets` through a coalescer the way the device does; returns what is
/// written (header and packet).
fn coalesce(packets: &[Vec<u8>]) -> Vec<(VnetHdr, Vec<u8>)> {
    let mut c = Coalescer::new();
    let mut out = Vec::new();
    for p in packets {
        if c.append(p) {
            continue;
        }
        if let Some((h, b)) = c.take() {
            out.push((h, b.to_vec()));
        }
        if !c.start(p) {
            let mut p = p.clone();
            let h = partial_checksum(&mut p).unwrap_or_default();
            out.push((h, p));
        }
    }
    if let Some((h, b)) = c.take() {
        out.push((h, b.to_vec()));
    }
    out
}

fn stream(v6: bool, sizes: &[usize], psh_last: bool) -> Vec<Vec<u8>> {
    let mut seq = 1_000_000u32;
    let n = sizes.len();
    sizes
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            let payload: Vec<u8> = (0..len).map(|j| (j as u32 + seq) as u8).collect();
            let p = segment(v6, seq, 77, psh_last && i == n - 1, &payload);
            seq = seq.wrapping_add(len as u32);
            p
        })
        .collect()
}

#[test]
fn header_round_trips_in_host_order() {
    let hdr = VnetHdr {
        flags: FLAG_NEEDS_CSUM,
        gso_type: gso::TCPV4,
        hdr_len: 52,
        gso_size: 1448,
        csum_start: 20,
        csum_offset: 16,
    };
    let bytes = hdr.encode();
    assert_eq!(bytes[..2], [1, 1]);
    assert_eq!(bytes[2..4], 52u16.to_ne_bytes());
    assert_eq!(bytes[4..6], 1448u16.to_ne_bytes());
    assert_eq!(VnetHdr::decode(&bytes), hdr);
    assert_eq!(VnetHdr::decode(&[0; HDR_LEN]), VnetHdr::NONE);
    assert!(hdr.checksum_trusted() && hdr.needs_csum());
    let valid = VnetHdr {
        flags: FLAG_DATA_VALID,
        ..VnetHdr::NONE
    };
    assert!(valid.checksum_trusted() && !valid.needs_csum());
    assert!(!VnetHdr::NONE.checksum_trusted());
    let ecn = VnetHdr {
        gso_type: gso::TCPV6 | gso::ECN,
        ..hdr
    };
    assert_eq!(ecn.gso_kind(), gso::TCPV6);
    let uso = VnetHdr {
        gso_type: gso::UDP_L4,
        gso_size: 1200,
        ..VnetHdr::NONE
    };
    assert_eq!(uso.udp_segment_size(), Some(1200));
    assert_eq!(hdr.udp_segment_size(), None);
}

#[test]
fn a_completed_partial_checksum_is_the_full_one() {
    for v6 in [false, true] {
        let full = segment(v6, 5, 6, true, b"hello, partial checksum!");
        let mut partial = full.clone();
        let hdr = partial_checksum(&mut partial).unwrap();
        assert_ne!(partial, full, "the field holds the pseudo-header sum");
        assert_eq!(usize::from(hdr.csum_start), ip_len(&full));
        complete_checksum(&hdr, &mut partial).unwrap();
        assert_eq!(partial, full);
    }
    let hdr = VnetHdr {
        flags: FLAG_NEEDS_CSUM,
        csum_start: 30,
        csum_offset: 16,
        ..VnetHdr::NONE
    };
    assert!(matches!(
        complete_checksum(&hdr, &mut [0u8; 40]),
        Err(OffloadError::ChecksumOutOfRange { len: 40, .. })
    ));
    assert_eq!(
        pseudo_header_sum([1, 2, 3, 4].into(), V6_SRC.into(), 6, 1),
        None
    );
}

#[test]
fn udp_super_payloads_split_at_the_segment_size() {
    let payload: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
    let parts: Vec<usize> = udp_segments(&payload, 1000).map(<[u8]>::len).collect();
    assert_eq!(parts, [1000, 1000, 500]);
    assert_eq!(udp_segments(&payload, 0).count(), 1);
    assert_eq!(udp_segments(&[], 1000).count(), 0);
}

#[test]
fn a_run_of_segments_becomes_one_super_segment_the_kernel_cuts_back() {
    for v6 in [false, true] {
        let packets = stream(v6, &[1460, 1460, 1460, 1460, 700], true);
        let out = coalesce(&packets);
        assert_eq!(
            out.len(),
            1,
            "{:?}",
            out.iter().map(|o| o.0).collect::<Vec<_>>()
        );
        let (hdr, sup) = &out[0];
        assert_eq!(hdr.gso_kind(), if v6 { gso::TCPV6 } else { gso::TCPV4 });
        assert_eq!(hdr.gso_size, 1460);
        assert!(hdr.needs_csum());
        assert_eq!(sup.len(), ip_len(sup) + 20 + 4 * 1460 + 700);
        assert_eq!(kernel_cut(hdr, sup), packets);
    }
}

#[test]
fn what_must_not_merge_goes_out_alone() {
    let base = stream(false, &[1000, 1000], false);
    // A gap in the sequence numbers.
    let mut gap = base.clone();
    gap[1] = segment(false, 1_000_000 + 1001, 77, false, &[1; 1000]);
    // Another ACK number.
    let mut ack = base.clone();
    ack[1] = segment(false, 1_000_000 + 1000, 78, false, &[1; 1000]);
    // A longer second segment.
    let mut longer = base.clone();
    longer[1] = segment(false, 1_000_000 + 1000, 77, false, &[1; 1001]);
    // Anything after a PSH.
    let mut after_psh = base.clone();
    after_psh[0] = segment(false, 1_000_000, 77, true, &[1; 1000]);
    // A pure ACK.
    let mut pure = base.clone();
    pure.insert(1, segment(false, 1_000_000 + 1000, 77, false, &[]));
    for (name, packets) in [
        ("gap", gap),
        ("ack", ack),
        ("longer", longer),
        ("after psh", after_psh),
        ("pure ack", pure),
    ] {
        let out = coalesce(&packets);
        assert_eq!(out.len(), packets.len(), "{name}");
        for ((hdr, p), original) in out.iter().zip(&packets) {
            assert_eq!(hdr.gso_kind(), gso::NONE, "{name}");
            assert_eq!(kernel_cut(hdr, p), std::slice::from_ref(original), "{name}");
        }
    }
}

#[test]
fn a_super_segment_stops_at_64_kib() {
    let packets = stream(false, &[1460; 60], false);
    let out = coalesce(&packets);
    assert_eq!(out.len(), 2);
    assert!(out.iter().all(|(_, p)| p.len() <= 65_535));
    assert_eq!(out[0].0.gso_size, 1460);
    let cut: Vec<Vec<u8>> = out.iter().flat_map(|(h, p)| kernel_cut(h, p)).collect();
    assert_eq!(cut, packets);
}

proptest! {
    #[test]
    fn coalescing_then_cutting_gives_back_the_segments(
        v6 in any::<bool>(),
        mss in 1usize..3000,
        runs in proptest::collection::vec((1usize..50, 0usize..3000, any::<bool>()), 1..6),
    ) {
        // Several runs: full segments, then a shorter (or equal) last one.
        let mut sizes = Vec::new();
        for (full, last, _) in &runs {
            sizes.extend(std::iter::repeat_n(mss, *full));
            sizes.push((*last).clamp(1, mss));
        }
        let packets = stream(v6, &sizes, runs[0].2);
        let out = coalesce(&packets);
        prop_assert!(out.len() <= packets.len());
        let cut: Vec<Vec<u8>> = out.iter().flat_map(|(h, p)| kernel_cut(h, p)).collect();
        prop_assert_eq!(cut, packets);
    }

    #[test]
    fn any_bytes_are_refused_or_handled_without_panic(
        a in proptest::collection::vec(any::<u8>(), 0..200),
        b in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut c = Coalescer::new();
        let _ = c.start(&a);
        let _ = c.append(&b);
        let _ = c.take();
        let mut a = a;
        let _ = partial_checksum(&mut a);
        let hdr = VnetHdr::decode(&[1, 0, 0, 0, 0, 0, 10, 0, 6, 0]);
        let _ = complete_checksum(&hdr, &mut a);
    }
}

/// The case CI's proptest found: a segment whose TCP checksum is zero. The kernel's
/// completion keeps zero for TCP; only UDP sends zero as all ones.
#[test]
fn a_tcp_checksum_of_zero_stays_zero_through_coalescing() {
    let mss = 1417;
    let mut sizes = Vec::new();
    for (full, last) in [(20usize, 745usize), (36, 1417)] {
        sizes.extend(std::iter::repeat_n(mss, full));
        sizes.push(last.clamp(1, mss));
    }
    let packets = stream(true, &sizes, false);
    // The 58th segment is the one whose checksum is zero.
    assert_eq!(&packets[57][56..58], &[0, 0]);
    let out = coalesce(&packets);
    let cut: Vec<Vec<u8>> = out.iter().flat_map(|(h, p)| kernel_cut(h, p)).collect();
    assert_eq!(cut.len(), packets.len());
    for (i, (a, b)) in cut.iter().zip(&packets).enumerate() {
        assert!(a == b, "segment {i} differs");
    }
}

#[test]
fn a_udp_checksum_of_zero_is_sent_as_all_ones() {
    let udp = |word: u16| {
        let mut out = Vec::new();
        PacketBuilder::ipv4(V4_SRC, V4_DST, 64)
            .udp(5353, 53)
            .write(&mut out, &word.to_be_bytes())
            .unwrap();
        out
    };
    let hdr = |p: &mut Vec<u8>| {
        let (src, dst) = src_dst(p);
        let pseudo = pseudo_header_sum(src, dst, 17, p.len() - 20).unwrap();
        p[26..28].copy_from_slice(&pseudo.to_be_bytes());
        VnetHdr {
            flags: FLAG_NEEDS_CSUM,
            csum_start: 20,
            csum_offset: 6,
            ..VnetHdr::NONE
        }
    };
    let mut p = udp(0);
    let h = hdr(&mut p);
    complete_checksum(&h, &mut p).unwrap();
    let c = u16::from_be_bytes([p[26], p[27]]);
    // A payload word equal to that checksum makes the sum all ones: checksum zero.
    let mut p = udp(c);
    let h = hdr(&mut p);
    complete_checksum(&h, &mut p).unwrap();
    assert_eq!(&p[26..28], &[0xff, 0xff]);
}

#[test]
fn a_large_segment_of_the_stack_is_cut_by_the_kernel_into_mss_segments() {
    for v6 in [false, true] {
        // What smoltcp builds with segmentation offload: one segment of 40,000 bytes
        // (PSH on it), full checksums not computed; the kernel's cut must give back
        // the segments an MSS-bound stack would have sent.
        let payload: Vec<u8> = (0..40_000u32).map(|i| (i * 13 + i / 977) as u8).collect();
        let mut big = segment(v6, 5_000, 77, true, &payload);
        let hdr = segmented(&mut big, 1448).expect("an ACK|PSH segment with data");
        assert_eq!(hdr.gso_kind(), if v6 { gso::TCPV6 } else { gso::TCPV4 });
        assert_eq!(hdr.gso_size, 1448);
        assert!(hdr.needs_csum());
        assert_eq!(usize::from(hdr.csum_start), ip_len(&big));
        assert_eq!(usize::from(hdr.hdr_len), ip_len(&big) + 20);
        let sizes: Vec<usize> = payload.chunks(1448).map(<[u8]>::len).collect();
        let first_seq = 5_000u32;
        let cut = kernel_cut(&hdr, &big);
        assert_eq!(cut.len(), sizes.len());
        for (i, (got, chunk)) in cut.iter().zip(payload.chunks(1448)).enumerate() {
            let ip = ip_len(got);
            let seq = u32::from_be_bytes(got[ip + 4..ip + 8].try_into().unwrap());
            assert_eq!(seq, first_seq + (i * 1448) as u32);
            assert_eq!(&got[ip + 20..], chunk);
            let psh = got[ip + 13] & 0x08 != 0;
            assert_eq!(psh, i == sizes.len() - 1, "PSH on the last only");
            let want = segment(v6, seq, 77, psh, chunk);
            assert_eq!(got, &want, "segment {i} as a plain stack would send it");
        }
    }
}

#[test]
fn a_segment_within_one_mss_or_with_other_flags_is_not_segmented() {
    // Small: partial checksum only.
    let mut small = segment(false, 1, 2, false, &[7u8; 1000]);
    let hdr = segmented(&mut small, 1448).unwrap();
    assert_eq!(hdr.gso_kind(), gso::NONE);
    assert!(hdr.needs_csum());
    // A large SYN (never built by the stack) is refused, unchanged.
    let mut syn = PacketBuilder::ipv4(V4_SRC, V4_DST, 64)
        .tcp(443, 40000, 1, 1000)
        .syn();
    let mut out = Vec::new();
    syn = syn.ack(2);
    syn.write(&mut out, &[1u8; 3000]).unwrap();
    let before = out.clone();
    assert!(segmented(&mut out, 1448).is_none());
    assert_eq!(out, before);
    // FIN rides on the last segment: accepted.
    let mut fin = Vec::new();
    PacketBuilder::ipv4(V4_SRC, V4_DST, 64)
        .tcp(443, 40000, 1, 1000)
        .ack(2)
        .fin()
        .write(&mut fin, &[1u8; 3000])
        .unwrap();
    assert_eq!(segmented(&mut fin, 1448).unwrap().gso_kind(), gso::TCPV4);
    // Not TCP at all.
    assert!(segmented(&mut [0x45u8, 0, 0], 1448).is_none());
}
