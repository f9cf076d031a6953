//! Batched datagram I/O for the relay: a burst queued on a socket is received with
//! one system call (`recvmmsg`) and sent on with one (`sendmmsg`), instead of two
//! system calls and two passes through the runtime per datagram. Where the system
//! has no batch calls, one datagram per call.
//!
//! The batch buffers belong to the worker thread, not to an association: one set per
//! thread, shared by every association that runs there (none holds them across an
//! await), so an idle association holds no buffer and memory does not grow with the
//! number of associations.
//!
//! Sending never waits: a datagram the socket will not take now (its send buffer
//! is full) is dropped and counted, as a full router queue drops it.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tun2socks_platform::mmsg;

/// Datagrams per receive call; every slot holds the largest datagram.
pub(super) const SLOTS: usize = 32;
/// Bytes per slot: the largest UDP payload, so nothing is ever truncated.
pub(super) const SLOT: usize = 65_536;

/// One thread's batch buffers.
#[derive(Debug, Default)]
pub(super) struct Batch {
    /// [`SLOTS`] slots of [`SLOT`] bytes (allocated on first use; the kernel
    /// touches only the pages it writes).
    pub(super) buf: Vec<u8>,
    /// What the last receive put in the slots.
    pub(super) got: Vec<mmsg::Datagram>,
    /// Datagrams built for sending (SOCKS headers added), back to back.
    pub(super) out: Vec<u8>,
}

thread_local! {
    static BATCH: RefCell<Batch> = RefCell::default();
}

/// Runs `f` with this thread's batch buffers.
pub(super) fn with_batch<R>(f: impl FnOnce(&mut Batch) -> R) -> R {
    BATCH.with_borrow_mut(|batch| {
        if batch.buf.len() != SLOTS * SLOT {
            batch.buf = vec![0; SLOTS * SLOT];
        }
        f(batch)
    })
}

/// How a receive learns that a socket has datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Recv {
    /// Through the runtime's readiness: no system call when the reactor has not
    /// seen the socket readable; a `WouldBlock` clears the readiness, so the next
    /// `readable()` waits.
    Tracked,
    /// A system call whatever the reactor saw (busy polling: the reactor is not
    /// polled meanwhile). A datagram that comes later still wakes the reactor, so
    /// nothing is missed once the association sleeps again.
    Direct,
}

/// Receives the datagrams queued on `socket` now, up to a batch, into `buf`'s slots;
/// `got` says where each lies and who sent it. `WouldBlock` when none is queued.
pub(super) fn recv(
    socket: &UdpSocket,
    buf: &mut [u8],
    got: &mut Vec<mmsg::Datagram>,
    how: Recv,
) -> io::Result<usize> {
    let once = |buf: &mut [u8], got: &mut Vec<mmsg::Datagram>| match mmsg::recv_batch(
        socket, buf, SLOT, got,
    ) {
        Err(e) if e.kind() == io::ErrorKind::Unsupported => {
            let slot = buf.get_mut(..SLOT).unwrap_or_default();
            let (len, from) = socket.try_recv_from(slot)?;
            got.push(mmsg::Datagram {
                len,
                truncated: false,
                from: Some(from),
            });
            Ok(1)
        }
        other => other,
    };
    match how {
        Recv::Tracked => socket.try_io(Interest::READABLE, || once(buf, got)),
        Recv::Direct => once(buf, got),
    }
}

/// [`recv`] into `b`'s slots, retried when interrupted: `true` if datagrams came,
/// `false` when none is queued (or the socket failed: logged).
pub(super) fn recv_into(socket: &UdpSocket, b: &mut Batch, how: Recv) -> bool {
    loop {
        match recv(socket, &mut b.buf, &mut b.got, how) {
            Ok(_) => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                if e.kind() != io::ErrorKind::WouldBlock {
                    tracing::debug!(error = %e, "receive error");
                }
                return false;
            }
        }
    }
}

