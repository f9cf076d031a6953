//! Fuzzing harnesses for the tunnel's packet input and the DNS parsers. Like
//! [`crate::socks::fuzzing`], they live in the library so that stable `cargo test`
//! replays every corpus and crash input (`tests/fuzz_corpus.rs`) without nightly;
//! the `fuzz/` targets only call them.
//!
//! Each entry point takes arbitrary bytes and returns normally on any input; a broken
//! invariant fails an `assert!`, which is the fuzzer's signal.
//!
//! Layouts:
//!
//! ```text
//! packet_ingress: | flags | one IP packet                                  |
//! packet_stack:   | flags | len (2, BE) | packet | len | packet | ...       |
//! dns_message:    | one DNS message (as the payload of a datagram to :53)  |
//! dns_frames:     | n | sizes... | a DNS-over-TCP byte stream              |
//! offload_frames: | virtio_net_hdr (10) | len (2, BE) | packet | ...        |
//! flags (packet_*): bit 0 fix the IPv4 header, TCP and UDP checksums first;
//!   packet_ingress: bits 1-2 the device MTU (1280, 1500, 9000, 65535);
//!   packet_stack:   bits 1-2 the DNS mode (udp, tcp, fake-ip, fake-ip with
//!                   --dns-server), bits 3-7 how long the stack runs after the last
//!                   packet (in scheduler yields, times 4)
//! n: data[0] % 8 chunk sizes follow (0 meaning 1); the last chunk takes the rest
//! ```
//!
//! Stage: none (beside the path); nothing here runs in the tunnel.

// A harness exists to panic when an invariant breaks.
#![allow(clippy::panic)]

pub mod dns;
pub mod offload;
pub mod packet;
pub mod seeds;
pub mod stack;

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
// `n | sizes... | input`, as in the SOCKS harnesses.
use crate::socks::fuzzing::chunk_plan;

/// IP protocol numbers.
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

/// Rewrites the IPv4 header checksum and the TCP or UDP checksum of `packet` so that
/// a mutated packet still reaches the code behind the checksum checks. Leaves
/// anything that does not parse as it is.
pub fn fix_checksums(packet: &mut [u8]) {
    let Some(plan) = ChecksumPlan::of(packet) else {
        return;
    };
    if let Some(len) = plan.ipv4_header_len {
        if let Some(field) = packet.get_mut(10..12) {
            field.copy_from_slice(&[0, 0]);
        }
        let sum = packet.get(..len).map_or(0, |h| ones_sum(0, h));
        if let Some(field) = packet.get_mut(10..12) {
            field.copy_from_slice(&fold(sum).to_be_bytes());
        }
    }
    let Some((offset, len, proto)) = plan.transport else {
        return;
    };
    let field_at = offset + if proto == PROTO_TCP { 16 } else { 6 };
    let Some(field) = packet.get_mut(field_at..field_at + 2) else {
        return;
    };
    field.copy_from_slice(&[0, 0]);
    let Some(segment) = packet.get(offset..offset + len) else {
        return;
    };
    let mut sum = ones_sum(0, &plan.pseudo);
    sum += u64::from(proto) + (len as u64 >> 16) + (len as u64 & 0xffff);
    let mut checksum = fold(ones_sum(sum, segment));
    if checksum == 0 && proto == PROTO_UDP {
        checksum = 0xffff;
    }
    if let Some(field) = packet.get_mut(field_at..field_at + 2) {
        field.copy_from_slice(&checksum.to_be_bytes());
    }
}

/// Where the checksums of a packet lie.
struct ChecksumPlan {
    /// Length of the IPv4 header (IPv6 has no header checksum).
    ipv4_header_len: Option<usize>,
    /// Source then destination address bytes.
    pseudo: Vec<u8>,
    /// TCP or UDP: offset and length of the segment, protocol number.
    transport: Option<(usize, usize, u8)>,
}

impl ChecksumPlan {
    fn of(packet: &[u8]) -> Option<Self> {
        let sliced = SlicedPacket::from_ip(packet).ok()?;
        let (ipv4_header_len, pseudo) = match &sliced.net {
            Some(NetSlice::Ipv4(ip)) => {
                let h = ip.header();
                let pseudo = [h.source(), h.destination()].concat();
                (Some(usize::from(h.ihl()) * 4), pseudo)
            }
            Some(NetSlice::Ipv6(ip)) => {
                let h = ip.header();
                (None, [h.source(), h.destination()].concat())
            }
            _ => return None,
        };
        let offset = |s: &[u8]| (s.as_ptr() as usize).saturating_sub(packet.as_ptr() as usize);
        let transport = match &sliced.transport {
            Some(TransportSlice::Tcp(tcp)) => {
                Some((offset(tcp.slice()), tcp.slice().len(), PROTO_TCP))
            }
            Some(TransportSlice::Udp(udp)) => {
                Some((offset(udp.slice()), udp.slice().len(), PROTO_UDP))
            }
            _ => None,
        };
        Some(ChecksumPlan {
            ipv4_header_len,
            pseudo,
            transport,
        })
    }
}

/// Adds `bytes` as big-endian 16-bit words (the last odd byte padded) to `sum`.
fn ones_sum(mut sum: u64, bytes: &[u8]) -> u64 {
    let mut words = bytes.chunks_exact(2);
    for w in &mut words {
        if let [a, b] = w {
            sum += u64::from(u16::from_be_bytes([*a, *b]));
        }
    }
    if let [last] = words.remainder() {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    sum
}

/// The ones' complement of the folded sum: the checksum to write.
fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// `input` cut into pieces of `sizes` (cycled), the last one taking what is left.
fn chunks<'a>(input: &'a [u8], sizes: &[usize]) -> Vec<&'a [u8]> {
    if sizes.is_empty() {
        return vec![input];
    }
    let mut out = Vec::new();
    let mut rest = input;
    for size in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (piece, tail) = rest.split_at((*size).min(rest.len()));
        out.push(piece);
        rest = tail;
    }
    out
}
