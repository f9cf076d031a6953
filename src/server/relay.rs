//! Copies a pair of TCP streams both ways until both directions have ended.
//!
//! Half-close is carried: end of stream on one side becomes a FIN (write shutdown)
//! on the other, and the opposite direction goes on. An error on either side (a
//! reset) ends both, and the other side is reset too (SO_LINGER 0), so a peer sees an
//! RST where the far end sent one.
//!
//! Each direction starts by copying through a small buffer. One that has moved
//! [`SPLICE_AFTER`] bytes is a bulk stream and switches to `splice(2)` through a
//! kernel pipe ([`Pipe`]): the bytes then never enter userspace. Short sessions never
//! pay for the pipe's two descriptors; where pipes are unavailable, copying goes on.
//!
//! [`relay_with_idle`] also ends a relay that moved no byte either way for a while
//! (copy and splice alike count as progress), with a reset to both peers.

use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tun2socks_platform::Pipe;

/// Buffer of a direction that is still copying.
const COPY_BUFFER: usize = 16 * 1024;
/// A direction switches to splice after moving this many bytes.
pub const SPLICE_AFTER: u64 = 256 * 1024;
/// Capacity asked for each splice pipe.
const PIPE_CAPACITY: usize = 512 * 1024;
// The idle limit, the keep-alive default and its parameters are the tunnel's: one
// definition, in `upstream`.
pub use crate::upstream::{DEFAULT_IDLE_TIMEOUT, DEFAULT_KEEPALIVE, keepalive};

/// Bytes moved by [`relay`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    /// From the client side to the remote side.
    pub up: u64,
    /// From the remote side to the client side.
    pub down: u64,
}

/// How a relay ended.
#[derive(Debug)]
pub struct Outcome {
    /// Bytes moved each way (also when an error ended the relay).
    pub bytes: Transferred,
    /// The error that ended it, if any (both sockets were then reset).
    pub error: Option<io::Error>,
}

/// Relays `client` <-> `remote` until both directions are done or one fails.
pub async fn relay(client: TcpStream, remote: TcpStream) -> Outcome {
    relay_with_idle(client, remote, None).await
}

/// Like [`relay`], and ends the relay with a reset both ways (error `TimedOut`) once
/// no byte moved either way for `idle_timeout`.
pub async fn relay_with_idle(
    mut client: TcpStream,
    mut remote: TcpStream,
    idle_timeout: Option<Duration>,
) -> Outcome {
    let mut bytes = Transferred::default();
    let shared = Shared {
        one_done: AtomicBool::new(false),
        activity: Activity::new(),
    };
    let result = {
        let (client_read, client_write) = client.split();
        let (remote_read, remote_write) = remote.split();
        let copy = async {
            tokio::try_join!(
                pipe(client_read, remote_write, &mut bytes.up, &shared),
                pipe(remote_read, client_write, &mut bytes.down, &shared),
            )
        };
        tokio::select! {
            result = copy => result.map(|_| ()),
            limit = shared.activity.idle_for(idle_timeout) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no traffic for {limit:?}"),
            )),
        }
    };
    let error = result.err();
    if error.is_some() {
        // Whichever side failed, the other learns of it as a reset, not a clean close.
        for stream in [&client, &remote] {
            let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
        }
    }
    Outcome { bytes, error }
}

/// What the two directions of one relay share.
struct Shared {
    /// One direction has passed its FIN on.
    one_done: AtomicBool,
    /// When bytes last moved either way.
    activity: Activity,
}

/// The time bytes last moved, as milliseconds since the relay started (an atomic, so
/// the relay's future stays `Send`).
struct Activity {
    start: tokio::time::Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: tokio::time::Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    /// Records that bytes moved now.
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn last(&self) -> tokio::time::Instant {
        let ms = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.checked_add(ms).unwrap_or(self.start)
    }

    /// Resolves (with the limit) once nothing moved for `limit`; never without one.
    async fn idle_for(&self, limit: Option<Duration>) -> Duration {
        let Some(limit) = limit else {
            return std::future::pending().await;
        };
        loop {
            // A limit too far to express is no limit.
            let Some(deadline) = self.last().checked_add(limit) else {
                return std::future::pending().await;
            };
            tokio::time::sleep_until(deadline).await;
            if self
                .last()
                .checked_add(limit)
                .is_some_and(|d| d <= tokio::time::Instant::now())
            {
                return limit;
            }
        }
    }
}

/// One direction: copy, then splice once it proves to be bulk; FIN at the end.
async fn pipe(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    count: &mut u64,
    shared: &Shared,
) -> io::Result<()> {
    // Filled by `read_buf` (no zeroing): a short session never pays for clearing
    // buffers it barely uses.
    let mut buf = Vec::with_capacity(COPY_BUFFER);
    let mut try_splice = true;
    loop {
        if try_splice && *count >= SPLICE_AFTER {
            match Pipe::new(PIPE_CAPACITY) {
                Ok(pipe) => {
                    return splice(from.as_ref(), to.as_ref(), pipe, count, shared).await;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "no splice pipe; copying");
                    try_splice = false;
                }
            }
        }
        buf.clear();
        let n = from.read_buf(&mut buf).await?;
        if n == 0 {
            return finish(to.as_ref(), &shared.one_done);
        }
        shared.activity.touch();
        to.write_all(&buf).await?;
        *count = count.saturating_add(n as u64);
    }
}

/// Zero-copy loop: socket -> pipe -> socket, waiting on readiness between calls.
async fn splice(
    from: &TcpStream,
    to: &TcpStream,
    mut pipe: Pipe,
    count: &mut u64,
    shared: &Shared,
) -> io::Result<()> {
    loop {
        let n = from
            .async_io(Interest::READABLE, || pipe.fill_from(from))
            .await?;
        if n == 0 {
            return finish(to, &shared.one_done);
        }
        shared.activity.touch();
        while pipe.buffered() > 0 {
            let n = to
                .async_io(Interest::WRITABLE, || pipe.drain_into(to))
                .await?;
            shared.activity.touch();
            *count = count.saturating_add(n as u64);
        }
    }
}

/// End of stream: pass the FIN on. When the other direction has already ended, the
/// close that follows sends the FIN and the shutdown call is skipped. The other side
/// may already be gone; that is its direction's business.
fn finish(to: &TcpStream, one_done: &AtomicBool) -> io::Result<()> {
    if one_done.swap(true, Ordering::AcqRel) {
        return Ok(());
    }
    match SockRef::from(to).shutdown(Shutdown::Write) {
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_limit_counts_from_the_last_progress() {
        let activity = Activity::new();
        let started = tokio::time::Instant::now();
        let limit = Duration::from_secs(10);
        let idle = activity.idle_for(Some(limit));
        tokio::pin!(idle);
        // Progress at 6 s moves the deadline from 10 s to 16 s.
        tokio::select! {
            _ = &mut idle => panic!("idle before any deadline"),
            () = tokio::time::sleep(Duration::from_secs(6)) => activity.touch(),
        }
        assert_eq!(idle.await, limit);
        assert_eq!(started.elapsed(), Duration::from_secs(16));
    }

    #[tokio::test(start_paused = true)]
    async fn no_limit_never_fires_and_a_huge_one_does_not_overflow() {
        let activity = Activity::new();
        for limit in [None, Some(Duration::MAX)] {
            let fired = tokio::time::timeout(
                Duration::from_secs(365 * 24 * 3600),
                activity.idle_for(limit),
            )
            .await;
            assert!(fired.is_err(), "{limit:?}");
        }
    }
}
