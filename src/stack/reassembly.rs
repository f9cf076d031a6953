//! Reassembly of IP fragments from the applications.
//!
//! Stage: inside the stack's ingress, before classification; sans-IO (time is passed
//! in). An application that sends a UDP datagram larger than the device's MTU (a
//! 4 KiB DNS query with EDNS0, a large game or media datagram) has its kernel cut it
//! into IP fragments, as it would for any router on the way. The tunnel is where
//! the datagram ends on this side, so it reassembles it (RFC 791, RFC 8200 4.5) and
//! handles the whole datagram as if it had come in one piece.
//!
//! Bounded, since fragments are also an old way to exhaust a host's memory: at most
//! [`MAX_PARTIALS`] datagrams and [`MAX_BYTES`] bytes are held at once, a datagram
//! whose fragments have not all come within [`TIMEOUT`] is discarded (Linux's
//! `ipfrag_time`), and fragments that overlap a different part already received
//! discard their datagram (RFC 5722; an exact duplicate is ignored). A datagram may
//! not exceed 65,535 bytes of IP packet. Every discarded fragment is reported to the
//! caller, which counts it.
//!
//! The rebuilt packet carries the addresses, the transport protocol and the hop
//! limit of the fragments; IPv4 options and IPv6 extension headers before the
//! Fragment header are not kept (the stack reads neither).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use etherparse::{
    IpNumber, Ipv4Header, Ipv4Slice, Ipv6ExtensionSlice, Ipv6FlowLabel, Ipv6Header, Ipv6Slice,
};

/// Datagrams being reassembled at once.
pub const MAX_PARTIALS: usize = 64;
/// Bytes held by datagrams being reassembled, in all.
pub const MAX_BYTES: usize = 4 << 20;
/// How long a datagram may take to arrive whole.
pub const TIMEOUT: Duration = Duration::from_secs(30);
/// The largest IP packet.
const MAX_PACKET: usize = 65_535;

/// Why fragments were discarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discard {
    /// Not a fragment that can be read (truncated headers, a middle fragment whose
    /// length is not a multiple of 8).
    Malformed,
    /// The datagram would exceed 65,535 bytes, or fragments disagree on its end.
    Oversized,
    /// It overlaps a different part of its datagram already received; the datagram
    /// is discarded with it.
    Overlap,
    /// Too many datagrams or bytes are being reassembled already.
    Full,
    /// An exact copy of a fragment received already (dropped, nothing else changes).
    Duplicate,
}

/// What adding one fragment did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Added {
    /// The datagram it completed, rebuilt as one unfragmented IP packet.
    pub whole: Option<Vec<u8>>,
    /// Fragments dropped by this call: this one if refused, and the ones held for a
    /// datagram it discarded.
    pub dropped: usize,
    /// Why.
    pub reason: Option<Discard>,
}

/// Which datagram a fragment belongs to (RFC 791: addresses, protocol and
/// identification; RFC 8200: addresses and identification).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    id: u32,
}

/// One datagram being reassembled.
#[derive(Debug)]
struct Partial {
    /// The payload so far, at its offsets (gaps are zero until filled).
    data: Vec<u8>,
    /// Received byte ranges, sorted, not overlapping.
    ranges: Vec<(usize, usize)>,
    /// The payload's length, once the last fragment came.
    end: Option<usize>,
    /// Hop limit (TTL) of the first fragment seen.
    hop_limit: u8,
    /// When the first fragment came.
    started: Instant,
    /// Fragments held.
    fragments: usize,
    /// The first fragment (offset 0) as it came, up to [`QUOTE`] bytes: what an
    /// ICMP "reassembly time exceeded" quotes, sent only when it came (and its source
    /// may get an error: [`deserves_error`]).
    first: Option<Vec<u8>>,
}

/// How much of the first fragment an ICMP error quotes: what fits in the IPv6
/// minimum MTU (an IPv4 error is cut shorter by egress).
const QUOTE: usize = 1280 - 40 - 8;

/// A datagram that did not arrive whole in time.
#[derive(Debug, PartialEq, Eq)]
pub struct Expired {
    /// Fragments it held (counted as dropped).
    pub fragments: usize,
    /// Its first fragment, if that came and its source may be told (the start of
    /// it): the source is told with an ICMP Time Exceeded, code 1 (RFC 792, RFC 1122
    /// 3.3.2, RFC 8200 4.5).
    pub first: Option<Vec<u8>>,
}

/// One fragment, read.
struct Fragment<'a> {
    key: Key,
    offset: usize,
    more: bool,
    hop_limit: u8,
    data: &'a [u8],
}

/// The datagrams being reassembled.
#[derive(Debug, Default)]
pub struct Reassembly {
    partials: HashMap<Key, Partial>,
    bytes: usize,
}

impl Reassembly {
    /// Adds fragment `packet` (a whole IP packet) at `now`. Datagrams that have
    /// waited longer than [`TIMEOUT`] are discarded by [`Reassembly::expire`], which
    /// the caller runs when [`Reassembly::next_expiry`] comes.
    pub fn add(&mut self, packet: &[u8], now: Instant) -> Added {
        let mut added = Added::default();
        match self.insert(packet, now) {
            Ok(whole) => added.whole = whole,
            Err((reason, held)) => {
                added.dropped += 1 + held;
                added.reason = Some(reason);
            }
        }
        added
    }

