//! SOCKS5 UDP ASSOCIATE, client side: the control connection and the socket that
//! talks to the proxy's relay, with blocking-free send and receive for the tunnel's
//! UDP path.

use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};

use socket2::SockRef;
use tokio::net::{TcpStream, UdpSocket};
use tun2socks_platform::mmsg;

use super::{Upstream, UpstreamError, negotiate};
use crate::socks::{self, Address, ClientHandshake, ClientStatus, Command, udp};

/// Receive buffer asked for on each association's UDP socket.
pub const UDP_RECV_BUFFER: usize = 4 << 20;

impl Upstream {
    /// Sets up a SOCKS5 UDP ASSOCIATE: a control connection and a UDP socket that
    /// talks to the proxy's relay. Over SOCKS4/4a it fails at once with
    /// [`UpstreamError::Unsupported`] (those protocols have no UDP).
    pub async fn udp_associate(&self) -> Result<UdpAssociation, UpstreamError> {
        let (mut control, proxy) = self.dial_addr().await?;
        let io_err = |source| UpstreamError::Io { proxy, source };
        // The relay accepts datagrams from the control connection's client address:
        // send from that address, and declare the port so the relay can check it.
        let local = control.local_addr().map_err(io_err)?;
        let socket = UdpSocket::bind(SocketAddr::new(local.ip(), 0))
            .await
            .map_err(io_err)?;
        self.mark(&SockRef::from(&socket)).map_err(io_err)?;
        // Bursts from the relay wait here while the stack is busy; the default
        // (rmem_default, ~208 KiB) overflows in a fraction of a second at a few
        // hundred datagrams/s. Best effort: the kernel caps it at rmem_max, and it
        // costs memory only while datagrams queue.
        let _ = SockRef::from(&socket).set_recv_buffer_size(UDP_RECV_BUFFER);
        let declared = socket.local_addr().map_err(io_err)?;
        let mut hs = ClientHandshake::new(
            self.proxy.protocol,
            self.proxy.auth.clone(),
            Command::UDP_ASSOCIATE,
            Address::from(declared),
        )
        .map_err(UpstreamError::Unsupported)?
        .pipelined(self.is_pipelined());
        let mut buf = Vec::with_capacity(512);
        let status = self
            .with_handshake_timeout(proxy, negotiate(&mut control, &mut hs, &mut buf, proxy))
            .await?;
        let ClientStatus::Done(relay) = status else {
            return Err(UpstreamError::Protocol {
                proxy,
                source: socks::Error::Failed,
            });
        };
        self.learn_pipelining();
        let relay = self
            .relay_names
            .resolve(
                &relay,
                proxy,
                declared,
                &self.proxy.host,
                super::relay::system_lookup,
            )
            .await?;
        self.check_relay(relay, proxy)?;
        socket.connect(relay).await.map_err(io_err)?;
        Ok(UdpAssociation {
            control,
            socket,
            relay,
            pending: AtomicU8::new(RelayError::NONE),
        })
    }
}

/// A SOCKS5 UDP association: datagrams to and from any destination through the
/// proxy's relay. It lives as long as the control connection; when the proxy closes
/// that, [`UdpAssociation::closed`] returns and the relay is gone.
#[derive(Debug)]
pub struct UdpAssociation {
    control: TcpStream,
    socket: UdpSocket,
    relay: SocketAddr,
    /// The error the socket last reported from the relay's address since
    /// [`UdpAssociation::take_error`] last looked ([`RelayError::code`], or
    /// [`RelayError::NONE`]).
    pending: AtomicU8,
}

/// An ICMP error the relay socket reported from the relay's address: it belongs to a
/// datagram sent before, not to the call that reported it (a connected UDP socket
/// reports it on its next call, and sends nothing on that call). Only the errors
/// the kernel passes to a connected UDP socket without `IP_RECVERR` (the "hard"
/// ones) ever show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayError {
    /// Port unreachable (`ECONNREFUSED`): nothing listens at the relay (ss-local
    /// without `-u` grants UDP ASSOCIATE with no relay behind it), or the proxy
    /// passed on a destination's port unreachable from its relay port (Dante does).
    Refused,
    /// Host unreachable or administratively prohibited (`EHOSTUNREACH`, `EHOSTDOWN`,
    /// `ENONET`, and `EACCES` over IPv6): typically a firewall in front of the
    /// proxy that rejects its relay ports (firewalld answers `icmp-host-prohibited`).
    Prohibited,
    /// Network unreachable or prohibited (`ENETUNREACH`).
    NetUnreachable,
}

impl RelayError {
    const NONE: u8 = 0;

