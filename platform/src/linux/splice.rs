//! Zero-copy relaying between sockets with `splice(2)`: bytes move from one socket
//! into a kernel pipe and from the pipe into the other socket as page references,
//! never through userspace. Both calls are non-blocking; the caller waits for
//! readiness and retries on `WouldBlock`.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};

/// A non-blocking pipe and the number of bytes it holds.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    buffered: usize,
    capacity: usize,
}

impl Pipe {
    /// A pipe asked to hold `capacity` bytes (the kernel may grant less: the limits
    /// are `/proc/sys/fs/pipe-max-size` and the per-user pipe page budget).
    pub fn new(capacity: usize) -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let wanted = i32::try_from(capacity).unwrap_or(i32::MAX);
        // A smaller pipe still works; only the batch per call shrinks.
        let granted = fcntl(&write, FcntlArg::F_SETPIPE_SZ(wanted))
            .or_else(|_| fcntl(&write, FcntlArg::F_GETPIPE_SZ))
            .map_err(io::Error::from)?;
        Ok(Pipe {
            read,
            write,
            buffered: 0,
            capacity: usize::try_from(granted).unwrap_or(4096),
        })
    }

    /// Bytes in the pipe, not yet written out.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// Moves what `socket` has received (up to the pipe's free space) into the pipe.
    /// `Ok(0)` is end of stream; `WouldBlock` means nothing to read (or no space).
    pub fn fill_from(&mut self, socket: impl AsFd) -> io::Result<usize> {
        let room = self.capacity.saturating_sub(self.buffered);
        if room == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
        let n = splice(socket, None, &self.write, None, room, flags)?;
        self.buffered = self.buffered.saturating_add(n);
        Ok(n)
    }

    /// Moves bytes from the pipe into `socket`. `WouldBlock` means the socket's send
    /// buffer is full.
    pub fn drain_into(&mut self, socket: impl AsFd) -> io::Result<usize> {
        if self.buffered == 0 {
            return Ok(0);
        }
        let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
        let n = splice(&self.read, None, socket, None, self.buffered, flags)?;
        self.buffered = self.buffered.saturating_sub(n);
        Ok(n)
    }
}
