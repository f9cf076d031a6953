//! Operating systems without an implementation yet: the same API as Linux, where
//! every entry point fails with `Unsupported`. The types can never be constructed,
//! so their methods are unreachable. This module must not pretend to work.

use std::convert::Infallible;
use std::io;

use ipnet::IpNet;

use crate::{LinkError, LinkOp, RouteError, RoutingEntry, SandboxError, TunError};

/// A common limit (BSD and macOS `IFNAMSIZ` less the NUL).
pub const MAX_NAME_LEN: usize = 15;

/// See the Linux implementation; never constructed here.
#[derive(Debug)]
pub struct Tun {
    never: Infallible,
}

impl Tun {
    /// Always fails with [`TunError::Unsupported`].
    #[cfg(unix)]
    pub fn from_fd(
        _fd: std::os::fd::OwnedFd,
        _name: String,
        _ifindex: u32,
    ) -> Result<Tun, TunError> {
        Err(TunError::Unsupported)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        match self.never {}
    }

    /// The interface index.
    pub fn ifindex(&self) -> u32 {
        match self.never {}
    }

    /// Whether this call created the device.
    pub fn created(&self) -> bool {
        match self.never {}
    }

    /// Whether the descriptor is a queue of a multi-queue device.
    pub fn multi_queue(&self) -> bool {
        match self.never {}
    }

    /// Opens one more queue.
    pub fn open_queue(&self) -> Result<Tun, TunError> {
        match self.never {}
    }

    /// Reads one packet.
    pub fn recv(&self, _buf: &mut [u8]) -> io::Result<usize> {
        match self.never {}
    }

    /// Writes one packet.
    pub fn send(&self, _packet: &[u8]) -> io::Result<()> {
        match self.never {}
    }

    /// Whether packets carry a `virtio_net_hdr`.
    pub fn vnet_hdr(&self) -> bool {
        match self.never {}
    }

    /// Sets the offload features.
    pub fn set_offload(&mut self, _offloads: crate::Offloads) -> io::Result<()> {
        match self.never {}
    }

    /// Reads one packet into several buffers.
    pub fn recv_vectored(&self, _bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
        match self.never {}
    }

    /// Writes one packet from several buffers.
    pub fn send_vectored(&self, _bufs: &[io::IoSlice<'_>]) -> io::Result<()> {
        match self.never {}
    }

    /// Registers the descriptor with the tokio reactor.
    #[cfg(unix)]
    pub fn into_async_fd(self) -> io::Result<tokio::io::unix::AsyncFd<Tun>> {
        match self.never {}
    }
}

#[cfg(unix)]
impl std::os::fd::AsRawFd for Tun {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self.never {}
    }
}

/// Not implemented here: fails with `Unsupported`.
pub fn if_index(_name: &str) -> io::Result<u32> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

/// Always fails with [`TunError::Unsupported`].
pub fn open_tun(_name: Option<&str>) -> Result<Tun, TunError> {
    Err(TunError::Unsupported)
}

/// Releasing resident code is not implemented here: nothing is released.
pub fn release_code() -> io::Result<usize> {
    Ok(0)
}

/// See the Linux implementation.
pub const LARGE_BLOCK: usize = 128 * 1024;

/// The allocator is left as it is here.
pub fn return_large_blocks() -> bool {
    false
}

/// See the Linux implementation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TunOptions {
    /// Open with `IFF_MULTI_QUEUE`.
    pub multi_queue: bool,
    /// A `virtio_net_hdr` before every packet.
    pub vnet_hdr: bool,
}

/// See the Linux implementation.
pub const VNET_HDR_LEN: usize = 10;

/// Always fails with [`TunError::Unsupported`].
pub fn open_tun_with(_name: Option<&str>, _options: &TunOptions) -> Result<Tun, TunError> {
    Err(TunError::Unsupported)
}

/// See the Linux implementation.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LinkState {
    /// Interface name.
    pub name: String,
    /// MTU in bytes.
    pub mtu: u32,
    /// Transmit queue length in packets.
    pub txqueuelen: u32,
    /// Administratively up.
    pub up: bool,
}

/// See the Linux implementation; never constructed here.
#[derive(Debug)]
pub struct LinkWatch {
    never: Infallible,
}

impl LinkWatch {
    /// Always fails with `Unsupported`.
    pub fn new(_ifindex: u32) -> io::Result<LinkWatch> {
        Err(io::ErrorKind::Unsupported.into())
    }

    /// The interface watched.
    pub fn ifindex(&self) -> u32 {
        match self.never {}
    }

