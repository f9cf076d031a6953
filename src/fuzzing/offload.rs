//! The `offload_frames` target: the `virtio_net_hdr` and what follows it, both ways.
//!
//! ```text
//! offload_frames: | virtio_net_hdr (10) | len (2, BE) | packet | len | packet | ... |
//! ```
//!
//! Read side: the header is decoded (and must encode back to the same bytes), the
//! first packet's partial checksum is completed as the header says (a completed one
//! must sum to all ones), it is classified trusting or not trusting its checksum,
//! and a UDP super-packet's payload is cut (the pieces must add up to it). Write
//! side: every packet goes through the TSO coalescer as the stack's transmit path
//! feeds it; every byte of payload it takes must come out in a super-segment of at
//! most 64 KiB whose header matches its contents.

use crate::offload::{
    Coalescer, HDR_LEN, VnetHdr, complete_checksum, fold, gso, partial_checksum, sum_words,
    udp_segments,
};
use crate::stack::classify::{Class, classify_offload};

/// The harness.
pub fn offload_frames(data: &[u8]) {
    let Some((head, rest)) = data.split_first_chunk::<HDR_LEN>() else {
        return;
    };
    let hdr = VnetHdr::decode(head);
    assert_eq!(&hdr.encode(), head, "decode then encode changed the header");
    let packets = split(rest);
    if let Some(first) = packets.first() {
        read_side(&hdr, first);
    }
    write_side(&packets);
}

/// `len | packet` records; a short last record takes what is left.
fn split(mut rest: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while let Some((len, tail)) = rest.split_first_chunk::<2>() {
        let len = usize::from(u16::from_be_bytes(*len)).min(tail.len());
        let (packet, tail) = tail.split_at(len);
        out.push(packet);
        rest = tail;
    }
    out
}

fn read_side(hdr: &VnetHdr, packet: &[u8]) {
    let mut copy = packet.to_vec();
    let start = usize::from(hdr.csum_start);
    let at = start + usize::from(hdr.csum_offset);
    // The field held the pseudo-header sum: with it, the completed segment sums to
    // all ones (when the field is word-aligned within the summed part).
    let pseudo = packet
        .get(at..at + 2)
        .and_then(|f| <[u8; 2]>::try_from(f).ok())
        .map_or(0, u16::from_be_bytes);
    if complete_checksum(hdr, &mut copy).is_ok() && hdr.needs_csum() && hdr.csum_offset % 2 == 0 {
        let sum = sum_words(u64::from(pseudo), copy.get(start..).unwrap_or_default());
        assert_eq!(fold(sum), 0xffff, "a completed checksum does not verify");
    }
    let class = classify_offload(packet, hdr.checksum_trusted());
    if let (Class::Udp { payload, .. }, Some(size)) = (class, hdr.udp_segment_size()) {
        let (offset, len) = payload;
        let payload = packet.get(offset..offset + len).unwrap_or_default();
        let mut total = 0;
        for piece in udp_segments(payload, size) {
            assert!(!piece.is_empty() && piece.len() <= size);
            total += piece.len();
        }
        assert_eq!(total, payload.len(), "the UDP pieces do not add up");
    }
}

/// Payload bytes of a TCP packet the coalescer would see (IPv4 header length from
/// IHL, IPv6 fixed header), or 0.
fn payload_len(packet: &[u8], hdr_len: usize) -> usize {
    packet.len().saturating_sub(hdr_len)
}

fn header_len(packet: &[u8]) -> usize {
    let Some(&first) = packet.first() else {
        return 0;
    };
    let ip = if first >> 4 == 6 {
        40
    } else {
        usize::from(first & 15) * 4
    };
    let tcp = packet.get(ip + 12).map_or(0, |b| usize::from(b >> 4) * 4);
    ip + tcp
}

