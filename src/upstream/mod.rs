//! The client side of SOCKS on tokio: dial the proxy, drive
//! [`crate::socks::ClientHandshake`], hand back a connected
//! stream ([`Upstream::connect`]) or a UDP association ([`Upstream::udp_associate`]).
//!
//! Stage: between the flows and the proxy. It must not parse or build SOCKS bytes
//! itself (the codec does), must not retry behind the caller's back, and must never
//! dial through the TUN: when a fwmark or an outbound interface is configured, every
//! socket it opens carries it.

mod pipelining;
mod relay;
mod resolve;
mod udp;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::config::ProxyUrl;
use crate::socks::{self, Address, ClientHandshake, ClientStatus, Command, ReplyCode};
use pipelining::PipelineState;
pub use pipelining::{PROBE_TIMEOUT, Pipelining, ProbeOutcome};
use resolve::ProxyAddrs;
pub use udp::{Received, RelayError, UDP_RECV_BUFFER, UdpAssociation};

/// How sockets to the proxy are opened.
#[derive(Debug, Clone)]
pub struct DialOptions {
    /// Give up connecting to the proxy after this long.
    pub connect_timeout: Duration,
    /// Give up on a proxy that has not finished the handshake after this long.
    pub handshake_timeout: Duration,
    /// `SO_MARK` for every socket to the proxy (policy routing keeps it off the TUN).
    pub fwmark: Option<u32>,
    /// `SO_BINDTODEVICE`: send to the proxy through this interface only.
    pub interface: Option<String>,
    /// TCP keep-alive on every connection to the proxy (and, for the flows, on the
    /// application's side in the stack): the first probe after this long without
    /// traffic; see [`keepalive`]. `None`: no probes.
    pub keepalive: Option<Duration>,
    /// A flow through the proxy that moved no byte either way for this long is reset
    /// on both sides. `None`: never.
    pub idle_timeout: Option<Duration>,
}

/// The default of [`DialOptions::keepalive`] (`--tcp-keepalive`).
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(60);
/// The default of [`DialOptions::idle_timeout`] (`--tcp-idle-timeout`): 2 h 4 min,
/// the shortest idle limit RFC 5382 (REQ-5) allows a NAT for established TCP.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(7440);
/// Unanswered keep-alive probes after which a peer is declared gone.
const KEEPALIVE_PROBES: u32 = 3;

/// Kernel keep-alive parameters for a first probe after `idle` without traffic: then
/// a probe every `idle / 3` (at least 1 s); after [`KEEPALIVE_PROBES`] unanswered
/// probes the kernel resets the connection, about `2 × idle` after the last packet
/// from the peer. The reference server uses the same parameters.
pub fn keepalive(idle: Duration) -> socket2::TcpKeepalive {
    let (time, interval, retries) = keepalive_parameters(idle);
    socket2::TcpKeepalive::new()
        .with_time(time)
        .with_interval(interval)
        .with_retries(retries)
}

/// What [`keepalive`] sets, as the kernel keeps it (whole seconds): the first probe
/// after, the interval between probes, and the probes before giving up.
pub fn keepalive_parameters(idle: Duration) -> (Duration, Duration, u32) {
    let whole = |d: Duration| Duration::from_secs(d.as_secs().max(1));
    let interval = (idle / KEEPALIVE_PROBES).max(Duration::from_secs(1));
    (whole(idle), whole(interval), KEEPALIVE_PROBES)
}

impl Default for DialOptions {
    fn default() -> Self {
        DialOptions {
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            fwmark: None,
            interface: None,
            keepalive: Some(DEFAULT_KEEPALIVE),
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
        }
    }
}

