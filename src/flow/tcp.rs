//! One TCP flow's task: SOCKS CONNECT to the destination, then copy both ways.
//!
//! The application's SYN already sits in a smoltcp socket whose SYN-ACK is paused:
//! the application sees the connection accepted only once the proxy has connected,
//! and sees a reset (connection refused) the moment the proxy cannot.
//!
//! The copy is zero-extra-copy: bytes go straight from smoltcp's receive ring into
//! the upstream socket (`try_write`) and from the upstream socket into smoltcp's send
//! ring (`try_read`). Backpressure is the rings filling up: a slow proxy leaves data in
//! the receive ring, which shrinks the window advertised to the application; a slow
//! application leaves the send ring full, so the upstream socket is not read and the
//! proxy's window closes. A FIN is carried each way on its own (half-close); a reset on
//! either side becomes a reset on the other.
//!
//! Lifetime: once the SYN-ACK goes out, the socket sends keep-alive probes to the
//! application after `keepalive` of silence and declares it gone when nothing came
//! back for the longer of the stack's timeout and two probe intervals (with
//! keep-alive off, an idle socket never times out: smoltcp's timeout would otherwise
//! end every flow idle that long). A flow that moved no byte either way for
//! `idle_timeout` is reset on both sides.

use std::future::poll_fn;
use std::io::{self, Read};
use std::net::Shutdown;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use smoltcp::socket::tcp;
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{BurstLog, Signal, TcpFlow};
use crate::metrics::{Metrics, SocksCommand};
use crate::upstream::{Connected, Upstream, UpstreamError};

