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

use tun2socks_platform::mmsg;

use self::batch::Recv;
use super::{Shared, refuse, reply};
use crate::busy::BusyPoll;
use crate::socks::{Address, ReplyCode, Request, udp};

mod batch;
mod spin;

pub(super) use spin::SpinSlot;

/// Batches received per wake-up of a socket before the others get a turn (up to
/// `ROUNDS * batch::SLOTS` datagrams).
const ROUNDS: usize = 2;
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
    /// Passes of a busy-poll spin that found datagrams ([`spin`]).
    spin_hits: u64,
}

impl Counters {
    /// Bytes relayed either way so far.
    fn bytes(&self) -> u64 {
        self.to_remote_bytes.saturating_add(self.to_client_bytes)
    }
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
    /// When to keep polling after datagrams instead of sleeping ([`spin`]).
    busy: BusyPoll,
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
        busy: BusyPoll::new(shared.config.udp_busy_poll),
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
        spin_hits = c.spin_hits,
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
            // Everything queued on that socket, up to a few batches: one wake-up (and
            // a system call each way) per burst rather than per datagram.
            let before = self.counters.bytes();
            let (active, mut named) = match ready {
                Ready::Client => batch::with_batch(|b| self.relay_from_client(b, Recv::Tracked)),
                Ready::Remote(family) => (
                    batch::with_batch(|b| self.relay_to_client(family, b, Recv::Tracked)),
                    vec![],
                ),
            };
            if active && named.is_empty() {
                // A busy association polls on for a moment (the next datagram of an
                // exchange is caught without a wake-up).
                let moved = self.counters.bytes().saturating_sub(before);
                named = self.after_work(moved);
            }
            // Datagrams to names not resolved yet: resolved and sent one by one.
            for (target, payload) in named {
                self.forward_named(&target, &payload).await;
            }
            if active {
                deadline = Instant::now() + idle;
            }
        }
    }

    /// Relays the client's queued datagrams to their destinations; returns whether
    /// any came from the client, and those whose destination is a name that needs
    /// resolving (to send after an await).
    fn relay_from_client(
        &mut self,
        b: &mut batch::Batch,
        how: Recv,
    ) -> (bool, Vec<(Address, Vec<u8>)>) {
        let (mut active, mut named) = (false, Vec::new());
        for _ in 0..ROUNDS {
            if !batch::recv_into(&self.relay, b, how) {
                break;
            }
            let mut v4: Vec<mmsg::Outgoing<'_>> = Vec::new();
            let mut v6: Vec<mmsg::Outgoing<'_>> = Vec::new();
            for (i, d) in b.got.iter().enumerate() {
                let at = i.saturating_mul(batch::SLOT);
                let datagram = b.buf.get(at..at.saturating_add(d.len)).unwrap_or_default();
                let Some(src) = batch::sender(d) else {
                    continue;
                };
                let Some((dst, payload)) = self.accept_from_client(datagram, src, &mut named)
                else {
                    continue;
                };
                active = true;
                match self.outbound(dst.ip()) {
                    Ok(Family::V4) => v4.push((payload, Some(dst))),
                    Ok(Family::V6) => v6.push((payload, Some(dst))),
                    Err(e) => {
                        self.counters.dropped = self.counters.dropped.saturating_add(1);
                        tracing::debug!(error = %e, "no outbound socket");
                    }
                }
            }
            self.send_remote(Family::V4, &v4, &mut b.out);
            self.send_remote(Family::V6, &v6, &mut b.out);
            if b.got.len() < batch::SLOTS {
                // Drained (a full batch may have more behind it).
                break;
            }
        }
        (active, named)
    }

    /// Sends a batch through the outbound socket of `family`, and counts it.
    fn send_remote(&mut self, family: Family, list: &[mmsg::Outgoing<'_>], out: &mut Vec<u8>) {
        if list.is_empty() {
            return;
        }
        let socket = match family {
            Family::V4 => self.out_v4.as_ref(),
            Family::V6 => self.out_v6.as_ref(),
        };
        let sent = socket.map_or(0, |socket| batch::send_grouped(socket, list, out));
        let bytes: u64 = list.iter().take(sent).map(|(p, _)| p.len() as u64).sum();
        let c = &mut self.counters;
        c.to_remote = c.to_remote.saturating_add(sent as u64);
        c.to_remote_bytes = c.to_remote_bytes.saturating_add(bytes);
        c.dropped = c
            .dropped
            .saturating_add(list.len().saturating_sub(sent) as u64);
    }

    /// Checks one datagram from the relay: its sender, header and destination.
    /// `Some((destination, payload))` to send it on; `None` when it was dropped
    /// (counted), or when its destination is a name not resolved yet (added to
    /// `named`).
    fn accept_from_client<'d>(
        &mut self,
        datagram: &'d [u8],
        src: SocketAddr,
        named: &mut Vec<(Address, Vec<u8>)>,
    ) -> Option<(SocketAddr, &'d [u8])> {
        if !self.is_client(src) {
            self.counters.dropped = self.counters.dropped.saturating_add(1);
            tracing::debug!(%src, "dropped a datagram from a stranger");
            return None;
        }
        let (header, payload) = match udp::parse_datagram(datagram) {
            Ok(parsed) => parsed,
            Err(e) => {
                self.counters.dropped = self.counters.dropped.saturating_add(1);
                tracing::debug!(error = %e, "dropped a malformed datagram");
                return None;
            }
        };
        if header.frag != 0 {
            self.counters.dropped = self.counters.dropped.saturating_add(1);
            tracing::debug!(frag = header.frag, "dropped a fragment (not supported)");
            return None;
        }
        let dst = match &header.target {
            Address::Ip(addr) => SocketAddr::new(addr.ip().to_canonical(), addr.port()),
            Address::Domain(name, port) => match self.names.get(name.as_str()) {
                Some(ip) => SocketAddr::new(*ip, *port),
                None => {
                    if named.len() < batch::SLOTS {
                        named.push((header.target.clone(), payload.to_vec()));
                    } else {
                        self.counters.dropped = self.counters.dropped.saturating_add(1);
                    }
                    return None;
                }
            },
        };
        if self.shared.destination_denied(dst.ip()) {
            self.counters.dropped = self.counters.dropped.saturating_add(1);
            tracing::debug!(%dst, "destination denied; datagram dropped");
            return None;
        }
        Some((dst, payload))
    }

    /// Resolves a datagram's destination name and sends it on.
    async fn forward_named(&mut self, target: &Address, payload: &[u8]) {
        let Some(dst) = self.destination(target).await else {
            self.counters.dropped = self.counters.dropped.saturating_add(1);
            return;
        };
        let family = match self.outbound(dst.ip()) {
            Ok(family) => family,
            Err(e) => {
                self.counters.dropped = self.counters.dropped.saturating_add(1);
                tracing::debug!(error = %e, "no outbound socket");
                return;
            }
        };
        let socket = match family {
            Family::V4 => self.out_v4.as_ref(),
            Family::V6 => self.out_v6.as_ref(),
        };
        let Some(socket) = socket else { return };
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
    }

    /// Relays the datagrams queued on an outbound socket to the client, each
    /// wrapped with its source; returns whether any was relayed.
    fn relay_to_client(&mut self, family: Family, b: &mut batch::Batch, how: Recv) -> bool {
        let socket = match family {
            Family::V4 => self.out_v4.as_ref(),
            Family::V6 => self.out_v6.as_ref(),
        };
        let Some(socket) = socket else { return false };
        let mut active = false;
        let mut ends: Vec<usize> = Vec::with_capacity(batch::SLOTS);
        for _ in 0..ROUNDS {
            if !batch::recv_into(socket, b, how) {
                break;
            }
            let Some(port) = self.client_port else {
                // The client has not sent anything yet, so it cannot expect replies.
                let n = b.got.len() as u64;
                self.counters.dropped = self.counters.dropped.saturating_add(n);
                continue;
            };
            active = true;
            b.out.clear();
            ends.clear();
            for (i, d) in b.got.iter().enumerate() {
                let at = i.saturating_mul(batch::SLOT);
                let payload = b.buf.get(at..at.saturating_add(d.len)).unwrap_or_default();
                let Some(src) = batch::sender(d) else {
                    continue;
                };
                udp::encode_datagram(&Address::from(src), payload, &mut b.out);
                ends.push(b.out.len());
                self.counters.to_client_bytes = self
                    .counters
                    .to_client_bytes
                    .saturating_add(payload.len() as u64);
            }
            let client = SocketAddr::new(self.client_ip, port);
            let sent = batch::send_contiguous(&self.relay, &b.out, &ends, client);
            self.counters.to_client = self.counters.to_client.saturating_add(sent as u64);
            if ends.len() > sent {
                tracing::debug!(dropped = ends.len() - sent, "send to client failed");
            }
            if b.got.len() < batch::SLOTS {
                break;
            }
        }
        active
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

    /// The outbound socket's family for `ip`, the socket opened on first use.
    fn outbound(&mut self, ip: IpAddr) -> io::Result<Family> {
        let (slot, any, family): (&mut Option<UdpSocket>, SocketAddr, _) = match ip {
            IpAddr::V4(_) => (
                &mut self.out_v4,
                (Ipv4Addr::UNSPECIFIED, 0).into(),
                Family::V4,
            ),
            IpAddr::V6(_) => (
                &mut self.out_v6,
                (Ipv6Addr::UNSPECIFIED, 0).into(),
                Family::V6,
            ),
        };
        if slot.is_none() {
            let socket = std::net::UdpSocket::bind(any)?;
            socket.set_nonblocking(true)?;
            let socket = UdpSocket::from_std(socket)?;
            set_recv_buffer(&socket);
            *slot = Some(socket);
        }
        Ok(family)
    }
}

/// Asks for the tunnel's receive buffer size on a relay socket: with the default
/// (rmem_default, ~208 KiB) a burst overflows in a fraction of a second at a few
/// hundred datagrams/s while the server is busy. Best effort (the kernel caps it at
/// rmem_max); it costs memory only while datagrams queue.
fn set_recv_buffer(socket: &UdpSocket) {
    let _ = socket2::SockRef::from(socket).set_recv_buffer_size(crate::upstream::UDP_RECV_BUFFER);
}
