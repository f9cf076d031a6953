//! smoltcp's `phy::Device` over the TUN: receive yields the one packet the stack is
//! handing in (borrowed, not copied); transmit writes each outgoing packet straight
//! to the device from a reused scratch buffer. No per-packet allocation.

use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use std::sync::Arc;

use super::PacketIo;
use crate::metrics::{Metrics, bump};

/// Where packets written, and dropped because the device would not take them (queue
/// full; TCP retransmits them), are counted: `stack.packets_out` and
/// `stack.packets_out_dropped`.
#[derive(Debug, Default, Clone)]
pub struct TxCounters(pub Arc<Metrics>);

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
            },
        }
    }
}

/// Writes one packet to the device.
pub struct Tx<'a, D: PacketIo> {
    device: &'a D,
    scratch: &'a mut Vec<u8>,
    counters: &'a mut TxCounters,
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
        // `classify` has checked every TCP segment's checksum already.
        caps.checksum.tcp = smoltcp::phy::Checksum::Tx;
        caps
    }
}

impl<'a, D: PacketIo> Tx<'a, D> {
    fn reborrow(&mut self) -> Tx<'_, D> {
        Tx {
            device: self.device,
            scratch: self.scratch,
            counters: self.counters,
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
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        self.scratch.clear();
        self.scratch.resize(len, 0);
        let result = f(self.scratch);
        match self.device.try_send(self.scratch) {
            Ok(()) => bump(&self.counters.0.stack.packets_out),
            Err(e) => {
                bump(&self.counters.0.stack.packets_out_dropped);
                tracing::trace!(error = %e, "device refused a packet");
            }
        }
        result
    }
}
