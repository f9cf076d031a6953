//! Creating a TUN device or attaching to one: a descriptor of `/dev/net/tun`, the
//! `TUNSETIFF` ioctl with the flags of [`TunOptions`], the kernel's rules for
//! interface names, and the mapping of errnos to [`TunError`].
//!
//! Whether we created the device or attached to an existing one is decided by the
//! kernel, not guessed: the first `TUNSETIFF` carries `IFF_TUN_EXCL`, which only
//! creates; if the name is taken (EBUSY) a second one without it attaches. This
//! module must not configure the interface (that is `link.rs`) nor do async I/O.

use std::ffi::{CStr, CString};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use crate::TunError;

use super::super::MAX_NAME_LEN;
use super::{OffloadReset, Tun, TunOptions};

/// The clone device every TUN descriptor comes from.
const CLONE_DEVICE: &str = "/dev/net/tun";

/// Shown in errors when the caller let the kernel choose the name.
const KERNEL_TEMPLATE: &str = "tun%d";

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
pub(super) fn open_clone_device(shown: &str) -> Result<File, TunError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(CLONE_DEVICE)
        .map_err(|error| classify(error, OPEN_DEVICE, shown, false))
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
/// The step that opens the TUN driver's device file.
const OPEN_DEVICE: &str = "open /dev/net/tun";

pub(super) fn classify(
    error: io::Error,
    op: &'static str,
    name: &str,
    attaching: bool,
) -> TunError {
    let name = name.to_owned();
    match error.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => TunError::PermissionDenied { name, error },
        Some(libc::EBUSY) => TunError::Busy { name },
        Some(libc::EINVAL) if attaching => TunError::NotTun { name },
        Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) if op == OPEN_DEVICE => {
            TunError::NoDriver { name, error }
        }
        _ => TunError::Io { op, name, error },
    }
}

/// `TUNSETIFF` with `IFF_TUN | IFF_NO_PI | extra`; returns the name the kernel gave.
pub(super) fn set_iff(file: &File, name: &str, extra: libc::c_int) -> io::Result<String> {
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

/// `if_nametoindex(3)` in the calling thread's network namespace: the index of the
/// interface called `name`, or an error (`ENODEV`) when there is none.
pub fn if_index(name: &str) -> io::Result<u32> {
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
    fn a_missing_driver_is_told_apart_from_other_errors() {
        let err = |errno| io::Error::from_raw_os_error(errno);
        for errno in [libc::ENOENT, libc::ENODEV, libc::ENXIO] {
            let e = classify(err(errno), OPEN_DEVICE, "t0", false);
            assert!(matches!(e, TunError::NoDriver { .. }), "{e:?}");
            assert!(e.to_string().contains("modprobe tun"), "{e}");
            assert_eq!(e.errno(), Some(errno));
        }
        // The same errors at a later step are not about the driver.
        let e = classify(err(libc::ENODEV), "TUNSETIFF (create)", "t0", false);
        assert!(matches!(e, TunError::Io { .. }), "{e:?}");
        let e = classify(err(libc::EACCES), OPEN_DEVICE, "t0", false);
        assert!(matches!(e, TunError::PermissionDenied { .. }), "{e:?}");
    }

    #[test]
    fn interface_indexes_come_from_the_kernel() {
        // Every network namespace has a loopback interface.
        assert!(if_index("lo").is_ok_and(|i| i > 0));
        let missing = if_index("no-such-if-t2s").unwrap_err();
        assert_eq!(missing.raw_os_error(), Some(libc::ENODEV), "{missing}");
        let nul = if_index("a\0b").unwrap_err();
        assert_eq!(nul.kind(), io::ErrorKind::InvalidInput, "{nul}");
    }

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
