//! A TUN stand-in for in-memory stack tests: packets come from and go to channels.

use std::io;
use std::sync::Mutex;
use std::task::{Context, Poll};

use tokio::sync::mpsc;
use tun2socks::offload::{Features, VnetHdr};
use tun2socks::stack::PacketIo;

/// The MTU the in-memory device reports.
pub const MTU: usize = 1500;

/// A device whose packets come from and go to channels.
pub struct MemDevice {
    /// Packets for the stack to read.
    pub rx: Mutex<mpsc::Receiver<Vec<u8>>>,
    /// Where the stack's packets go.
    pub tx: mpsc::Sender<Vec<u8>>,
}

impl PacketIo for MemDevice {
    fn poll_recv(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        match self.rx.lock().unwrap().poll_recv(cx) {
            Poll::Ready(Some(p)) => {
                buf[..p.len()].copy_from_slice(&p);
                Poll::Ready(Ok(p.len()))
            }
            Poll::Ready(None) => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self.rx.lock().unwrap().try_recv() {
            Ok(p) => {
                buf[..p.len()].copy_from_slice(&p);
                Ok(p.len())
            }
            Err(_) => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn try_send(&self, packet: &[u8]) -> io::Result<()> {
        self.tx
            .try_send(packet.to_vec())
            .map_err(|_| io::Error::other("full"))
    }

    fn mtu(&self) -> usize {
        MTU
    }
}

/// A packet and its offload header, as [`OffloadDevice`] moves them.
pub type Framed = (VnetHdr, Vec<u8>);

/// A device with offload: each packet comes and goes with its `virtio_net_hdr`, as a
/// TUN opened with `IFF_VNET_HDR` and `TUNSETOFFLOAD` moves them.
pub struct OffloadDevice {
    /// Packets for the stack to read.
    pub rx: Mutex<mpsc::Receiver<Framed>>,
    /// Where the stack's packets go.
    pub tx: mpsc::Sender<Framed>,
    /// What the device claims to offload.
    pub features: Features,
}

impl OffloadDevice {
    fn take(p: Framed, buf: &mut [u8]) -> (usize, VnetHdr) {
        buf[..p.1.len()].copy_from_slice(&p.1);
        (p.1.len(), p.0)
    }
}

impl PacketIo for OffloadDevice {
    fn poll_recv(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        self.poll_recv_hdr(cx, buf).map_ok(|(n, _)| n)
    }

    fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.try_recv_hdr(buf).map(|(n, _)| n)
    }

    fn try_send(&self, packet: &[u8]) -> io::Result<()> {
        self.try_send_hdr(&VnetHdr::NONE, packet)
    }

    fn mtu(&self) -> usize {
        MTU
    }

    fn offload(&self) -> Features {
        self.features
    }

    fn poll_recv_hdr(
        &self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<(usize, VnetHdr)>> {
        match self.rx.lock().unwrap().poll_recv(cx) {
            Poll::Ready(Some(p)) => Poll::Ready(Ok(Self::take(p, buf))),
            Poll::Ready(None) => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn try_recv_hdr(&self, buf: &mut [u8]) -> io::Result<(usize, VnetHdr)> {
        match self.rx.lock().unwrap().try_recv() {
            Ok(p) => Ok(Self::take(p, buf)),
            Err(_) => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn try_send_hdr(&self, hdr: &VnetHdr, packet: &[u8]) -> io::Result<()> {
        self.tx
            .try_send((*hdr, packet.to_vec()))
            .map_err(|_| io::Error::other("full"))
    }
}