/// Why a session with the proxy could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The proxy's host name did not resolve.
    #[error("cannot resolve proxy host {host}: {source}")]
    Resolve {
        /// The name.
        host: String,
        /// The resolver's error.
        source: io::Error,
    },
    /// No TCP connection to the proxy (refused, unreachable, ...).
    #[error("cannot connect to proxy {proxy}: {source}")]
    Dial {
        /// The proxy's address.
        proxy: SocketAddr,
        /// The socket error.
        source: io::Error,
    },
    /// The proxy did not accept the TCP connection in time.
    #[error("proxy {proxy} did not accept within {timeout:?}")]
    DialTimeout {
        /// The proxy's address.
        proxy: SocketAddr,
        /// The limit.
        timeout: Duration,
    },
    /// The proxy answered, but the handshake failed (refused method or login,
    /// an error reply carrying its code, a malformed message).
    #[error("proxy {proxy}: {source}")]
    Protocol {
        /// The proxy's address.
        proxy: SocketAddr,
        /// What went wrong, as the codec sees it.
        source: socks::Error,
    },
    /// The UDP relay the proxy announced is routed through the tunnel itself:
    /// datagrams to it would come back in as new datagrams, each needing an
    /// association of its own.
    #[error(
        "routing loop: the proxy's UDP relay {relay} is routed through {device}, the tunnel \
         itself; route it as the proxy is routed"
    )]
    RelayLoop {
        /// The relay's address.
        relay: SocketAddr,
        /// The TUN device.
        device: String,
    },
    /// The proxy closed the connection before the handshake completed.
    #[error("proxy {proxy} closed the connection {}", ClosedWhen(*after_request))]
    Closed {
        /// The proxy's address.
        proxy: SocketAddr,
        /// It closed after the request, with no reply: how some proxies (`ssh -D`)
        /// refuse a destination.
        after_request: bool,
    },
    /// A socket error during the handshake.
    #[error("I/O error talking to proxy {proxy}: {source}")]
    Io {
        /// The proxy's address.
        proxy: SocketAddr,
        /// The socket error.
        source: io::Error,
    },
    /// The proxy did not finish the handshake in time.
    #[error("proxy {proxy} did not answer within {timeout:?}")]
    HandshakeTimeout {
        /// The proxy's address.
        proxy: SocketAddr,
        /// The limit.
        timeout: Duration,
    },
    /// The destination or command cannot be expressed in the proxy's protocol
    /// (an IPv6 destination over SOCKS4, UDP over SOCKS4).
    #[error("{0}")]
    Unsupported(socks::Error),
}

/// When the proxy closed the connection, in words.
struct ClosedWhen(bool);

impl std::fmt::Display for ClosedWhen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0 {
            "after the request without a reply (some proxies, ssh -D among them, refuse \
             a destination so)"
        } else {
            "during the handshake"
        })
    }
}

impl UpstreamError {
    /// The proxy's SOCKS5 reply code when it refused the request; SOCKS4 refusals map
    /// to 0x01 (SOCKS4 has one failure code).
    pub fn reply_code(&self) -> Option<ReplyCode> {
        match self {
            UpstreamError::Protocol {
                source: socks::Error::Rejected { reply },
                ..
            } => Some(*reply),
            UpstreamError::Protocol {
                source: socks::Error::Rejected4 { .. },
                ..
            } => Some(ReplyCode::GENERAL_FAILURE),
            _ => None,
        }
    }

    /// The SOCKS5 reply code the proxy refused the request with, if it did (not for
    /// SOCKS4, whose one refusal code says nothing of why).
    pub fn reply(&self) -> Option<socks::ReplyCode> {
        match self {
            UpstreamError::Protocol {
                source: socks::Error::Rejected { reply },
                ..
            } => Some(*reply),
            _ => None,
        }
    }

    /// True when the proxy itself could not be reached (as opposed to the proxy
    /// refusing or failing the request).
    pub fn proxy_unreachable(&self) -> bool {
        matches!(
            self,
            UpstreamError::Resolve { .. }
                | UpstreamError::Dial { .. }
                | UpstreamError::DialTimeout { .. }
        )
    }
}

