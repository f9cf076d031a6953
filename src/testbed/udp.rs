//! UDP test services for the target namespace, run in-process on threads that entered
//! it: an echo (every datagram goes back to its sender, unchanged) and a "cone"
//! service for the full-cone test (a datagram `CONE <port>` to [`CONE_PORT`] is
//! answered from a second socket bound to `<port>`, a port the client never sent to),
//! and a sink that only counts what reaches it (to prove that something, a broadcast
//! say, was *not* forwarded).
//! Both listen on IPv4 and IPv6 at fixed ports, on separate sockets per family, each
//! served by its own blocking thread (the echo must keep up with 100,000 datagrams/s).
//!
//! The client side is [`udp_client`](super::udp_client). Used by the namespace tests,
//! `selftest` and the benchmarks; never by the data path.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use super::context;
use super::namespace::Namespace;

/// Port of the UDP echo.
pub const UDP_ECHO_PORT: u16 = 7007;
/// Port A of the cone service: it receives `CONE <port>` requests.
pub const CONE_PORT: u16 = 7008;
/// The port a cone test asks the reply to come from, unless it picks its own.
pub const CONE_REPLY_PORT: u16 = 7009;
/// Port of the counting sink: never answers; [`UdpServices::sink_received`] counts.
pub const UDP_SINK_PORT: u16 = 7010;
/// What a cone request starts with; the ASCII decimal port follows after one space.
pub const CONE_REQUEST: &[u8] = b"CONE ";
/// What a cone reply starts with; the port it was sent from follows after one space.
pub const CONE_REPLY: &[u8] = b"CONE-REPLY ";

/// Receive buffer of the service sockets (asked for; the kernel may cap it).
const SOCKET_BUFFER: usize = 8 << 20;
/// How often a serving thread looks at its stop flag when no datagram comes.
const STOP_POLL: Duration = Duration::from_millis(100);
/// Large enough for any UDP payload.
const MAX_DATAGRAM: usize = 65_536;

/// The UDP echo and cone services (v4 and v6), stopped on drop.
#[derive(Debug)]
pub struct UdpServices {
    stop: Arc<AtomicBool>,
    sunk: Arc<AtomicU64>,
    threads: Vec<JoinHandle<io::Result<()>>>,
}

impl UdpServices {
    /// Binds the echo ([`UDP_ECHO_PORT`]) and the cone service ([`CONE_PORT`]) on
    /// `0.0.0.0` and on `[::]` (IPv6 only) inside `ns`, and serves them until dropped.
    /// Returns once every socket is bound.
    pub fn start(ns: &Namespace) -> io::Result<UdpServices> {
        // A larger receive buffer than the default cap, for the rate benchmark; the
        // namespace may not let us (then the default stays).
        let _ = ns.set_sysctl("net.core.rmem_max", &SOCKET_BUFFER.to_string());
        let _ = ns.set_sysctl("net.core.wmem_max", &SOCKET_BUFFER.to_string());
        let sockets = ns.within(|| {
            Ok([
                (bind_udp(v4(UDP_ECHO_PORT))?, Service::Echo),
                (bind_udp(v6(UDP_ECHO_PORT))?, Service::Echo),
                (bind_udp(v4(CONE_PORT))?, Service::Cone),
                (bind_udp(v6(CONE_PORT))?, Service::Cone),
                (bind_udp(v4(UDP_SINK_PORT))?, Service::Sink),
                (bind_udp(v6(UDP_SINK_PORT))?, Service::Sink),
            ])
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut services = UdpServices {
            stop: stop.clone(),
            sunk: Arc::new(AtomicU64::new(0)),
            threads: Vec::new(),
        };
        for (socket, service) in sockets {
            socket
                .set_read_timeout(Some(STOP_POLL))
                .map_err(context("udp service: read timeout"))?;
            let stop = stop.clone();
            let sunk = services.sunk.clone();
            // The cone service binds reply sockets as it goes: its thread must be in
            // the namespace. The echo's socket is, which is all it needs.
            services.threads.push(ns.enter(move || match service {
                Service::Echo => serve_echo(&socket, &stop),
                Service::Cone => serve_cone(&socket, &stop),
                Service::Sink => serve_sink(&socket, &stop, &sunk),
            }));
        }
        Ok(services)
    }

    /// Datagrams the sink ([`UDP_SINK_PORT`], v4 and v6, broadcasts included) has
    /// received so far.
    pub fn sink_received(&self) -> u64 {
        self.sunk.load(Ordering::Relaxed)
    }

    /// Stops the services and reports the first error a serving thread ended with.
    pub fn stop(mut self) -> io::Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> io::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        let mut first = Ok(());
        for thread in self.threads.drain(..) {
            let result = super::namespace::join(thread);
            if first.is_ok() {
                first = result;
            }
        }
        first
    }
}

impl Drop for UdpServices {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!("udp services: {e}");
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Service {
    Echo,
    Cone,
    Sink,
}

fn v4(port: u16) -> SocketAddr {
    (Ipv4Addr::UNSPECIFIED, port).into()
}

fn v6(port: u16) -> SocketAddr {
    (Ipv6Addr::UNSPECIFIED, port).into()
}

/// A UDP socket bound to `addr` (IPv6 sockets are IPv6 only), with large buffers and
/// SO_REUSEADDR.
pub(crate) fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(context(format!("udp socket for {addr}")))?;
    if addr.is_ipv6() {
        socket
            .set_only_v6(true)
            .map_err(context(format!("IPV6_V6ONLY {addr}")))?;
    }
    socket
        .set_reuse_address(true)
        .map_err(context(format!("SO_REUSEADDR {addr}")))?;
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket
        .bind(&addr.into())
        .map_err(context(format!("bind udp {addr}")))?;
    Ok(socket.into())
}

/// Whether a receive error only means "nothing came within the poll interval".
fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

fn serve_echo(socket: &UdpSocket, stop: &AtomicBool) -> io::Result<()> {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while !stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                // A full send buffer or an unreachable sender loses this reply only.
                let _ = socket.send_to(buf.get(..n).unwrap_or_default(), from);
            }
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(context("udp echo: recv")(e)),
        }
    }
    Ok(())
}

