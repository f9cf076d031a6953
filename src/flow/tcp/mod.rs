//! One TCP flow's task: SOCKS CONNECT to the destination, then copy both ways.
//!
//! The application's SYN already sits in a smoltcp socket whose SYN-ACK is paused:
//! the application sees the connection accepted only once the proxy has connected,
//! and sees a reset (connection refused) the moment the proxy cannot.
//!
//! The copy both ways (no extra copy, backpressure through the rings, half-close) is
//! `pump.rs`.
//!
//! Lifetime: once the SYN-ACK goes out, the socket sends keep-alive probes to the
//! application after `keepalive` of silence and declares it gone when nothing came
//! back for the longer of the stack's timeout and two probe intervals (with
//! keep-alive off, an idle socket never times out: smoltcp's timeout would otherwise
//! end every flow idle that long). A flow that moved no byte either way for
//! `idle_timeout` is reset on both sides.

mod local_dns;
mod pump;

use std::future::poll_fn;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use smoltcp::socket::tcp;
use socket2::SockRef;
use tokio::io::AsyncWriteExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{BurstLog, Signal, TcpFlow};
use crate::dns::{DNS_PORT, Dns};
use crate::egress::{Egress, Unreachable};
use crate::metrics::{Metrics, SocksCommand};
use crate::socks::ReplyCode;
use crate::upstream::{Connected, Upstream, UpstreamError};
use pump::Pump;

/// What a flow task needs besides its flow.
#[derive(Debug)]
pub struct FlowContext {
    /// The proxy.
    pub upstream: Upstream,
    /// Where to ask the stack for a poll.
    pub signal: Arc<Signal>,
    /// Shared counters.
    pub stats: Arc<Metrics>,
    /// Packets the stack builds itself (an ICMP error for a refused SYN).
    pub egress: Arc<Egress>,
    /// With `--dns fake-ip`: connections to port 53 are answered in the tunnel by
    /// this DNS module ([`local_dns`]) instead of going to the proxy.
    pub local_dns: Option<Arc<Dns>>,
    /// Rate limit for "cannot reach the proxy" messages.
    pub failures: BurstLog,
    /// Places for CONNECTs in progress. A flow waiting for one costs its paused SYN
    /// and a small task; only the CONNECT itself holds the dial's state (about 2 KiB),
    /// so a SYN storm against a dead proxy costs little memory.
    pub dials: Semaphore,
}

/// How a flow ended.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    /// The proxy could not be reached, or refused the request.
    #[error("{0}")]
    Upstream(#[from] UpstreamError),
    /// The proxy connection failed after the handshake.
    #[error("proxy connection: {0}")]
    UpstreamIo(io::Error),
    /// The application reset the connection (or its smoltcp socket timed out).
    #[error("reset by the application")]
    AppReset,
    /// No byte moved either way for the idle limit; both sides were reset.
    #[error("idle for {0:?}")]
    Idle(Duration),
}

/// Runs one flow to its end. `permit` is the flow's place under the flow limit,
/// `pending` its place among flows whose CONNECT has not finished (given back as soon
/// as it has).
pub async fn run(
    flow: Arc<TcpFlow>,
    cx: Arc<FlowContext>,
    permit: OwnedSemaphorePermit,
    pending: OwnedSemaphorePermit,
) {
    let _permit = permit;
    let _active = cx.stats.flows.active_guard();
    let result = serve(&flow, &cx, pending).await;
    match result {
        Ok(bytes) => tracing::debug!(up = bytes.0, down = bytes.1, "closed"),
        Err(FlowError::Upstream(e)) => {
            cx.stats.flows.failed.fetch_add(1, Ordering::Relaxed);
            cx.stats.socks.record(SocksCommand::Connect, &e);
            // Why the proxy could not connect, told as the kernel's own path tells
            // it, where the reply says why: an ICMP error for the SYN (the
            // application's connect fails with "no route to host" or "network is
            // unreachable" at once). The reset follows either way, for a stack that
            // does not take the ICMP error while connecting; one that did has no
            // socket left for it.
            if let Some(why) = e.reply().and_then(unreachable_for) {
                cx.egress
                    .tcp_unreachable(flow.tuple.src, flow.tuple.dst, flow.syn_seq, why);
            }
            abort_socket(&flow);
            match cx.failures.check(std::time::Instant::now()) {
                Some(suppressed) if e.proxy_unreachable() => tracing::warn!(
                    error = %e, suppressed,
                    "proxy unreachable; resetting connections"
                ),
                Some(suppressed) => tracing::info!(error = %e, suppressed, "proxy refused"),
                None => tracing::debug!(error = %e, "connect failed"),
            }
        }
        Err(e) => {
            abort_socket(&flow);
            tracing::debug!(error = %e, "closed by error");
        }
    }
    cx.signal.finished(&flow);
}

