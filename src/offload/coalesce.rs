//! TSO on write: consecutive TCP segments of one flow, as the stack emits them in one
//! egress pass, merged into one super-segment that the kernel cuts back into
//! segments of the first one's size (`gso_size`).
//!
//! Merged only when the kernel's cut gives back exactly the segments we were given:
//! same addresses, ports, ACK number, window, TCP options and IP fields but the IPv4
//! id; adjacent sequence numbers; flags exactly ACK, or ACK|PSH on the last; equal
//! payload sizes but a shorter last one; at most 64 KiB in all. Every TCP packet
//! goes out with `NEEDS_CSUM` and the pseudo-header sum in its checksum field (the
//! stack computes no TCP checksum when the device offloads it).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{FLAG_NEEDS_CSUM, VnetHdr, fold, gso, pseudo_header_sum, sum_words};

/// The largest super-segment: the IPv4 total length is 16 bits.
const MAX_SUPER: usize = 65_535;
const TCP_PROTOCOL: u8 = 6;
const ACK: u8 = 0x10;
const PSH: u8 = 0x08;
const FIN: u8 = 0x01;
/// Where the TCP checksum lies in the TCP header.
const TCP_CSUM_OFFSET: u16 = 16;

/// The parts of a TCP/IP packet that coalescing looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TcpView {
    v6: bool,
    /// IP header length.
    ip_len: usize,
    /// IP plus TCP header length.
    hdr_len: usize,
    seq: u32,
    flags: u8,
    src: IpAddr,
    dst: IpAddr,
}

impl TcpView {
    /// Parses an IPv4 (any header length) or IPv6 (TCP right after the fixed
    /// header) packet carrying TCP whose IP length matches the buffer.
    fn parse(packet: &[u8]) -> Option<TcpView> {
        let first = *packet.first()?;
        let (v6, ip_len, src, dst) = match first >> 4 {
            4 => {
                let ip_len = usize::from(first & 0x0f) * 4;
                let total = u16::from_be_bytes([*packet.get(2)?, *packet.get(3)?]);
                let frag = u16::from_be_bytes([*packet.get(6)?, *packet.get(7)?]);
                let fragmented = frag & 0x3fff != 0;
                if ip_len < 20
                    || usize::from(total) != packet.len()
                    || fragmented
                    || *packet.get(9)? != TCP_PROTOCOL
                {
                    return None;
                }
                let src: [u8; 4] = packet.get(12..16)?.try_into().ok()?;
                let dst: [u8; 4] = packet.get(16..20)?.try_into().ok()?;
                (
                    false,
                    ip_len,
                    Ipv4Addr::from(src).into(),
                    Ipv4Addr::from(dst).into(),
                )
            }
            6 => {
                let payload = u16::from_be_bytes([*packet.get(4)?, *packet.get(5)?]);
                if usize::from(payload) + 40 != packet.len() || *packet.get(6)? != TCP_PROTOCOL {
                    return None;
                }
                let src: [u8; 16] = packet.get(8..24)?.try_into().ok()?;
                let dst: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
                (
                    true,
                    40,
                    Ipv6Addr::from(src).into(),
                    Ipv6Addr::from(dst).into(),
                )
            }
            _ => return None,
        };
        let tcp = packet.get(ip_len..)?;
        let tcp_len = usize::from(*tcp.get(12)? >> 4) * 4;
        if tcp_len < 20 || tcp_len > tcp.len() {
            return None;
        }
        let seq = u32::from_be_bytes(tcp.get(4..8)?.try_into().ok()?);
        Some(TcpView {
            v6,
            ip_len,
            hdr_len: ip_len + tcp_len,
            seq,
            flags: *tcp.get(13)?,
            src,
            dst,
        })
    }
}

