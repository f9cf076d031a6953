//! Error types shared by every OS implementation: what went wrong opening a TUN
//! device ([`TunError`]) or changing an interface ([`LinkError`], naming the
//! [`LinkOp`] that failed). No OS-specific types appear here, so callers match on the
//! same variants everywhere. The OS error text is part of each message (the
//! `Display`), and the errno is kept for matching.

use std::fmt;
use std::io;

use ipnet::IpNet;

/// Opening a TUN device failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TunError {
    /// The requested name is longer than the OS allows ([`crate::MAX_NAME_LEN`]).
    #[error("interface name {name:?} is {len} bytes long; at most {max} are allowed")]
    NameTooLong {
        /// The name as requested.
        name: String,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The requested name is empty, `.` or `..`, or contains a character the kernel
    /// refuses (`/`, `:`, whitespace, NUL).
    #[error("invalid interface name {name:?}: {reason}")]
    InvalidName {
        /// The name as requested.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// The OS refused for lack of privilege (EPERM or EACCES). On Linux, creating a
    /// TUN device, or attaching to one owned by another user, needs `CAP_NET_ADMIN`.
    #[error(
        "permission denied opening TUN device {name}: creating or attaching a TUN device \
         needs CAP_NET_ADMIN (run as root, or grant the capability) ({error})"
    )]
    PermissionDenied {
        /// The requested name (or the kernel's template).
        name: String,
        /// The OS error (EPERM or EACCES).
        error: io::Error,
    },
    /// The device exists and another process (or another descriptor of ours) holds it
    /// open (EBUSY).
    #[error("TUN device {name} is busy: another process already has it open")]
    Busy {
        /// The device name.
        name: String,
    },
    /// An interface of that name exists but is not a TUN device: a TAP or another
    /// kind of link (the kernel answers EINVAL).
    #[error("interface {name} exists but is not a TUN device")]
    NotTun {
        /// The interface name.
        name: String,
    },
    /// There is no TUN driver to open: `/dev/net/tun` is missing (ENOENT; in a
    /// container that was not given it) or has no driver behind it (ENODEV, ENXIO:
    /// the `tun` module is not loaded).
    #[error(
        "open /dev/net/tun for TUN device {name}: {error}: the TUN driver is not available \
         here (load it with `modprobe tun`; in a container, pass the device in, e.g. \
         `docker run --device /dev/net/tun --cap-add NET_ADMIN`)"
    )]
    NoDriver {
        /// The requested name (or the kernel's template).
        name: String,
        /// The OS error (ENOENT, ENODEV or ENXIO).
        error: io::Error,
    },
    /// Any other OS error, with the step that failed.
    #[error("{op} for TUN device {name}: {error}")]
    Io {
        /// The step: "open /dev/net/tun", "TUNSETIFF", "look up the ifindex".
        op: &'static str,
        /// The requested name (or the kernel's template).
        name: String,
        /// The OS error.
        error: io::Error,
    },
    /// TUN devices are not implemented for this OS yet.
    #[error("TUN devices are not supported on this operating system yet")]
    Unsupported,
}

impl TunError {
    /// The OS error number behind this error, if there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::PermissionDenied { error, .. }
            | Self::NoDriver { error, .. }
            | Self::Io { error, .. } => error.raw_os_error(),
            _ => None,
        }
    }
}

/// A change to an interface, named in [`LinkError`]s and in restore warnings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinkOp {
    /// Opening the configuration socket (netlink on Linux).
    Open,
    /// Reading the interface's current state.
    Get,
    /// Setting the MTU.
    SetMtu(u32),
    /// Setting the transmit queue length (packets).
    SetTxQueueLen(u32),
    /// Bringing the link up.
    SetUp,
    /// Bringing the link down (restoring a previous down state).
    SetDown,
    /// Adding an address.
    AddAddress(IpNet),
    /// Removing an address.
    DelAddress(IpNet),
}

impl fmt::Display for LinkOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Open => f.write_str("open the configuration socket"),
            Self::Get => f.write_str("read the link state"),
            Self::SetMtu(mtu) => write!(f, "set MTU {mtu}"),
            Self::SetTxQueueLen(len) => write!(f, "set txqueuelen {len}"),
            Self::SetUp => f.write_str("set link up"),
            Self::SetDown => f.write_str("set link down"),
            Self::AddAddress(addr) => write!(f, "add address {addr}"),
            Self::DelAddress(addr) => write!(f, "remove address {addr}"),
        }
    }
}