/// The ICMP error a SOCKS5 refusal becomes (`None`: a reset only). "Connection
/// refused" is a reset, as the destination's own stack sends it; a general failure
/// or an unsupported command or address type says nothing of the path.
fn unreachable_for(reply: ReplyCode) -> Option<Unreachable> {
    match reply {
        ReplyCode::NOT_ALLOWED => Some(Unreachable::Prohibited),
        ReplyCode::NETWORK_UNREACHABLE => Some(Unreachable::Net),
        // A TTL that expired on the way: the path to the host failed, as a
        // router's ICMP time exceeded says (Linux reports both as EHOSTUNREACH).
        ReplyCode::HOST_UNREACHABLE | ReplyCode::TTL_EXPIRED => Some(Unreachable::Host),
        _ => None,
    }
}

fn abort_socket(flow: &TcpFlow) {
    let mut sockets = flow.sockets();
    sockets.get_mut::<tcp::Socket>(flow.handle).abort();
}

async fn serve(
    flow: &Arc<TcpFlow>,
    cx: &FlowContext,
    pending: OwnedSemaphorePermit,
) -> Result<(u64, u64), FlowError> {
    if let Some(dns) = cx
        .local_dns
        .as_ref()
        .filter(|_| flow.tuple.dst.port() == DNS_PORT)
    {
        drop(pending);
        return local_dns::serve(flow, cx, dns).await;
    }
    // The application may give up (reset) while the proxy is still connecting: then
    // the CONNECT is abandoned at once, and its socket closed.
    let connected = tokio::select! {
        biased;
        () = app_gave_up(flow) => return Err(FlowError::AppReset),
        connected = dial(flow, cx) => connected?,
    };
    drop(pending);
    cx.stats.flows.connected.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(bound = %connected.bound, "connected");
    accept_app(flow, cx).await?;
    relay(flow, cx, connected).await
}

/// Carries the rest of an application connection that is already accepted to the
/// proxy as it stands, `first` (the bytes already read from it) sent ahead: for a
/// DNS zone transfer that reached the tunnel's own DNS-over-TCP answers
/// ([`local_dns`]), whose answer is a stream of messages. Returns the bytes moved
/// each way after `first`.
async fn pass_through(
    flow: &Arc<TcpFlow>,
    cx: &FlowContext,
    first: &[u8],
) -> Result<(u64, u64), FlowError> {
    let mut connected = tokio::select! {
        biased;
        () = app_gave_up(flow) => return Err(FlowError::AppReset),
        connected = dial(flow, cx) => connected?,
    };
    cx.stats.flows.connected.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(bound = %connected.bound, "connected, passing the connection through");
    connected
        .stream
        .write_all(first)
        .await
        .map_err(FlowError::UpstreamIo)?;
    relay(flow, cx, connected).await
}

/// Copies both ways between the application's connection and the proxy's until
/// both have closed (or one fails, or the idle limit passes).
async fn relay(
    flow: &Arc<TcpFlow>,
    cx: &FlowContext,
    connected: Connected,
) -> Result<(u64, u64), FlowError> {
    let mut pump = Pump {
        flow: flow.clone(),
        upstream: connected.stream,
        pending: connected.leftover,
        up_closed: false,
        down_eof: false,
        up: 0,
        down: 0,
        last_progress: tokio::time::Instant::now(),
        stats: cx.stats.clone(),
        counted: (0, 0),
    };
    let result = match cx.upstream.options().idle_timeout {
        Some(limit) => pump_until_idle(&mut pump, &cx.signal, limit).await,
        None => poll_fn(|task| pump.poll(task, &cx.signal)).await,
    };
    if result.is_err() {
        // Whatever went wrong, the proxy side learns of it as a reset.
        let _ = SockRef::from(&pump.upstream).set_linger(Some(Duration::ZERO));
    }
    result.map(|()| (pump.up, pump.down))
}

