//! One-off UDP probes from a namespace: many source ports at once (and holding them
//! idle), the full-cone check, the ICMP port-unreachable probe and a broadcast
//! sender. Companions of [`udp_client`](super::udp_client), for the services of
//! [`udp`](super::udp).

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use super::context;
use super::namespace::Namespace;
use super::udp::{CONE_PORT, CONE_REPLY_PORT, bind_udp, cone_reply, cone_request};
use super::udp_client::{
    REPLY_TIMEOUT, connected_socket, echo_payload, is_timeout, recv_from_retrying, recv_retrying,
    wildcard,
};

/// Many UDP sockets of one namespace, each on its own source port; held open until
/// dropped (for "200 ports at once" and for idle associations).
#[derive(Debug)]
pub struct UdpFanout {
    sockets: Vec<UdpSocket>,
}

/// What [`UdpFanout::echo_once`] saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FanoutReport {
    /// Sockets that sent.
    pub sockets: usize,
    /// Sockets that got their own payload back.
    pub answered: usize,
    /// Replies with another socket's payload or altered bytes.
    pub wrong: usize,
}

impl UdpFanout {
    /// Opens `count` UDP sockets in `ns`, of `family`'s address family (`family` is
    /// any address of it, e.g. the target's), each bound to its own ephemeral port.
    pub fn open(ns: &Namespace, family: IpAddr, count: usize) -> io::Result<UdpFanout> {
        let any = wildcard(SocketAddr::new(family, 0));
        let sockets = ns.within(move || {
            (0..count)
                .map(|_| {
                    let socket = UdpSocket::bind(any).map_err(context(format!("bind {any}")))?;
                    socket
                        .set_nonblocking(true)
                        .map_err(context("nonblocking"))?;
                    Ok(socket)
                })
                .collect::<io::Result<Vec<_>>>()
        })?;
        Ok(UdpFanout { sockets })
    }

    /// The number of sockets.
    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// The local port of every socket.
    pub fn ports(&self) -> io::Result<Vec<u16>> {
        self.sockets
            .iter()
            .map(|s| s.local_addr().map(|a| a.port()))
            .collect()
    }

    /// Every socket sends one datagram (its index and `payload` bytes in all) to the
    /// echo at `target`, all at once; then each waits, up to `timeout` in all, for its
    /// own payload to come back. Nothing is resent.
    pub fn echo_once(
        &self,
        target: SocketAddr,
        payload: usize,
        timeout: Duration,
    ) -> io::Result<FanoutReport> {
        let mut report = FanoutReport {
            sockets: self.sockets.len(),
            ..FanoutReport::default()
        };
        for (i, socket) in self.sockets.iter().enumerate() {
            send_retrying(socket, &echo_payload(i as u64, payload), target)?;
        }
        let mut pending: Vec<usize> = (0..self.sockets.len()).collect();
        let mut buf = vec![0u8; 65_536];
        let deadline = Instant::now() + timeout;
        while !pending.is_empty() && Instant::now() < deadline {
            pending.retain(|&i| {
                let Some(socket) = self.sockets.get(i) else {
                    return false;
                };
                match socket.recv_from(&mut buf) {
                    Ok((n, _from)) => {
                        if buf.get(..n) == Some(echo_payload(i as u64, payload).as_slice()) {
                            report.answered += 1;
                        } else {
                            report.wrong += 1;
                        }
                        false
                    }
                    Err(_) => true,
                }
            });
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(report)
    }
}

/// Sends on a nonblocking socket, waiting briefly while its buffer is full.
fn send_retrying(socket: &UdpSocket, data: &[u8], target: SocketAddr) -> io::Result<()> {
    let deadline = Instant::now() + REPLY_TIMEOUT;
    loop {
        match socket.send_to(data, target) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(context(format!("send to {target}"))(e)),
        }
    }
}

/// `count` sockets in `ns` each send one datagram to the echo at `target` at once,
/// and each must get its own payload back within `timeout` (see [`UdpFanout`]).
pub fn udp_many_ports(
    ns: &Namespace,
    target: SocketAddr,
    count: usize,
    timeout: Duration,
) -> io::Result<FanoutReport> {
    UdpFanout::open(ns, target.ip(), count)?.echo_once(target, 64, timeout)
}

/// What the full-cone check saw: where the reply came from and what it said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConeReply {
    /// The source `recv_from` reported for the reply.
    pub from: SocketAddr,
    /// Whether the reply was the cone service's `CONE-REPLY <port>` for the port asked.
    pub payload_ok: bool,
    /// The probing socket's own address (its port may be reused by a later socket,
    /// which then, rightly, shares the association the tunnel keyed on it).
    pub local: SocketAddr,
}

