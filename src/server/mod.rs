//! The reference SOCKS server: SOCKS4, SOCKS4a and SOCKS5 on one port; CONNECT, BIND
//! and UDP ASSOCIATE; IPv4, IPv6 and host names; RFC 1929 logins.
//!
//! Stage: a peer of the tunnel, used to test the whole path and usable on its own.
//! It drives [`crate::socks::ServerHandshake`] and must not parse SOCKS bytes itself.
//! One session's failure never ends the accept loop; every session holds a permit of
//! a bounded semaphore, has its own tracing span, and logs its byte counts at close.
//!
//! - `handshake`: reads the handshake under a timeout, with a bounded buffer;
//! - `connect`, `bind`, `associate`: the three commands;
//! - [`relay`]: copies a TCP pair both ways with half-close;
//! - [`reply`]: OS errors to reply codes, in one place.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod associate;
mod bind;
mod connect;
mod handshake;
mod penalty;
pub mod relay;
pub mod reply;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ipnet::IpNet;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::socks::{Address, Command, ReplyCode, Request, ServerPolicy};

/// How long sessions get to wind down after shutdown is requested.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

/// Everything the server needs to know; built by the binary (`src/cli/args.rs`) from the command line.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Accounts (RFC 1929 required when non-empty) and which commands are served.
    pub policy: ServerPolicy,
    /// Clients allowed to use the server; empty allows every client.
    pub allow: Vec<IpNet>,
    /// Destinations refused with reply 0x02 (SOCKS4: 91).
    pub deny: Vec<IpNet>,
    /// Refuse destinations that are this host or its local networks: loopback,
    /// unspecified, link-local, private (RFC 1918, fc00::/7) and shared (RFC 6598)
    /// addresses. Checked on the resolved address, so a name that resolves there
    /// (DNS rebinding) is refused too.
    pub deny_private: bool,
    /// The address announced and listened on for BIND; by default, the address of the
    /// interface that routes towards the expected peer.
    pub bind_external: Option<IpAddr>,
    /// Limit for a client to complete its handshake.
    pub handshake_timeout: Duration,
    /// Limit for connecting to a destination (per address tried).
    pub connect_timeout: Duration,
    /// Limit for the expected peer to connect to a BIND listener.
    pub bind_timeout: Duration,
    /// A UDP association without traffic for this long is closed.
    pub udp_idle_timeout: Duration,
    /// Sessions served at once; further clients are closed at once.
    pub max_connections: usize,
    /// A CONNECT relay that moved no byte either way for this long is reset on both
    /// sides. `None`: never.
    pub idle_timeout: Option<Duration>,
    /// TCP keep-alive on the client's socket and the destination's: the first probe
    /// after this long without traffic (parameters: [`relay::keepalive`]).
    /// `None`: no probes.
    pub keepalive: Option<Duration>,
    /// How long a busy UDP association keeps polling its sockets after a datagram
    /// before it sleeps ([`crate::busy`]: only while datagrams come at least this
    /// often; one association at a time; never on a single CPU). Zero: never.
    pub udp_busy_poll: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            policy: ServerPolicy::default(),
            allow: Vec::new(),
            deny: Vec::new(),
            deny_private: false,
            bind_external: None,
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            bind_timeout: Duration::from_secs(60),
            udp_idle_timeout: Duration::from_secs(300),
            max_connections: 4096,
            idle_timeout: Some(relay::DEFAULT_IDLE_TIMEOUT),
            keepalive: Some(relay::DEFAULT_KEEPALIVE),
            udp_busy_poll: crate::busy::DEFAULT_WINDOW,
        }
    }
}

/// Why a configuration cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A non-loopback listener with neither `--user` nor `--allow` would be an open
    /// proxy.
    #[error(
        "refusing to listen on {addr} without --user or --allow: that would be an open proxy \
         (listen on 127.0.0.1/::1, or restrict clients with --allow CIDR, or require logins \
         with --user NAME:PASS)"
    )]
    OpenProxy {
        /// The listen address.
        addr: SocketAddr,
    },
    /// `--max-connections 0`.
    #[error("--max-connections must be at least 1")]
    NoConnections,
}

impl ServerConfig {
    /// Checks the configuration against the addresses it will listen on.
    pub fn validate(&self, listen: &[SocketAddr]) -> Result<(), ConfigError> {
        if self.max_connections == 0 {
            return Err(ConfigError::NoConnections);
        }
        let guarded = !self.policy.users.is_empty() || !self.allow.is_empty();
        match listen.iter().find(|a| !a.ip().is_loopback()) {
            Some(addr) if !guarded => Err(ConfigError::OpenProxy { addr: *addr }),
            _ => Ok(()),
        }
    }
}

/// State shared by all sessions.
#[derive(Debug)]
struct Shared {
    config: ServerConfig,
    sessions: Arc<Semaphore>,
    next_id: AtomicU64,
    login_failures: penalty::LoginFailures,
    /// Busy polling of UDP associations ([`associate`]): allowed at all (a window,
    /// and more than one CPU to spin on), and whether one is spinning now.
    spin: associate::SpinSlot,
}

