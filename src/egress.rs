//! Egress: the one way that code other than smoltcp writes packets to the TUN.
//!
//! Stage: the last stage of the UDP and DNS paths. UDP replies from the proxy's
//! relay, DNS answers built in the tunnel, and ICMP / ICMPv6 "port unreachable"
//! errors (and ICMPv6 "parameter problem" for extension headers, ICMP "reassembly
//! time exceeded" for fragments that never made a datagram) are built here as whole IP packets (etherparse; IPv4 and IPv6; correct
//! checksums) and handed to the device with a non-blocking send.
//!
//! It is bounded by construction: it holds no queue. A packet the device will not
//! take at once (its transmit queue is full) is dropped and counted, as a router
//! drops a datagram; TCP never comes this way (smoltcp writes its own segments and
//! retransmits). One reused buffer; no allocation per packet.
//!
//! A burst of replies to one application ([`Egress::udp_batch`]) goes out, where the
//! device takes UDP super-packets (USO, Linux 6.2+), as one write per run of
//! consecutive equal-size datagrams from one source: one IP/UDP header, the
//! datagrams back to back, a `virtio_net_hdr` with `gso_type` UDP_L4 and a partial
//! checksum; the kernel cuts it into the datagrams (and checksums them) on its
//! receive path. A device that refuses one is written to a datagram per packet from
//! then on.
//!
//! It must not parse what it sends, decide policy (who gets an ICMP error is the
//! caller's choice), or block.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU32};
use std::sync::{Arc, Mutex, PoisonError};

use etherparse::{IpHeaders, PacketBuilder, PacketBuilderStep, icmpv4, icmpv6};

use crate::metrics::Metrics;
use crate::offload::VnetHdr;
use uso::write_udp_super;

mod fragment;
mod uso;

pub use fragment::{MAX_UDP_PAYLOAD_V4, MAX_UDP_PAYLOAD_V6};

/// Hop limit of the packets we build.
const TTL: u8 = 64;
/// Most datagrams in one UDP super-packet (the kernel's `UDP_MAX_SEGMENTS` is 64 on
/// older kernels, 128 on newer).
const MAX_SEGMENTS: usize = 64;
/// The largest IP packet (the IPv4 total length and the IPv6 payload length are 16
/// bits).
const MAX_IP_PACKET: usize = 65_535;

/// An ICMPv4 error carries at most this much of the offending packet, so that the
/// whole error fits in 576 bytes (RFC 1812 4.3.2.3).
const ICMP4_QUOTE: usize = 576 - 20 - 8;
/// An ICMPv6 error carries at most this much, so that it fits in the IPv6 minimum
/// MTU of 1280 bytes (RFC 4443 2.4 (c)).
const ICMP6_QUOTE: usize = 1280 - 40 - 8;

/// Where egress writes: the TUN device (or an in-memory device in tests).
pub trait PacketSink: Send + Sync + 'static {
    /// Sends one whole IP packet without blocking; an error means it was not sent.
    fn send_packet(&self, packet: &[u8]) -> io::Result<()>;
    /// The largest packet the device carries.
    fn max_packet(&self) -> usize;
    /// Whether the device takes UDP super-packets ([`PacketSink::send_offload`] with
    /// `gso_type` UDP_L4). False by default.
    fn udp_offload(&self) -> bool {
        false
    }
    /// Sends one packet with an offload header; `Unsupported` by default.
    fn send_offload(&self, hdr: &VnetHdr, packet: &[u8]) -> io::Result<()> {
        let _ = (hdr, packet);
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// What egress did (its group of the one set of counters).
pub use crate::metrics::EgressStats;

/// Why a datagram or a connection attempt was not delivered, as an ICMP destination
/// unreachable says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable {
    /// Port unreachable (ICMP 3/3, ICMPv6 1/4): `ECONNREFUSED`.
    Port,
    /// Communication administratively prohibited (ICMP 3/13, ICMPv6 1/1):
    /// `EHOSTUNREACH` over IPv4, `EACCES` over IPv6. A connected UDP socket hears it
    /// (a "hard" error).
    Prohibited,
    /// Network unreachable (ICMP 3/0, ICMPv6 "no route" 1/0): `ENETUNREACH`. A
    /// connecting TCP socket hears it; a connected UDP socket only with `IP_RECVERR`.
    Net,
    /// Host unreachable (ICMP 3/1, ICMPv6 "address unreachable" 1/3): `EHOSTUNREACH`,
    /// heard as `Net` is.
    Host,
}

