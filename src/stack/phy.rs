//! smoltcp's `phy::Device` over the TUN: receive yields the one packet the stack is
//! handing in (borrowed, not copied); transmit writes each outgoing packet straight
//! to the device from a reused scratch buffer. No per-packet allocation.
//!
//! With checksum offload smoltcp computes no TCP checksum: each TCP packet goes out
//! with `NEEDS_CSUM` and the pseudo-header sum. With TSO, consecutive segments of the
//! flow being polled are merged ([`Coalescer`]) and written as one super-segment when
//! the run ends: when a segment does not continue it, or when the [`OnePacket`] of
//! one poll is dropped. Better still, with TSO smoltcp itself builds TCP segments of
//! up to 64 KiB (its segmentation offload): such a packet goes out at once with
//! `gso_type` TCPV4/TCPV6 and `gso_size` the connection's MSS, with no copy into the
//! coalescer and one pass through smoltcp's dispatch per 64 KiB instead of per MSS.

use smoltcp::phy::{self, DeviceCapabilities, Medium, PacketMeta};
use smoltcp::time::Instant;

use std::num::{NonZeroU16, NonZeroUsize};
use std::sync::Arc;

use super::PacketIo;
use crate::metrics::{Metrics, bump};
use crate::offload::{Coalescer, Features, VnetHdr, partial_checksum, segmented};

/// The largest TCP packet smoltcp builds for the device to segment (TSO): the IPv4
/// total length is 16 bits.
const TSO_MAX: NonZeroUsize = NonZeroUsize::new(65_535).unwrap();

/// The transmit side's state across polls: where packets written, and dropped
/// because the device would not take them (queue full; TCP retransmits them), are
/// counted (`stack.packets_out`, `stack.packets_out_dropped`), what the device
/// offloads, and the TSO coalescer.
#[derive(Debug)]
pub struct TxCounters {
    metrics: Arc<Metrics>,
    offload: Features,
    coalescer: Coalescer,
    /// Bytes written since [`TxCounters::take_bytes`].
    bytes: usize,
}

impl TxCounters {
    /// Counts into `metrics`; writes as `offload` allows.
    pub fn new(metrics: Arc<Metrics>, offload: Features) -> TxCounters {
        TxCounters {
            metrics,
            offload,
            coalescer: if offload.tso {
                Coalescer::new()
            } else {
                Coalescer::default()
            },
            bytes: 0,
        }
    }

    /// Bytes written to the device since the last call.
    pub fn take_bytes(&mut self) -> usize {
        std::mem::take(&mut self.bytes)
    }
}

/// The device smoltcp sees for one call: at most one packet in, any number out.
pub struct OnePacket<'a, D: PacketIo> {
    rx: Option<&'a [u8]>,
    tx: Tx<'a, D>,
}

impl<'a, D: PacketIo> OnePacket<'a, D> {
    /// A device that yields `rx` (if any) once and transmits to `device`.
    pub fn new(
        rx: Option<&'a [u8]>,
        device: &'a D,
        scratch: &'a mut Vec<u8>,
        counters: &'a mut TxCounters,
    ) -> Self {
        OnePacket {
            rx,
            tx: Tx {
                device,
                scratch,
                counters,
                segment: None,
            },
        }
    }
}

/// Writes one packet to the device.
pub struct Tx<'a, D: PacketIo> {
    device: &'a D,
    scratch: &'a mut Vec<u8>,
    counters: &'a mut TxCounters,
    /// The segment size smoltcp asked the device to cut this packet into (TSO).
    segment: Option<NonZeroU16>,
}

/// Hands one received packet to smoltcp.
pub struct Rx<'a>(&'a [u8]);

