//! The seam between the stack and a packet device ([`PacketIo`]): the TUN
//! ([`crate::device::Device`]), or an in-memory device in tests and fuzzing. Stage:
//! the device's side of the stack; it must not parse packets (the classifier does).

use std::io;
use std::task::{Context, Poll};

use crate::offload::{Features, VnetHdr};

/// A packet device the stack can drive: the TUN, or an in-memory one in tests.
///
/// A device with offload ([`PacketIo::offload`]) also carries each packet's
/// `virtio_net_hdr` ([`VnetHdr`]) through the `_hdr` methods: TCP super-segments of up
/// to 64 KiB and partial checksums in, the same out. The `_hdr` methods default to
/// the plain ones with [`VnetHdr::NONE`], so a device without offload implements
/// only those.
pub trait PacketIo: Send + Sync + 'static {
    /// Receives one packet, registering for readiness when none is there.
    fn poll_recv(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>>;
    /// Receives one packet if one is queued; `WouldBlock` otherwise.
    fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Sends one packet; an error means it was dropped.
    fn try_send(&self, packet: &[u8]) -> io::Result<()>;
    /// The device's MTU (the largest packet it carries).
    fn mtu(&self) -> usize;
    /// What the device offloads; [`Features::NONE`] by default.
    fn offload(&self) -> Features {
        Features::NONE
    }
    /// [`PacketIo::poll_recv`] with the packet's offload header.
    fn poll_recv_hdr(
        &self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<(usize, VnetHdr)>> {
        self.poll_recv(cx, buf).map_ok(|n| (n, VnetHdr::NONE))
    }
    /// [`PacketIo::try_recv`] with the packet's offload header.
    fn try_recv_hdr(&self, buf: &mut [u8]) -> io::Result<(usize, VnetHdr)> {
        self.try_recv(buf).map(|n| (n, VnetHdr::NONE))
    }
    /// [`PacketIo::try_send`] with an offload header; a device without offload takes
    /// only [`VnetHdr::NONE`].
    fn try_send_hdr(&self, hdr: &VnetHdr, packet: &[u8]) -> io::Result<()> {
        if *hdr == VnetHdr::NONE {
            self.try_send(packet)
        } else {
            Err(io::ErrorKind::Unsupported.into())
        }
    }
}

impl PacketIo for crate::device::Device {
    fn poll_recv(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        self.poll_recv_hdr(cx, buf).map_ok(|(n, _)| n)
    }

    fn poll_recv_hdr(
        &self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<(usize, VnetHdr)>> {
        loop {
            match self.poll_recv_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            match self.try_recv_hdr(buf) {
                // Readiness is cleared: the next poll_recv_ready registers the waker.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        crate::device::Device::try_recv(self, buf)
    }

    fn try_recv_hdr(&self, buf: &mut [u8]) -> io::Result<(usize, VnetHdr)> {
        crate::device::Device::try_recv_hdr(self, buf)
    }

    fn try_send(&self, packet: &[u8]) -> io::Result<()> {
        crate::device::Device::try_send(self, packet)
    }

    fn try_send_hdr(&self, hdr: &VnetHdr, packet: &[u8]) -> io::Result<()> {
        crate::device::Device::try_send_hdr(self, hdr, packet)
    }

    fn mtu(&self) -> usize {
        usize::from(crate::device::Device::mtu(self))
    }

    fn offload(&self) -> Features {
        crate::device::Device::offload(self)
    }
}
