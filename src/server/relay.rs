//! Copies a pair of TCP streams both ways until both directions have ended.
//!
//! Half-close is carried: end of stream on one side becomes a FIN (write shutdown)
//! on the other, and the opposite direction goes on. An error on either side (a
//! reset) ends both, and the other side is reset too (SO_LINGER 0), so a peer sees an
//! RST where the far end sent one. Buffers start small and grow only for streams that
//! fill them, so idle sessions stay cheap.

use std::io;
use std::time::Duration;

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// First buffer size of each direction.
const INITIAL_BUFFER: usize = 16 * 1024;
/// A direction whose reads keep filling the buffer doubles it up to this size.
const MAX_BUFFER: usize = 256 * 1024;

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
    let result = {
        let (client_read, client_write) = client.split();
        let (remote_read, remote_write) = remote.split();
        tokio::try_join!(
            pipe(client_read, remote_write, &mut bytes.up),
            pipe(remote_read, client_write, &mut bytes.down),
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

/// Copies one direction; on end of stream shuts the writer down (FIN).
async fn pipe<R, W>(mut from: R, mut to: W, count: &mut u64) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; INITIAL_BUFFER];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return match to.shutdown().await {
                // The other side may already be gone; that is its direction's business.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
                other => other,
            };
        }
        to.write_all(buf.get(..n).unwrap_or_default()).await?;
        *count = count.saturating_add(n as u64);
        if n == buf.len() && buf.len() < MAX_BUFFER {
            buf.resize(buf.len().saturating_mul(2), 0);
        }
    }
}