    /// Whether the interface has gone.
    pub fn gone(&mut self) -> io::Result<bool> {
        match self.never {}
    }

    /// Registers the descriptor with the tokio reactor.
    #[cfg(unix)]
    pub fn into_async_fd(self) -> io::Result<tokio::io::unix::AsyncFd<LinkWatch>> {
        match self.never {}
    }
}

#[cfg(unix)]
impl std::os::fd::AsRawFd for LinkWatch {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self.never {}
    }
}

/// See the Linux implementation; never constructed here.
#[derive(Debug, Clone)]
pub struct Link {
    never: Infallible,
}

impl Link {
    /// Always fails with [`LinkError::Unsupported`].
    pub fn new(_ifindex: u32) -> Result<Link, LinkError> {
        Err(LinkError::Unsupported)
    }

    /// The interface index.
    pub fn ifindex(&self) -> u32 {
        match self.never {}
    }

    /// Reads the interface state.
    pub fn state(&self) -> Result<LinkState, LinkError> {
        match self.never {}
    }

    /// Sets the MTU.
    pub fn set_mtu(&self, _mtu: u32) -> Result<LinkGuard, LinkError> {
        match self.never {}
    }

    /// Sets the transmit queue length.
    pub fn set_txqueuelen(&self, _len: u32) -> Result<LinkGuard, LinkError> {
        match self.never {}
    }

    /// Brings the link up.
    pub fn set_up(&self) -> Result<LinkGuard, LinkError> {
        match self.never {}
    }

    /// Adds an address.
    pub fn add_address(&self, _address: IpNet) -> Result<LinkGuard, LinkError> {
        match self.never {}
    }
}

/// See the Linux implementation; never constructed here.
#[derive(Debug)]
#[must_use = "dropping the guard undoes the change at once"]
pub struct LinkGuard {
    never: Infallible,
}

impl LinkGuard {
    /// Keeps the change.
    pub fn forget(self) {
        match self.never {}
    }

    /// Undoes the change now.
    pub fn restore(self) -> Result<(), LinkError> {
        match self.never {}
    }

    /// The change this guard will undo.
    pub fn undoes(&self) -> Option<LinkOp> {
        match self.never {}
    }
}

/// See the Linux implementation: `Pipe::new` fails here, and callers copy instead.
#[derive(Debug)]
pub struct Pipe {
    never: Infallible,
}

impl Pipe {
    /// Always `Unsupported`.
    pub fn new(_capacity: usize) -> io::Result<Pipe> {
        Err(io::ErrorKind::Unsupported.into())
    }

    /// Unreachable.
    pub fn buffered(&self) -> usize {
        match self.never {}
    }

    /// Unreachable.
    pub fn fill_from(&mut self, _socket: impl Socket) -> io::Result<usize> {
        match self.never {}
    }

    /// Unreachable.
    pub fn drain_into(&mut self, _socket: impl Socket) -> io::Result<usize> {
        match self.never {}
    }
}

/// A socket as the OS names it: a descriptor on Unix, a socket handle on Windows.
#[cfg(unix)]
pub trait Socket: std::os::fd::AsFd {}
#[cfg(unix)]
impl<T: std::os::fd::AsFd> Socket for T {}
/// A socket as the OS names it: a descriptor on Unix, a socket handle on Windows.
#[cfg(windows)]
pub trait Socket: std::os::windows::io::AsSocket {}
#[cfg(windows)]
impl<T: std::os::windows::io::AsSocket> Socket for T {}
/// A socket as the OS names it (no such notion here).
#[cfg(not(any(unix, windows)))]
pub trait Socket {}
#[cfg(not(any(unix, windows)))]
impl<T> Socket for T {}

/// See the Linux implementation; never constructed here.
#[derive(Debug, Clone)]
pub struct Routing {
    never: Infallible,
}

impl Routing {
    /// Always fails with [`RouteError::Unsupported`].
    pub fn new() -> Result<Routing, RouteError> {
        Err(RouteError::Unsupported)
    }

    /// Adds a route or rule.
    pub fn add(&self, _entry: RoutingEntry) -> Result<RouteGuard, RouteError> {
        match self.never {}
    }

    /// Deletes a route or rule.
    pub fn remove(&self, _entry: RoutingEntry) -> Result<bool, RouteError> {
        match self.never {}
    }

    /// The addresses of the interfaces.
    pub fn local_addresses(&self) -> Result<Vec<(String, std::net::IpAddr)>, RouteError> {
        match self.never {}
    }

