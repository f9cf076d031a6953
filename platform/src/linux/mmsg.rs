//! Batched datagram receive on a connected UDP socket (the sender is not reported):
//! `recvmmsg(2)` through nix's safe wrapper, so that a
//! burst queued on a UDP socket costs one system call instead of one per datagram.
//! Synchronous and non-blocking (`MSG_DONTWAIT`): the caller drives readiness (for
//! tokio, inside `UdpSocket::try_io`).

use std::io;
use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd};

use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg};

/// The most datagrams one call receives.
pub const MAX_BATCH: usize = 64;

/// One datagram of a batch: it lies in slot `i` of the buffer, `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram {
    /// Bytes received (at most the slot size).
    pub len: usize,
    /// The datagram was larger than its slot: the rest was discarded.
    pub truncated: bool,
}

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
        });
    }
    Ok(out.len())
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
            assert_eq!(&buf[i * 16..i * 16 + 3], &[i as u8; 3]);
        }
        assert!(out[5].truncated);
        assert_eq!(out[5].len, 16);
        assert_eq!(
            recv_batch(&rx, &mut buf, 0, &mut out).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }
}
