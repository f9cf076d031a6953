//! DNS over TCP answered in the tunnel (`--dns fake-ip`): an application's TCP
//! connection to port 53 (any address) is not sent to the proxy as it stands; its
//! queries (RFC 7766 framing) are answered as its UDP queries are: A / AAAA from the
//! fake-IP pool at once, anything else over TCP through the proxy to the queried
//! resolver (or `--dns-server`). So `dig +tcp` and resolvers configured for TCP
//! (`options use-vc`) get the same fake addresses as UDP, and a name only the proxy
//! can resolve works over either. A zone transfer (AXFR, IXFR) is answered by a
//! stream of messages, which this one-answer-per-query loop cannot pass on: when it
//! is the connection's first query, the whole connection goes to the resolver
//! through the proxy as it stands; after other queries, it is refused (REFUSED).
//!
//! Stage: a flow task (instead of the CONNECT and the copy loop); it reads and writes
//! the flow's smoltcp socket and asks the stack for a poll after each change. Queries
//! are answered one at a time, in order (RFC 7766 lets a server answer pipelined
//! queries in order). A connection without a query for [`IDLE`] is closed, as RFC
//! 7766 §6.2.3 has servers do.

use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use smoltcp::socket::tcp;

use super::{FlowContext, FlowError, accept_app};
use crate::dns::frames::Frames;
use crate::dns::{Dns, message};
use crate::flow::{Signal, TcpFlow};

/// A connection with no query for this long is closed (our own DNS-over-TCP client's
/// idle limit too).
pub const IDLE: Duration = Duration::from_secs(10);

/// Serves one application connection to port 53; returns the bytes read and written.
pub(super) async fn serve(
    flow: &Arc<TcpFlow>,
    cx: &FlowContext,
    dns: &Dns,
) -> Result<(u64, u64), FlowError> {
    accept_app(flow, cx).await?;
    tracing::debug!("DNS over TCP answered in the tunnel");
    let mut frames = Frames::default();
    let (mut up, mut down) = (0u64, 0u64);
    let mut queries = 0u64;
    loop {
        let read = match tokio::time::timeout(IDLE, read_some(flow, &mut frames)).await {
            Ok(read) => read?,
            // Idle: close (a FIN; the client opens a new connection if it needs one).
            Err(_) => 0,
        };
        if read == 0 {
            close(flow, &cx.signal);
            return Ok((up, down));
        }
        up = up.saturating_add(read as u64);
        flow.note_read(up);
        // The ring has room again: the stack may advertise a larger window.
        cx.signal.mark(flow);
        while let Some(query) = frames.next_message() {
            queries = queries.saturating_add(1);
            let answer = if message::is_zone_transfer(&query) {
                if queries == 1 {
                    // A zone transfer is answered by a stream of messages: the whole
                    // connection goes to the resolver as it stands (it is asked for
                    // on a connection of its own, RFC 5936 §4.1).
                    tracing::debug!("a zone transfer: the connection passes through");
                    let mut first = framed(&query);
                    first.extend_from_slice(&frames.take_rest());
                    let (more_up, more_down) = super::pass_through(flow, cx, &first).await?;
                    return Ok((up.saturating_add(more_up), down.saturating_add(more_down)));
                }
                tracing::debug!("a zone transfer after other queries: refused");
                dns.refused(&query)
            } else {
                dns.answer_stream(&query, flow.tuple.src, flow.tuple.dst)
                    .await
            };
            let Some(answer) = answer else {
                close(flow, &cx.signal);
                return Ok((up, down));
            };
            // A DNS message over TCP is at most 65,535 bytes; a longer one cannot be
            // framed (none is ever built).
            if u16::try_from(answer.len()).is_err() {
                continue;
            }
            let framed = framed(&answer);
            write_all(flow, &cx.signal, &framed).await?;
            down = down.saturating_add(framed.len() as u64);
        }
    }
}

/// `message` with its 2-byte length in front (RFC 7766 §8); the caller checks that it
/// fits.
fn framed(message: &[u8]) -> Vec<u8> {
    let len = u16::try_from(message.len()).unwrap_or(u16::MAX);
    let mut framed = Vec::with_capacity(message.len().saturating_add(2));
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    framed
}

/// Moves what the socket has received into `frames`; 0 once the application has
/// closed its sending half (and everything before its FIN was read).
async fn read_some(flow: &TcpFlow, frames: &mut Frames) -> Result<usize, FlowError> {
    poll_fn(|task| {
        let mut sockets = flow.sockets();
        let socket = sockets.get_mut::<tcp::Socket>(flow.handle);
        if socket.can_recv() {
            let n = socket
                .recv(|bytes| {
                    frames.push(bytes);
                    (bytes.len(), bytes.len())
                })
                .unwrap_or(0);
            return Poll::Ready(Ok(n));
        }
        match socket.state() {
            tcp::State::Closed | tcp::State::Listen => Poll::Ready(Err(FlowError::AppReset)),
            _ if !socket.may_recv() => Poll::Ready(Ok(0)),
            _ => {
                socket.register_recv_waker(task.waker());
                Poll::Pending
            }
        }
    })
    .await
}

/// Queues all of `bytes` on the socket, as fast as the application's window lets.
async fn write_all(flow: &TcpFlow, signal: &Signal, bytes: &[u8]) -> Result<(), FlowError> {
    let mut rest = bytes;
    while !rest.is_empty() {
        let n = poll_fn(|task| {
            let mut sockets = flow.sockets();
            let socket = sockets.get_mut::<tcp::Socket>(flow.handle);
            if !socket.may_send() {
                return Poll::Ready(Err(FlowError::AppReset));
            }
            if socket.send_capacity() == 0 {
                // The send ring was freed while the connection idled.
                flow.open_send_buffer(socket, Instant::now());
            }
            if socket.can_send() {
                return Poll::Ready(Ok(socket.send_slice(rest).unwrap_or(0)));
            }
            socket.register_send_waker(task.waker());
            Poll::Pending
        })
        .await?;
        rest = rest.get(n..).unwrap_or_default();
        signal.mark(flow);
    }
    Ok(())
}

fn close(flow: &TcpFlow, signal: &Signal) {
    flow.sockets().get_mut::<tcp::Socket>(flow.handle).close();
    signal.mark(flow);
}
