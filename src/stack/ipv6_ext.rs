//! IPv6 extension headers (RFC 8200 section 4), checked before a packet is
//! classified, and taken out of a TCP segment's packet before smoltcp sees it.
//!
//! smoltcp understands a Hop-by-Hop header and nothing else between the IPv6 header
//! and TCP: a segment behind a Destination Options header (an application that sets
//! `IPV6_DSTOPTS` on its socket, say) was answered with "unrecognized next header"
//! and the connection failed. The tunnel ends every packet that reaches it, so it
//! processes the chain as a destination does:
//! - Hop-by-Hop (first only) and Destination Options: each option's type says what
//!   to do when the option is unknown (its two high bits: skip it; discard the
//!   packet; discard and send an ICMPv6 Parameter Problem, code 2, pointing at the
//!   option; the same unless the destination is multicast). Pad1 and PadN are the
//!   only options known.
//! - Routing: with no segments left it is skipped; with segments left the packet
//!   would have to be forwarded to an address in the header, which a tunnel end does
//!   not do: discarded with a Parameter Problem, code 0, pointing at its type (as for
//!   a routing type not recognised).
//! - Fragment (an atomic one, RFC 6946; real fragments go to reassembly first) and
//!   Authentication: skipped.
//! - A Hop-by-Hop header anywhere but first: Parameter Problem, code 1 (unrecognised
//!   next header), pointing at the next-header field that names it.
//!
//! No error is sent about an ICMPv6 error message (RFC 4443 2.4 (e)), to a source
//! that is not one node's address, or about a packet to a multicast group; those
//! packets are discarded silently.
//!
//! Sans-IO; never panics on any input.

use std::net::Ipv6Addr;

/// The fixed IPv6 header's length.
pub const FIXED: usize = 40;

const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const AUTHENTICATION: u8 = 51;
const DESTINATION_OPTIONS: u8 = 60;
const ICMPV6: u8 = 58;
const TCP: u8 = 6;

/// An ICMPv6 Parameter Problem to send about a packet (RFC 4443 3.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamProblem {
    /// 0: erroneous header field; 1: unrecognized next header; 2: unrecognized
    /// option.
    pub code: u8,
    /// Offset in the offending packet of the octet where the problem was found.
    pub pointer: u32,
}

/// What the extension headers say about a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chain {
    /// Go on: the upper-layer header (`protocol`) starts at `offset`.
    Upper {
        /// The upper-layer protocol number (6 TCP, 17 UDP, 58 ICMPv6, ...).
        protocol: u8,
        /// Where its header starts in the packet.
        offset: usize,
    },
    /// Discard the packet; `Some`: and send this error to its source.
    Discard(Option<ParamProblem>),
    /// The chain runs past the packet's end or its lengths are wrong.
    Malformed,
}

/// Walks the extension headers of the IPv6 `packet`.
pub fn walk(packet: &[u8]) -> Chain {
    let Some(packet) = declared(packet) else {
        return Chain::Malformed;
    };
    let (Some(&first), Some(dst)) = (packet.get(6), packet.get(24..40)) else {
        return Chain::Malformed;
    };
    let multicast_dst = dst.first() == Some(&0xff);
    let mut next = first;
    // Where the field that holds `next` is: the fixed header's Next Header.
    let mut next_field = 6usize;
    let mut offset = FIXED;
    let mut problem: Option<Option<ParamProblem>> = None;
    loop {
        let len = match next {
            HOP_BY_HOP | DESTINATION_OPTIONS | ROUTING | FRAGMENT => {
                let Some(&units) = packet.get(offset + 1) else {
                    return Chain::Malformed;
                };
                if next == FRAGMENT {
                    8
                } else {
                    (usize::from(units) + 1) * 8
                }
            }
            AUTHENTICATION => {
                let Some(&units) = packet.get(offset + 1) else {
                    return Chain::Malformed;
                };
                (usize::from(units) + 2) * 4
            }
            protocol => {
                return match problem {
                    None => Chain::Upper { protocol, offset },
                    // Never an error about an error (types below 128), nor to a
                    // source that is no one node.
                    Some(Some(error)) if sends_errors(packet, protocol, offset) => {
                        Chain::Discard(Some(error))
                    }
                    Some(_) => Chain::Discard(None),
                };
            }
        };
        let Some(header) = packet.get(offset..offset + len) else {
            return Chain::Malformed;
        };
        if next == FRAGMENT && !atomic(header) {
            // What follows is a piece of a datagram: reassembly reads the rest of
            // the chain once the datagram is whole.
            return Chain::Upper {
                protocol: FRAGMENT,
                offset,
            };
        }
        if problem.is_none() {
            problem = match next {
                HOP_BY_HOP if offset != FIXED => Some(Some(ParamProblem {
                    code: 1,
                    pointer: next_field as u32,
                })),
                HOP_BY_HOP | DESTINATION_OPTIONS => options(header, offset, multicast_dst),
                ROUTING if header.get(3).is_some_and(|&left| left != 0) => {
                    Some(Some(ParamProblem {
                        code: 0,
                        pointer: (offset + 2) as u32,
                    }))
                }
                _ => None,
            };
        }
        next_field = offset;
        next = header.first().copied().unwrap_or(0);
        offset += len;
    }
}