fn serve_sink(socket: &UdpSocket, stop: &AtomicBool, sunk: &AtomicU64) -> io::Result<()> {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while !stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut buf) {
            Ok(_) => {
                sunk.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(context("udp sink: recv")(e)),
        }
    }
    Ok(())
}

fn serve_cone(socket: &UdpSocket, stop: &AtomicBool) -> io::Result<()> {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let local = socket
        .local_addr()
        .map_err(context("cone: local address"))?;
    while !stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                let Some(port) = parse_cone_request(buf.get(..n).unwrap_or_default()) else {
                    continue;
                };
                let reply_from = SocketAddr::new(local.ip(), port);
                match bind_udp(reply_from) {
                    Ok(second) => {
                        let _ = second.send_to(&cone_reply(port), from);
                    }
                    Err(e) => tracing::warn!("cone service: {e}"),
                }
            }
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(context("cone service: recv")(e)),
        }
    }
    Ok(())
}

/// The request that asks the cone service to answer from `port`.
pub fn cone_request(port: u16) -> Vec<u8> {
    let mut request = CONE_REQUEST.to_vec();
    request.extend_from_slice(port.to_string().as_bytes());
    request
}

/// The reply the cone service sends from `port`.
pub fn cone_reply(port: u16) -> Vec<u8> {
    let mut reply = CONE_REPLY.to_vec();
    reply.extend_from_slice(port.to_string().as_bytes());
    reply
}

/// The port of a `CONE <port>` request (ASCII decimal, optional trailing newline),
/// or `None` for anything else (including port 0).
pub fn parse_cone_request(datagram: &[u8]) -> Option<u16> {
    let rest = datagram.strip_prefix(CONE_REQUEST)?;
    let text = std::str::from_utf8(rest).ok()?.trim_end();
    text.parse::<u16>().ok().filter(|&port| port != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cone_requests_parse_and_round_trip() {
        assert_eq!(parse_cone_request(&cone_request(7009)), Some(7009));
        assert_eq!(parse_cone_request(b"CONE 65535\n"), Some(65535));
        for bad in [
            &b"CONE 0"[..],
            b"CONE 65536",
            b"CONE",
            b"CONE x",
            b"cone 7009",
            b"",
        ] {
            assert_eq!(parse_cone_request(bad), None, "{bad:?}");
        }
        assert_eq!(cone_reply(7009), b"CONE-REPLY 7009".to_vec());
    }
}