/// The interface a packet to `ip` carrying `fwmark` leaves by (`ip route get`).
fn route_out(ip: IpAddr, fwmark: Option<u32>) -> Result<Option<u32>, String> {
    tun2socks_platform::Routing::new()
        .and_then(|routing| routing.output_interface(ip, fwmark))
        .map_err(|e| e.to_string())
}

/// A TCP stream through the proxy to the destination.
#[derive(Debug)]
pub struct Connected {
    /// The stream; after the handshake it carries the destination's bytes.
    pub stream: TcpStream,
    /// BND.ADDR/BND.PORT of the reply (the proxy's outbound socket).
    pub bound: Address,
    /// Bytes that arrived after the reply: the first bytes from the destination.
    /// Deliver them before reading `stream`.
    pub leftover: Vec<u8>,
}

/// The upstream proxy and how to reach it. Clones share the proxy's resolved
/// addresses.
#[derive(Debug, Clone)]
pub struct Upstream {
    proxy: ProxyUrl,
    options: DialOptions,
    addrs: Arc<ProxyAddrs>,
    /// The UDP relay names the proxy announced ([`relay`]).
    relay_names: Arc<relay::RelayNames>,
    /// Keeps addresses learnt while running off the TUN ([`Upstream::guard_loops`]).
    loop_guard: Option<Arc<relay::LoopGuard>>,
    /// Pipeline the SOCKS5 handshake? ([`Upstream::pipelining`]).
    pipelining: Pipelining,
    /// What `auto` has learnt about the proxy.
    pipeline_state: Arc<PipelineState>,
}

impl Upstream {
    /// A client for `proxy`. A proxy given by name is resolved on first use (call
    /// [`Upstream::resolve`] at start), then again only after every address failed,
    /// with a growing pause between lookups: never once per flow. Once the host's
    /// DNS goes through the tunnel, a lookup per flow would loop.
    pub fn new(proxy: ProxyUrl, options: DialOptions) -> Self {
        let addrs = Arc::new(ProxyAddrs::new(&proxy));
        Upstream {
            proxy,
            options,
            addrs,
            relay_names: Arc::default(),
            loop_guard: None,
            pipelining: Pipelining::default(),
            pipeline_state: Arc::new(PipelineState::new()),
        }
    }

    /// Whether to send the SOCKS5 greeting, credentials and request in one write and
    /// read the replies after (see [`ClientHandshake::pipelined`]): a CONNECT or UDP
    /// ASSOCIATE then costs one round trip to the proxy instead of two or three.
    /// `On` only for proxies that read a pipelined handshake (ours, Dante; not
    /// microsocks); `Auto` asks the proxy once (see [`Upstream::probe_pipelining`]);
    /// `Off` is the default.
    pub fn pipelining(mut self, mode: Pipelining) -> Self {
        self.pipelining = mode;
        self
    }

    /// Keeps addresses learnt while running from looping through the TUN `device`
    /// (index `ifindex`), as the start-up check does for the proxy's first
    /// addresses: a UDP relay at another address than the proxy's, and the proxy's
    /// addresses when its name is looked up again (a lookup that enters the tunnel
    /// may be answered from the fake-IP pool). An address whose route, with this
    /// socket's mark and no `--interface`, leaves through the TUN (`ip route get`,
    /// asked once per address and 30 s) is refused. Not for `exec`, whose device lives in
    /// another network namespace. Addresses in `fake_pools` (the fake-IP pools, with
    /// `--dns fake-ip`) are refused whatever their route.
    pub fn guard_loops(&mut self, ifindex: u32, device: &str, fake_pools: &[ipnet::IpNet]) {
        self.loop_guard = Some(Arc::new(relay::LoopGuard::new(ifindex, device, fake_pools)));
    }

