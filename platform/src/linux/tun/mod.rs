//! A Linux TUN device ([`Tun`]: its reads and writes, offloads and queues), opened
//! through `/dev/net/tun` and the `TUNSETIFF` ioctl in layer-3 mode without packet
//! information (`IFF_TUN | IFF_NO_PI`), non-blocking; with
//! [`TunOptions::vnet_hdr`] every packet carries a `virtio_net_hdr` (`IFF_VNET_HDR`)
//! and [`Tun::set_offload`] turns on checksum and segmentation offload.
//! With [`TunOptions::multi_queue`] the device is opened with `IFF_MULTI_QUEUE`, and
//! [`Tun::open_queue`] opens further queues (descriptors) of the same device, each
//! with the same flags; the kernel spreads packets over them by flow hash.
//!
//! Whether we created the device or attached to an existing one is decided by the
//! kernel when the device is opened: that, `TUNSETIFF` and the kernel's name rules are
//! `open.rs`. This module must not configure the interface (that is `link.rs`) nor
//! do async I/O.

mod open;

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::{Offloads, TunError};

use open::{classify, open_clone_device, set_iff};
pub use open::{if_index, open_tun, open_tun_with};

/// An open TUN device: a non-blocking descriptor that reads and writes raw IPv4 and
/// IPv6 packets (no packet-information header).
///
/// The interface exists as long as this descriptor is open, unless it was created
/// persistent by someone else (`ip tuntap add`).
#[derive(Debug)]
pub struct Tun {
    file: File,
    name: String,
    ifindex: u32,
    created: bool,
    /// The `TUNSETIFF` flags beyond `IFF_TUN | IFF_NO_PI` this descriptor was opened
    /// with (never `IFF_TUN_EXCL`): every further queue is opened with the same.
    flags: libc::c_int,
    /// Turns the offloads off again when an attached device's descriptor closes.
    reset: OffloadReset,
}

/// How to open a TUN device (beyond layer 3 without packet information, which is
/// always asked for). Build it with `..TunOptions::default()` so new options keep
/// old callers compiling.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TunOptions {
    /// Open with `IFF_MULTI_QUEUE`, so that [`Tun::open_queue`] can add queues. An
    /// existing device made without it refuses the flag: the open then falls back to
    /// one queue ([`Tun::multi_queue`] tells). Without it, an existing multi-queue
    /// device is still attached to (with the flag, as the kernel demands).
    pub multi_queue: bool,
    /// `IFF_VNET_HDR`: every packet read or written starts with a 10-byte
    /// `virtio_net_hdr` ([`VNET_HDR_LEN`]). Needed for [`Tun::set_offload`]. Every
    /// descriptor of one device must agree.
    pub vnet_hdr: bool,
}

/// Length of the `virtio_net_hdr` before each packet on a device opened with
/// [`TunOptions::vnet_hdr`] (the kernel's default `TUNSETVNETHDRSZ`).
pub const VNET_HDR_LEN: usize = 10;

impl Tun {
    /// The interface name the kernel gave (it differs from the request only when
    /// the request was `None` or a template like `tun%d`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The interface index, for netlink ([`crate::Link::new`]).
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// `true` if this call created the device (it vanishes when the descriptor
    /// closes); `false` if it attached to a device that already existed.
    pub fn created(&self) -> bool {
        self.created
    }

    /// `true` if every packet carries a `virtio_net_hdr` ([`TunOptions::vnet_hdr`]).
    pub fn vnet_hdr(&self) -> bool {
        self.flags & libc::IFF_VNET_HDR != 0
    }