    /// Fragments held now (for datagrams not yet whole).
    pub fn held(&self) -> usize {
        self.partials.values().map(|p| p.fragments).sum()
    }

    /// Datagrams being reassembled now.
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.partials.len()
    }

    /// Adds one fragment; an error says why it was refused and how many fragments
    /// held for its datagram were discarded with it.
    fn insert(&mut self, packet: &[u8], now: Instant) -> Result<Option<Vec<u8>>, (Discard, usize)> {
        let f = read(packet).ok_or((Discard::Malformed, 0))?;
        let end = f.offset.saturating_add(f.data.len());
        // Not a fragment at all (the classifier never sends one: an IPv6 "atomic
        // fragment", RFC 6946, is handled as the whole packet it is), or a fragment
        // before the last whose data is not a multiple of 8.
        if (f.offset == 0 && !f.more) || (f.more && f.data.len() % 8 != 0) {
            return Err((Discard::Malformed, 0));
        }
        let header = match f.key.src {
            IpAddr::V4(_) => Ipv4Header::MIN_LEN,
            IpAddr::V6(_) => Ipv6Header::LEN,
        };
        if end.saturating_add(header) > MAX_PACKET {
            let held = self.remove(&f.key).map_or(0, |p| p.fragments);
            return Err((Discard::Oversized, held));
        }
        if !self.partials.contains_key(&f.key) {
            if self.partials.len() >= MAX_PARTIALS || self.bytes.saturating_add(end) > MAX_BYTES {
                return Err((Discard::Full, 0));
            }
            self.partials.insert(
                f.key,
                Partial {
                    data: Vec::new(),
                    ranges: Vec::new(),
                    end: None,
                    hop_limit: f.hop_limit,
                    started: now,
                    fragments: 0,
                    first: None,
                },
            );
        }
        let grow = end.saturating_sub(self.partials.get(&f.key).map_or(0, |p| p.data.len()));
        if self.bytes.saturating_add(grow) > MAX_BYTES {
            let held = self.remove(&f.key).map_or(0, |p| p.fragments);
            return Err((Discard::Full, held));
        }
        let Some(partial) = self.partials.get_mut(&f.key) else {
            return Err((Discard::Full, 0));
        };
        let before = partial.data.len();
        let verdict = partial.add(f.offset, f.data, f.more);
        // What it holds now, not `grow` (an empty last fragment grows nothing).
        let grown = partial.data.len().saturating_sub(before);
        match verdict {
            Ok(Some(whole)) => {
                partial.fragments += 1;
                if f.offset == 0 && deserves_error(&f) {
                    partial.first = Some(packet.get(..QUOTE).unwrap_or(packet).to_vec());
                }
                self.bytes = self.bytes.saturating_add(grown);
                if !whole {
                    return Ok(None);
                }
                Ok(self.remove(&f.key).map(|p| rebuild(&f.key, &p)))
            }
            // An exact copy: dropped, the datagram goes on.
            Ok(None) => Err((Discard::Duplicate, 0)),
            Err(discard) => {
                // `add` refused before growing anything.
                let held = self.remove(&f.key).map_or(0, |p| p.fragments);
                Err((discard, held))
            }
        }
    }

    fn remove(&mut self, key: &Key) -> Option<Partial> {
        let partial = self.partials.remove(key)?;
        self.bytes = self.bytes.saturating_sub(partial.data.len());
        Some(partial)
    }

    /// When the oldest datagram being reassembled expires, if any.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.partials.values().map(|p| p.started + TIMEOUT).min()
    }

    /// Discards the datagrams that have waited [`TIMEOUT`] or longer at `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<Expired> {
        let mut expired = Vec::new();
        let mut freed = 0;
        self.partials.retain(|_, p| {
            let keep = now.saturating_duration_since(p.started) < TIMEOUT;
            if !keep {
                freed += p.data.len();
                expired.push(Expired {
                    fragments: p.fragments,
                    first: p.first.take(),
                });
            }
            keep
        });
        self.bytes = self.bytes.saturating_sub(freed);
        expired
    }
}

