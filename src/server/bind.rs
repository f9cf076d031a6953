//! BIND: listen where the expected peer can reach us, announce that address (first
//! reply), wait for the peer, check it is the one announced in DST.ADDR, announce it
//! (second reply), then relay.

use std::io;
use std::net::{IpAddr, SocketAddr};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use super::connect::allowed_addresses;
use super::{Shared, refuse, relay, reply};
use crate::socks::{Address, ReplyCode, Request};

/// The local address the kernel would use to reach `peer`: the interface the peer
/// can reach us on. No packet is sent (a UDP connect only picks a route).
async fn local_address_towards(peer: IpAddr) -> io::Result<IpAddr> {
    let any: SocketAddr = match peer {
        IpAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let probe = UdpSocket::bind(any).await?;
    probe.connect((peer, 9)).await?;
    Ok(probe.local_addr()?.ip())
}

/// Resolves when the client closes its connection. Returns pending forever once the
/// client has sent data (kept in the socket for the peer), so it never spins.
async fn client_closed(client: &TcpStream) {
    let mut byte = [0u8; 1];
    match client.peek(&mut byte).await {
        Ok(0) | Err(_) => {}
        Ok(_) => std::future::pending().await,
    }
}

pub(super) async fn serve(
    mut client: TcpStream,
    request: &Request,
    leftover: Vec<u8>,
    shared: &Shared,
) -> io::Result<()> {
    // The peer the client expects, if it named one.
    let expected: Option<Vec<IpAddr>> = if request.target.is_unspecified() {
        None
    } else {
        match allowed_addresses(&request.target, shared).await {
            Ok(addrs) => Some(addrs.iter().map(|a| a.ip().to_canonical()).collect()),
            Err(code) => {
                refuse(&mut client, request, code).await;
                return Ok(());
            }
        }
    };
    let control_ip = client.local_addr()?.ip();
    let listen_ip = match (shared.config.bind_external, expected.as_deref()) {
        (Some(ip), _) => ip,
        (None, Some([first, ..])) => local_address_towards(*first).await.unwrap_or(control_ip),
        (None, _) => control_ip,
    };
    let listener = match TcpListener::bind((listen_ip, 0)).await {
        Ok(listener) => listener,
        Err(e) => {
            tracing::info!(ip = %listen_ip, error = %e, "cannot listen for BIND");
            refuse(&mut client, request, reply::for_io_error(&e)).await;
            return Ok(());
        }
    };
    let bound = listener.local_addr()?;
    client
        .write_all(&request.reply(ReplyCode::SUCCEEDED, &Address::from(bound)))
        .await?;
    tracing::info!(%bound, expected = ?expected, "listening for the peer");

    let accepted = tokio::select! {
        accepted = listener.accept() => accepted,
        () = client_closed(&client) => {
            tracing::info!("client closed while waiting for the peer");
            return Ok(());
        }
        () = tokio::time::sleep(shared.config.bind_timeout) => {
            tracing::info!(timeout = ?shared.config.bind_timeout, "no peer connected");
            refuse(&mut client, request, reply::TIMED_OUT).await;
            return Ok(());
        }
    };
    drop(listener);
    let (mut peer_stream, peer) = match accepted {
        Ok(pair) => pair,
        Err(e) => {
            refuse(&mut client, request, reply::for_io_error(&e)).await;
            return Ok(());
        }
    };
    let peer_ip = peer.ip().to_canonical();
    if let Some(expected) = &expected
        && !expected.contains(&peer_ip)
    {
        tracing::info!(%peer, "unexpected peer connected; refused");
        // Second reply: 0x02 (SOCKS4: 91), naming the peer that was turned away.
        let reply = request.reply(ReplyCode::NOT_ALLOWED, &Address::from(peer));
        let _ = client.write_all(&reply).await;
        return Ok(());
    }
    let _ = peer_stream.set_nodelay(true);
    super::set_keepalive(&peer_stream, shared.config.keepalive);
    client
        .write_all(&request.reply(ReplyCode::SUCCEEDED, &Address::from(peer)))
        .await?;
    if !leftover.is_empty() {
        peer_stream.write_all(&leftover).await?;
    }
    tracing::info!(%peer, "peer connected");
    let outcome = relay::relay_with_idle(client, peer_stream, shared.config.idle_timeout).await;
    tracing::info!(
        sent = outcome.bytes.up,
        received = outcome.bytes.down,
        error = outcome.error.map(|e| e.to_string()),
        "closed"
    );
    Ok(())
}