    /// `TUNSETOFFLOAD`: lets the kernel hand over (and take) packets with partial
    /// checksums and TCP/UDP super-segments of the given kinds. Fails with
    /// `InvalidInput` on a device without [`TunOptions::vnet_hdr`], and with the
    /// kernel's `EINVAL` for a feature it does not know (USO before Linux 6.2): the
    /// caller probes by trying a smaller set. On a device we attached to, the
    /// offloads are turned off again when this descriptor closes, so a later reader
    /// without the header never gets super-segments.
    pub fn set_offload(&mut self, offloads: Offloads) -> io::Result<()> {
        if !self.vnet_hdr() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "TUN offload needs IFF_VNET_HDR",
            ));
        }
        set_offload(self.file.as_fd(), offloads)?;
        if !self.created && !offloads.is_empty() && self.reset.0.is_none() {
            // Best effort: without a second descriptor there is just no reset.
            self.reset = OffloadReset(self.file.as_fd().try_clone_to_owned().ok());
        }
        Ok(())
    }

    /// Reads one packet split across `bufs` (readv: a `virtio_net_hdr` into the
    /// first, the IP packet into the second) and returns the total length.
    /// `WouldBlock` when no packet is queued.
    pub fn recv_vectored(&self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        (&self.file).read_vectored(bufs)
    }

    /// Writes one packet gathered from `bufs` (writev: header, then the packet).
    pub fn send_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let written = (&self.file).write_vectored(bufs)?;
        if written == total {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("TUN took {written} of {total} bytes"),
            ))
        }
    }

    /// `true` if the descriptor is a queue of a multi-queue device (`IFF_MULTI_QUEUE`),
    /// so that [`Tun::open_queue`] can open more.
    pub fn multi_queue(&self) -> bool {
        self.flags & libc::IFF_MULTI_QUEUE != 0
    }

    /// Opens one more queue of this multi-queue device: a new non-blocking,
    /// close-on-exec descriptor with the same flags. Like [`open_tun`], it must be
    /// called in the device's network namespace. Packets may be read from and written
    /// to any queue; the kernel picks the queue a packet is read from by its flow.
    ///
    /// Fails with [`TunError::Io`] (`EINVAL`) on a single-queue device.
    pub fn open_queue(&self) -> Result<Tun, TunError> {
        if !self.multi_queue() {
            return Err(TunError::Io {
                op: "open a further queue (the device is single-queue)",
                name: self.name.clone(),
                error: io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
        let file = open_clone_device(&self.name)?;
        set_iff(&file, &self.name, self.flags)
            .map_err(|error| classify(error, "TUNSETIFF (queue)", &self.name, false))?;
        Ok(Tun {
            file,
            name: self.name.clone(),
            ifindex: self.ifindex,
            created: self.created,
            flags: self.flags,
            // Offloads are the device's: the first descriptor turns them off.
            reset: OffloadReset(None),
        })
    }

    /// Reads one packet into `buf` and returns its length. `buf` should hold at least
    /// the MTU; the kernel truncates a longer packet. Returns `WouldBlock` when no
    /// packet is queued.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one packet (a whole IPv4 or IPv6 datagram). Returns `WouldBlock` when
    /// the device cannot take it now, and the kernel's error for a malformed packet
    /// (`EINVAL` if the first nibble is neither 4 nor 6).
    pub fn send(&self, packet: &[u8]) -> io::Result<()> {
        let written = (&self.file).write(packet)?;
        if written == packet.len() {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("TUN took {written} of {} bytes", packet.len()),
            ))
        }
    }
}

impl Tun {
    /// Takes over the descriptor of a TUN device opened elsewhere: by another process
    /// that passed it here (`SCM_RIGHTS`), possibly in another network namespace.
    /// `name` and `ifindex` are the interface's there; they are only reported, never
    /// used to find it. The descriptor is made non-blocking. Whether it really is a
    /// TUN device in layer-3 mode without packet information is the caller's word.
    pub fn from_fd(fd: OwnedFd, name: String, ifindex: u32) -> Result<Tun, TunError> {
        let file = File::from(fd);
        let flags = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GETFL)
            .map(nix::fcntl::OFlag::from_bits_truncate)
            .and_then(|flags| {
                nix::fcntl::fcntl(
                    &file,
                    nix::fcntl::FcntlArg::F_SETFL(flags | nix::fcntl::OFlag::O_NONBLOCK),
                )
            });
        flags.map_err(|errno| TunError::Io {
            op: "make the descriptor non-blocking",
            name: name.clone(),
            error: errno.into(),
        })?;
        Ok(Tun::from_parts(file.into(), name, ifindex, true))
    }

    /// A `Tun` from a descriptor known to be an open, non-blocking TUN device
    /// without `IFF_VNET_HDR`.
    pub(crate) fn from_parts(fd: OwnedFd, name: String, ifindex: u32, created: bool) -> Tun {
        Tun {
            file: File::from(fd),
            name,
            ifindex,
            created,
            flags: 0,
            reset: OffloadReset(None),
        }
    }

    /// Registers the descriptor with the current tokio reactor for read and write
    /// readiness. Must be called inside a tokio runtime with I/O enabled (tokio
    /// panics otherwise).
    pub fn into_async_fd(self) -> io::Result<AsyncFd<Tun>> {
        // SAFETY: `Tun` owns its descriptor (a `File`) for its whole life,
        // `as_raw_fd` always returns that same descriptor, and no method of `Tun`
        // closes or replaces it. The `AsyncFd` owns the `Tun`, so the descriptor stays
        // open and unchanged until the `AsyncFd` is dropped or gives the `Tun` back.
        let registered = unsafe {
            AsyncFd::register_with_interest(self, Interest::READABLE | Interest::WRITABLE)
        };
        registered.map_err(|error| error.into_parts().1)
    }
}

impl AsFd for Tun {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for Tun {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl From<Tun> for OwnedFd {
    /// The descriptor, for another owner: the offloads stay as they are.
    fn from(tun: Tun) -> OwnedFd {
        tun.reset.disarm();
        tun.file.into()
    }
}

/// A second descriptor of an attached device whose drop turns its offloads off.
#[derive(Debug)]
struct OffloadReset(Option<OwnedFd>);

impl OffloadReset {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for OffloadReset {
    fn drop(&mut self) {
        if let Some(fd) = self.0.take() {
            // Nothing to do about a failure: the device may already be gone.
            let _ = set_offload(fd.as_fd(), Offloads::NONE);
        }
    }
}

/// `TUNSETOFFLOAD` with `offloads` on an open TUN descriptor.
fn set_offload(fd: BorrowedFd<'_>, offloads: Offloads) -> io::Result<()> {
    let bits = libc::c_ulong::from(offloads.bits());
    // SAFETY: `fd` is an open TUN descriptor (borrowed, not closed); TUNSETOFFLOAD
    // takes its argument by value (an unsigned long of TUN_F_* bits), reads no memory
    // of ours and writes none.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETOFFLOAD, bits) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