/// The header for a TCP packet written alone with a partial checksum: writes the
/// pseudo-header sum into its checksum field and returns `NEEDS_CSUM` pointing at it.
/// `None` (packet unchanged) if it is not a TCP packet this module understands.
pub fn partial_checksum(packet: &mut [u8]) -> Option<VnetHdr> {
    let view = TcpView::parse(packet)?;
    set_pseudo_sum(packet, &view)?;
    Some(VnetHdr {
        flags: FLAG_NEEDS_CSUM,
        gso_type: gso::NONE,
        hdr_len: u16::try_from(view.hdr_len).ok()?,
        gso_size: 0,
        csum_start: u16::try_from(view.ip_len).ok()?,
        csum_offset: TCP_CSUM_OFFSET,
    })
}

/// The header for a TCP packet that the stack built larger than the MTU, asking the
/// device to cut it into segments of `gso_size` payload bytes (TSO): as
/// [`partial_checksum`], with `gso_type` TCPV4 or TCPV6 and `gso_size`. A packet whose
/// payload fits in one segment gets no GSO type. Flags ACK, with PSH and FIN or not
/// (the kernel's cut leaves PSH and FIN on the last segment only). `None` (packet
/// unchanged) if it is not a TCP packet this module understands, or carries other
/// flags (SYN, RST, URG, ECN bits).
pub fn segmented(packet: &mut [u8], gso_size: u16) -> Option<VnetHdr> {
    let view = TcpView::parse(packet)?;
    let payload = packet.len().checked_sub(view.hdr_len)?;
    if gso_size == 0 || payload <= usize::from(gso_size) {
        return partial_checksum(packet);
    }
    if view.flags & !(PSH | FIN) != ACK {
        return None;
    }
    let mut hdr = partial_checksum(packet)?;
    hdr.gso_type = if view.v6 { gso::TCPV6 } else { gso::TCPV4 };
    hdr.gso_size = gso_size;
    Some(hdr)
}

/// Writes the pseudo-header sum for the TCP segment of `packet` into its checksum
/// field.
fn set_pseudo_sum(packet: &mut [u8], view: &TcpView) -> Option<()> {
    let tcp_len = packet.len().checked_sub(view.ip_len)?;
    let sum = pseudo_header_sum(view.src, view.dst, TCP_PROTOCOL, tcp_len)?;
    let at = view.ip_len + usize::from(TCP_CSUM_OFFSET);
    packet
        .get_mut(at..at + 2)?
        .copy_from_slice(&sum.to_be_bytes());
    Some(())
}

/// The super-segment being built.
#[derive(Debug, Clone, Copy)]
struct Pending {
    view: TcpView,
    /// Payload bytes of the first segment: every segment but the last has it.
    seg: usize,
    /// The sequence number right after the data so far.
    next_seq: u32,
    segments: usize,
    /// A PSH or a short segment was merged: nothing may follow.
    closed: bool,
}

/// Merges consecutive TCP segments into super-segments. One buffer of 64 KiB,
/// reused.
///
/// Use: offer each packet with [`Coalescer::append`]; if it is refused, write what
/// [`Coalescer::take`] returns (if anything), then [`Coalescer::start`] with the
/// packet; if that refuses too, write the packet alone (with [`partial_checksum`]).
/// Call [`Coalescer::take`] at the end of a batch.
#[derive(Debug, Default)]
pub struct Coalescer {
    buf: Vec<u8>,
    pending: Option<Pending>,
}

impl Coalescer {
    /// An empty coalescer.
    pub fn new() -> Coalescer {
        Coalescer {
            buf: Vec::with_capacity(MAX_SUPER),
            pending: None,
        }
    }