impl Shared {
    /// Inside the server's runtime (busy polling looks at its workers).
    fn new(config: ServerConfig) -> Shared {
        Shared {
            sessions: Arc::new(Semaphore::new(config.max_connections)),
            spin: associate::SpinSlot::new(config.udp_busy_poll),
            config,
            next_id: AtomicU64::new(1),
            login_failures: penalty::LoginFailures::default(),
        }
    }

    fn client_allowed(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.config.allow.is_empty() || self.config.allow.iter().any(|net| net.contains(&ip))
    }

    fn destination_denied(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        (self.config.deny_private && is_private_or_local(ip))
            || self.config.deny.iter().any(|net| net.contains(&ip))
    }
}

/// Is `ip` this host, a link-local address, or in a private or shared range?
pub fn is_private_or_local(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_unspecified()
                || v4.is_private()
                || v4.is_link_local()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || first & 0xfe00 == 0xfc00
                || first & 0xffc0 == 0xfe80
        }
    }
}

/// Serves SOCKS on `listeners` until `shutdown` resolves, then closes every session
/// (waiting briefly for them) and returns. Errors of single sessions are logged, never
/// returned.
pub async fn run(
    listeners: Vec<TcpListener>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let listen: Vec<SocketAddr> = listeners
        .iter()
        .map(TcpListener::local_addr)
        .collect::<io::Result<_>>()?;
    config
        .validate(&listen)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    if let Some(ip) = config.bind_external {
        // BIND listens there: an address this host does not have would fail every
        // BIND with a general failure, long after start.
        std::net::TcpListener::bind((ip, 0)).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("--bind-external {ip}: cannot listen there: {e}"),
            )
        })?;
    }
    let shared = Arc::new(Shared::new(config));
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    for listener in listeners {
        let (shared, cancel, sessions) = (shared.clone(), cancel.clone(), tracker.clone());
        tracker.spawn(accept_loop(listener, shared, cancel, sessions));
    }
    tracing::info!(?listen, "serving SOCKS4/4a/5");
    shutdown.await;
    tracing::info!("shutting down");
    cancel.cancel();
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            sessions = tracker.len(),
            "sessions still open after the grace period"
        );
    }
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    sessions: TaskTracker,
) {
    let mut options = SocketOptions::on_listener(&listener, shared.config.keepalive);
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning; the loop goes on.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if !shared.client_allowed(peer.ip()) {
            // Judged before any byte is read: a client outside --allow gets no
            // handshake, so no chance to try passwords.
            tracing::info!(client = %peer, "client not in --allow; closed");
            drop(stream);
            continue;
        }
        let Ok(permit) = shared.sessions.clone().try_acquire_owned() else {
            tracing::warn!(client = %peer, "connection limit reached; closing");
            drop(stream);
            continue;
        };
        let set_options = options.needed_on(&stream, shared.config.keepalive);
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("session", id, client = %peer);
        let (shared, cancel) = (shared.clone(), cancel.child_token());
        sessions.spawn(
            async move {
                let _permit = permit;
                tokio::select! {
                    () = cancel.cancelled() => tracing::debug!("closed by shutdown"),
                    () = session(stream, shared, set_options) => {}
                }
            }
            .instrument(span),
        );
    }
}

/// Whether accepted sockets come with `TCP_NODELAY` and the keep-alive parameters
/// already set. Linux copies a listener's socket options to every socket it accepts:
/// set once on the listener, they save five setsockopt(2) per session. The first
/// accepted socket is checked; if it lacks them, every session sets its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SocketOptions {
    /// Set on the listener; not yet seen on an accepted socket.
    Unchecked,
    /// Accepted sockets carry them.
    Inherited,
    /// Each session sets them.
    PerSession,
}

impl SocketOptions {
    fn on_listener(listener: &TcpListener, keepalive: Option<Duration>) -> Self {
        let socket = socket2::SockRef::from(listener);
        let set = socket.set_tcp_nodelay(true).and_then(|()| match keepalive {
            Some(idle) => socket.set_tcp_keepalive(&relay::keepalive(idle)),
            None => Ok(()),
        });
        match set {
            Ok(()) => SocketOptions::Unchecked,
            Err(e) => {
                tracing::debug!(error = %e, "cannot set socket options on the listener");
                SocketOptions::PerSession
            }
        }
    }

    /// Must the session on `stream` set the options itself?
    fn needed_on(&mut self, stream: &TcpStream, keepalive: Option<Duration>) -> bool {
        if *self == SocketOptions::Unchecked {
            *self = if carries_options(stream, keepalive) {
                SocketOptions::Inherited
            } else {
                SocketOptions::PerSession
            };
        }
        *self == SocketOptions::PerSession
    }
}