/// Sends every datagram of `batch` that `socket` takes now, a batch per system
/// call; returns how many went (the others are dropped: the socket's buffer was
/// full, or the kernel refused that one datagram).
pub(super) fn send(socket: &UdpSocket, batch: &[mmsg::Outgoing<'_>]) -> usize {
    let (mut at, mut sent) = (0, 0);
    while let Some(rest) = batch.get(at..).filter(|rest| !rest.is_empty()) {
        match mmsg::send_batch(socket, rest) {
            Ok(0) => break,
            Ok(n) => {
                at += n;
                sent += n;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                return sent + send_one_by_one(socket, rest);
            }
            Err(e) => {
                // The first datagram of the rest is the one the kernel refused (an
                // unreachable destination, say); the others may still go.
                tracing::debug!(error = %e, "send failed");
                at += 1;
            }
        }
    }
    sent
}

/// Sends datagrams that lie back to back in `bytes` (datagram `i` ends at
/// `ends[i]`) to `to`, runs of equal size as one segmented send where the kernel
/// allows; returns how many went (the others are dropped).
pub(super) fn send_contiguous(
    socket: &UdpSocket,
    bytes: &[u8],
    ends: &[usize],
    to: SocketAddr,
) -> usize {
    let (mut sent, mut start) = (0, 0);
    while sent < ends.len() {
        let rest = ends.get(sent..).unwrap_or_default();
        let from = bytes.get(start..).unwrap_or_default();
        let relative: Vec<usize> = rest.iter().map(|end| end.saturating_sub(start)).collect();
        match mmsg::send_contiguous(socket, from, &relative, Some(to)) {
            Ok(n) if n == rest.len() => return sent + n,
            Ok(n) => {
                // The datagram after those that went was refused: skip it.
                tracing::debug!("send failed");
                sent += n + 1;
            }
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                let mut at = 0;
                let list: Vec<mmsg::Outgoing<'_>> = relative
                    .iter()
                    .map(|&end| {
                        let datagram = from.get(at..end).unwrap_or_default();
                        at = end;
                        (datagram, Some(to))
                    })
                    .collect();
                return sent + send(socket, &list);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return sent,
            Err(e) => {
                tracing::debug!(error = %e, "send failed");
                sent += 1;
            }
        }
        start = sent
            .checked_sub(1)
            .and_then(|last| ends.get(last))
            .copied()
            .unwrap_or(0);
    }
    ends.len().min(sent)
}

/// Sends `list` (each datagram to its address) with as few system calls as the
/// kernel allows: a run of datagrams to one address is copied back to back into
/// `out` and sent with [`send_contiguous`] (segmented where the sizes allow), the
/// others in batches. Returns how many went.
pub(super) fn send_grouped(
    socket: &UdpSocket,
    list: &[mmsg::Outgoing<'_>],
    out: &mut Vec<u8>,
) -> usize {
    let mut sent = 0;
    let mut singles: Vec<mmsg::Outgoing<'_>> = Vec::new();
    let mut rest = list;
    while let Some((_, to)) = rest.first() {
        let run = rest.iter().take_while(|(_, t)| t == to).count().max(1);
        let (group, after) = rest.split_at(run.min(rest.len()));
        rest = after;
        match to {
            Some(to) if group.len() > 1 => {
                sent += send(socket, &singles);
                singles.clear();
                out.clear();
                let mut ends = Vec::with_capacity(group.len());
                for (payload, _) in group {
                    out.extend_from_slice(payload);
                    ends.push(out.len());
                }
                sent += send_contiguous(socket, out, &ends, *to);
            }
            _ => singles.extend_from_slice(group),
        }
    }
    sent + send(socket, &singles)
}

fn send_one_by_one(socket: &UdpSocket, batch: &[mmsg::Outgoing<'_>]) -> usize {
    let mut sent = 0;
    for (bytes, to) in batch {
        let result = match to {
            Some(to) => socket.try_send_to(bytes, *to),
            None => socket.try_send(bytes),
        };
        match result {
            Ok(_) => sent += 1,
            Err(e) => tracing::debug!(error = %e, "send failed"),
        }
    }
    sent
}

/// Who sent datagram `d` (the canonical form of an IPv4-mapped address).
pub(super) fn sender(d: &mmsg::Datagram) -> Option<SocketAddr> {
    d.from
        .map(|from| SocketAddr::new(from.ip().to_canonical(), from.port()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    async fn bound() -> UdpSocket {
        UdpSocket::bind("127.0.0.1:0").await.unwrap()
    }

    fn drain(socket: &UdpSocket) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while let Ok(n) = socket.try_recv(&mut buf) {
            got.push(buf[..n].to_vec());
        }
        got
    }

    #[tokio::test]
    async fn grouped_sends_reach_each_address_in_order() {
        let (tx, r1, r2) = (bound().await, bound().await, bound().await);
        let (a1, a2) = (r1.local_addr().unwrap(), r2.local_addr().unwrap());
        let payloads: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 40 + usize::from(i % 2)]).collect();
        // A run of three to r1 (sizes differ), one to r2, a run of four equal ones
        // to r2 (segmented), then r1 again.
        let to = [a1, a1, a1, a2, a2, a2, a2, a1];
        let mut list: Vec<mmsg::Outgoing<'_>> = payloads
            .iter()
            .zip(to)
            .map(|(p, to)| (&p[..], Some(to)))
            .collect();
        list[4].0 = &payloads[3];
        list[5].0 = &payloads[3];
        list[6].0 = &payloads[3];
        let mut out = Vec::new();
        assert_eq!(send_grouped(&tx, &list, &mut out), 8);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let (g1, g2) = (drain(&r1), drain(&r2));
        assert_eq!(
            g1,
            vec![
                payloads[0].clone(),
                payloads[1].clone(),
                payloads[2].clone(),
                payloads[7].clone()
            ]
        );
        assert_eq!(g2, vec![payloads[3].clone(); 4]);
    }

    #[tokio::test]
    async fn contiguous_sends_count_what_went() {
        let (tx, rx) = (bound().await, bound().await);
        let bytes: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let ends = [100, 200, 300, 400, 1000];
        assert_eq!(
            send_contiguous(&tx, &bytes, &ends, rx.local_addr().unwrap()),
            5
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let got = drain(&rx);
        let lens: Vec<usize> = got.iter().map(Vec::len).collect();
        assert_eq!(lens, vec![100, 100, 100, 100, 600]);
        assert_eq!(got.concat(), bytes);
    }
}