    /// The loop guard, when one applies: `--interface` pins every socket to the
    /// proxy to another interface, so nothing it opens can enter the TUN.
    fn loop_guard(&self) -> Option<&relay::LoopGuard> {
        self.loop_guard
            .as_deref()
            .filter(|_| self.options.interface.is_none())
    }

    /// Whether `ip` is reached through the TUN ([`Upstream::guard_loops`]).
    fn loops(&self, ip: IpAddr) -> bool {
        let fwmark = self.options.fwmark;
        self.loop_guard()
            .is_some_and(|guard| guard.loops(ip, |ip| route_out(ip, fwmark)))
    }

    /// Refuses a UDP relay reached through the TUN ([`Upstream::guard_loops`]); one
    /// at the proxy's own address was checked at start.
    fn check_relay(&self, relay: SocketAddr, proxy: SocketAddr) -> Result<(), UpstreamError> {
        let fwmark = self.options.fwmark;
        match self.loop_guard() {
            Some(guard) if relay.ip().to_canonical() != proxy.ip().to_canonical() => {
                guard.check(relay, |ip| route_out(ip, fwmark))
            }
            _ => Ok(()),
        }
    }

    /// Resolves the proxy's host name now (a no-op for an address). Returns the
    /// addresses in use.
    pub async fn resolve(&self) -> Result<Vec<SocketAddr>, UpstreamError> {
        self.addrs
            .resolve(&self.proxy, true, |ip| !self.loops(ip))
            .await
    }

    /// The proxy's addresses as last resolved (empty before the first lookup).
    pub fn proxy_addrs(&self) -> Vec<SocketAddr> {
        self.addrs.current()
    }

    /// Is `addr` the proxy itself (one of its resolved addresses and its port)? A flow
    /// to it would loop through the tunnel.
    pub fn is_proxy(&self, addr: SocketAddr) -> bool {
        self.addrs.contains(addr)
    }

    /// The proxy URL (safe to log: `Display` hides the password).
    pub fn proxy(&self) -> &ProxyUrl {
        &self.proxy
    }

    /// The dial options.
    pub fn options(&self) -> &DialOptions {
        &self.options
    }

    /// Opens a stream to `target` through the proxy (SOCKS CONNECT).
    pub async fn connect(&self, target: Address) -> Result<Connected, UpstreamError> {
        let mut hs = ClientHandshake::new(
            self.proxy.protocol,
            self.proxy.auth.clone(),
            Command::CONNECT,
            target,
        )
        .map_err(UpstreamError::Unsupported)?
        .pipelined(self.is_pipelined());
        let (mut stream, proxy) = self.dial_addr().await?;
        let mut buf = Vec::with_capacity(512);
        let bound = self
            .with_handshake_timeout(proxy, negotiate(&mut stream, &mut hs, &mut buf, proxy))
            .await?;
        let ClientStatus::Done(bound) = bound else {
            // CONNECT has a single reply; `Bound` belongs to BIND.
            return Err(UpstreamError::Protocol {
                proxy,
                source: socks::Error::Failed,
            });
        };
        self.learn_pipelining();
        Ok(Connected {
            stream,
            bound,
            leftover: buf,
        })
    }

    async fn with_handshake_timeout<T>(
        &self,
        proxy: SocketAddr,
        fut: impl Future<Output = Result<T, UpstreamError>>,
    ) -> Result<T, UpstreamError> {
        handshake_within(self.options.handshake_timeout, proxy, fut).await
    }

    /// Opens a TCP connection to the proxy, trying each of its addresses in turn.
    pub async fn dial(&self) -> Result<TcpStream, UpstreamError> {
        self.dial_addr().await.map(|(stream, _)| stream)
    }

