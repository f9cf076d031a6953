//! A TUN stand-in for in-memory stack tests: packets come from and go to channels.

use std::io;
use std::sync::Mutex;
use std::task::{Context, Poll};

use tokio::sync::mpsc;
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
