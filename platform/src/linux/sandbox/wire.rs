//! The two messages between the sandbox's setup process and the parent, over a
//! `SOCK_SEQPACKET` socket pair (one datagram each, so no framing is needed):
//!
//! ```text
//! child -> parent, ready:   0x00 | ifindex u32 LE | TUN name (UTF-8)   + SCM_RIGHTS(TUN fd)
//! child -> parent, failed:  0x01 | what failed (UTF-8 text)
//! parent -> child, go:      0x47 ('G')
//! ```
//!
//! This module must not set anything up; it only encodes, decodes and moves the
//! descriptor.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr, recvmsg, sendmsg};

/// The largest message either side sends (an error text is cut to fit).
pub(crate) const MAX_MESSAGE: usize = 4096;

const READY: u8 = 0;
const FAILED: u8 = 1;
/// The parent's "go": the child may now run the program.
pub(crate) const GO: u8 = b'G';

/// What the setup process reports.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Report {
    /// The TUN device is open and configured; its descriptor rides along.
    Ready { ifindex: u32, name: String },
    /// A setup step failed.
    Failed(String),
}

impl Report {
    /// The message bytes (without the descriptor).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Report::Ready { ifindex, name } => {
                out.push(READY);
                out.extend_from_slice(&ifindex.to_le_bytes());
                out.extend_from_slice(name.as_bytes());
            }
            Report::Failed(text) => {
                out.push(FAILED);
                out.extend_from_slice(text.as_bytes());
            }
        }
        out.truncate(MAX_MESSAGE);
        out
    }

    /// Parses one message; `None` if it is malformed.
    pub(crate) fn decode(bytes: &[u8]) -> Option<Report> {
        let (&kind, rest) = bytes.split_first()?;
        match kind {
            READY => {
                let index: [u8; 4] = rest.get(..4)?.try_into().ok()?;
                let name = std::str::from_utf8(rest.get(4..)?).ok()?;
                Some(Report::Ready {
                    ifindex: u32::from_le_bytes(index),
                    name: name.to_owned(),
                })
            }
            FAILED => Some(Report::Failed(String::from_utf8_lossy(rest).into_owned())),
            _ => None,
        }
    }
}

/// Sends `report`, with `fd` attached as `SCM_RIGHTS` when given.
pub(crate) fn send(
    socket: BorrowedFd<'_>,
    report: &Report,
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let bytes = report.encode();
    let iov = [IoSlice::new(&bytes)];
    let fds = fd.map(|fd| [fd.as_raw_fd()]);
    let cmsgs: Vec<ControlMessage<'_>> = fds
        .iter()
        .map(|fds| ControlMessage::ScmRights(fds))
        .collect();
    let sent = sendmsg::<UnixAddr>(socket.as_raw_fd(), &iov, &cmsgs, MsgFlags::empty(), None)?;
    if sent == bytes.len() {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "report sent partially",
        ))
    }
}

/// Receives one report and the descriptor that came with it. `Ok(None)` means the
/// other side closed without a word (it exited).
pub(crate) fn receive(socket: BorrowedFd<'_>) -> io::Result<Option<(Report, Option<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let (len, raw_fds) = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match recvmsg::<UnixAddr>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(message) => {
                let mut fds = Vec::new();
                // A truncated control buffer (ENOBUFS) would mean more than one
                // descriptor arrived; the sender never does that.
                for c in message.cmsgs()? {
                    if let ControlMessageOwned::ScmRights(received) = c {
                        fds.extend(received);
                    }
                }
                break (message.bytes, fds);
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let owned: Vec<OwnedFd> = raw_fds
        .into_iter()
        // SAFETY: each descriptor was just installed in this process by the kernel
        // for this `recvmsg` (SCM_RIGHTS); nothing else knows its number, so taking
        // ownership of it here is the only ownership there is.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if len == 0 && owned.is_empty() {
        return Ok(None);
    }
    let report = buf
        .get(..len)
        .and_then(Report::decode)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed sandbox report"))?;
    Ok(Some((report, owned.into_iter().next())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;

    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap()
    }

    #[test]
    fn reports_round_trip() {
        for report in [
            Report::Ready {
                ifindex: 7,
                name: "tun0".into(),
            },
            Report::Failed("unshare: EPERM".into()),
            Report::Failed(String::new()),
        ] {
            assert_eq!(Report::decode(&report.encode()), Some(report));
        }
        assert_eq!(Report::decode(&[]), None);
        assert_eq!(Report::decode(&[READY, 1, 2]), None);
        assert_eq!(Report::decode(&[9]), None);
        assert_eq!(Report::decode(&[READY, 1, 0, 0, 0, 0xff]), None);
        assert!(Report::Failed("x".repeat(10_000)).encode().len() <= MAX_MESSAGE);
    }

    #[test]
    fn a_descriptor_crosses_the_socket_and_stays_usable() {
        let (a, b) = pair();
        let mut file = tempfile_in_proc();
        file.write_all(b"carried").unwrap();
        let report = Report::Ready {
            ifindex: 3,
            name: "t".into(),
        };
        send(a.as_fd(), &report, Some(file.as_fd())).unwrap();
        let (got, fd) = receive(b.as_fd()).unwrap().unwrap();
        assert_eq!(got, report);
        let mut received = std::fs::File::from(fd.unwrap());
        received.rewind().unwrap();
        let mut text = String::new();
        received.read_to_string(&mut text).unwrap();
        assert_eq!(text, "carried");
    }

    #[test]
    fn a_closed_peer_reads_as_none() {
        let (a, b) = pair();
        send(a.as_fd(), &Report::Failed("no".into()), None).unwrap();
        drop(a);
        let (got, fd) = receive(b.as_fd()).unwrap().unwrap();
        assert_eq!(got, Report::Failed("no".into()));
        assert!(fd.is_none());
        assert!(receive(b.as_fd()).unwrap().is_none());
    }

    /// An anonymous file (unlinked at once), standing in for a TUN descriptor.
    fn tempfile_in_proc() -> std::fs::File {
        let path = std::env::temp_dir().join(format!("t2s-wire-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }
}