    /// `true` if a super-segment is being built.
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Starts a super-segment with `packet` if it may begin one (a TCP segment with
    /// data, flags ACK or ACK|PSH). Call only when nothing is pending.
    pub fn start(&mut self, packet: &[u8]) -> bool {
        if self.pending.is_some() {
            return false;
        }
        let Some(view) = TcpView::parse(packet) else {
            return false;
        };
        let seg = packet.len().saturating_sub(view.hdr_len);
        if seg == 0 || (view.flags != ACK && view.flags != ACK | PSH) {
            return false;
        }
        self.buf.clear();
        self.buf.extend_from_slice(packet);
        self.pending = Some(Pending {
            view,
            seg,
            next_seq: view.seq.wrapping_add(seg as u32),
            segments: 1,
            closed: view.flags & PSH != 0,
        });
        true
    }

    /// Merges `packet` into the pending super-segment if it continues it.
    pub fn append(&mut self, packet: &[u8]) -> bool {
        let Some(pending) = self.pending.as_mut() else {
            return false;
        };
        let Some(view) = TcpView::parse(packet) else {
            return false;
        };
        let first = pending.view;
        let payload = packet.get(view.hdr_len..).unwrap_or_default();
        let fits = payload.len() <= pending.seg
            && !payload.is_empty()
            && self.buf.len() + payload.len() <= MAX_SUPER;
        let flags_ok = view.flags == first.flags || view.flags == first.flags | PSH;
        if pending.closed
            || !fits
            || !flags_ok
            || view.seq != pending.next_seq
            || view.v6 != first.v6
            || view.hdr_len != first.hdr_len
            || !same_headers(&self.buf, packet, &first)
        {
            return false;
        }
        self.buf.extend_from_slice(payload);
        pending.next_seq = pending.next_seq.wrapping_add(payload.len() as u32);
        pending.segments += 1;
        if view.flags & PSH != 0 || payload.len() < pending.seg {
            pending.closed = true;
            if view.flags & PSH != 0 {
                // The kernel's cut puts PSH on the last segment only.
                let at = first.ip_len + 13;
                if let Some(flags) = self.buf.get_mut(at) {
                    *flags |= PSH;
                }
            }
        }
        true
    }

    /// Finishes the pending super-segment (lengths, IPv4 header checksum, the
    /// pseudo-header sum) and returns its header and bytes; `None` if nothing is
    /// pending. A single segment goes out as itself with `NEEDS_CSUM`.
    pub fn take(&mut self) -> Option<(VnetHdr, &mut [u8])> {
        let pending = self.pending.take()?;
        let view = pending.view;
        let total = self.buf.len();
        if view.v6 {
            let len = u16::try_from(total.checked_sub(40)?).ok()?;
            self.buf.get_mut(4..6)?.copy_from_slice(&len.to_be_bytes());
        } else {
            let len = u16::try_from(total).ok()?;
            self.buf.get_mut(2..4)?.copy_from_slice(&len.to_be_bytes());
            self.buf.get_mut(10..12)?.copy_from_slice(&[0, 0]);
            let sum = !fold(sum_words(0, self.buf.get(..view.ip_len)?));
            self.buf
                .get_mut(10..12)?
                .copy_from_slice(&sum.to_be_bytes());
        }
        set_pseudo_sum(&mut self.buf, &view)?;
        let (gso_type, gso_size) = match (pending.segments, view.v6) {
            (1, _) => (gso::NONE, 0),
            (_, false) => (gso::TCPV4, pending.seg),
            (_, true) => (gso::TCPV6, pending.seg),
        };
        let hdr = VnetHdr {
            flags: FLAG_NEEDS_CSUM,
            gso_type,
            hdr_len: u16::try_from(view.hdr_len).ok()?,
            gso_size: u16::try_from(gso_size).ok()?,
            csum_start: u16::try_from(view.ip_len).ok()?,
            csum_offset: TCP_CSUM_OFFSET,
        };
        Some((hdr, self.buf.as_mut_slice()))
    }
}

/// Do `a` (the pending super-segment) and `b` agree on every header byte that must
/// be equal: IP fields but lengths, id and header checksum; TCP ports, ACK number,
/// header length, window, urgent pointer and options.
fn same_headers(a: &[u8], b: &[u8], first: &TcpView) -> bool {
    let eq = |r: std::ops::Range<usize>| match (a.get(r.clone()), b.get(r)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    };
    let ip = if first.v6 {
        eq(0..4) && eq(6..40)
    } else {
        eq(0..2) && eq(6..10) && eq(12..first.ip_len)
    };
    let t = first.ip_len;
    ip && eq(t..t + 4) && eq(t + 8..t + 13) && eq(t + 14..t + 16) && eq(t + 18..first.hdr_len)
}