/// Lets the paused SYN-ACK go (the flow's rings opened, keep-alive set) and waits
/// for the application's side of the handshake.
async fn accept_app(flow: &TcpFlow, cx: &FlowContext) -> Result<(), FlowError> {
    {
        let mut sockets = flow.sockets();
        let socket = sockets.get_mut::<tcp::Socket>(flow.handle);
        if socket.state() != tcp::State::SynReceived {
            // The application gave up while we were connecting.
            return Err(FlowError::AppReset);
        }
        if let Some(every) = cx.upstream.options().keepalive {
            set_keepalive(socket, every);
        }
        flow.open_buffers(socket, std::time::Instant::now());
        socket.pause_synack(false);
    }
    cx.signal.mark(flow);
    app_established(flow, cx.upstream.options().keepalive).await
}

/// Waits for the application's side of the handshake (its ACK of our SYN-ACK; until
/// then the stack's timeout bounds the wait). Without keep-alive, the timeout is then
/// lifted: smoltcp counts it from the last packet received, so it would end every
/// flow that merely idles that long.
async fn app_established(flow: &TcpFlow, keepalive: Option<Duration>) -> Result<(), FlowError> {
    poll_fn(|task| {
        let mut sockets = flow.sockets();
        let socket = sockets.get_mut::<tcp::Socket>(flow.handle);
        match socket.state() {
            tcp::State::SynReceived => {
                socket.register_recv_waker(task.waker());
                Poll::Pending
            }
            tcp::State::Listen | tcp::State::Closed => Poll::Ready(Err(FlowError::AppReset)),
            _ => {
                if keepalive.is_none() {
                    socket.set_timeout(None);
                }
                Poll::Ready(Ok(()))
            }
        }
    })
    .await
}

/// Keep-alive probes to the application every `every` of silence; it is declared gone
/// after the longer of the socket's timeout and two probe intervals without a packet
/// from it. Set before the SYN-ACK leaves: on a socket that is already idle, smoltcp
/// would send a first probe at once.
fn set_keepalive(socket: &mut tcp::Socket<'_>, every: Duration) {
    let every = smoltcp::time::Duration::from(every);
    let floor = smoltcp::time::Duration::from_micros(
        every
            .total_micros()
            .saturating_mul(2)
            .saturating_add(1_000_000),
    );
    let timeout = socket.timeout().map_or(floor, |t| t.max(floor));
    socket.set_keep_alive(Some(every));
    socket.set_timeout(Some(timeout));
}

/// Runs the pump to its end, or resets both sides once it has made no progress for
/// `limit` (keep-alive probes are no progress: they carry no byte).
async fn pump_until_idle(
    pump: &mut Pump,
    signal: &Signal,
    limit: Duration,
) -> Result<(), FlowError> {
    loop {
        // A limit too far to express is no limit.
        let Some(deadline) = pump.last_progress.checked_add(limit) else {
            return poll_fn(|task| pump.poll(task, signal)).await;
        };
        let idle = tokio::select! {
            result = poll_fn(|task| pump.poll(task, signal)) => return result,
            () = tokio::time::sleep_until(deadline) => {
                pump.last_progress.checked_add(limit).is_some_and(|d| d <= tokio::time::Instant::now())
            }
        };
        if idle {
            abort_socket(&pump.flow);
            signal.mark(&pump.flow);
            return Err(FlowError::Idle(limit));
        }
    }
}

/// SOCKS CONNECT to the flow's target, once a place under `cx.dials` is free. The
/// CONNECT is boxed: its state exists only while it runs, instead of sizing the task
/// of every flow (waiting, or established).
async fn dial(flow: &TcpFlow, cx: &FlowContext) -> Result<Connected, UpstreamError> {
    // The semaphore is never closed; were it, the dial would go ahead unlimited.
    let _place = cx.dials.acquire().await.ok();
    Box::pin(cx.upstream.connect(flow.target.clone())).await
}

/// Resolves when the application gives up on a connection whose SYN-ACK is paused: a
/// reset sends the socket back to `Listen` (or to `Closed`). A socket that went back
/// to `Listen` must never be taken for an open one.
async fn app_gave_up(flow: &TcpFlow) {
    poll_fn(|task| {
        let mut sockets = flow.sockets();
        let socket = sockets.get_mut::<tcp::Socket>(flow.handle);
        if matches!(socket.state(), tcp::State::Listen | tcp::State::Closed) {
            Poll::Ready(())
        } else {
            socket.register_recv_waker(task.waker());
            Poll::Pending
        }
    })
    .await;
}