/// One socket in `ns` sends `CONE <reply_port>` to the cone service on `target`
/// ([`CONE_PORT`]) and waits up to `timeout` for the answer, which the service sends
/// from `reply_port`, a port this socket never sent to. The caller checks that
/// [`ConeReply::from`] is `(target, reply_port)` (see [`udp_cone_check`]).
pub fn udp_cone(
    ns: &Namespace,
    target: IpAddr,
    reply_port: u16,
    timeout: Duration,
) -> io::Result<ConeReply> {
    let service = SocketAddr::new(target, CONE_PORT);
    let socket = ns.within(move || bind_udp(wildcard(service)))?;
    socket
        .set_read_timeout(Some(timeout))
        .map_err(context("cone: read timeout"))?;
    socket
        .send_to(&cone_request(reply_port), service)
        .map_err(context(format!("cone: send to {service}")))?;
    let mut buf = vec![0u8; 2048];
    let (n, from) = recv_from_retrying(&socket, &mut buf).map_err(context(format!(
        "cone: no reply from {target} port {reply_port}"
    )))?;
    Ok(ConeReply {
        from,
        payload_ok: buf.get(..n) == Some(cone_reply(reply_port).as_slice()),
        local: socket
            .local_addr()
            .map_err(context("cone: local address"))?,
    })
}

/// [`udp_cone`] with [`CONE_REPLY_PORT`], failing unless the reply came from
/// `(target, CONE_REPLY_PORT)` with the expected payload.
pub fn udp_cone_check(ns: &Namespace, target: IpAddr) -> io::Result<ConeReply> {
    let reply = udp_cone(ns, target, CONE_REPLY_PORT, REPLY_TIMEOUT)?;
    let expected = SocketAddr::new(target, CONE_REPLY_PORT);
    if reply.from != expected || !reply.payload_ok {
        return Err(io::Error::other(format!(
            "cone: expected the reply from {expected}, got {reply:?}"
        )));
    }
    Ok(reply)
}

/// Sends one datagram from a connected socket in `ns` to `target` (where nothing
/// listens, or through a proxy without UDP) and waits up to `timeout` for the ICMP /
/// ICMPv6 port unreachable, which a connected socket reports as `ECONNREFUSED` on
/// its next receive. Returns how long it took; a reply, silence until `timeout` or
/// another error is an error.
pub fn udp_expect_unreachable(
    ns: &Namespace,
    target: SocketAddr,
    timeout: Duration,
) -> io::Result<Duration> {
    udp_expect_unreachable_from(ns, target, timeout).map(|(took, _)| took)
}

/// [`udp_expect_unreachable`], also returning the probe socket's own address.
pub fn udp_expect_unreachable_from(
    ns: &Namespace,
    target: SocketAddr,
    timeout: Duration,
) -> io::Result<(Duration, SocketAddr)> {
    let socket = connected_socket(ns, target)?;
    let local = socket
        .local_addr()
        .map_err(context("unreachable: local address"))?;
    socket
        .set_read_timeout(Some(timeout))
        .map_err(context("unreachable: read timeout"))?;
    let start = Instant::now();
    socket
        .send(&echo_payload(0, 64))
        .map_err(context(format!("unreachable: send to {target}")))?;
    let mut buf = [0u8; 2048];
    match recv_retrying(&socket, &mut buf) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok((start.elapsed(), local)),
        Err(e) if is_timeout(&e) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no port unreachable from {target} within {timeout:?}"),
        )),
        Err(e) => Err(context(format!("unreachable: recv from {target}"))(e)),
        Ok(n) => Err(io::Error::other(format!(
            "{target} answered ({n} bytes) instead of port unreachable"
        ))),
    }
}

/// Sends `count` datagrams to the IPv4 broadcast address `255.255.255.255:port` from
/// `ns` (SO_BROADCAST set). Whether they go anywhere is the caller's question: with
/// the sink's port, [`UdpServices::sink_received`](super::udp::UdpServices::sink_received)
/// tells whether one was forwarded to the target.
pub fn udp_send_broadcast(ns: &Namespace, port: u16, count: usize) -> io::Result<()> {
    let socket = ns.within(|| bind_udp(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))))?;
    socket
        .set_broadcast(true)
        .map_err(context("SO_BROADCAST"))?;
    let to = SocketAddr::from((Ipv4Addr::BROADCAST, port));
    for i in 0..count {
        socket
            .send_to(&echo_payload(i as u64, 64), to)
            .map_err(context(format!("send to {to}")))?;
    }
    Ok(())
}
