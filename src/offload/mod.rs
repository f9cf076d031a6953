//! TUN offload, sans-IO: the `virtio_net_hdr` that precedes every packet on a device
//! opened with `IFF_VNET_HDR`, the checksum arithmetic it asks for, and the TSO
//! coalescer for writes ([`Coalescer`]).
//!
//! Stage: between the device and the stack, both ways. On read, the header says
//! whether a packet's checksum is partial (`NEEDS_CSUM`: the transport checksum field
//! holds only the pseudo-header sum) or already checked by the kernel (`DATA_VALID`),
//! and whether it is a super-segment (`gso_type` TCPV4/TCPV6/UDP_L4, `gso_size` the
//! segment size) that the kernel did not cut. On write, a TCP packet goes out with
//! `NEEDS_CSUM` (the kernel completes the checksum) and, when several segments of one
//! flow were merged, as one super-segment the kernel cuts at `gso_size`.
//!
//! This module must not do I/O, allocate per packet (the coalescer reuses one
//! buffer), or panic on any input.
//!
//! ```text
//! virtio_net_hdr (10 bytes, host byte order):
//!  0        1          2-3       4-5        6-7          8-9
//! +--------+----------+---------+----------+------------+-------------+
//! | flags  | gso_type | hdr_len | gso_size | csum_start | csum_offset |
//! +--------+----------+---------+----------+------------+-------------+
//! ```

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod coalesce;

pub use coalesce::{Coalescer, partial_checksum, segmented};

use std::net::IpAddr;

/// Length of the `virtio_net_hdr` (without the `num_buffers` field of the mergeable
/// variant, which TUN does not use by default).
pub const HDR_LEN: usize = 10;

/// The largest packet one read can return on a device with offload: a 64 KiB
/// super-segment (its IPv4 total length or IPv6 payload length is 16 bits), plus
/// IPv6's fixed header.
pub const MAX_PACKET: usize = 65_535 + 40;

/// `flags`: the transport checksum is partial: complete it from `csum_start` to the
/// end and store it at `csum_start + csum_offset`.
pub const FLAG_NEEDS_CSUM: u8 = 1;
/// `flags`: the kernel has checked the checksum already.
pub const FLAG_DATA_VALID: u8 = 2;

/// `gso_type` values (the low 7 bits; bit 7 is ECN).
pub mod gso {
    /// Not a super-segment.
    pub const NONE: u8 = 0;
    /// A TCP/IPv4 super-segment.
    pub const TCPV4: u8 = 1;
    /// UFO (UDP fragmentation offload): never enabled by us.
    pub const UDP: u8 = 3;
    /// A TCP/IPv6 super-segment.
    pub const TCPV6: u8 = 4;
    /// A UDP super-packet (`UDP_SEGMENT`): datagrams of `gso_size` bytes each.
    pub const UDP_L4: u8 = 5;
    /// The ECN bit that may be or-ed into a TCP `gso_type`.
    pub const ECN: u8 = 0x80;
}

/// What a device offloads, as the stack sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    /// Every packet read and written carries a [`VnetHdr`].
    pub vnet_hdr: bool,
    /// Partial checksums both ways: TCP packets are written with `NEEDS_CSUM` and
    /// the pseudo-header sum, the kernel computes the rest.
    pub csum: bool,
    /// TCP super-segments both ways (TSO4 and TSO6).
    pub tso: bool,
    /// UDP super-packets on read (USO4 and USO6).
    pub uso: bool,
}

impl Features {
    /// No header, no offload.
    pub const NONE: Features = Features {
        vnet_hdr: false,
        csum: false,
        tso: false,
        uso: false,
    };
}

impl std::fmt::Display for Features {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.vnet_hdr {
            return f.write_str("off");
        }
        let mut names = vec![];
        if self.csum {
            names.push("csum");
        }
        if self.tso {
            names.push("tso");
        }
        if self.uso {
            names.push("uso");
        }
        if names.is_empty() {
            f.write_str("header only")
        } else {
            f.write_str(&names.join(","))
        }
    }
}

/// A `virtio_net_hdr`: the offload metadata of one packet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct VnetHdr {
    /// [`FLAG_NEEDS_CSUM`], [`FLAG_DATA_VALID`].
    pub flags: u8,
    /// One of [`gso`].
    pub gso_type: u8,
    /// Length of the headers (IP + transport); not trusted on read.
    pub hdr_len: u16,
    /// Payload bytes per segment of a super-segment.
    pub gso_size: u16,
    /// Where the checksummed part starts (the transport header).
    pub csum_start: u16,
    /// Where the checksum field lies, from `csum_start` (16 for TCP, 6 for UDP).
    pub csum_offset: u16,
}

impl VnetHdr {
    /// All zero: a whole, checksummed packet.
    pub const NONE: VnetHdr = VnetHdr {
        flags: 0,
        gso_type: 0,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
    };

    /// Reads a header (host byte order, as the kernel writes it for a TUN of the
    /// host's endianness).
    pub fn decode(bytes: &[u8; HDR_LEN]) -> VnetHdr {
        let [flags, gso_type, a, b, c, d, e, f, g, h] = *bytes;
        VnetHdr {
            flags,
            gso_type,
            hdr_len: u16::from_ne_bytes([a, b]),
            gso_size: u16::from_ne_bytes([c, d]),
            csum_start: u16::from_ne_bytes([e, f]),
            csum_offset: u16::from_ne_bytes([g, h]),
        }
    }