/// The packet up to the end its payload length declares (a device may hand over
/// more); `None` when it is shorter than that.
fn declared(packet: &[u8]) -> Option<&[u8]> {
    let len = packet.get(4..6)?;
    let payload = usize::from(u16::from_be_bytes([*len.first()?, *len.get(1)?]));
    packet.get(..FIXED + payload)
}

/// Whether a Fragment header is an atomic fragment (offset 0, no more fragments:
/// RFC 6946), the whole datagram.
fn atomic(header: &[u8]) -> bool {
    // Offset (13 bits), two reserved bits (ignored), M.
    header
        .get(2..4)
        .is_some_and(|f| f.first() == Some(&0) && f.get(1).is_some_and(|low| low & !0b110 == 0))
}

/// Checks the options of a Hop-by-Hop or Destination Options `header` found at
/// `at`. `Some(error)`: the packet is to be discarded (and the error sent, if any).
fn options(header: &[u8], at: usize, multicast_dst: bool) -> Option<Option<ParamProblem>> {
    let mut i = 2;
    while let Some(&kind) = header.get(i) {
        if kind == 0 {
            // Pad1
            i += 1;
            continue;
        }
        let Some(&len) = header.get(i + 1) else {
            // An option's length runs past its header.
            return Some(Some(ParamProblem {
                code: 0,
                pointer: (at + i) as u32,
            }));
        };
        let end = i + 2 + usize::from(len);
        if end > header.len() {
            return Some(Some(ParamProblem {
                code: 0,
                pointer: (at + i + 1) as u32,
            }));
        }
        if kind != 1 {
            // Not PadN: unknown. Its two high bits say what to do.
            let error = ParamProblem {
                code: 2,
                pointer: (at + i) as u32,
            };
            match kind >> 6 {
                0 => {}
                1 => return Some(None),
                2 => return Some(Some(error)),
                _ => return Some((!multicast_dst).then_some(error)),
            }
        }
        i = end;
    }
    None
}

/// Whether an error may be sent about `packet`, whose upper layer is `protocol` at
/// `offset`: not about an ICMPv6 error message, only to a unicast source, and not
/// about a packet to a multicast group (the error's source would have to be one of
/// our unicast addresses, and the tunnel has none of its own).
fn sends_errors(packet: &[u8], protocol: u8, offset: usize) -> bool {
    let address = |range: std::ops::Range<usize>| {
        packet
            .get(range)
            .and_then(|a| <[u8; 16]>::try_from(a).ok())
            .map(Ipv6Addr::from)
    };
    let (Some(src), Some(dst)) = (address(8..24), address(24..40)) else {
        return false;
    };
    if src.is_unspecified() || src.is_multicast() || dst.is_multicast() {
        return false;
    }
    if protocol == ICMPV6 {
        // Informational messages have the high bit of their type set.
        return packet.get(offset).is_some_and(|&kind| kind >= 128);
    }
    true
}

/// Whether `packet` is IPv6 with headers between the fixed header and TCP (whose
/// protocol number its fixed header would otherwise name).
pub fn has_extensions(packet: &[u8]) -> bool {
    packet.first().is_some_and(|b| b >> 4 == 6) && packet.get(6) != Some(&TCP)
}

/// The packet as smoltcp can take it: the fixed header directly before the
/// upper-layer header at `offset`, its Next Header `protocol` and its payload
/// length fixed. Written into `out` (cleared first).
pub fn strip(packet: &[u8], protocol: u8, offset: usize, out: &mut Vec<u8>) -> bool {
    let Some(packet) = declared(packet) else {
        return false;
    };
    let (Some(fixed), Some(upper)) = (packet.get(..FIXED), packet.get(offset..)) else {
        return false;
    };
    let Ok(payload_len) = u16::try_from(upper.len()) else {
        return false;
    };
    out.clear();
    out.extend_from_slice(fixed);
    out.extend_from_slice(upper);
    if let Some(field) = out.get_mut(4..6) {
        field.copy_from_slice(&payload_len.to_be_bytes());
    }
    if let Some(field) = out.get_mut(6) {
        *field = protocol;
    }
    true
}

#[cfg(test)]
#[path = "ipv6_ext_tests.rs"]
mod tests;
