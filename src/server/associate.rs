//! UDP ASSOCIATE: a relay socket per association, on the control connection's local
//! address (so the reply never announces 0.0.0.0).
//!
//! Only the client may use the relay: datagrams must come from the control
//! connection's client IP, and from the port it declared (when it declared 0, the
//! first sender's port is locked in). Fragments (FRAG != 0) are dropped. Replies from
//! any destination are relayed back (full cone) with their source in the header. The
//! association ends when the control connection closes, or after an idle timeout.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::Instant;

use super::{Shared, refuse, reply};
use crate::socks::{Address, ReplyCode, Request, udp};

/// Largest UDP payload plus header we receive in one datagram.
const DATAGRAM_MAX: usize = 65_536;
/// Datagrams handled per wake-up of a socket before the others get a turn.
const BATCH: usize = 64;
/// Host names remembered per association (cleared when full).
const NAME_CACHE: usize = 64;

/// Datagram and byte counts of one association, logged at its end.
#[derive(Debug, Default)]
struct Counters {
    to_remote: u64,
    to_remote_bytes: u64,
    to_client: u64,
    to_client_bytes: u64,
    dropped: u64,
}

/// The association's sockets and state.
struct Association<'a> {
    shared: &'a Shared,
    relay: UdpSocket,
    out_v4: Option<UdpSocket>,
    out_v6: Option<UdpSocket>,
    client_ip: IpAddr,
    /// The client's UDP port: declared in the request, or locked on first datagram.
    client_port: Option<u16>,
    names: HashMap<String, IpAddr>,
    counters: Counters,
    /// The reply being wrapped for the client (reused).
    out: Vec<u8>,
}

pub(super) async fn serve(
    mut control: TcpStream,
    request: &Request,
    shared: &Shared,
) -> io::Result<()> {
    let client_ip = control.peer_addr()?.ip().to_canonical();
    let local_ip = control.local_addr()?.ip();
    let relay = match UdpSocket::bind((local_ip, 0)).await {
        Ok(relay) => {
            set_recv_buffer(&relay);
            relay
        }
        Err(e) => {
            refuse(&mut control, request, reply::for_io_error(&e)).await;
            return Ok(());
        }
    };
    let bound = relay.local_addr()?;
    control
        .write_all(&request.reply(ReplyCode::SUCCEEDED, &Address::from(bound)))
        .await?;
    let declared = request.target.port();
    tracing::info!(relay = %bound, declared = %request.target, "UDP association open");
    let mut assoc = Association {
        shared,
        relay,
        out_v4: None,
        out_v6: None,
        client_ip,
        client_port: (declared != 0).then_some(declared),
        names: HashMap::new(),
        counters: Counters::default(),
        out: Vec::new(),
    };
    let why = assoc.run(&mut control).await;
    let c = &assoc.counters;
    tracing::info!(
        ended = why,
        sent = c.to_remote,
        sent_bytes = c.to_remote_bytes,
        received = c.to_client,
        received_bytes = c.to_client_bytes,
        dropped = c.dropped,
        "UDP association closed"
    );
    Ok(())
}

/// Which socket has a datagram.
#[derive(Debug, Clone, Copy)]
enum Ready {
    /// The relay: a datagram from the client.
    Client,
    /// An outbound socket: a reply from a destination.
    Remote(Family),
}

#[derive(Debug, Clone, Copy)]
enum Family {
    V4,
    V6,
}

/// Waits until an optional socket is readable; pending forever when there is none.
async fn readable_opt(socket: Option<&UdpSocket>) -> io::Result<()> {
    match socket {
        Some(socket) => socket.readable().await,
        None => std::future::pending().await,
    }
}

/// Resolves when the control connection closes (data on it is read and ignored).
async fn control_closed(control: &mut TcpStream) {
    let mut scratch = [0u8; 256];
    while let Ok(n) = control.read(&mut scratch).await {
        if n == 0 {
            return;
        }
    }
}

