//! Opening a Linux TUN device: `/dev/net/tun` plus the `TUNSETIFF` ioctl, in layer-3
//! mode without packet information (`IFF_TUN | IFF_NO_PI`), non-blocking; with
//! [`TunOptions::vnet_hdr`] every packet carries a `virtio_net_hdr` (`IFF_VNET_HDR`)
//! and [`Tun::set_offload`] turns on checksum and segmentation offload.
//! With [`TunOptions::multi_queue`] the device is opened with `IFF_MULTI_QUEUE`, and
//! [`Tun::open_queue`] opens further queues (descriptors) of the same device, each
//! with the same flags; the kernel spreads packets over them by flow hash.
//!
//! Whether we created the device or attached to an existing one is decided by the
//! kernel, not guessed: the first `TUNSETIFF` carries `IFF_TUN_EXCL`, which only
//! creates; if the name is taken (EBUSY) a second one without it attaches. This
//! module must not configure the interface (that is `link.rs`) nor do async I/O.

use std::ffi::{CStr, CString};
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::{Offloads, TunError};

use super::MAX_NAME_LEN;

/// The clone device every TUN descriptor comes from.
const CLONE_DEVICE: &str = "/dev/net/tun";

/// Shown in errors when the caller let the kernel choose the name.
const KERNEL_TEMPLATE: &str = "tun%d";

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

/// Creates the TUN device `name`, or attaches to an existing TUN device of that
/// name (for example a persistent one made with `ip tuntap add mode tun`). With
/// `None` the kernel picks a free `tunN` name. The descriptor is non-blocking and
/// close-on-exec. The same as [`open_tun_with`] with the default options.
///
/// The device is created in the network namespace of the calling thread.
pub fn open_tun(name: Option<&str>) -> Result<Tun, TunError> {
    open_tun_with(name, &TunOptions::default())
}

/// [`open_tun`] with `options`: with [`TunOptions::vnet_hdr`] the device (created or
/// attached) carries a `virtio_net_hdr` before every packet. An existing device whose
/// multi-queue flag differs from the request is attached with its own (the kernel
/// refuses a mismatch); a multi-queue device that is not persistent and exists
/// already belongs to another process's descriptors, and is refused as
/// [`TunError::Busy`] like a single-queue one held elsewhere.
pub fn open_tun_with(name: Option<&str>, options: &TunOptions) -> Result<Tun, TunError> {
    if let Some(name) = name {
        validate_name(name)?;
    }
    let shown = name.unwrap_or(KERNEL_TEMPLATE);
    let file = open_clone_device(shown)?;
    let vnet = if options.vnet_hdr {
        libc::IFF_VNET_HDR
    } else {
        0
    };
    let wanted = vnet
        | if options.multi_queue {
            libc::IFF_MULTI_QUEUE
        } else {
            0
        };
    let mut flags = wanted;
    let mut created = true;
    let mut actual = match set_iff(&file, name.unwrap_or(""), wanted | libc::IFF_TUN_EXCL) {
        Ok(actual) => actual,
        Err(error) if error.raw_os_error() == Some(libc::EBUSY) => {
            // The name is taken: attach instead of creating.
            created = false;
            let name = name.unwrap_or("");
            match set_iff(&file, name, wanted) {
                Ok(actual) => actual,
                Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                    // A device made with the other multi-queue setting (or no TUN at
                    // all, which the second try tells).
                    flags = wanted ^ libc::IFF_MULTI_QUEUE;
                    set_iff(&file, name, flags)
                        .map_err(|error| classify(error, "TUNSETIFF (attach)", shown, true))?
                }
                Err(error) => return Err(classify(error, "TUNSETIFF (attach)", shown, true)),
            }
        }
        Err(error) => return Err(classify(error, "TUNSETIFF (create)", shown, false)),
    };
    if actual.is_empty() {
        actual = shown.to_owned();
    }
    if !created && flags & libc::IFF_MULTI_QUEUE != 0 {
        // A multi-queue device takes any number of queues, so "held by another
        // process" shows only as: it exists, yet nobody made it persistent.
        let device_flags = get_iff(&file).map_err(|error| TunError::Io {
            op: "TUNGETIFF",
            name: actual.clone(),
            error,
        })?;
        if device_flags & libc::IFF_PERSIST == 0 {
            return Err(TunError::Busy { name: actual });
        }
    }
    let ifindex = if_index(&actual).map_err(|error| TunError::Io {
        op: "look up the ifindex",
        name: actual.clone(),
        error,
    })?;
    Ok(Tun {
        file,
        name: actual,
        ifindex,
        created,
        flags,
        reset: OffloadReset(None),
    })
}

/// A fresh non-blocking, close-on-exec descriptor of the clone device.
fn open_clone_device(shown: &str) -> Result<File, TunError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(CLONE_DEVICE)
        .map_err(|error| classify(error, "open /dev/net/tun", shown, false))
}