fn write_side(packets: &[&[u8]]) {
    let mut coalescer = Coalescer::new();
    let mut held = 0usize;
    let mut written = 0usize;
    let check = |hdr: VnetHdr, out: &[u8]| {
        assert!(
            out.len() <= 65_535 + 40,
            "super-segment of {} bytes",
            out.len()
        );
        assert_eq!(usize::from(hdr.hdr_len), header_len(out), "hdr_len");
        let payload = payload_len(out, usize::from(hdr.hdr_len));
        if hdr.gso_kind() != gso::NONE {
            assert!(payload > usize::from(hdr.gso_size) && hdr.gso_size > 0);
        }
        payload
    };
    for packet in packets {
        if coalescer.append(packet) {
            held += payload_len(packet, header_len(packet));
            continue;
        }
        if let Some((hdr, out)) = coalescer.take() {
            written += check(hdr, out);
        }
        if coalescer.start(packet) {
            held += payload_len(packet, header_len(packet));
        } else {
            let mut alone = packet.to_vec();
            let _ = partial_checksum(&mut alone);
        }
    }
    if let Some((hdr, out)) = coalescer.take() {
        written += check(hdr, out);
    }
    assert_eq!(held, written, "payload taken in is not the payload written");
}

/// Seeds: real headers before real packets.
pub fn seeds() -> Vec<super::seeds::Seed> {
    use etherparse::PacketBuilder;
    let tcp = |seq: u32, psh: bool, len: usize| {
        let b = PacketBuilder::ipv4([198, 19, 2, 2], [198, 18, 0, 2], 64)
            .tcp(443, 40000, seq, 1000)
            .ack(9);
        let b = if psh { b.psh() } else { b };
        let mut out = Vec::new();
        let _ = b.write(&mut out, &vec![0x61; len]);
        out
    };
    let tcp6 = |seq: u32, len: usize| {
        let mut out = Vec::new();
        let _ = PacketBuilder::ipv6([0xfd; 16], [0x20; 16], 64)
            .tcp(443, 40000, seq, 1000)
            .ack(9)
            .write(&mut out, &vec![0x62; len]);
        out
    };
    let udp = |len: usize| {
        let mut out = Vec::new();
        let _ = PacketBuilder::ipv4([198, 18, 0, 2], [198, 19, 2, 2], 64)
            .udp(5000, 6000)
            .write(&mut out, &vec![0x63; len]);
        out
    };
    let frame = |hdr: VnetHdr, packets: &[Vec<u8>]| {
        let mut data = hdr.encode().to_vec();
        for p in packets {
            data.extend_from_slice(&u16::try_from(p.len()).unwrap_or(0).to_be_bytes());
            data.extend_from_slice(p);
        }
        data
    };
    let partial = VnetHdr {
        flags: crate::offload::FLAG_NEEDS_CSUM,
        csum_start: 20,
        csum_offset: 16,
        ..VnetHdr::NONE
    };
    let tso = VnetHdr {
        gso_type: gso::TCPV4,
        gso_size: 1000,
        hdr_len: 40,
        ..partial
    };
    let uso = VnetHdr {
        gso_type: gso::UDP_L4,
        gso_size: 1000,
        hdr_len: 28,
        csum_offset: 6,
        ..partial
    };
    let run: Vec<Vec<u8>> = (0..5).map(|i| tcp(1 + i * 1000, i == 4, 1000)).collect();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("none-empty", frame(VnetHdr::NONE, &[])),
        ("none-one", frame(VnetHdr::NONE, &[tcp(1, false, 100)])),
        ("partial-tcp", frame(partial, &[tcp(1, true, 10)])),
        ("tso-super", frame(tso, &[tcp(1, false, 4500)])),
        ("uso-super", frame(uso, &[udp(2500)])),
        ("run-of-five", frame(VnetHdr::NONE, &run)),
        (
            "gap",
            frame(
                VnetHdr::NONE,
                &[tcp(1, false, 1000), tcp(2001, false, 1000)],
            ),
        ),
        (
            "longer-second",
            frame(VnetHdr::NONE, &[tcp(1, false, 500), tcp(501, false, 1000)]),
        ),
        (
            "v6-run",
            frame(
                VnetHdr::NONE,
                &[tcp6(1, 1200), tcp6(1201, 1200), tcp6(2401, 7)],
            ),
        ),
        (
            "near-64k",
            frame(
                VnetHdr::NONE,
                &(0..50)
                    .map(|i| tcp(1 + i * 1400, false, 1400))
                    .collect::<Vec<_>>(),
            ),
        ),
        (
            "checksum-out-of-range",
            frame(
                VnetHdr {
                    csum_start: 60000,
                    ..partial
                },
                &[tcp(1, false, 1)],
            ),
        ),
    ];
    cases
        .into_iter()
        .map(|(name, data)| ("offload_frames", format!("seed-{name}"), data))
        .collect()
}