impl Unreachable {
    fn icmpv4(self) -> icmpv4::DestUnreachableHeader {
        match self {
            Unreachable::Port => icmpv4::DestUnreachableHeader::Port,
            Unreachable::Prohibited => icmpv4::DestUnreachableHeader::FilterProhibited,
            Unreachable::Net => icmpv4::DestUnreachableHeader::Network,
            Unreachable::Host => icmpv4::DestUnreachableHeader::Host,
        }
    }

    fn icmpv6(self) -> icmpv6::DestUnreachableCode {
        match self {
            Unreachable::Port => icmpv6::DestUnreachableCode::Port,
            Unreachable::Prohibited => icmpv6::DestUnreachableCode::Prohibited,
            Unreachable::Net => icmpv6::DestUnreachableCode::NoRoute,
            Unreachable::Host => icmpv6::DestUnreachableCode::Address,
        }
    }
}

/// Builds packets and writes them to the device. Cheap to share (`Arc`).
pub struct Egress {
    sink: Arc<dyn PacketSink>,
    buf: Mutex<Vec<u8>>,
    metrics: Arc<Metrics>,
    /// UDP super-packets are written (the device offers them and has not refused one).
    uso: AtomicBool,
    /// Identification of the next fragmented datagram (IPv4 uses the low 16 bits).
    fragment_id: AtomicU32,
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Egress")
            .field("stats", &self.metrics.egress)
            .finish()
    }
}

impl Egress {
    /// Egress to `sink`, with counters of its own.
    pub fn new(sink: Arc<dyn PacketSink>) -> Self {
        Egress::with_metrics(sink, Arc::default())
    }

    /// Egress to `sink`, counting into `metrics`.
    pub fn with_metrics(sink: Arc<dyn PacketSink>, metrics: Arc<Metrics>) -> Self {
        Egress {
            buf: Mutex::new(Vec::with_capacity(sink.max_packet())),
            uso: AtomicBool::new(sink.udp_offload()),
            // Not predictable from outside (RFC 7739): a random start.
            fragment_id: AtomicU32::new(random_u32()),
            sink,
            metrics,
        }
    }

    /// The counters.
    pub fn stats(&self) -> &EgressStats {
        &self.metrics.egress
    }

    /// The set of counters it counts into (shared with the stages that reply
    /// through it).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The largest UDP payload that fits in one packet from `from` (IPv4: 20-byte
    /// header, IPv6: 40) plus the 8-byte UDP header.
    pub fn max_udp_payload(&self, from: IpAddr) -> usize {
        let ip = if from.is_ipv4() { 20 } else { 40 };
        self.sink.max_packet().saturating_sub(ip + 8)
    }

