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

use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
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
pub async fn relay(mut client: TcpStream, mut remote: TcpStream) -> Outcome {
    let mut bytes = Transferred::default();
    let one_done = AtomicBool::new(false);
    let result = {
        let (client_read, client_write) = client.split();
        let (remote_read, remote_write) = remote.split();
        tokio::try_join!(
            pipe(client_read, remote_write, &mut bytes.up, &one_done),
            pipe(remote_read, client_write, &mut bytes.down, &one_done),
        )
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

/// One direction: copy, then splice once it proves to be bulk; FIN at the end.
async fn pipe(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    count: &mut u64,
    one_done: &AtomicBool,
) -> io::Result<()> {
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut try_splice = true;
    loop {
        if try_splice && *count >= SPLICE_AFTER {
            match Pipe::new(PIPE_CAPACITY) {
                Ok(pipe) => {
                    return splice(from.as_ref(), to.as_ref(), pipe, count, one_done).await;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "no splice pipe; copying");
                    try_splice = false;
                }
            }
        }
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return finish(to.as_ref(), one_done);
        }
        to.write_all(buf.get(..n).unwrap_or_default()).await?;
        *count = count.saturating_add(n as u64);
    }
}

/// Zero-copy loop: socket -> pipe -> socket, waiting on readiness between calls.
async fn splice(
    from: &TcpStream,
    to: &TcpStream,
    mut pipe: Pipe,
    count: &mut u64,
    one_done: &AtomicBool,
) -> io::Result<()> {
    loop {
        let n = from
            .async_io(Interest::READABLE, || pipe.fill_from(from))
            .await?;
        if n == 0 {
            return finish(to, one_done);
        }
        while pipe.buffered() > 0 {
            let n = to
                .async_io(Interest::WRITABLE, || pipe.drain_into(to))
                .await?;
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
