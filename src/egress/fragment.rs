//! IP fragmentation of UDP replies larger than the device's MTU.
//!
//! A remote may answer with a datagram larger than the application's path MTU (a
//! DNS answer with a large EDNS0 buffer, a game's state dump, NFS or SNMP over UDP).
//! Through the kernel's own path it arrives as IP fragments and the application's
//! stack reassembles it. Egress does the same: it is the sending host of the reply
//! (it writes it from the remote's address), so it may fragment it, IPv4 (RFC 791)
//! and IPv6 (RFC 8200 4.5, a Fragment header) alike. Every fragment's data is a
//! multiple of 8 bytes but the last's; the UDP checksum covers the whole datagram.
//!
//! Sans-IO: the caller passes a buffer and a function that sends one packet; the
//! datagram is never copied whole (each fragment is built from the UDP header and a
//! slice of the payload). It must not queue or retry: a fragment the device will not
//! take ends the datagram (the rest would be useless without it).

use std::net::SocketAddr;

use etherparse::{IpFragOffset, IpNumber, Ipv4Header, Ipv6FragmentHeader, Ipv6Header, UdpHeader};

/// IPv4 header without options.
const IPV4_HEADER: usize = Ipv4Header::MIN_LEN;
/// IPv6 header and the Fragment header.
const IPV6_HEADERS: usize = Ipv6Header::LEN + Ipv6FragmentHeader::LEN;
/// The largest UDP payload IPv4 can carry (total length 65,535).
pub const MAX_UDP_PAYLOAD_V4: usize = 65_535 - IPV4_HEADER - UdpHeader::LEN;
/// The largest UDP payload IPv6 can carry without a jumbogram (payload length
/// 65,535).
pub const MAX_UDP_PAYLOAD_V6: usize = 65_535 - UdpHeader::LEN;

/// Why a datagram cannot be fragmented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unfit {
    /// Source and destination are of different families.
    Families,
    /// The payload is larger than IP can carry at all.
    TooLarge,
    /// The MTU leaves no room for 8 bytes of data per fragment.
    TinyMtu,
}

/// Sends UDP datagram `from` -> `to` carrying `payload` as IP fragments of at most
/// `mtu` bytes, with identification `id` (IPv4 uses its low 16 bits), building each
/// in `buf` and handing it to `send`. Returns whether every fragment was taken: the
/// first one `send` refuses ends it. Addresses must already be canonical (an
/// IPv4-mapped IPv6 address as IPv4).
pub fn udp_fragments(
    (from, to): (SocketAddr, SocketAddr),
    payload: &[u8],
    (mtu, id): (usize, u32),
    ttl: u8,
    buf: &mut Vec<u8>,
    mut send: impl FnMut(&[u8]) -> bool,
) -> Result<bool, Unfit> {
    let total = UdpHeader::LEN + payload.len();
    match (from, to) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            if payload.len() > MAX_UDP_PAYLOAD_V4 {
                return Err(Unfit::TooLarge);
            }
            let chunk = mtu.saturating_sub(IPV4_HEADER) / 8 * 8;
            if chunk == 0 {
                return Err(Unfit::TinyMtu);
            }
            let mut ip = Ipv4Header::new(0, ttl, IpNumber::UDP, s.ip().octets(), d.ip().octets())
                .map_err(|_| Unfit::TooLarge)?;
            ip.dont_fragment = false;
            ip.identification = (id & 0xffff) as u16;
            let udp = UdpHeader::with_ipv4_checksum(s.port(), d.port(), &ip, payload)
                .map_err(|_| Unfit::TooLarge)?
                .to_bytes();
            for start in (0..total).step_by(chunk) {
                let end = (start + chunk).min(total);
                ip.total_len = (IPV4_HEADER + end - start) as u16;
                ip.more_fragments = end < total;
                ip.fragment_offset =
                    IpFragOffset::try_new((start / 8) as u16).map_err(|_| Unfit::TooLarge)?;
                ip.header_checksum = ip.calc_header_checksum();
                buf.clear();
                buf.extend_from_slice(&ip.to_bytes());
                extend_range(buf, &udp, payload, start, end);
                if !send(buf) {
                    return Ok(false);
                }
            }
            Ok(true)
        }
        (SocketAddr::V6(s), SocketAddr::V6(d)) => {
            if payload.len() > MAX_UDP_PAYLOAD_V6 {
                return Err(Unfit::TooLarge);
            }
            let chunk = mtu.saturating_sub(IPV6_HEADERS) / 8 * 8;
            if chunk == 0 {
                return Err(Unfit::TinyMtu);
            }
            let mut ip = Ipv6Header {
                traffic_class: 0,
                flow_label: Default::default(),
                payload_length: 0,
                next_header: IpNumber::IPV6_FRAGMENTATION_HEADER,
                hop_limit: ttl,
                source: s.ip().octets(),
                destination: d.ip().octets(),
            };
            let udp = UdpHeader::with_ipv6_checksum(s.port(), d.port(), &ip, payload)
                .map_err(|_| Unfit::TooLarge)?
                .to_bytes();
            for start in (0..total).step_by(chunk) {
                let end = (start + chunk).min(total);
                ip.payload_length = (Ipv6FragmentHeader::LEN + end - start) as u16;
                let offset =
                    IpFragOffset::try_new((start / 8) as u16).map_err(|_| Unfit::TooLarge)?;
                let fragment = Ipv6FragmentHeader::new(IpNumber::UDP, offset, end < total, id);
                buf.clear();
                buf.extend_from_slice(&ip.to_bytes());
                buf.extend_from_slice(&fragment.to_bytes());
                extend_range(buf, &udp, payload, start, end);
                if !send(buf) {
                    return Ok(false);
                }
            }
            Ok(true)
        }
        _ => Err(Unfit::Families),
    }
}

/// Appends bytes `start..end` of the UDP header followed by the payload.
fn extend_range(buf: &mut Vec<u8>, header: &[u8], payload: &[u8], start: usize, end: usize) {
    let split = header.len();
    if start < split {
        buf.extend_from_slice(header.get(start..end.min(split)).unwrap_or_default());
    }
    let (from, to) = (start.saturating_sub(split), end.saturating_sub(split));
    if to > from {
        buf.extend_from_slice(payload.get(from..to).unwrap_or_default());
    }
}

#[cfg(test)]
#[path = "fragment_tests.rs"]
mod tests;
