//! Operating systems without an implementation yet: the same API as Linux, where
//! every entry point fails with `Unsupported`. The types can never be constructed,
//! so their methods are unreachable. This module must not pretend to work.

use std::convert::Infallible;
use std::io;

use ipnet::IpNet;

use crate::{LinkError, LinkOp, RouteError, RoutingEntry, TunError};

/// A common limit (BSD and macOS `IFNAMSIZ` less the NUL).
pub const MAX_NAME_LEN: usize = 15;

/// See the Linux implementation; never constructed here.
#[derive(Debug)]
pub struct Tun {
    never: Infallible,
}

impl Tun {
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

    /// Reads one packet.
    pub fn recv(&self, _buf: &mut [u8]) -> io::Result<usize> {
        match self.never {}
    }

    /// Writes one packet.
    pub fn send(&self, _packet: &[u8]) -> io::Result<()> {
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

/// Always fails with [`TunError::Unsupported`].
pub fn open_tun(_name: Option<&str>) -> Result<Tun, TunError> {
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
    pub fn fill_from(&mut self, _socket: impl std::os::fd::AsFd) -> io::Result<usize> {
        match self.never {}
    }

    /// Unreachable.
    pub fn drain_into(&mut self, _socket: impl std::os::fd::AsFd) -> io::Result<usize> {
        match self.never {}
    }
}

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
