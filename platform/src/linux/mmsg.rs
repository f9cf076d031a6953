//! Batched datagram receive and send on a UDP socket: `recvmmsg(2)` and
//! `sendmmsg(2)` through nix's safe wrappers, so that a burst queued on a UDP socket
//! costs one system call instead of one per datagram, either way. Synchronous and
//! non-blocking (`MSG_DONTWAIT`): the caller drives readiness (for tokio, inside
//! `UdpSocket::try_io`).

use std::io;
use std::io::{IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd};

use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg};

/// The most datagrams one call receives or sends.
pub const MAX_BATCH: usize = 64;

/// One datagram of a batch: it lies in slot `i` of the buffer, `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram {
    /// Bytes received (at most the slot size).
    pub len: usize,
    /// The datagram was larger than its slot: the rest was discarded.
    pub truncated: bool,
    /// Its sender (IPv4 or IPv6; `None` if the kernel reported no address).
    pub from: Option<SocketAddr>,
}

/// One datagram to send: its bytes, and where to (`None` on a connected socket).
pub type Outgoing<'a> = (&'a [u8], Option<SocketAddr>);

/// Receives up to [`MAX_BATCH`] datagrams queued on
/// `socket` into `buf`, split into slots of `slot` bytes: datagram `i` lies at
/// `buf[i * slot..][..out[i].len]`. Clears `out` and fills it; returns how many were
/// received. `WouldBlock` when none was queued.
pub fn recv_batch(
    socket: &impl AsFd,
    buf: &mut [u8],
    slot: usize,
    out: &mut Vec<Datagram>,
) -> io::Result<usize> {
    out.clear();
    if slot == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty slot"));
    }
    let mut slices: Vec<[IoSliceMut<'_>; 1]> = buf
        .chunks_exact_mut(slot)
        .take(MAX_BATCH)
        .map(|chunk| [IoSliceMut::new(chunk)])
        .collect();
    if slices.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "buffer smaller than a slot",
        ));
    }
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(slices.len(), None);
    let received = recvmmsg(
        socket.as_fd().as_raw_fd(),
        &mut headers,
        slices.iter_mut(),
        MsgFlags::MSG_DONTWAIT,
        None,
    )
    .map_err(io::Error::from)?;
    for msg in received {
        out.push(Datagram {
            len: msg.bytes.min(slot),
            truncated: msg.flags.contains(MsgFlags::MSG_TRUNC),
            from: msg.address.as_ref().and_then(socket_addr),
        });
    }
    Ok(out.len())
}

/// A kernel socket address as a std one (IPv4 and IPv6 only).
fn socket_addr(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    addr.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

/// Sends the first datagrams of `batch` (up to [`MAX_BATCH`]) with one system call,
/// each to its address (or to the connected peer). Returns how many the kernel
/// took, in order (fewer than offered when the socket's buffer filled);
/// `WouldBlock` when it took none. An empty batch sends nothing.
pub fn send_batch(socket: &impl AsFd, batch: &[Outgoing<'_>]) -> io::Result<usize> {
    let batch = batch.get(..batch.len().min(MAX_BATCH)).unwrap_or_default();
    if batch.is_empty() {
        return Ok(0);
    }
    let slices: Vec<[IoSlice<'_>; 1]> = batch
        .iter()
        .map(|(bytes, _)| [IoSlice::new(bytes)])
        .collect();
    let addrs: Vec<Option<SockaddrStorage>> = batch
        .iter()
        .map(|(_, to)| to.map(SockaddrStorage::from))
        .collect();
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(batch.len(), None);
    let sent = sendmmsg(
        socket.as_fd().as_raw_fd(),
        &mut headers,
        slices.iter(),
        &addrs,
        [],
        MsgFlags::MSG_DONTWAIT,
    )
    .map_err(io::Error::from)?;
    Ok(sent.count())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    #[test]
    fn receives_a_burst_in_one_call_and_flags_truncation() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_nonblocking(true).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let mut buf = vec![0u8; 8 * 16];
        let mut out = Vec::new();
        let e = recv_batch(&rx, &mut buf, 16, &mut out).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        for i in 0..5u8 {
            tx.send_to(&[i; 3], to).unwrap();
        }
        tx.send_to(&[9; 40], to).unwrap();
        let n = recv_batch(&rx, &mut buf, 16, &mut out).unwrap();
        assert_eq!(n, 6);
        for (i, d) in out.iter().take(5).enumerate() {
            assert_eq!(d.len, 3);
            assert!(!d.truncated);
            assert_eq!(d.from, Some(tx.local_addr().unwrap()));
            assert_eq!(&buf[i * 16..i * 16 + 3], &[i as u8; 3]);
        }
        assert!(out[5].truncated);
        assert_eq!(out[5].len, 16);
        assert_eq!(
            recv_batch(&rx, &mut buf, 0, &mut out).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn reports_each_sender_of_a_batch_v4_and_v6() {
        let rx = UdpSocket::bind("[::]:0").unwrap();
        rx.set_nonblocking(true).unwrap();
        let port = rx.local_addr().unwrap().port();
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("[::1]:0").unwrap();
        a.send_to(b"a", ("127.0.0.1", port)).unwrap();
        b.send_to(b"bb", ("::1", port)).unwrap();
        let mut buf = vec![0u8; 4 * 32];
        let mut out = Vec::new();
        let n = recv_batch(&rx, &mut buf, 32, &mut out).unwrap();
        assert_eq!(n, 2);
        // A dual-stack socket sees the IPv4 sender as an IPv4-mapped address.
        let first = out[0].from.unwrap();
        assert_eq!(first.ip().to_canonical(), a.local_addr().unwrap().ip());
        assert_eq!(first.port(), a.local_addr().unwrap().port());
        assert_eq!(out[1].from, Some(b.local_addr().unwrap()));
        assert_eq!(&buf[32..34], b"bb");
    }

    #[test]
    fn sends_a_batch_to_several_addresses_in_one_call() {
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.set_nonblocking(true).unwrap();
        let r1 = UdpSocket::bind("127.0.0.1:0").unwrap();
        let r2 = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (a1, a2) = (r1.local_addr().unwrap(), r2.local_addr().unwrap());
        assert_eq!(send_batch(&tx, &[]).unwrap(), 0);
        let batch: Vec<Outgoing<'_>> =
            vec![(b"one", Some(a1)), (b"two", Some(a2)), (b"three", Some(a1))];
        assert_eq!(send_batch(&tx, &batch).unwrap(), 3);
        let mut buf = [0u8; 16];
        let (n, from) = r1.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"one"[..], tx.local_addr().unwrap()));
        assert_eq!(r1.recv(&mut buf).unwrap(), 5);
        assert_eq!(&buf[..5], b"three");
        assert_eq!(r2.recv(&mut buf).unwrap(), 3);
        // Connected: no address per datagram.
        tx.connect(a2).unwrap();
        let many: Vec<Outgoing<'_>> = (0..MAX_BATCH + 10).map(|_| (&b"x"[..], None)).collect();
        assert_eq!(
            send_batch(&tx, &many).unwrap(),
            MAX_BATCH,
            "one call sends one batch"
        );
        r2.set_nonblocking(true).unwrap();
        let mut got = 0;
        while r2.recv(&mut buf).is_ok() {
            got += 1;
        }
        assert_eq!(got, MAX_BATCH);
    }
}