    /// Sends a UDP datagram `from` -> `to` carrying `payload`. Returns whether it was
    /// written. An IPv4-mapped IPv6 address counts as IPv4.
    pub fn udp(&self, from: SocketAddr, to: SocketAddr, payload: &[u8]) -> bool {
        let builder = match (canonical(from.ip()), canonical(to.ip())) {
            (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), TTL),
            (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), TTL),
            _ => return self.unsendable(),
        };
        let builder = builder.udp(from.port(), to.port());
        if builder.size(payload.len()) > self.sink.max_packet() {
            return self.fragmented(from, to, payload);
        }
        self.emit(|buf| builder.write(buf, payload).is_ok())
    }

    /// Sends a UDP datagram too large for one packet as IP fragments (see
    /// [`fragment`]); counted once, as sent only if every fragment was taken.
    fn fragmented(&self, from: SocketAddr, to: SocketAddr, payload: &[u8]) -> bool {
        let ends = (
            SocketAddr::new(canonical(from.ip()), from.port()),
            SocketAddr::new(canonical(to.ip()), to.port()),
        );
        let id = self.fragment_id.fetch_add(1, Relaxed);
        let mtu = self.sink.max_packet();
        let mut buf = self.buf.lock().unwrap_or_else(PoisonError::into_inner);
        let sent = fragment::udp_fragments(ends, payload, (mtu, id), TTL, &mut buf, |packet| {
            self.sink.send_packet(packet).is_ok()
        });
        match sent {
            Ok(true) => {
                self.metrics.egress.sent.fetch_add(1, Relaxed);
                self.metrics.egress.fragmented.fetch_add(1, Relaxed);
                true
            }
            Ok(false) => {
                self.metrics.egress.device_full.fetch_add(1, Relaxed);
                false
            }
            Err(unfit) => {
                tracing::debug!(?unfit, len = payload.len(), "UDP datagram cannot be sent");
                drop(buf);
                self.unsendable()
            }
        }
    }

    /// Sends datagrams to `to`, each from its source, in order; returns how many were
    /// written, and their payload bytes. Where the device takes UDP super-packets, each run of consecutive
    /// datagrams from one source with one size (the last of a run may be shorter)
    /// is one write.
    pub fn udp_batch(&self, to: SocketAddr, datagrams: &[(SocketAddr, &[u8])]) -> (usize, u64) {
        let (mut sent, mut bytes) = (0, 0u64);
        let mut rest = datagrams;
        while !rest.is_empty() {
            let run = if self.uso.load(Relaxed) {
                self.run_len(rest)
            } else {
                1
            };
            let (batch, after) = rest.split_at(run.clamp(1, rest.len()));
            rest = after;
            if let (true, Some((from, _))) = (batch.len() > 1, batch.first()) {
                // `None`: refused, so one by one (and from now on).
                if let Some(written) = self.udp_super(*from, to, batch) {
                    if written > 0 {
                        sent += written;
                        bytes += batch.iter().map(|(_, p)| p.len() as u64).sum::<u64>();
                    }
                    continue;
                }
            }
            for (from, payload) in batch {
                if self.udp(*from, to, payload) {
                    sent += 1;
                    bytes += payload.len() as u64;
                }
            }
        }
        (sent, bytes)
    }

    /// How many datagrams from the start of `datagrams` go in one super-packet: one
    /// source, equal sizes (the last may be shorter), each small enough for the
    /// device alone, the whole within an IP packet and [`MAX_SEGMENTS`].
    fn run_len(&self, datagrams: &[(SocketAddr, &[u8])]) -> usize {
        let Some((from, first)) = datagrams.first() else {
            return 0;
        };
        let size = first.len();
        let ip = if canonical(from.ip()).is_ipv4() {
            20
        } else {
            40
        };
        if size == 0 || size > self.max_udp_payload(canonical(from.ip())) {
            return 1;
        }
        let room = MAX_IP_PACKET
            .min(self.sink.max_packet().max(crate::offload::MAX_PACKET))
            .saturating_sub(ip + 8);
        let mut total = 0;
        let mut n = 0;
        for (src, payload) in datagrams.iter().take(MAX_SEGMENTS) {
            if src != from || payload.len() > size || total + payload.len() > room {
                break;
            }
            total += payload.len();
            n += 1;
            if payload.len() < size {
                break;
            }
        }
        n.max(1)
    }

    /// Writes `datagrams` (a run, see [`Egress::run_len`]) as one UDP super-packet.
    /// `Some(written)`: it was written, or dropped because the device was full (0);
    /// `None`: the device refused super-packets (now off; send them one by one).
    fn udp_super(
        &self,
        from: SocketAddr,
        to: SocketAddr,
        datagrams: &[(SocketAddr, &[u8])],
    ) -> Option<usize> {
        let size = datagrams.first().map_or(0, |(_, p)| p.len());
        let mut buf = self.buf.lock().unwrap_or_else(PoisonError::into_inner);
        buf.clear();
        let hdr = write_udp_super(&mut buf, from, to, datagrams, size)?;
        match self.sink.send_offload(&hdr, &buf) {
            Ok(()) => {
                let n = datagrams.len();
                self.metrics.egress.sent.fetch_add(n as u64, Relaxed);
                Some(n)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let n = datagrams.len() as u64;
                self.metrics.egress.device_full.fetch_add(n, Relaxed);
                Some(0)
            }
            Err(e) => {
                self.uso.store(false, Relaxed);
                tracing::warn!(
                    error = %e,
                    "the device refused a UDP super-packet; writing datagrams one by one"
                );
                None
            }
        }
    }

    /// Tells the application at `app` that its datagram to `remote` was not
    /// delivered: an ICMP port-unreachable (ICMPv6 destination unreachable, code 4)
    /// from `remote`, quoting the datagram as the application sent it (rebuilt from
    /// its addresses and payload; the application's stack matches the error by the
    /// quoted addresses and ports).
    pub fn port_unreachable(&self, app: SocketAddr, remote: SocketAddr, payload: &[u8]) -> bool {
        self.unreachable(app, remote, payload, Unreachable::Port)
    }

    /// [`Egress::port_unreachable`] with the reason `why` (its ICMP / ICMPv6 code).
    pub fn unreachable(
        &self,
        app: SocketAddr,
        remote: SocketAddr,
        payload: &[u8],
        why: Unreachable,
    ) -> bool {
        self.unreachable_quoting(app, remote, why, |original, quote| {
            original
                .udp(app.port(), remote.port())
                .write(quote, payload)
                .is_ok()
        })
    }

    /// Tells the application at `app` that its connection attempt to `remote` (the
    /// SYN with sequence number `seq`) failed for `why`: an ICMP destination
    /// unreachable from `remote` quoting that SYN. A connecting socket takes it at
    /// once (Linux: any destination unreachable aborts a connect in SYN-SENT, if
    /// the quoted sequence number is its SYN's).
    pub fn tcp_unreachable(
        &self,
        app: SocketAddr,
        remote: SocketAddr,
        seq: u32,
        why: Unreachable,
    ) -> bool {
        self.unreachable_quoting(app, remote, why, |original, quote| {
            original
                .tcp(app.port(), remote.port(), seq, 0)
                .syn()
                .write(quote, &[])
                .is_ok()
        })
    }

    /// An ICMP / ICMPv6 destination unreachable for `why`, from `remote` to `app`,
    /// quoting the packet `original` writes (given a header from `app` to `remote`).
    fn unreachable_quoting(
        &self,
        app: SocketAddr,
        remote: SocketAddr,
        why: Unreachable,
        original: impl FnOnce(PacketBuilderStep<IpHeaders>, &mut Vec<u8>) -> bool,
    ) -> bool {
        let mut quote = Vec::new();
        let (app_ip, remote_ip) = (canonical(app.ip()), canonical(remote.ip()));
        let header = match (app_ip, remote_ip) {
            (IpAddr::V4(a), IpAddr::V4(r)) => PacketBuilder::ipv4(a.octets(), r.octets(), TTL),
            (IpAddr::V6(a), IpAddr::V6(r)) => PacketBuilder::ipv6(a.octets(), r.octets(), TTL),
            _ => return self.unsendable(),
        };
        if !original(header, &mut quote) {
            return self.unsendable();
        }
        match (remote_ip, app_ip) {
            (IpAddr::V4(r), IpAddr::V4(a)) => {
                quote.truncate(ICMP4_QUOTE);
                let b = PacketBuilder::ipv4(r.octets(), a.octets(), TTL)
                    .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(why.icmpv4()));
                self.emit(|buf| b.write(buf, &quote).is_ok())
            }
            (IpAddr::V6(r), IpAddr::V6(a)) => {
                quote.truncate(ICMP6_QUOTE);
                let b = PacketBuilder::ipv6(r.octets(), a.octets(), TTL)
                    .icmpv6(etherparse::Icmpv6Type::DestinationUnreachable(why.icmpv6()));
                self.emit(|buf| b.write(buf, &quote).is_ok())
            }
            _ => self.unsendable(),
        }
    }

    /// Tells the source of the IPv6 `packet` that it was discarded for a problem in
    /// its extension headers: an ICMPv6 Parameter Problem (RFC 4443 3.4) with `code`
    /// and `pointer`, from the packet's destination, quoting as much of the packet
    /// as fits in the IPv6 minimum MTU. Whether to send one is the caller's choice.
    pub fn param_problem(&self, packet: &[u8], code: u8, pointer: u32) -> bool {
        let (Some(src), Some(dst)) = (
            packet.get(8..24).and_then(|a| <[u8; 16]>::try_from(a).ok()),
            packet
                .get(24..40)
                .and_then(|a| <[u8; 16]>::try_from(a).ok()),
        ) else {
            return self.unsendable();
        };
        let Some(code) = icmpv6::ParameterProblemCode::from_u8(code) else {
            return self.unsendable();
        };
        let quote = packet.get(..ICMP6_QUOTE).unwrap_or(packet);
        let b =
            PacketBuilder::ipv6(dst, src, TTL).icmpv6(etherparse::Icmpv6Type::ParameterProblem(
                icmpv6::ParameterProblemHeader { code, pointer },
            ));
        self.emit(|buf| b.write(buf, quote).is_ok())
    }

    /// Tells the source of a datagram whose fragments did not all arrive in time
    /// that it was discarded: an ICMP Time Exceeded (ICMPv6 type 3), code 1,
    /// "fragment reassembly time exceeded", from the datagram's destination,
    /// quoting `first`, the start of its first fragment as it came. Whether to send
    /// one is the caller's choice.
    pub fn reassembly_time_exceeded(&self, first: &[u8]) -> bool {
        match first.first().map(|b| b >> 4) {
            Some(4) => {
                let (Some(src), Some(dst)) = (
                    first.get(12..16).and_then(|a| <[u8; 4]>::try_from(a).ok()),
                    first.get(16..20).and_then(|a| <[u8; 4]>::try_from(a).ok()),
                ) else {
                    return self.unsendable();
                };
                let quote = first.get(..ICMP4_QUOTE).unwrap_or(first);
                let b = PacketBuilder::ipv4(dst, src, TTL).icmpv4(
                    etherparse::Icmpv4Type::TimeExceeded(
                        icmpv4::TimeExceededCode::FragmentReassemblyTimeExceeded,
                    ),
                );
                self.emit(|buf| b.write(buf, quote).is_ok())
            }
            Some(6) => {
                let (Some(src), Some(dst)) = (
                    first.get(8..24).and_then(|a| <[u8; 16]>::try_from(a).ok()),
                    first.get(24..40).and_then(|a| <[u8; 16]>::try_from(a).ok()),
                ) else {
                    return self.unsendable();
                };
                let quote = first.get(..ICMP6_QUOTE).unwrap_or(first);
                let b = PacketBuilder::ipv6(dst, src, TTL).icmpv6(
                    etherparse::Icmpv6Type::TimeExceeded(
                        icmpv6::TimeExceededCode::FragmentReassemblyTimeExceeded,
                    ),
                );
                self.emit(|buf| b.write(buf, quote).is_ok())
            }
            _ => self.unsendable(),
        }
    }

    fn unsendable(&self) -> bool {
        self.metrics.egress.unsendable.fetch_add(1, Relaxed);
        false
    }

    /// Builds a packet into the reused buffer with `build` and sends it.
    fn emit(&self, build: impl FnOnce(&mut Vec<u8>) -> bool) -> bool {
        let mut buf = self.buf.lock().unwrap_or_else(PoisonError::into_inner);
        buf.clear();
        if !build(&mut buf) {
            return self.unsendable();
        }
        match self.sink.send_packet(&buf) {
            Ok(()) => {
                self.metrics.egress.sent.fetch_add(1, Relaxed);
                true
            }
            Err(e) => {
                self.metrics.egress.device_full.fetch_add(1, Relaxed);
                tracing::trace!(error = %e, "device refused a packet");
                false
            }
        }
    }
}