/// Changing (or reading) an interface failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// The kernel refused the request: its errno and, when it gave one, its own
    /// explanation (netlink extended ACK).
    #[error("{op} on interface {ifindex}: {}{}", io::Error::from_raw_os_error(*errno), Explained(message))]
    Refused {
        /// What was asked.
        op: LinkOp,
        /// The interface.
        ifindex: u32,
        /// The positive errno, e.g. `EPERM` (no `CAP_NET_ADMIN`), `ENODEV`, `EINVAL`.
        errno: i32,
        /// The kernel's extended-ACK message, if any.
        message: Option<String>,
    },
    /// Talking to the kernel failed (socket, send or receive).
    #[error("{op} on interface {ifindex}: {error}")]
    Io {
        /// What was asked.
        op: LinkOp,
        /// The interface.
        ifindex: u32,
        /// The OS error.
        error: io::Error,
    },
    /// The kernel's reply could not be understood.
    #[error("{op} on interface {ifindex}: undecodable reply: {reason}")]
    Decode {
        /// What was asked.
        op: LinkOp,
        /// The interface.
        ifindex: u32,
        /// What the decoder said.
        reason: String,
    },
    /// Interface configuration is not implemented for this OS yet.
    #[error("interface configuration is not supported on this operating system yet")]
    Unsupported,
}

impl LinkError {
    /// The OS error number behind this error, if there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Refused { errno, .. } => Some(*errno),
            Self::Io { error, .. } => error.raw_os_error(),
            _ => None,
        }
    }
}

/// Formats an optional kernel explanation as `" (kernel: ...)"`.
struct Explained<'a>(&'a Option<String>);

impl fmt::Display for Explained<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(message) => write!(f, " (kernel: {message})"),
            None => Ok(()),
        }
    }
}

/// A change to routes or policy rules, named in [`RouteError`]s and restore warnings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RouteOp {
    /// Opening the configuration socket (netlink on Linux).
    Open,
    /// Adding a route or rule.
    Add(crate::RoutingEntry),
    /// Deleting a route or rule.
    Delete(crate::RoutingEntry),
    /// Asking which interface a packet to this address (with this mark) leaves by.
    Lookup(std::net::IpAddr, Option<u32>),
    /// Listing the interfaces' addresses.
    Addresses,
}

impl fmt::Display for RouteOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Open => f.write_str("open the routing socket"),
            Self::Add(entry) => write!(f, "add {entry}"),
            Self::Delete(entry) => write!(f, "delete {entry}"),
            Self::Lookup(ip, None) => write!(f, "look up the route to {ip}"),
            Self::Lookup(ip, Some(mark)) => write!(f, "look up the route to {ip} mark {mark:#x}"),
            Self::Addresses => f.write_str("list the interfaces' addresses"),
        }
    }
}

/// Changing or reading routes and rules failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// The kernel refused the request: its errno and, when it gave one, its own
    /// explanation (netlink extended ACK).
    #[error("{op}: {}{}", io::Error::from_raw_os_error(*errno), Explained(message))]
    Refused {
        /// What was asked.
        op: RouteOp,
        /// The positive errno, e.g. `EPERM` (no `CAP_NET_ADMIN`), `EEXIST`, `ENOENT`.
        errno: i32,
        /// The kernel's extended-ACK message, if any.
        message: Option<String>,
    },
    /// Talking to the kernel failed (socket, send or receive).
    #[error("{op}: {error}")]
    Io {
        /// What was asked.
        op: RouteOp,
        /// The OS error.
        error: io::Error,
    },
    /// The kernel's reply could not be understood.
    #[error("{op}: undecodable reply: {reason}")]
    Decode {
        /// What was asked.
        op: RouteOp,
        /// What the decoder said.
        reason: String,
    },
    /// Routes and policy rules are not implemented for this OS yet.
    #[error("routes and policy rules are not supported on this operating system yet")]
    Unsupported,
}

impl RouteError {
    /// The OS error number behind this error, if there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Refused { errno, .. } => Some(*errno),
            Self::Io { error, .. } => error.raw_os_error(),
            _ => None,
        }
    }
}
/// Running a program in a sandbox (a private network namespace) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SandboxError {
    /// The process has more than one thread; forking it would copy a process whose
    /// other threads may hold locks. Create the sandbox before starting any runtime.
    #[error("a sandbox must be created while the process has one thread (it has {threads})")]
    Threads {
        /// How many threads there were.
        threads: usize,
    },
    /// A setup step inside the new namespaces failed; the message names the step,
    /// the OS error and, where one is known, the usual cause.
    #[error("{message}")]
    Setup {
        /// What the setup process reported.
        message: String,
    },
    /// A system call in this process failed.
    #[error("{op}: {error}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        error: io::Error,
    },
    /// Sandboxes are not implemented for this OS yet.
    #[error(
        "running a program in a private network namespace is not supported on this operating system yet"
    )]
    Unsupported,
}