/// Applies the kernel's `dev_valid_name` rules, so a bad name fails with a clear
/// error before any system call.
fn validate_name(name: &str) -> Result<(), TunError> {
    let invalid = |reason| TunError::InvalidName {
        name: name.to_owned(),
        reason,
    };
    if name.len() > MAX_NAME_LEN {
        return Err(TunError::NameTooLong {
            name: name.to_owned(),
            len: name.len(),
            max: MAX_NAME_LEN,
        });
    }
    if name.is_empty() {
        return Err(invalid("it is empty"));
    }
    if name == "." || name == ".." {
        return Err(invalid("`.` and `..` are reserved"));
    }
    let forbidden =
        |b: u8| b == b'/' || b == b':' || b == 0 || b == 0x0b || b.is_ascii_whitespace();
    if name.bytes().any(forbidden) {
        return Err(invalid("it contains `/`, `:`, NUL or whitespace"));
    }
    Ok(())
}

/// Maps an OS error to a [`TunError`]. `attaching` tells whether the name is
/// known to exist, which makes EINVAL mean "not a TUN device".
fn classify(error: io::Error, op: &'static str, name: &str, attaching: bool) -> TunError {
    let name = name.to_owned();
    match error.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => TunError::PermissionDenied { name, error },
        Some(libc::EBUSY) => TunError::Busy { name },
        Some(libc::EINVAL) if attaching => TunError::NotTun { name },
        _ => TunError::Io { op, name, error },
    }
}

/// `TUNSETIFF` with `IFF_TUN | IFF_NO_PI | extra`; returns the name the kernel gave.
fn set_iff(file: &File, name: &str, extra: libc::c_int) -> io::Result<String> {
    // SAFETY: `ifreq` is plain old data (a `c_char` array and a union of integers,
    // `sockaddr`s and a raw pointer); all-zero bytes are a valid value of each.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // `name` has at most MAX_NAME_LEN bytes (validated), so the last byte stays NUL.
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes().take(MAX_NAME_LEN)) {
        *dst = src as libc::c_char;
    }
    // The kernel reads the flags as a `short`; every flag we pass fits in 16 bits.
    req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI | extra) as libc::c_short;
    // SAFETY: the descriptor is an open `/dev/net/tun`; TUNSETIFF reads and writes back
    // exactly one `struct ifreq`, and `req` is a live, initialised `ifreq` for the whole
    // call. The descriptor is borrowed, not closed.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::TUNSETIFF,
            &mut req as *mut libc::ifreq,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // The kernel wrote back a NUL-terminated name into the array (IFNAMSIZ bytes).
    let bytes: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// `TUNGETIFF`: the flags of the device `file` is attached to (`IFF_PERSIST`,
/// `IFF_MULTI_QUEUE`, ...).
fn get_iff(file: &File) -> io::Result<libc::c_int> {
    // SAFETY: as in `set_iff`: all-zero bytes are a valid `ifreq`.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is an open `/dev/net/tun` attached to a device;
    // TUNGETIFF writes exactly one `struct ifreq` into `req`, which is live and
    // initialised for the whole call. The descriptor is borrowed, not closed.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::TUNGETIFF,
            &mut req as *mut libc::ifreq,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNGETIFF filled the flags member of the union (as a `short`).
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    Ok(libc::c_int::from(flags) & 0xffff)
}

/// `if_nametoindex(3)` in the calling thread's network namespace.
fn if_index(name: &str) -> io::Result<u32> {
    let cname = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let cname: &CStr = &cname;
    // SAFETY: `cname` is a valid NUL-terminated string that outlives the call; the
    // function only reads it.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if index == 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_kernel_rules() {
        for good in ["tun0", "t2s-dev-1", "tun%d", "a", "fifteen-chars-x"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in [
            "", ".", "..", "a/b", "a:b", "a b", "a\tb", "a\u{b}b", "a\0b",
        ] {
            assert!(
                matches!(validate_name(bad), Err(TunError::InvalidName { .. })),
                "{bad:?}"
            );
        }
        assert!(matches!(
            validate_name("sixteen-chars-xx"),
            Err(TunError::NameTooLong {
                len: 16,
                max: 15,
                ..
            })
        ));
    }

    #[test]
    fn errnos_map_to_variants() {
        let e = |errno| io::Error::from_raw_os_error(errno);
        assert!(matches!(
            classify(e(libc::EPERM), "x", "t", false),
            TunError::PermissionDenied { .. }
        ));
        assert!(matches!(
            classify(e(libc::EACCES), "x", "t", false),
            TunError::PermissionDenied { .. }
        ));
        assert!(matches!(
            classify(e(libc::EBUSY), "x", "t", true),
            TunError::Busy { .. }
        ));
        assert!(matches!(
            classify(e(libc::EINVAL), "x", "t", true),
            TunError::NotTun { .. }
        ));
        assert!(matches!(
            classify(e(libc::EINVAL), "x", "t", false),
            TunError::Io { .. }
        ));
        let msg = classify(e(libc::EPERM), "x", "t", false).to_string();
        assert!(msg.contains("CAP_NET_ADMIN"), "{msg}");
    }
}