impl Association<'_> {
    async fn run(&mut self, control: &mut TcpStream) -> &'static str {
        let idle = self.shared.config.udp_idle_timeout;
        let mut deadline = Instant::now() + idle;
        // One receive buffer for the three sockets: a datagram is handled (and
        // sent on) before the next is read.
        let mut buf = vec![0u8; DATAGRAM_MAX];
        loop {
            let ready = tokio::select! {
                () = control_closed(control) => return "control connection closed",
                () = tokio::time::sleep_until(deadline) => return "idle timeout",
                r = self.relay.readable() => r.map(|()| Ready::Client),
                r = readable_opt(self.out_v4.as_ref()) => r.map(|()| Ready::Remote(Family::V4)),
                r = readable_opt(self.out_v6.as_ref()) => r.map(|()| Ready::Remote(Family::V6)),
            };
            let ready = match ready {
                Ok(ready) => ready,
                Err(e) => {
                    tracing::debug!(error = %e, "receive error");
                    continue;
                }
            };
            // Everything queued on that socket, up to a batch: one wake-up (and one
            // pass through the select) per burst rather than per datagram.
            let mut active = false;
            for _ in 0..BATCH {
                let (n, src) = match self.try_recv(ready, &mut buf) {
                    Some(Ok(received)) => received,
                    Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "receive error");
                        break;
                    }
                    None => break,
                };
                let datagram = buf.get(..n).unwrap_or_default();
                active |= match ready {
                    Ready::Client => self.forward_from_client(datagram, src).await,
                    Ready::Remote(_) => self.forward_to_client(datagram, src).await,
                };
            }
            if active {
                deadline = Instant::now() + idle;
            }
        }
    }

    /// Receives one datagram from the socket `ready` names, if it has one queued.
    fn try_recv(&self, ready: Ready, buf: &mut [u8]) -> Option<io::Result<(usize, SocketAddr)>> {
        let socket = match ready {
            Ready::Client => Some(&self.relay),
            Ready::Remote(Family::V4) => self.out_v4.as_ref(),
            Ready::Remote(Family::V6) => self.out_v6.as_ref(),
        };
        socket.map(|s| s.try_recv_from(buf))
    }

    /// Is `src` the client? Locks the port on the first datagram if none was declared.
    fn is_client(&mut self, src: SocketAddr) -> bool {
        if src.ip().to_canonical() != self.client_ip {
            return false;
        }
        match self.client_port {
            Some(port) => port == src.port(),
            None => {
                self.client_port = Some(src.port());
                true
            }
        }
    }

    /// A datagram arrived on the relay: check the sender, parse, forward the payload.
    async fn forward_from_client(&mut self, datagram: &[u8], src: SocketAddr) -> bool {
        if !self.is_client(src) {
            self.counters.dropped = self.counters.dropped.saturating_add(1);
            tracing::debug!(%src, "dropped a datagram from a stranger");
            return false;
        }
        let (header, payload) = match udp::parse_datagram(datagram) {
            Ok(parsed) => parsed,
            Err(e) => {
                self.counters.dropped = self.counters.dropped.saturating_add(1);
                tracing::debug!(error = %e, "dropped a malformed datagram");
                return false;
            }
        };
        if header.frag != 0 {
            self.counters.dropped = self.counters.dropped.saturating_add(1);
            tracing::debug!(frag = header.frag, "dropped a fragment (not supported)");
            return false;
        }
        let Some(dst) = self.destination(&header.target).await else {
            self.counters.dropped = self.counters.dropped.saturating_add(1);
            return false;
        };
        let socket = match self.outbound(dst.ip()).await {
            Ok(socket) => socket,
            Err(e) => {
                self.counters.dropped = self.counters.dropped.saturating_add(1);
                tracing::debug!(error = %e, "no outbound socket");
                return false;
            }
        };
        match socket.send_to(payload, dst).await {
            Ok(_) => {
                self.counters.to_remote = self.counters.to_remote.saturating_add(1);
                self.counters.to_remote_bytes = self
                    .counters
                    .to_remote_bytes
                    .saturating_add(payload.len() as u64);
            }
            Err(e) => {
                self.counters.dropped = self.counters.dropped.saturating_add(1);
                tracing::debug!(%dst, error = %e, "send failed");
            }
        }
        true
    }

    /// A datagram arrived from a destination: wrap it and send it to the client.
    async fn forward_to_client(&mut self, payload: &[u8], src: SocketAddr) -> bool {
        let Some(port) = self.client_port else {
            // The client has not sent anything yet, so it cannot expect replies.
            self.counters.dropped = self.counters.dropped.saturating_add(1);
            return false;
        };
        let src = SocketAddr::new(src.ip().to_canonical(), src.port());
        let mut datagram = std::mem::take(&mut self.out);
        datagram.clear();
        udp::encode_datagram(&Address::from(src), payload, &mut datagram);
        let client = SocketAddr::new(self.client_ip, port);
        let sent = self.relay.send_to(&datagram, client).await;
        self.out = datagram;
        match sent {
            Ok(_) => {
                self.counters.to_client = self.counters.to_client.saturating_add(1);
                self.counters.to_client_bytes = self
                    .counters
                    .to_client_bytes
                    .saturating_add(payload.len() as u64);
            }
            Err(e) => tracing::debug!(%client, error = %e, "send to client failed"),
        }
        true
    }

    /// Resolves and checks a datagram's destination; `None` (logged) to drop it.
    async fn destination(&mut self, target: &Address) -> Option<SocketAddr> {
        let addr = match target {
            Address::Ip(addr) => SocketAddr::new(addr.ip().to_canonical(), addr.port()),
            Address::Domain(name, port) => {
                let ip = match self.names.get(name.as_str()) {
                    Some(ip) => *ip,
                    None => {
                        let resolved = tokio::net::lookup_host((name.as_str(), *port))
                            .await
                            .ok()
                            .and_then(|mut addrs| addrs.next());
                        let Some(addr) = resolved else {
                            tracing::debug!(host = %name, "resolve failed; datagram dropped");
                            return None;
                        };
                        if self.names.len() >= NAME_CACHE {
                            self.names.clear();
                        }
                        self.names.insert(name.as_str().to_string(), addr.ip());
                        addr.ip()
                    }
                };
                SocketAddr::new(ip, *port)
            }
        };
        if self.shared.destination_denied(addr.ip()) {
            tracing::debug!(dst = %addr, "destination denied; datagram dropped");
            return None;
        }
        Some(addr)
    }

    /// The outbound socket for `ip`'s family, opened on first use.
    async fn outbound(&mut self, ip: IpAddr) -> io::Result<&UdpSocket> {
        let (slot, any): (&mut Option<UdpSocket>, SocketAddr) = match ip {
            IpAddr::V4(_) => (&mut self.out_v4, (Ipv4Addr::UNSPECIFIED, 0).into()),
            IpAddr::V6(_) => (&mut self.out_v6, (Ipv6Addr::UNSPECIFIED, 0).into()),
        };
        if slot.is_none() {
            let socket = UdpSocket::bind(any).await?;
            set_recv_buffer(&socket);
            *slot = Some(socket);
        }
        slot.as_ref()
            .ok_or_else(|| io::Error::other("outbound socket missing"))
    }
}

/// Asks for the tunnel's receive buffer size on a relay socket: with the default
/// (rmem_default, ~208 KiB) a burst overflows in a fraction of a second at a few
/// hundred datagrams/s while the server is busy. Best effort (the kernel caps it at
/// rmem_max); it costs memory only while datagrams queue.
fn set_recv_buffer(socket: &UdpSocket) {
    let _ = socket2::SockRef::from(socket).set_recv_buffer_size(crate::upstream::UDP_RECV_BUFFER);
}