    /// The interface a packet to `destination` would leave by.
    pub fn output_interface(
        &self,
        _destination: std::net::IpAddr,
        _mark: Option<u32>,
    ) -> Result<Option<u32>, RouteError> {
        match self.never {}
    }
}

/// See the Linux implementation; never constructed here.
#[derive(Debug)]
#[must_use = "dropping the guard deletes the entry at once"]
pub struct RouteGuard {
    never: Infallible,
}

impl RouteGuard {
    /// Keeps the entry.
    pub fn forget(self) {
        match self.never {}
    }

    /// Deletes the entry now.
    pub fn restore(self) -> Result<(), RouteError> {
        match self.never {}
    }

    /// The entry this guard will delete.
    pub fn undoes(&self) -> Option<RoutingEntry> {
        match self.never {}
    }
}

/// See the Linux implementation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxSpec {
    /// The program.
    pub program: std::ffi::OsString,
    /// Its arguments.
    pub args: Vec<std::ffi::OsString>,
    /// The TUN device's name inside.
    pub device: String,
    /// The device's MTU.
    pub mtu: u32,
    /// The device's transmit queue length.
    pub txqueuelen: u32,
    /// Addresses of the device.
    pub addresses: Vec<IpNet>,
    /// Whether IPv6 addresses may be left out where IPv6 is disabled.
    pub ipv6_optional: bool,
    /// Contents of `/etc/resolv.conf` inside.
    pub resolv_conf: Option<String>,
}

/// See the Linux implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SandboxSignal {
    /// SIGINT.
    Interrupt,
    /// SIGTERM.
    Terminate,
    /// SIGHUP.
    Hangup,
    /// SIGQUIT.
    Quit,
    /// SIGUSR1.
    User1,
    /// SIGUSR2.
    User2,
    /// SIGKILL.
    Kill,
}

/// See the Linux implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProgramExit {
    /// Exit status.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl ProgramExit {
    /// The exit code, or 128 + the signal number.
    pub fn shell_status(self) -> u8 {
        let status = match self {
            ProgramExit::Code(code) => code,
            ProgramExit::Signal(signal) => signal.saturating_add(128),
        };
        u8::try_from(status & 0xff).unwrap_or(u8::MAX)
    }
}

/// See the Linux implementation; never constructed here.
#[derive(Debug)]
pub struct Sandbox {
    never: Infallible,
}

impl Sandbox {
    /// Always fails with [`SandboxError::Unsupported`].
    pub fn spawn(_spec: &SandboxSpec) -> Result<(Sandbox, Tun), SandboxError> {
        Err(SandboxError::Unsupported)
    }

    /// Unreachable.
    pub fn id(&self) -> u32 {
        match self.never {}
    }

    /// Unreachable.
    pub fn start(&self) -> Result<(), SandboxError> {
        match self.never {}
    }

    /// Unreachable.
    pub fn wait(&self) -> Result<ProgramExit, SandboxError> {
        match self.never {}
    }

    /// Unreachable.
    pub fn signal(&self, _signal: SandboxSignal) -> Result<(), SandboxError> {
        match self.never {}
    }

    /// Unreachable.
    pub fn shares_terminal(&self) -> bool {
        match self.never {}
    }

    /// Unreachable.
    pub fn kill_leftovers(&self) -> usize {
        match self.never {}
    }
}

/// Batched datagram receive and send; not available here (callers fall back to one
/// datagram per call).
pub mod mmsg {
    use std::io;

    /// The most datagrams one call receives.
    pub const MAX_BATCH: usize = 64;

    /// See the Linux implementation.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Datagram {
        /// Bytes received.
        pub len: usize,
        /// Larger than its slot.
        pub truncated: bool,
        /// Its sender.
        pub from: Option<std::net::SocketAddr>,
    }

    /// One datagram to send: its bytes, and where to.
    pub type Outgoing<'a> = (&'a [u8], Option<std::net::SocketAddr>);

    /// Always fails with `Unsupported` (callers send one datagram per call).
    pub fn send_batch<T>(_socket: &T, _batch: &[Outgoing<'_>]) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }

    /// Always fails with `Unsupported` (callers send one datagram per call).
    pub fn send_contiguous<T>(
        _socket: &T,
        _bytes: &[u8],
        _ends: &[usize],
        _to: Option<std::net::SocketAddr>,
    ) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }

    /// Always fails with `Unsupported`.
    pub fn recv_batch<T>(
        _socket: &T,
        _buf: &mut [u8],
        _slot: usize,
        out: &mut Vec<Datagram>,
    ) -> io::Result<usize> {
        out.clear();
        Err(io::ErrorKind::Unsupported.into())
    }
}