    /// The header's bytes.
    pub fn encode(&self) -> [u8; HDR_LEN] {
        let [a, b] = self.hdr_len.to_ne_bytes();
        let [c, d] = self.gso_size.to_ne_bytes();
        let [e, f] = self.csum_start.to_ne_bytes();
        let [g, h] = self.csum_offset.to_ne_bytes();
        [self.flags, self.gso_type, a, b, c, d, e, f, g, h]
    }

    /// The transport checksum is partial (only the pseudo-header sum is there).
    pub fn needs_csum(&self) -> bool {
        self.flags & FLAG_NEEDS_CSUM != 0
    }

    /// The transport checksum need not be checked: the kernel vouches for it, or
    /// it is partial because the packet never crossed a wire.
    pub fn checksum_trusted(&self) -> bool {
        self.flags & (FLAG_NEEDS_CSUM | FLAG_DATA_VALID) != 0
    }

    /// The `gso_type` without the ECN bit.
    pub fn gso_kind(&self) -> u8 {
        self.gso_type & !gso::ECN
    }

    /// A UDP super-packet: its payload is datagrams of `gso_size` bytes (the last
    /// may be shorter), each with the same addresses.
    pub fn udp_segment_size(&self) -> Option<usize> {
        (self.gso_kind() == gso::UDP_L4 && self.gso_size > 0).then_some(usize::from(self.gso_size))
    }
}

/// Adds `bytes` to a ones' complement sum (RFC 1071), as big-endian 16-bit words; an
/// odd last byte is padded with zero.
pub fn sum_words(mut sum: u64, bytes: &[u8]) -> u64 {
    let mut chunks = bytes.chunks_exact(2);
    for c in &mut chunks {
        if let [a, b] = c {
            sum += u64::from(u16::from_be_bytes([*a, *b]));
        }
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    sum
}

/// Folds a sum to 16 bits (end-around carry).
pub fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The loop leaves at most 16 bits.
    u16::try_from(sum).unwrap_or(u16::MAX)
}

/// The folded pseudo-header sum (not complemented) for a transport segment of `len`
/// bytes of `protocol` between `src` and `dst`: what a `NEEDS_CSUM` packet carries in
/// its checksum field. `None` for mixed families.
pub fn pseudo_header_sum(src: IpAddr, dst: IpAddr, protocol: u8, len: usize) -> Option<u16> {
    let mut sum = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => sum_words(sum_words(0, &s.octets()), &d.octets()),
        (IpAddr::V6(s), IpAddr::V6(d)) => sum_words(sum_words(0, &s.octets()), &d.octets()),
        _ => return None,
    };
    sum += u64::from(protocol) + len as u64;
    Some(fold(sum))
}

/// Why a partial checksum could not be completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    /// `csum_start + csum_offset + 2` lies beyond the packet.
    #[error("checksum field at {start}+{offset} lies beyond a {len}-byte packet")]
    ChecksumOutOfRange {
        /// `csum_start`.
        start: u16,
        /// `csum_offset`.
        offset: u16,
        /// The packet's length.
        len: usize,
    },
}

/// Where a UDP header keeps its checksum.
pub const UDP_CSUM_OFFSET: u16 = 6;

/// Completes a partial checksum as the header describes (`NEEDS_CSUM`): the ones'
/// complement of the sum from `csum_start` to the end (the field holds the
/// pseudo-header sum already) goes into the field. Does nothing without the flag.
pub fn complete_checksum(hdr: &VnetHdr, packet: &mut [u8]) -> Result<(), OffloadError> {
    if !hdr.needs_csum() {
        return Ok(());
    }
    let start = usize::from(hdr.csum_start);
    let at = start + usize::from(hdr.csum_offset);
    let out_of_range = OffloadError::ChecksumOutOfRange {
        start: hdr.csum_start,
        offset: hdr.csum_offset,
        len: packet.len(),
    };
    if at + 2 > packet.len() {
        return Err(out_of_range);
    }
    let sum = !fold(sum_words(0, packet.get(start..).unwrap_or_default()));
    // RFC 768: a UDP checksum (field at offset 6) of zero is sent as all ones. TCP
    // keeps zero, as the kernel's own completion does (both verify; bytes differ).
    let sum = if sum == 0 && hdr.csum_offset == UDP_CSUM_OFFSET {
        0xffff
    } else {
        sum
    };
    let field = packet.get_mut(at..at + 2).ok_or(out_of_range)?;
    field.copy_from_slice(&sum.to_be_bytes());
    Ok(())
}

/// The datagrams of a UDP super-packet's `payload`, `size` bytes each (the last may
/// be shorter). A zero size yields the payload whole; an empty payload, nothing.
pub fn udp_segments(payload: &[u8], size: usize) -> std::slice::Chunks<'_, u8> {
    let size = if size == 0 { payload.len() } else { size };
    payload.chunks(size.max(1))
}

#[cfg(test)]
mod tests;