/// The address with an IPv4-mapped IPv6 address turned into IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// A random number from the standard library's per-process hash keys.
fn random_u32() -> u32 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(0u8) as u32
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
    use super::*;
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    #[derive(Default)]
    struct Capture {
        packets: Mutex<Vec<Vec<u8>>>,
        full: bool,
    }

    impl PacketSink for Capture {
        fn send_packet(&self, packet: &[u8]) -> io::Result<()> {
            if self.full {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.packets.lock().unwrap().push(packet.to_vec());
            Ok(())
        }
        fn max_packet(&self) -> usize {
            1500
        }
    }

    fn sent(c: &Capture) -> Vec<Vec<u8>> {
        c.packets.lock().unwrap().clone()
    }

    #[test]
    fn udp_v4_and_v6_have_valid_checksums() {
        let cap = Arc::new(Capture::default());
        let egress = Egress::new(cap.clone());
        assert!(egress.udp(
            "198.19.2.2:7".parse().unwrap(),
            "198.18.0.1:5000".parse().unwrap(),
            b"hello"
        ));
        assert!(egress.udp(
            "[fd19:2::2]:7".parse().unwrap(),
            "[fd18::1]:5000".parse().unwrap(),
            b"hello6"
        ));
        for (p, payload) in sent(&cap).iter().zip([&b"hello"[..], b"hello6"]) {
            let s = SlicedPacket::from_ip(p).unwrap();
            let Some(TransportSlice::Udp(udp)) = s.transport else {
                panic!()
            };
            assert_eq!(udp.payload(), payload);
            assert_eq!(udp.source_port(), 7);
            let header = udp.to_header();
            let expected = match s.net {
                Some(NetSlice::Ipv4(ip)) => {
                    let h = ip.header().to_header();
                    assert_eq!(h.header_checksum, h.calc_header_checksum());
                    header.calc_checksum_ipv4(&h, payload).unwrap()
                }
                Some(NetSlice::Ipv6(ip)) => header
                    .calc_checksum_ipv6(&ip.header().to_header(), payload)
                    .unwrap(),
                _ => panic!(),
            };
            assert_eq!(udp.checksum(), expected);
        }
    }

    #[test]
    fn mixed_families_and_oversize_are_counted_not_sent() {
        let cap = Arc::new(Capture::default());
        let egress = Egress::new(cap.clone());
        assert!(!egress.udp(
            "[fd19:2::2]:7".parse().unwrap(),
            "198.18.0.1:5000".parse().unwrap(),
            b"x"
        ));
        // Larger than IP can carry at all.
        assert!(!egress.udp(
            "198.19.2.2:7".parse().unwrap(),
            "198.18.0.1:5000".parse().unwrap(),
            &[0u8; fragment::MAX_UDP_PAYLOAD_V4 + 1]
        ));
        assert!(egress.udp(
            "198.19.2.2:7".parse().unwrap(),
            "198.18.0.1:5000".parse().unwrap(),
            &[0u8; 1472]
        ));
        assert_eq!(egress.stats().unsendable.load(Relaxed), 2);
        assert_eq!(sent(&cap).len(), 1);
    }

    #[test]
    fn a_datagram_over_the_mtu_goes_as_fragments() {
        let cap = Arc::new(Capture::default());
        let egress = Egress::new(cap.clone());
        let payload: Vec<u8> = (0..4000u32).map(|i| i as u8).collect();
        assert!(egress.udp(
            "198.19.2.2:7".parse().unwrap(),
            "198.18.0.1:5000".parse().unwrap(),
            &payload
        ));
        assert!(egress.udp(
            "[fd19:2::2]:7".parse().unwrap(),
            "[fd18::1]:5000".parse().unwrap(),
            &payload
        ));
        let packets = sent(&cap);
        assert_eq!(packets.len(), 6, "three fragments each at MTU 1500");
        assert!(packets.iter().all(|p| p.len() <= 1500));
        assert_eq!(
            egress.stats().sent.load(Relaxed),
            2,
            "a datagram counts once"
        );
        assert_eq!(egress.stats().fragmented.load(Relaxed), 2);
        assert_eq!(egress.stats().unsendable.load(Relaxed), 0);
    }

    #[test]
    fn mapped_v4_is_v4() {
        let cap = Arc::new(Capture::default());
        let egress = Egress::new(cap.clone());
        assert!(egress.udp(
            "[::ffff:198.19.2.2]:7".parse().unwrap(),
            "198.18.0.1:5000".parse().unwrap(),
            b"x"
        ));
        assert_eq!(sent(&cap)[0][0] >> 4, 4);
    }

    #[test]
    fn port_unreachable_quotes_the_datagram() {
        let cap = Arc::new(Capture::default());
        let egress = Egress::new(cap.clone());
        let app: SocketAddr = "198.18.0.1:5000".parse().unwrap();
        let remote: SocketAddr = "198.19.2.2:53".parse().unwrap();
        assert!(egress.port_unreachable(app, remote, &[7u8; 2000]));
        let app6: SocketAddr = "[fd18::1]:5000".parse().unwrap();
        let remote6: SocketAddr = "[fd19:2::2]:53".parse().unwrap();
        assert!(egress.port_unreachable(app6, remote6, &[7u8; 2000]));
        let packets = sent(&cap);
        let v4 = SlicedPacket::from_ip(&packets[0]).unwrap();
        assert!(packets[0].len() <= 576);
        let Some(TransportSlice::Icmpv4(icmp)) = v4.transport else {
            panic!()
        };
        assert_eq!(
            icmp.icmp_type(),
            etherparse::Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port)
        );
        // The quote starts with the app's IP and UDP headers.
        let q = icmp.payload();
        assert_eq!(&q[12..16], &[198, 18, 0, 1]);
        assert_eq!(&q[20..22], &5000u16.to_be_bytes());
        assert_eq!(&q[22..24], &53u16.to_be_bytes());
        let h = v4.net.as_ref().map(|n| match n {
            NetSlice::Ipv4(ip) => ip.header().to_header(),
            _ => panic!(),
        });
        let h = h.unwrap();
        assert_eq!(h.source, [198, 19, 2, 2]);
        assert_eq!(h.destination, [198, 18, 0, 1]);
        assert_eq!(
            icmp.checksum(),
            icmp.header().icmp_type.calc_checksum(icmp.payload())
        );
        let v6 = SlicedPacket::from_ip(&packets[1]).unwrap();
        assert!(packets[1].len() <= 1280);
        let Some(TransportSlice::Icmpv6(icmp6)) = v6.transport else {
            panic!()
        };
        assert_eq!(
            icmp6.icmp_type(),
            etherparse::Icmpv6Type::DestinationUnreachable(icmpv6::DestUnreachableCode::Port)
        );
    }

    #[test]
    fn each_reason_has_its_code() {
        let cap = Arc::new(Capture::default());
        let egress = Egress::new(cap.clone());
        let (app, remote): (SocketAddr, SocketAddr) = (
            "198.18.0.1:5000".parse().unwrap(),
            "198.19.2.2:7".parse().unwrap(),
        );
        let (app6, remote6): (SocketAddr, SocketAddr) = (
            "[fd18::1]:5000".parse().unwrap(),
            "[fd19:2::2]:7".parse().unwrap(),
        );
        let reasons = [
            Unreachable::Port,
            Unreachable::Prohibited,
            Unreachable::Net,
            Unreachable::Host,
        ];
        for why in reasons {
            assert!(egress.unreachable(app, remote, b"x", why));
            assert!(egress.unreachable(app6, remote6, b"x", why));
        }
        let packets = sent(&cap);
        let codes: Vec<(u8, u8)> = packets
            .iter()
            .map(|p| {
                let at = if p[0] >> 4 == 4 { 20 } else { 40 };
                (p[at], p[at + 1])
            })
            .collect();
        // ICMP 3/3, 3/13, 3/0, 3/1; ICMPv6 1/4, 1/1, 1/0, 1/3.
        assert_eq!(
            codes,
            [
                (3, 3),
                (1, 4),
                (3, 13),
                (1, 1),
                (3, 0),
                (1, 0),
                (3, 1),
                (1, 3)
            ],
            "type and code of each"
        );
        for p in &packets {
            match SlicedPacket::from_ip(p).unwrap().transport {
                Some(TransportSlice::Icmpv4(icmp)) => assert_eq!(
                    icmp.checksum(),
                    icmp.header().icmp_type.calc_checksum(icmp.payload())
                ),
                Some(TransportSlice::Icmpv6(_)) => {}
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_refused_syn_is_quoted_with_its_sequence_number() {
        let cap = Arc::new(Capture::default());
        let egress = Egress::new(cap.clone());
        let app: SocketAddr = "198.18.0.1:40000".parse().unwrap();
        let remote: SocketAddr = "198.19.2.2:80".parse().unwrap();
        let app6: SocketAddr = "[fd18::1]:40000".parse().unwrap();
        let remote6: SocketAddr = "[fd19:2::2]:80".parse().unwrap();
        let seq = 0xdead_beef_u32;
        assert!(egress.tcp_unreachable(app, remote, seq, Unreachable::Host));
        assert!(egress.tcp_unreachable(app6, remote6, seq, Unreachable::Host));
        let packets = sent(&cap);
        // ICMP host unreachable from the destination, quoting the SYN: IPv4 header
        // (protocol 6, app -> remote), then ports and sequence number.
        let v4 = &packets[0];
        assert_eq!((v4[20], v4[21]), (3, 1));
        assert_eq!(&v4[12..16], &[198, 19, 2, 2]);
        let q = &v4[28..];
        assert_eq!(q[9], 6, "TCP");
        assert_eq!(&q[12..16], &[198, 18, 0, 1]);
        assert_eq!(&q[20..22], &40000u16.to_be_bytes());
        assert_eq!(&q[22..24], &80u16.to_be_bytes());
        assert_eq!(&q[24..28], &seq.to_be_bytes());
        let v6 = &packets[1];
        assert_eq!((v6[40], v6[41]), (1, 3));
        let q6 = &v6[48..];
        assert_eq!(q6[6], 6, "TCP");
        assert_eq!(&q6[40..42], &40000u16.to_be_bytes());
        assert_eq!(&q6[44..48], &seq.to_be_bytes());
        let Some(TransportSlice::Icmpv4(icmp)) = SlicedPacket::from_ip(v4).unwrap().transport
        else {
            panic!()
        };
        assert_eq!(
            icmp.checksum(),
            icmp.header().icmp_type.calc_checksum(icmp.payload())
        );
    }

    #[test]
    fn param_problem_goes_back_to_the_source_quoting_the_packet() {
        let cap = Arc::new(Capture::default());
        let egress = Egress::new(cap.clone());
        let (app, remote) = ([0xfd; 16], [0x20; 16]);
        let mut offending = Vec::new();
        PacketBuilder::ipv6(app, remote, 64)
            .udp(5000, 53)
            .write(&mut offending, &[7u8; 2000])
            .unwrap();
        assert!(egress.param_problem(&offending, 2, 42));
        // Not a Parameter Problem code.
        assert!(!egress.param_problem(&offending, 200, 42));
        // Too short to have addresses.
        assert!(!egress.param_problem(&offending[..30], 0, 0));
        assert_eq!(egress.stats().unsendable.load(Relaxed), 2);
        let packets = sent(&cap);
        assert_eq!(packets.len(), 1);
        assert!(packets[0].len() <= 1280);
        let v6 = SlicedPacket::from_ip(&packets[0]).unwrap();
        let Some(NetSlice::Ipv6(ip)) = &v6.net else {
            panic!()
        };
        assert_eq!(ip.header().source(), remote);
        assert_eq!(ip.header().destination(), app);
        let Some(TransportSlice::Icmpv6(icmp)) = v6.transport else {
            panic!()
        };
        assert_eq!(
            icmp.icmp_type(),
            etherparse::Icmpv6Type::ParameterProblem(icmpv6::ParameterProblemHeader {
                code: icmpv6::ParameterProblemCode::UnrecognizedIpv6Option,
                pointer: 42
            })
        );
        assert!(icmp.is_checksum_valid(remote, app));
        assert_eq!(icmp.payload(), &offending[..1280 - 48]);
    }

    #[test]
    fn reassembly_time_exceeded_goes_back_to_the_source_quoting_the_first_fragment() {
        let cap = Arc::new(Capture::default());
        let egress = Egress::new(cap.clone());
        let mut first4 = Vec::new();
        PacketBuilder::ipv4([198, 18, 0, 1], [198, 19, 2, 2], 64)
            .udp(5000, 9)
            .write(&mut first4, &[7u8; 1472])
            .unwrap();
        let mut first6 = Vec::new();
        PacketBuilder::ipv6([0xfd; 16], [0x20; 16], 64)
            .udp(5000, 9)
            .write(&mut first6, &[7u8; 1452])
            .unwrap();
        assert!(egress.reassembly_time_exceeded(&first4));
        assert!(egress.reassembly_time_exceeded(&first6));
        assert!(!egress.reassembly_time_exceeded(&[0x45, 0]));
        assert!(!egress.reassembly_time_exceeded(&[]));
        let packets = sent(&cap);
        assert_eq!(packets.len(), 2);
        let v4 = SlicedPacket::from_ip(&packets[0]).unwrap();
        assert!(packets[0].len() <= 576);
        let Some(NetSlice::Ipv4(ip)) = &v4.net else {
            panic!()
        };
        assert_eq!(ip.header().source(), [198, 19, 2, 2]);
        assert_eq!(ip.header().destination(), [198, 18, 0, 1]);
        let Some(TransportSlice::Icmpv4(icmp)) = &v4.transport else {
            panic!()
        };
        assert_eq!(
            icmp.icmp_type(),
            etherparse::Icmpv4Type::TimeExceeded(
                icmpv4::TimeExceededCode::FragmentReassemblyTimeExceeded
            )
        );
        assert_eq!(icmp.payload(), &first4[..ICMP4_QUOTE]);
        let v6 = SlicedPacket::from_ip(&packets[1]).unwrap();
        let Some(TransportSlice::Icmpv6(icmp6)) = &v6.transport else {
            panic!()
        };
        assert_eq!(
            icmp6.icmp_type(),
            etherparse::Icmpv6Type::TimeExceeded(
                icmpv6::TimeExceededCode::FragmentReassemblyTimeExceeded
            )
        );
        assert!(icmp6.is_checksum_valid([0x20; 16], [0xfd; 16]));
        assert_eq!(icmp6.payload(), &first6[..ICMP6_QUOTE]);
    }

    #[test]
    fn full_device_is_counted() {
        let cap = Arc::new(Capture {
            full: true,
            ..Capture::default()
        });
        let egress = Egress::new(cap);
        assert!(!egress.udp(
            "198.19.2.2:7".parse().unwrap(),
            "198.18.0.1:5000".parse().unwrap(),
            b"x"
        ));
        assert_eq!(egress.stats().device_full.load(Relaxed), 1);
    }
}

#[cfg(test)]
mod uso_tests;
