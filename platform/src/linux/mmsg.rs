//! Batched datagram receive and send on a UDP socket: `recvmmsg(2)` and
//! `sendmmsg(2)` through nix's safe wrappers, so that a burst queued on a UDP socket
//! costs one system call instead of one per datagram, either way. Synchronous and
//! non-blocking (`MSG_DONTWAIT`): the caller drives readiness (for tokio, inside
//! `UdpSocket::try_io`).

use std::io;
use std::io::{IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::sys::socket::{
    ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg, sendmsg,
};

/// The most datagrams one call receives or sends.
pub const MAX_BATCH: usize = 64;
/// The most datagrams one segmented send carries (the kernel's `UDP_MAX_SEGMENTS`
/// is 64 on older kernels).
pub const MAX_SEGMENTS: usize = 64;
/// The largest datagram sent segmented: small enough for any path MTU of at least
/// 1,448 bytes (the kernel refuses a segment larger than the path allows).
pub const MAX_SEGMENT: usize = 1400;
/// The most bytes of one segmented send (one IP packet before segmentation).
const MAX_SEGMENTED_BYTES: usize = 65_000;

/// Segmented sends work here (cleared for good when the kernel says they do not).
static SEGMENTATION: AtomicBool = AtomicBool::new(true);

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

/// Sends `bytes` as datagrams of `segment` bytes each (the last may be shorter) with
/// one system call: UDP generic segmentation (`UDP_SEGMENT`, Linux 4.18+), so the
/// datagrams cross the stack as one packet and are cut where they leave the host or
/// reach the receiving socket. Returns the bytes sent.
pub fn send_segments(
    socket: &impl AsFd,
    bytes: &[u8],
    segment: u16,
    to: Option<SocketAddr>,
) -> io::Result<usize> {
    let iov = [IoSlice::new(bytes)];
    let cmsg = [ControlMessage::UdpGsoSegments(&segment)];
    let to = to.map(SockaddrStorage::from);
    sendmsg(
        socket.as_fd().as_raw_fd(),
        &iov,
        &cmsg,
        MsgFlags::MSG_DONTWAIT,
        to.as_ref(),
    )
    .map_err(io::Error::from)
}

/// Sends datagrams that lie back to back in `bytes` (datagram `i` ends at
/// `ends[i]`) to `to` (or the connected peer), in order, with as few system calls
/// as the kernel allows: each run of at least two datagrams of one size (at most
/// [`MAX_SEGMENT`] bytes) goes as one segmented send ([`send_segments`]), the others
/// in batches ([`send_batch`]). Where the kernel refuses segmentation, it is not
/// tried again. Returns how many datagrams went (the first of the rest is the one
/// refused); an error only when none went.
pub fn send_contiguous(
    socket: &impl AsFd,
    bytes: &[u8],
    ends: &[usize],
    to: Option<SocketAddr>,
) -> io::Result<usize> {
    let mut singles: Vec<Outgoing<'_>> = Vec::new();
    let (mut next, mut start, mut sent) = (0usize, 0usize, 0usize);
    let datagram = |from: usize, end: usize| bytes.get(from..end).unwrap_or_default();
    while let Some(&end) = ends.get(next) {
        let size = end.saturating_sub(start);
        let mut run = 1;
        while let (Some(&prev), Some(&later)) = (ends.get(next + run - 1), ends.get(next + run)) {
            if run >= MAX_SEGMENTS
                || later.saturating_sub(prev) != size
                || later.saturating_sub(start) > MAX_SEGMENTED_BYTES
            {
                break;
            }
            run += 1;
        }
        let run_end = ends.get(next + run - 1).copied().unwrap_or(end);
        let segmented =
            run >= 2 && (1..=MAX_SEGMENT).contains(&size) && SEGMENTATION.load(Ordering::Relaxed);
        if segmented {
            let taken = flush_singles(socket, &mut singles)?;
            sent += taken.0;
            if !taken.1 {
                return Ok(sent);
            }
            match send_segments(socket, datagram(start, run_end), size as u16, to) {
                Ok(_) => {
                    sent += run;
                    next += run;
                    start = run_end;
                    continue;
                }
                Err(e) if segmentation_refused(&e) => {
                    SEGMENTATION.store(false, Ordering::Relaxed);
                }
                // Not for this run (a segment too large for the path, say): send it
                // as datagrams.
                Err(e) if e.raw_os_error() == Some(Errno::EINVAL as i32) => {}
                Err(e) if sent == 0 => return Err(e),
                Err(_) => return Ok(sent),
            }
        }
        let mut at = start;
        for &e in ends.get(next..next + run).unwrap_or_default() {
            singles.push((datagram(at, e), to));
            at = e;
        }
        next += run;
        start = run_end;
    }
    match flush_singles(socket, &mut singles) {
        Ok((n, _)) => Ok(sent + n),
        Err(e) if sent == 0 => Err(e),
        Err(_) => Ok(sent),
    }
}

/// Sends the waiting single datagrams: how many went, and whether all did.
fn flush_singles(socket: &impl AsFd, singles: &mut Vec<Outgoing<'_>>) -> io::Result<(usize, bool)> {
    let mut sent = 0;
    while sent < singles.len() {
        match send_batch(socket, singles.get(sent..).unwrap_or_default()) {
            Ok(0) => break,
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if sent == 0 => {
                singles.clear();
                return Err(e);
            }
            Err(_) => break,
        }
    }
    let all = sent == singles.len();
    singles.clear();
    Ok((sent, all))
}

/// The kernel (or the route's device) cannot segment UDP at all.
fn segmentation_refused(e: &io::Error) -> bool {
    [Errno::EIO, Errno::ENOPROTOOPT, Errno::EOPNOTSUPP]
        .iter()
        .any(|errno| e.raw_os_error() == Some(*errno as i32))
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

    #[test]
    fn contiguous_datagrams_arrive_whole_segmented_or_not() {
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_nonblocking(true).unwrap();
        let to = Some(rx.local_addr().unwrap());
        // 10 x 100 bytes (one segmented send), 3 of 7, 2 of 300, one of 1500 (too
        // large to segment), 2 of 50.
        let mut sizes = vec![100; 10];
        sizes.extend([7, 7, 7, 300, 300, 1500, 50, 50]);
        let (mut bytes, mut ends) = (Vec::new(), Vec::new());
        for (i, size) in sizes.iter().enumerate() {
            bytes.extend(std::iter::repeat_n(i as u8, *size));
            ends.push(bytes.len());
        }
        assert_eq!(
            send_contiguous(&tx, &bytes, &ends, to).unwrap(),
            sizes.len()
        );
        let mut buf = [0u8; 2048];
        for (i, size) in sizes.iter().enumerate() {
            let n = rx.recv(&mut buf).unwrap();
            assert_eq!(n, *size, "datagram {i}");
            assert!(buf[..n].iter().all(|b| *b == i as u8), "datagram {i}");
        }
        assert_eq!(
            rx.recv(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert!(SEGMENTATION.load(Ordering::Relaxed), "loopback segments");
        assert_eq!(send_contiguous(&tx, &[], &[], to).unwrap(), 0);
    }

    #[test]
    fn a_segmented_send_is_one_packet_cut_at_the_receiver() {
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_nonblocking(true).unwrap();
        let bytes: Vec<u8> = (0..250u8).collect();
        let n = send_segments(&tx, &bytes, 100, Some(rx.local_addr().unwrap())).unwrap();
        assert_eq!(n, 250);
        let mut buf = [0u8; 512];
        let lens: Vec<usize> = (0..3).map(|_| rx.recv(&mut buf).unwrap()).collect();
        assert_eq!(lens, vec![100, 100, 50]);
        assert_eq!(&buf[..50], &bytes[200..]);
    }
}