    /// [`Upstream::dial`], also returning the address that answered (no
    /// `getpeername` needed).
    async fn dial_addr(&self) -> Result<(TcpStream, SocketAddr), UpstreamError> {
        let addrs = self
            .addrs
            .resolve(&self.proxy, false, |ip| !self.loops(ip))
            .await?;
        let mut last = None;
        for addr in addrs {
            match self.dial_one(addr).await {
                Ok(stream) => {
                    self.addrs.dialled();
                    return Ok((stream, addr));
                }
                Err(e) => last = Some(e),
            }
        }
        self.addrs.all_failed();
        Err(last.unwrap_or_else(|| UpstreamError::Resolve {
            host: self.proxy.host.to_string(),
            source: io::Error::new(io::ErrorKind::NotFound, "no addresses"),
        }))
    }

    async fn dial_one(&self, proxy: SocketAddr) -> Result<TcpStream, UpstreamError> {
        let dial_err = |source| UpstreamError::Dial { proxy, source };
        let socket = match proxy {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(dial_err)?;
        self.mark(&SockRef::from(&socket)).map_err(dial_err)?;
        socket.set_nodelay(true).map_err(dial_err)?;
        if let Some(idle) = self.options.keepalive {
            // Without probes the connection still works: log, go on.
            if let Err(e) = SockRef::from(&socket).set_tcp_keepalive(&keepalive(idle)) {
                tracing::debug!(error = %e, "cannot enable keep-alive to the proxy");
            }
        }
        let timeout = self.options.connect_timeout;
        match tokio::time::timeout(timeout, socket.connect(proxy)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(source)) => Err(UpstreamError::Dial { proxy, source }),
            Err(_) => Err(UpstreamError::DialTimeout { proxy, timeout }),
        }
    }

    /// Applies the fwmark and outbound interface to a socket before it is used.
    fn mark(&self, socket: &SockRef<'_>) -> io::Result<()> {
        if let Some(mark) = self.options.fwmark {
            socket.set_mark(mark)?;
        }
        if let Some(interface) = &self.options.interface {
            socket.bind_device(Some(interface.as_bytes()))?;
        }
        Ok(())
    }
}

/// `fut` (a handshake with `proxy`), or `HandshakeTimeout` once `timeout` has passed.
async fn handshake_within<T>(
    timeout: Duration,
    proxy: SocketAddr,
    fut: impl Future<Output = Result<T, UpstreamError>>,
) -> Result<T, UpstreamError> {
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or(Err(UpstreamError::HandshakeTimeout { proxy, timeout }))
}

/// Runs a client handshake over `stream` until the proxy's reply (or, for BIND, one
/// of its two replies) arrives. `buf` holds received bytes not consumed yet; on
/// success whatever follows the reply stays in it.
pub async fn negotiate<S>(
    stream: &mut S,
    hs: &mut ClientHandshake,
    buf: &mut Vec<u8>,
    proxy: SocketAddr,
) -> Result<ClientStatus, UpstreamError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let io_err = |source| UpstreamError::Io { proxy, source };
    let first = hs.start();
    if !first.is_empty() {
        stream.write_all(&first).await.map_err(io_err)?;
    }
    loop {
        let step = hs
            .handshake(buf)
            .map_err(|source| UpstreamError::Protocol { proxy, source })?;
        buf.drain(..step.consumed.min(buf.len()));
        if !step.send.is_empty() {
            stream.write_all(&step.send).await.map_err(io_err)?;
        }
        match step.status {
            ClientStatus::NeedMore if step.consumed > 0 => continue,
            ClientStatus::NeedMore => {}
            done => return Ok(done),
        }
        if buf.len() >= socks::MAX_MESSAGE {
            return Err(UpstreamError::Protocol {
                proxy,
                source: socks::Error::FieldLength {
                    field: "proxy reply",
                    len: buf.len(),
                    min: 0,
                    max: socks::MAX_MESSAGE,
                },
            });
        }
        let mut chunk = [0u8; 512];
        let n = stream.read(&mut chunk).await.map_err(io_err)?;
        if n == 0 {
            return Err(UpstreamError::Closed {
                proxy,
                after_request: hs.awaiting_reply(),
            });
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
}