    /// The relay error an I/O error is, if it is one.
    pub fn from_io(e: &io::Error) -> Option<RelayError> {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => return Some(RelayError::Refused),
            io::ErrorKind::HostUnreachable => return Some(RelayError::Prohibited),
            io::ErrorKind::NetworkUnreachable => return Some(RelayError::NetUnreachable),
            _ => {}
        }
        // EACCES only (ICMPv6 administratively prohibited), not EPERM, which is a
        // local firewall refusing our own send.
        match e.raw_os_error() {
            Some(nix::libc::EACCES | nix::libc::EHOSTDOWN | nix::libc::ENONET) => {
                Some(RelayError::Prohibited)
            }
            _ => None,
        }
    }

    fn code(self) -> u8 {
        match self {
            RelayError::Refused => 1,
            RelayError::Prohibited => 2,
            RelayError::NetUnreachable => 3,
        }
    }

    fn from_code(code: u8) -> Option<RelayError> {
        match code {
            1 => Some(RelayError::Refused),
            2 => Some(RelayError::Prohibited),
            3 => Some(RelayError::NetUnreachable),
            _ => None,
        }
    }
}

/// A datagram from the relay: its source and where its payload lies in the buffer.
pub type Received = (Address, Range<usize>);

impl UdpAssociation {
    /// The relay's address.
    pub fn relay(&self) -> SocketAddr {
        self.relay
    }

    /// The local address datagrams are sent from.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Sends `payload` to `target` through the relay.
    pub async fn send_to(&self, payload: &[u8], target: &Address) -> io::Result<()> {
        let mut datagram = Vec::with_capacity(udp::MAX_HEADER_LEN.saturating_add(payload.len()));
        udp::encode_datagram(target, payload, &mut datagram);
        self.socket.send(&datagram).await.map(|_| ())
    }

    /// Sends `payload` to `target` through the relay if the socket can take it now
    /// (`WouldBlock` otherwise: the datagram is dropped, as a full queue does).
    /// `scratch` is reused for the SOCKS header and payload.
    pub fn try_send_to(
        &self,
        payload: &[u8],
        target: &Address,
        scratch: &mut Vec<u8>,
    ) -> io::Result<()> {
        scratch.clear();
        udp::encode_datagram(target, payload, scratch);
        self.retrying_pending(|| self.socket.try_send(scratch).map(|_| ()))
    }

    /// The ICMP error the socket reported from the relay's address since the last
    /// call, if any (and forgets it). It belongs to an earlier datagram, not to the
    /// one whose send or receive reported it; which datagram it was, the socket does
    /// not say.
    pub fn take_error(&self) -> Option<RelayError> {
        RelayError::from_code(self.pending.swap(RelayError::NONE, Relaxed))
    }

    /// Runs a send; when it fails with an ICMP error an earlier datagram left pending
    /// on the socket (a connected UDP socket reports it on its next call, and sends
    /// nothing on that call), notes it for [`UdpAssociation::take_error`] and sends
    /// again, so that the error costs no datagram of this call.
    fn retrying_pending<T>(&self, mut send: impl FnMut() -> io::Result<T>) -> io::Result<T> {
        match send() {
            Err(e) if self.noting(&e) => send(),
            other => other,
        }
    }

