//! CONNECT: resolve the destination, try each of its addresses, answer with the real
//! outbound socket's address, then relay.

use std::io;
use std::net::SocketAddr;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::{Shared, refuse, relay, reply};
use crate::socks::{Address, ReplyCode, Request};

/// Resolves `target` and drops addresses the deny rules refuse. Fails with the reply
/// code to send: 0x04 when the name does not resolve, 0x02 when every address is
/// denied.
pub(super) async fn allowed_addresses(
    target: &Address,
    shared: &Shared,
) -> Result<Vec<SocketAddr>, ReplyCode> {
    let addrs: Vec<SocketAddr> = match target {
        Address::Ip(addr) => vec![*addr],
        Address::Domain(name, port) => {
            match tokio::net::lookup_host((name.as_str(), *port)).await {
                Ok(addrs) => addrs.collect(),
                Err(e) => {
                    tracing::info!(host = %name, error = %e, "resolve failed");
                    return Err(reply::RESOLVE_FAILED);
                }
            }
        }
    };
    if addrs.is_empty() {
        return Err(reply::RESOLVE_FAILED);
    }
    let allowed: Vec<SocketAddr> = addrs
        .into_iter()
        .filter(|a| !shared.destination_denied(a.ip()))
        .collect();
    if allowed.is_empty() {
        tracing::info!(target = %target, "destination denied by rule");
        return Err(ReplyCode::NOT_ALLOWED);
    }
    Ok(allowed)
}

/// Tries each address in turn: the stream and the address it reached, or the reply
/// code of the last failure if none connects.
async fn connect_any(
    addrs: &[SocketAddr],
    shared: &Shared,
) -> Result<(TcpStream, SocketAddr), ReplyCode> {
    let mut code = ReplyCode::HOST_UNREACHABLE;
    for addr in addrs {
        match tokio::time::timeout(shared.config.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => return Ok((stream, *addr)),
            Ok(Err(e)) => {
                code = reply::for_io_error(&e);
                tracing::debug!(%addr, error = %e, "connect failed");
            }
            Err(_) => {
                code = reply::TIMED_OUT;
                tracing::debug!(%addr, "connect timed out");
            }
        }
    }
    Err(code)
}

/// Carries out a CONNECT. `unsent`: earlier handshake replies of a pipelining client,
/// sent in front of this one.
pub(super) async fn serve(
    mut client: TcpStream,
    request: &Request,
    leftover: Vec<u8>,
    mut unsent: Vec<u8>,
    shared: &Shared,
) -> io::Result<()> {
    let connected = match allowed_addresses(&request.target, shared).await {
        Ok(addrs) => connect_any(&addrs, shared).await,
        Err(code) => Err(code),
    };
    let (mut remote, peer) = match connected {
        Ok(pair) => pair,
        Err(code) => {
            tracing::info!(target = %request.target, reply = %code, "connect failed");
            if !unsent.is_empty() {
                client.write_all(&unsent).await?;
            }
            refuse(&mut client, request, code).await;
            return Ok(());
        }
    };
    let _ = remote.set_nodelay(true);
    super::set_keepalive(&remote, shared.config.keepalive);
    let bound = Address::from(remote.local_addr()?);
    unsent.extend(request.reply(ReplyCode::SUCCEEDED, &bound));
    client.write_all(&unsent).await?;
    if !leftover.is_empty() {
        remote.write_all(&leftover).await?;
    }
    tracing::info!(target = %request.target, %peer, "connected");
    let outcome = relay::relay_with_idle(client, remote, shared.config.idle_timeout).await;
    let sent = outcome.bytes.up.saturating_add(leftover.len() as u64);
    match outcome.error {
        None => tracing::info!(sent, received = outcome.bytes.down, "closed"),
        Some(e) => {
            tracing::info!(sent, received = outcome.bytes.down, error = %e, "closed by error")
        }
    }
    Ok(())
}