impl Partial {
    /// Adds `data` at `offset`: `Ok(Some(true))` once the datagram is whole,
    /// `Ok(None)` for an exact copy of bytes already received.
    fn add(&mut self, offset: usize, data: &[u8], more: bool) -> Result<Option<bool>, Discard> {
        let end = offset + data.len();
        match self.end {
            Some(known) if end > known || (!more && end != known) => {
                return Err(Discard::Oversized);
            }
            None if !more => {
                if self.ranges.last().is_some_and(|&(_, e)| e > end) {
                    return Err(Discard::Oversized);
                }
                self.end = Some(end);
            }
            _ => {}
        }
        if data.is_empty() {
            return Ok(Some(self.whole()));
        }
        // The first received range that ends after this fragment starts.
        let at = self.ranges.partition_point(|&(_, e)| e <= offset);
        if let Some(&(s, e)) = self.ranges.get(at) {
            if s < end {
                // Bytes received already: a duplicate of them is ignored, anything
                // else discards the datagram.
                let duplicate = s <= offset && end <= e && self.data.get(offset..end) == Some(data);
                return if duplicate {
                    Ok(None)
                } else {
                    Err(Discard::Overlap)
                };
            }
        }
        if self.data.len() < end {
            self.data.resize(end, 0);
        }
        if let Some(slot) = self.data.get_mut(offset..end) {
            slot.copy_from_slice(data);
        }
        self.ranges.insert(at, (offset, end));
        // Merge ranges that touch.
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(self.ranges.len());
        for &(s, e) in &self.ranges {
            match merged.last_mut() {
                Some((_, last_end)) if *last_end == s => *last_end = e,
                _ => merged.push((s, e)),
            }
        }
        self.ranges = merged;
        Ok(Some(self.whole()))
    }

    /// Whether every byte up to the known end has come.
    fn whole(&self) -> bool {
        match self.end {
            Some(0) => true,
            Some(end) => self.ranges == [(0, end)],
            None => false,
        }
    }
}

/// Reads a fragment's identity, offset and data; `None` if it is not one or cannot
/// be read.
fn read(packet: &[u8]) -> Option<Fragment<'_>> {
    match packet.first()? >> 4 {
        4 => {
            let ip = Ipv4Slice::from_slice(packet).ok()?;
            let h = ip.header();
            Some(Fragment {
                key: Key {
                    src: IpAddr::V4(h.source_addr()),
                    dst: IpAddr::V4(h.destination_addr()),
                    protocol: h.protocol().0,
                    id: u32::from(h.identification()),
                },
                offset: usize::from(h.fragments_offset().byte_offset()),
                more: h.more_fragments(),
                hop_limit: h.ttl(),
                data: ip.payload().payload,
            })
        }
        6 => {
            let ip = Ipv6Slice::from_slice(packet).ok()?;
            let fragment = ip
                .extensions()
                .clone()
                .into_iter()
                .find_map(|ext| match ext {
                    Ipv6ExtensionSlice::Fragment(f) => Some(f.to_header()),
                    _ => None,
                })?;
            let h = ip.header();
            Some(Fragment {
                key: Key {
                    src: IpAddr::V6(h.source_addr()),
                    dst: IpAddr::V6(h.destination_addr()),
                    protocol: fragment.next_header.0,
                    id: fragment.identification,
                },
                offset: usize::from(fragment.fragment_offset.byte_offset()),
                more: fragment.more_fragments,
                hop_limit: h.hop_limit(),
                data: ip.payload().payload,
            })
        }
        _ => None,
    }
}

/// Whether the source of a datagram whose first fragment is `f` gets an ICMP error
/// about it: only a unicast source (not unspecified, multicast, or IPv4
/// broadcast), never about a packet to a multicast group, and never about an ICMP
/// error message itself (RFC 1122 3.2.2, RFC 4443 2.4 (e)).
fn deserves_error(f: &Fragment<'_>) -> bool {
    let (src, dst) = (f.key.src, f.key.dst);
    if src.is_unspecified()
        || src.is_multicast()
        || dst.is_multicast()
        || src == IpAddr::from([255, 255, 255, 255])
        || dst == IpAddr::from([255, 255, 255, 255])
    {
        return false;
    }
    // The upper-layer header starts the first fragment's data (for IPv6, when no
    // extension header follows the Fragment header).
    let kind = f.data.first().copied();
    match (src, f.key.protocol) {
        // ICMP errors: destination unreachable, source quench, redirect, time
        // exceeded, parameter problem.
        (IpAddr::V4(_), 1) => !matches!(kind, Some(3 | 4 | 5 | 11 | 12)),
        // ICMPv6 errors have types below 128.
        (IpAddr::V6(_), 58) => kind.is_some_and(|k| k >= 128),
        _ => true,
    }
}

/// The whole datagram as one unfragmented IP packet.
fn rebuild(key: &Key, partial: &Partial) -> Vec<u8> {
    let payload = &partial.data;
    let mut packet = Vec::with_capacity(payload.len() + Ipv6Header::LEN);
    match (key.src, key.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let Ok(mut h) = Ipv4Header::new(
                payload.len() as u16,
                partial.hop_limit,
                IpNumber(key.protocol),
                s.octets(),
                d.octets(),
            ) else {
                return Vec::new();
            };
            h.dont_fragment = false;
            h.identification = (key.id & 0xffff) as u16;
            h.header_checksum = h.calc_header_checksum();
            packet.extend_from_slice(&h.to_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let h = Ipv6Header {
                traffic_class: 0,
                flow_label: Ipv6FlowLabel::ZERO,
                payload_length: payload.len() as u16,
                next_header: IpNumber(key.protocol),
                hop_limit: partial.hop_limit,
                source: s.octets(),
                destination: d.octets(),
            };
            packet.extend_from_slice(&h.to_bytes());
        }
        _ => return Vec::new(),
    }
    packet.extend_from_slice(payload);
    packet
}

#[cfg(test)]
#[path = "reassembly_tests.rs"]
mod tests;