    /// Resolves once the socket has taken an ICMP error from the relay's address
    /// that arrived while nothing was sent or received: such an error shows only as
    /// error readiness, never as readable. Noted for [`UdpAssociation::take_error`].
    /// Other errors pending on the socket are taken and logged.
    pub async fn refusal(&self) -> io::Result<()> {
        loop {
            self.socket.ready(tokio::io::Interest::ERROR).await?;
            // SO_ERROR takes the pending error; "none left" clears the readiness,
            // so this does not spin.
            let taken = self.socket.try_io(tokio::io::Interest::ERROR, || {
                match self.socket.take_error() {
                    Ok(Some(error)) => Ok(error),
                    Ok(None) => Err(io::ErrorKind::WouldBlock.into()),
                    Err(error) => Err(error),
                }
            });
            match taken {
                Ok(error) if self.noting(&error) => return Ok(()),
                Ok(error) => {
                    tracing::debug!(%error, relay = %self.relay, "error from the relay's address");
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Notes `e` for [`UdpAssociation::take_error`] if it is an ICMP error from the
    /// relay's address; whether it was.
    fn noting(&self, e: &io::Error) -> bool {
        match RelayError::from_io(e) {
            Some(error) => {
                self.pending.store(error.code(), Relaxed);
                true
            }
            None => false,
        }
    }

    /// Sends datagrams already encoded for the relay (SOCKS header and payload) as
    /// far as the socket takes them now, a batch per system call; returns how many
    /// went, in order (the rest are to be dropped). `WouldBlock` only when none went.
    pub fn try_send_batch(&self, datagrams: &[&[u8]]) -> io::Result<usize> {
        let mut sent = 0;
        while sent < datagrams.len() {
            let rest = datagrams.get(sent..).unwrap_or_default();
            let batch: Vec<mmsg::Outgoing<'_>> = rest
                .iter()
                .take(mmsg::MAX_BATCH)
                .map(|datagram| (*datagram, None))
                .collect();
            let result = self.retrying_pending(|| {
                self.socket.try_io(tokio::io::Interest::WRITABLE, || {
                    mmsg::send_batch(&self.socket, &batch)
                })
            });
            match result {
                Ok(0) => break,
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                    for datagram in rest {
                        match self.retrying_pending(|| self.socket.try_send(datagram)) {
                            Ok(_) => sent += 1,
                            Err(_) => break,
                        }
                    }
                    break;
                }
                Err(e) if sent == 0 => return Err(e),
                Err(_) => break,
            }
        }
        Ok(sent)
    }

    /// Sends datagrams already encoded for the relay that lie back to back in
    /// `bytes` (datagram `i` ends at `ends[i]`), as far as the socket takes them now:
    /// runs of one size as one segmented send (UDP GSO) where the kernel allows,
    /// others a batch per system call. Returns how many went, in order.
    pub fn try_send_contiguous(&self, bytes: &[u8], ends: &[usize]) -> io::Result<usize> {
        let result = self.retrying_pending(|| {
            self.socket.try_io(tokio::io::Interest::WRITABLE, || {
                mmsg::send_contiguous(&self.socket, bytes, ends, None)
            })
        });
        match result {
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                let mut start = 0;
                let datagrams: Vec<&[u8]> = ends
                    .iter()
                    .map(|&end| {
                        let datagram = bytes.get(start..end).unwrap_or_default();
                        start = end;
                        datagram
                    })
                    .collect();
                self.try_send_batch(&datagrams)
            }
            other => other,
        }
    }

    /// Receives the next well-formed datagram from the relay into `buf`: returns its
    /// source and where its payload lies in `buf`. Malformed datagrams and fragments
    /// (FRAG != 0) are dropped and logged.
    pub async fn recv_from(&self, buf: &mut [u8]) -> io::Result<Received> {
        loop {
            self.socket.readable().await?;
            match self.try_recv_from(buf) {
                Ok(Some(received)) => return Ok(received),
                Ok(None) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits until the relay socket may have a datagram.
    pub async fn readable(&self) -> io::Result<()> {
        self.socket.readable().await
    }

    /// Receives one datagram if one is queued (`WouldBlock` when none is). `Ok(None)`:
    /// one was received but dropped (malformed, or a fragment).
    pub fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<Option<Received>> {
        let n = self.socket.try_recv(buf).inspect_err(|e| {
            self.noting(e);
        })?;
        Ok(Self::parse_relayed(buf.get(..n).unwrap_or_default()))
    }

    /// Receives every datagram queued now, up to a batch, with one system call:
    /// datagram `i` lies in slot `i` (`slot` bytes each) of `buf`; parse each with
    /// [`UdpAssociation::parse_relayed`]. `WouldBlock` when none is queued.
    pub fn try_recv_batch(
        &self,
        buf: &mut [u8],
        slot: usize,
        out: &mut Vec<mmsg::Datagram>,
    ) -> io::Result<usize> {
        self.socket
            .try_io(tokio::io::Interest::READABLE, || {
                mmsg::recv_batch(&self.socket, buf, slot, out)
            })
            .inspect_err(|e| {
                self.noting(e);
            })
    }

    /// A datagram from the relay: its source and where its payload lies in `datagram`;
    /// `None` (logged) for a malformed datagram or a fragment (FRAG != 0), to drop.
    pub fn parse_relayed(datagram: &[u8]) -> Option<Received> {
        let n = datagram.len();
        match udp::parse_datagram(datagram) {
            Ok((header, _)) if header.frag != 0 => {
                tracing::debug!(frag = header.frag, "dropped a fragment from the relay");
                None
            }
            Ok((header, payload)) => {
                let start = n.saturating_sub(payload.len());
                Some((header.target, start..n))
            }
            Err(e) => {
                tracing::debug!(error = %e, "dropped a malformed datagram from the relay");
                None
            }
        }
    }

    /// Resolves when the proxy closes the control connection (the association is over).
    pub async fn closed(&self) {
        let mut scratch = [0u8; 64];
        loop {
            if self.control.readable().await.is_err() {
                return;
            }
            match self.control.try_read(&mut scratch) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_errors_a_relay_socket_reports_from_icmp() {
        let from = |errno| RelayError::from_io(&io::Error::from_raw_os_error(errno));
        assert_eq!(from(nix::libc::ECONNREFUSED), Some(RelayError::Refused));
        for errno in [
            nix::libc::EHOSTUNREACH,
            nix::libc::EACCES,
            nix::libc::EHOSTDOWN,
            nix::libc::ENONET,
        ] {
            assert_eq!(from(errno), Some(RelayError::Prohibited), "errno {errno}");
        }
        assert_eq!(
            from(nix::libc::ENETUNREACH),
            Some(RelayError::NetUnreachable)
        );
        // A local firewall refusing our own send, and ordinary failures: not from
        // the relay.
        for errno in [nix::libc::EPERM, nix::libc::EAGAIN, nix::libc::EMSGSIZE] {
            assert_eq!(from(errno), None, "errno {errno}");
        }
        for error in [
            RelayError::Refused,
            RelayError::Prohibited,
            RelayError::NetUnreachable,
        ] {
            assert_eq!(RelayError::from_code(error.code()), Some(error));
        }
        assert_eq!(RelayError::from_code(RelayError::NONE), None);
    }
}