/// What a flow task needs besides its flow.
#[derive(Debug)]
pub struct FlowContext {
    /// The proxy.
    pub upstream: Upstream,
    /// Where to ask the stack for a poll.
    pub signal: Arc<Signal>,
    /// Shared counters.
    pub stats: Arc<Metrics>,
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

fn abort_socket(flow: &TcpFlow) {
    let mut sockets = flow.sockets();
    sockets.get_mut::<tcp::Socket>(flow.handle).abort();
}

async fn serve(
    flow: &Arc<TcpFlow>,
    cx: &FlowContext,
    pending: OwnedSemaphorePermit,
) -> Result<(u64, u64), FlowError> {
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
    app_established(flow, cx.upstream.options().keepalive).await?;
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

/// The copy loop's state.
struct Pump {
    flow: Arc<TcpFlow>,
    upstream: TcpStream,
    /// Bytes from the proxy not yet in the socket (those that followed the reply).
    pending: Vec<u8>,
    /// The application's FIN has been passed on to the proxy.
    up_closed: bool,
    /// The proxy's FIN has been passed on to the application.
    down_eof: bool,
    up: u64,
    down: u64,
    /// When bytes last moved (or a FIN was passed on).
    last_progress: tokio::time::Instant,
    /// The shared counters; bytes are counted as they move, so a scrape sees a long
    /// transfer progress.
    stats: Arc<Metrics>,
    /// `(up, down)` already added to `stats`.
    counted: (u64, u64),
}

/// One direction's outcome within a poll.
enum Step {
    /// Nothing more to do until a registered event.
    Blocked,
    /// Bytes moved or state changed; try again.
    Progress,
}

impl Pump {
    fn poll(&mut self, task: &mut Context<'_>, signal: &Signal) -> Poll<Result<(), FlowError>> {
        let poll = self.poll_sockets(task, signal);
        self.flow.note_read(self.up);
        self.stats
            .flows
            .count_bytes(&mut self.counted, (self.up, self.down));
        poll
    }

    fn poll_sockets(
        &mut self,
        task: &mut Context<'_>,
        signal: &Signal,
    ) -> Poll<Result<(), FlowError>> {
        let flow = self.flow.clone();
        let mut sockets = flow.sockets();
        let socket = sockets.get_mut::<tcp::Socket>(flow.handle);
        let mut changed = false;
        let result = loop {
            if socket.state() == tcp::State::Closed {
                break Err(FlowError::AppReset);
            }
            let up = match self.upload(socket, task) {
                Ok(step) => step,
                Err(e) => break Err(FlowError::UpstreamIo(e)),
            };
            let down = match self.download(socket, task) {
                Ok(step) => step,
                Err(e) => break Err(FlowError::UpstreamIo(e)),
            };
            if self.up_closed && self.down_eof {
                // Both FINs passed on; the stack finishes the socket's close.
                break Ok(());
            }
            match (up, down) {
                (Step::Blocked, Step::Blocked) => {
                    // A state change (a reset) wakes both wakers; register one always.
                    socket.register_send_waker(task.waker());
                    if changed {
                        self.last_progress = tokio::time::Instant::now();
                        signal.mark(&flow);
                    }
                    return Poll::Pending;
                }
                _ => changed = true,
            }
        };
        if result.is_err() {
            socket.abort();
        }
        drop(sockets);
        signal.mark(&flow);
        Poll::Ready(result)
    }

    /// Application -> proxy.
    fn upload(&mut self, socket: &mut tcp::Socket<'_>, task: &mut Context<'_>) -> io::Result<Step> {
        if self.up_closed {
            return Ok(Step::Blocked);
        }
        if !socket.can_recv() {
            if !socket.may_recv() && socket.state() != tcp::State::SynReceived {
                // The application's FIN, after all its data: pass it on.
                SockRef::from(&self.upstream).shutdown(Shutdown::Write)?;
                self.up_closed = true;
                return Ok(Step::Progress);
            }
            socket.register_recv_waker(task.waker());
            return Ok(Step::Blocked);
        }
        match self.upstream.poll_write_ready(task) {
            Poll::Pending => return Ok(Step::Blocked),
            Poll::Ready(result) => result?,
        }
        let upstream = &self.upstream;
        let written = socket.recv(|data| match upstream.try_write(data) {
            Ok(n) => (n, Ok(n)),
            Err(e) => (0, Err(e)),
        });
        match written {
            Ok(Ok(n)) => {
                self.up = self.up.saturating_add(n as u64);
                Ok(Step::Progress)
            }
            // Readiness was stale and is now cleared; the next poll_write_ready
            // registers for the real event.
            Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => Ok(Step::Progress),
            Ok(Err(e)) => Err(e),
            // The socket cannot receive after all; its next state change wakes us.
            Err(_) => {
                socket.register_recv_waker(task.waker());
                Ok(Step::Blocked)
            }
        }
    }

    /// Proxy -> application.
    fn download(
        &mut self,
        socket: &mut tcp::Socket<'static>,
        task: &mut Context<'_>,
    ) -> io::Result<Step> {
        if self.down_eof {
            return Ok(Step::Blocked);
        }
        if socket.send_capacity() == 0 {
            // No send ring yet (or it was freed while idle): make one once the proxy
            // has data for the application.
            if self.pending.is_empty() {
                match self.upstream.poll_read_ready(task) {
                    Poll::Pending => return Ok(Step::Blocked),
                    Poll::Ready(result) => result?,
                }
            }
            self.flow
                .open_send_buffer(socket, std::time::Instant::now());
        }
        if !socket.can_send() {
            // Not established yet, or the send ring is full: wait for ACKs.
            socket.register_send_waker(task.waker());
            return Ok(Step::Blocked);
        }
        if !self.pending.is_empty() {
            let n = socket.send_slice(&self.pending).unwrap_or(0);
            self.pending.drain(..n.min(self.pending.len()));
            self.down = self.down.saturating_add(n as u64);
            return Ok(Step::Progress);
        }
        match self.upstream.poll_read_ready(task) {
            Poll::Pending => return Ok(Step::Blocked),
            Poll::Ready(result) => result?,
        }
        let upstream = &self.upstream;
        let read = socket.send(|space| match read_draining(upstream, space) {
            Ok(n) => (n, Ok(n)),
            Err(e) => (0, Err(e)),
        });
        match read {
            Ok(Ok(0)) => {
                // The proxy's FIN: close our sending half once the ring drains.
                socket.close();
                self.down_eof = true;
                Ok(Step::Progress)
            }
            Ok(Ok(n)) => {
                self.down = self.down.saturating_add(n as u64);
                Ok(Step::Progress)
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => Ok(Step::Progress),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                socket.register_send_waker(task.waker());
                Ok(Step::Blocked)
            }
        }
    }
}

/// `try_read` that also ends the socket's readiness after a short read. A read from a
/// TCP socket that returns fewer bytes than asked for has emptied its receive queue, so
/// the next read could only fail with `EAGAIN`: tokio's own `poll_read` skips that
/// call in the same way, and this does it for the flow's ring-sized reads. Data that
/// arrives after the read raises a new readiness event, which clearing does not lose
/// (tokio clears only the event it handed out).
fn read_draining(upstream: &TcpStream, space: &mut [u8]) -> io::Result<usize> {
    let asked = space.len();
    let mut got = None;
    let result = upstream.try_io(Interest::READABLE, || {
        let n = (&*SockRef::from(upstream)).read(space)?;
        got = Some(n);
        if n > 0 && n < asked {
            // Tells tokio the socket is drained; `got` keeps the count.
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(n)
        }
    });
    match got {
        Some(n) => Ok(n),
        None => result,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn a_drained_socket_still_wakes_for_later_data() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (writer, accepted) = tokio::join!(
            TcpStream::connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        let (mut writer, reader) = (writer.unwrap(), accepted.unwrap().0);
        let mut space = [0u8; 64];
        for round in 0..20u8 {
            let chunk = vec![round; usize::from(round % 7) + 1];
            writer.write_all(&chunk).await.unwrap();
            let mut got = Vec::new();
            while got.len() < chunk.len() {
                tokio::time::timeout(Duration::from_secs(5), reader.readable())
                    .await
                    .expect("data that came after a drained read must wake the reader")
                    .unwrap();
                match read_draining(&reader, &mut space) {
                    Ok(n) => got.extend_from_slice(&space[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            }
            assert_eq!(got, chunk, "round {round}");
        }
        // A read that fills the space leaves the rest readable.
        writer.write_all(&[7u8; 100]).await.unwrap();
        let mut total = 0;
        while total < 100 {
            reader.readable().await.unwrap();
            match read_draining(&reader, &mut space) {
                Ok(n) => total += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(total, 100);
        drop(writer);
        reader.readable().await.unwrap();
        assert_eq!(read_draining(&reader, &mut space).unwrap(), 0, "EOF");
    }
}
