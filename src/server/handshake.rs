//! Reads a client's handshake under a timeout, with a bounded buffer, driving the
//! sans-IO [`ServerHandshake`] and sending its replies.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::ServerConfig;
use super::penalty::LoginFailures;
use crate::socks::{self, Request, ServerHandshake, ServerStatus};

/// Why a handshake ended without a request.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The client broke the protocol or was refused (the reply, if any, was sent).
    #[error("{0}")]
    Protocol(#[from] socks::Error),
    /// The client closed before finishing.
    #[error("client closed the connection during the handshake")]
    Closed,
    /// The client took too long.
    #[error("handshake not completed within {0:?}")]
    Timeout(std::time::Duration),
    /// A socket error.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// A handshake that reached its request.
#[derive(Debug)]
pub(super) struct Handshaken {
    /// The request to carry out.
    pub request: Request,
    /// Bytes the client pipelined after the request (to be forwarded once the request
    /// is carried out).
    pub leftover: Vec<u8>,
    /// Replies not sent yet (method selection, login status): a client that pipelined
    /// its request with them waits for the request's reply anyway, so they go out in
    /// the same write as that reply. Empty unless the client pipelined.
    pub unsent: Vec<u8>,
}

/// Runs the handshake to its end.
pub(super) async fn read_request(
    stream: &mut TcpStream,
    config: &ServerConfig,
    failures: &LoginFailures,
) -> Result<Handshaken, HandshakeError> {
    let timeout = config.handshake_timeout;
    tokio::time::timeout(
        timeout,
        drive(
            stream,
            ServerHandshake::new(config.policy.clone()),
            failures,
        ),
    )
    .await
    .unwrap_or(Err(HandshakeError::Timeout(timeout)))
}

async fn drive(
    stream: &mut TcpStream,
    mut hs: ServerHandshake,
    failures: &LoginFailures,
) -> Result<Handshaken, HandshakeError> {
    // Every handshake message fits in MAX_MESSAGE bytes (the codec caps each field),
    // so the buffer never holds more than that plus one read.
    let mut buf = Vec::with_capacity(socks::MAX_MESSAGE);
    let mut chunk = [0u8; 1024];
    loop {
        let step = hs.handshake(&buf);
        // The peer's address only when a login failed: asking for it on every step
        // would cost a getpeername(2) per message of every handshake.
        if let ServerStatus::Failed(socks::Error::AuthFailed { .. }) = &step.status {
            if let Ok(peer) = stream.peer_addr() {
                // A wrong password is answered late, later for each recent failure.
                let delay = failures.failed(peer.ip(), tokio::time::Instant::now());
                tracing::info!(?delay, "login failed; answering after a delay");
                tokio::time::sleep(delay).await;
            }
        }
        buf.drain(..step.consumed.min(buf.len()));
        match step.status {
            ServerStatus::Done(request) => {
                if request.user.is_some() {
                    if let Ok(peer) = stream.peer_addr() {
                        failures.succeeded(peer.ip());
                    }
                }
                return Ok(Handshaken {
                    request,
                    leftover: buf,
                    unsent: step.reply,
                });
            }
            ServerStatus::Failed(error) => {
                if !step.reply.is_empty() {
                    stream.write_all(&step.reply).await?;
                }
                let _ = stream.shutdown().await;
                return Err(error.into());
            }
            ServerStatus::NeedMore => {
                if !step.reply.is_empty() {
                    stream.write_all(&step.reply).await?;
                }
            }
        }
        if buf.len() > socks::MAX_MESSAGE {
            // Unreachable while the codec caps every field; kept as a hard stop.
            return Err(socks::Error::Failed.into());
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(HandshakeError::Closed);
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
}