impl<D: PacketIo> phy::Device for OnePacket<'_, D> {
    type RxToken<'b>
        = Rx<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = Tx<'b, D>
    where
        Self: 'b;

    fn receive(&mut self, _now: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let packet = self.rx.take()?;
        Some((Rx(packet), self.tx.reborrow()))
    }

    fn transmit(&mut self, _now: Instant) -> Option<Self::TxToken<'_>> {
        Some(self.tx.reborrow())
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.tx.device.mtu();
        // `classify` has checked every TCP segment's checksum already (or the offload
        // header vouched for it); with checksum offload the kernel computes ours.
        caps.checksum.tcp = if self.tx.counters.offload.csum {
            smoltcp::phy::Checksum::None
        } else {
            smoltcp::phy::Checksum::Tx
        };
        if self.tx.counters.offload.csum && self.tx.counters.offload.tso {
            caps.segmentation.tcpv4 = Some(TSO_MAX);
            caps.segmentation.tcpv6 = Some(TSO_MAX);
        }
        caps
    }
}

impl<D: PacketIo> Drop for OnePacket<'_, D> {
    /// Writes the super-segment still being built: a poll's segments never wait for
    /// the next poll.
    fn drop(&mut self) {
        self.tx.flush();
    }
}

impl<'a, D: PacketIo> Tx<'a, D> {
    fn reborrow(&mut self) -> Tx<'_, D> {
        Tx {
            device: self.device,
            scratch: self.scratch,
            counters: self.counters,
            segment: None,
        }
    }

    /// Writes the pending super-segment, if any.
    fn flush(&mut self) {
        if let Some((hdr, packet)) = self.counters.coalescer.take() {
            send(
                self.device,
                &self.counters.metrics,
                &mut self.counters.bytes,
                &hdr,
                packet,
            );
        }
    }

    /// Writes the packet smoltcp built in `scratch` as the device's offload allows.
    fn transmit(&mut self) {
        if let Some(size) = self.segment.take() {
            self.transmit_segmented(size.get());
            return;
        }
        let offload = self.counters.offload;
        if !offload.csum {
            self.send_scratch(&VnetHdr::NONE);
            return;
        }
        if offload.tso {
            if self.counters.coalescer.append(self.scratch) {
                return;
            }
            self.flush();
            if self.counters.coalescer.start(self.scratch) {
                return;
            }
        }
        // Not TCP (smoltcp checksummed it), or TCP that starts no super-segment.
        let hdr = partial_checksum(self.scratch).unwrap_or(VnetHdr::NONE);
        self.send_scratch(&hdr);
    }

    /// Writes the packet smoltcp built in `scratch`, with `hdr`.
    fn send_scratch(&mut self, hdr: &VnetHdr) {
        send(
            self.device,
            &self.counters.metrics,
            &mut self.counters.bytes,
            hdr,
            self.scratch,
        );
    }
}

impl<D: PacketIo> Tx<'_, D> {
    /// Writes a TCP packet smoltcp built for the device to segment (TSO), after the
    /// super-segment being coalesced (which comes before it in sequence).
    fn transmit_segmented(&mut self, size: u16) {
        self.flush();
        match segmented(self.scratch, size) {
            Some(hdr) => self.send_scratch(&hdr),
            // smoltcp asks for segmentation only of ACK segments with data (PSH, FIN)
            // that it builds itself; anything else is a bug, counted as a drop (TCP
            // sends the data again).
            None => {
                bump(&self.counters.metrics.stack.packets_out_dropped);
                tracing::debug!(len = self.scratch.len(), "unsegmentable TSO packet");
            }
        }
    }
}

/// Writes one packet, counting it as sent (and its bytes in `written`) or dropped.
fn send<D: PacketIo>(
    device: &D,
    metrics: &Metrics,
    written: &mut usize,
    hdr: &VnetHdr,
    packet: &[u8],
) {
    match device.try_send_hdr(hdr, packet) {
        Ok(()) => {
            bump(&metrics.stack.packets_out);
            *written = written.saturating_add(packet.len());
        }
        Err(e) => {
            bump(&metrics.stack.packets_out_dropped);
            tracing::trace!(error = %e, "device refused a packet");
        }
    }
}

impl phy::RxToken for Rx<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(self.0)
    }
}

impl<D: PacketIo> phy::TxToken for Tx<'_, D> {
    fn set_meta(&mut self, meta: PacketMeta) {
        self.segment = meta.segmentation_offload_size;
    }

    fn consume<R, F>(mut self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        self.scratch.clear();
        self.scratch.resize(len, 0);
        let result = f(self.scratch);
        self.transmit();
        result
    }
}