/// Does `stream` have `TCP_NODELAY` and the keep-alive parameters for `keepalive`?
fn carries_options(stream: &TcpStream, keepalive: Option<Duration>) -> bool {
    let socket = socket2::SockRef::from(stream);
    let nodelay = stream.nodelay().unwrap_or(false);
    let probes = match keepalive {
        None => true,
        Some(idle) => {
            let expected = crate::upstream::keepalive_parameters(idle);
            socket.keepalive().unwrap_or(false)
                && socket.tcp_keepalive_time().ok() == Some(expected.0)
                && socket.tcp_keepalive_interval().ok() == Some(expected.1)
                && socket.tcp_keepalive_retries().ok() == Some(expected.2)
        }
    };
    nodelay && probes
}

/// One client, from the first byte to the close. `set_options`: the socket did not
/// inherit `TCP_NODELAY` and keep-alive from the listener.
async fn session(mut stream: TcpStream, shared: Arc<Shared>, set_options: bool) {
    if set_options {
        let _ = stream.set_nodelay(true);
        set_keepalive(&stream, shared.config.keepalive);
    }
    let hs = handshake::read_request(&mut stream, &shared.config, &shared.login_failures).await;
    let handshake::Handshaken {
        request,
        leftover,
        unsent,
    } = match hs {
        Ok(done) => done,
        Err(e) => {
            tracing::info!(error = %e, "handshake failed");
            return;
        }
    };
    if !unsent.is_empty() && request.command != Command::CONNECT {
        // Only CONNECT's reply carries the earlier replies along.
        use tokio::io::AsyncWriteExt;
        if let Err(e) = stream.write_all(&unsent).await {
            tracing::info!(error = %e, "session ended with an error");
            return;
        }
    }
    tracing::debug!(version = %request.version, command = %request.command,
        target = %request.target, user = ?request.user, "request");
    let result = match request.command {
        Command::CONNECT => connect::serve(stream, &request, leftover, unsent, &shared).await,
        Command::BIND => bind::serve(stream, &request, leftover, &shared).await,
        Command::UDP_ASSOCIATE => associate::serve(stream, &request, &shared).await,
        // The handshake only lets the three commands through.
        other => {
            tracing::warn!(command = %other, "unexpected command");
            Ok(())
        }
    };
    if let Err(e) = result {
        tracing::info!(error = %e, "session ended with an error");
    }
}

/// Turns on TCP keep-alive probes (a failure only loses the probes: logged).
fn set_keepalive(stream: &TcpStream, idle: Option<Duration>) {
    if let Some(idle) = idle {
        let params = relay::keepalive(idle);
        if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&params) {
            tracing::debug!(error = %e, "cannot enable keep-alive");
        }
    }
}

/// Sends a failure reply and lets the connection close.
async fn refuse(stream: &mut TcpStream, request: &Request, code: ReplyCode) {
    use tokio::io::AsyncWriteExt;
    let reply = request.reply(code, &Address::UNSPECIFIED);
    if let Err(e) = stream.write_all(&reply).await {
        tracing::debug!(error = %e, "could not send the refusal");
    }
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn accepted(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), server.unwrap().0)
    }

    #[tokio::test]
    async fn accepted_sockets_inherit_the_listeners_options() {
        let keepalive = Some(Duration::from_secs(45));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut options = SocketOptions::on_listener(&listener, keepalive);
        assert_eq!(options, SocketOptions::Unchecked);
        let (_client, stream) = accepted(&listener).await;
        assert!(carries_options(&stream, keepalive));
        assert!(!options.needed_on(&stream, keepalive), "inherited");
        assert_eq!(options, SocketOptions::Inherited);
        let socket = socket2::SockRef::from(&stream);
        assert_eq!(
            socket.tcp_keepalive_time().unwrap(),
            Duration::from_secs(45)
        );
        assert_eq!(
            socket.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(15)
        );
        assert!(stream.nodelay().unwrap());
        // Other parameters than the listener's are not taken for inherited ones.
        assert!(!carries_options(&stream, Some(Duration::from_secs(60))));
    }

    #[tokio::test]
    async fn sessions_set_the_options_when_the_listener_has_none() {
        let keepalive = Some(Duration::from_secs(45));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        // Options set, then taken off again: the check on the first socket notices.
        let mut options = SocketOptions::on_listener(&listener, keepalive);
        socket2::SockRef::from(&listener)
            .set_keepalive(false)
            .unwrap();
        let (_client, stream) = accepted(&listener).await;
        assert!(!carries_options(&stream, keepalive));
        assert!(options.needed_on(&stream, keepalive));
        assert_eq!(options, SocketOptions::PerSession);
        let (_client, stream) = accepted(&listener).await;
        assert!(options.needed_on(&stream, keepalive), "stays per session");
        // Without keep-alive, only TCP_NODELAY matters.
        assert!(carries_options(&stream, None));
    }

    #[test]
    fn private_and_local_ranges() {
        for local in [
            "127.0.0.1",
            "0.0.0.0",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "0.1.2.3",
        ] {
            assert!(is_private_or_local(local.parse().unwrap()), "{local}");
        }
        for public in [
            "8.8.8.8",
            "172.32.0.1",
            "198.19.2.2",
            "100.128.0.1",
            "2001:db8::1",
        ] {
            assert!(!is_private_or_local(public.parse().unwrap()), "{public}");
        }
    }
}
