//! The copy loop of one TCP flow, between its smoltcp socket and the proxy stream,
//! from the proxy's reply to both FINs (or a reset).
//!
//! The copy is zero-extra-copy: bytes go straight from smoltcp's receive ring into
//! the upstream socket (`try_write`) and from the upstream socket into smoltcp's send
//! ring (`try_read`). Backpressure is the rings filling up: a slow proxy leaves data in
//! the receive ring, which shrinks the window advertised to the application; a slow
//! application leaves the send ring full, so the upstream socket is not read and the
//! proxy's window closes. A FIN is carried each way on its own (half-close); a reset on
//! either side becomes a reset on the other.

use std::io::{self, Read};
use std::net::Shutdown;
use std::sync::Arc;
use std::task::{Context, Poll};

use smoltcp::socket::tcp;
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::super::{Signal, TcpFlow};
use super::FlowError;
use crate::metrics::Metrics;

/// The copy loop's state.
pub(super) struct Pump {
    pub(super) flow: Arc<TcpFlow>,
    pub(super) upstream: TcpStream,
    /// Bytes from the proxy not yet in the socket (those that followed the reply).
    pub(super) pending: Vec<u8>,
    /// The application's FIN has been passed on to the proxy.
    pub(super) up_closed: bool,
    /// The proxy's FIN has been passed on to the application.
    pub(super) down_eof: bool,
    pub(super) up: u64,
    pub(super) down: u64,
    /// When bytes last moved (or a FIN was passed on).
    pub(super) last_progress: tokio::time::Instant,
    /// The shared counters; bytes are counted as they move, so a scrape sees a long
    /// transfer progress.
    pub(super) stats: Arc<Metrics>,
    /// `(up, down)` already added to `stats`.
    pub(super) counted: (u64, u64),
}

/// One direction's outcome within a poll.
enum Step {
    /// Nothing more to do until a registered event.
    Blocked,
    /// Bytes moved or state changed; try again.
    Progress,
}

impl Pump {
    pub(super) fn poll(
        &mut self,
        task: &mut Context<'_>,
        signal: &Signal,
    ) -> Poll<Result<(), FlowError>> {
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
    use std::time::Duration;
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
