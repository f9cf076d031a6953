//! Interface changes over rtnetlink, each returning a [`LinkGuard`] that undoes it:
//! MTU, transmit queue length, up state, addresses.
//!
//! A guard records what was there before the change and puts it back on drop: the
//! previous MTU or queue length, the down state, or the absence of the address. A
//! change that changed nothing (value already set, address already present) gives a
//! guard that does nothing, so restoring never removes what someone else configured.
//! This module must not open TUN devices or decide policy (which values to set).

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use super::netlink::{Netlink, NlError};
use crate::{LinkError, LinkOp};

/// How long [`Link::add_address`] waits for the kernel to accept packets for a new
/// IPv6 address. Even without DAD, the kernel installs the local route from a work
/// queue, a little after acknowledging the address; packets arriving before that are
/// dropped (`Ip6InAddrErrors`). It normally takes well under a millisecond.
const LOCAL_ROUTE_WAIT: Duration = Duration::from_secs(2);

/// Interval between two checks for the local route.
const LOCAL_ROUTE_POLL: Duration = Duration::from_millis(1);

/// The state of an interface that the guards may change and restore.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LinkState {
    /// Interface name.
    pub name: String,
    /// MTU in bytes.
    pub mtu: u32,
    /// Transmit queue length in packets (`txqueuelen`).
    pub txqueuelen: u32,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
}

/// A handle on one interface (by index) in the network namespace of the thread that
/// called [`Link::new`]. Cheap to clone; clones share one netlink socket.
#[derive(Debug, Clone)]
pub struct Link {
    ifindex: u32,
    netlink: Arc<Netlink>,
}

impl Link {
    /// Opens a netlink socket for changing interface `ifindex`. The socket belongs to
    /// the calling thread's network namespace, and so do all later changes and
    /// restores, whichever thread drops the guards.
    pub fn new(ifindex: u32) -> Result<Link, LinkError> {
        let netlink = Netlink::open().map_err(|error| LinkError::Io {
            op: LinkOp::Open,
            ifindex,
            error,
        })?;
        Ok(Link {
            ifindex,
            netlink: Arc::new(netlink),
        })
    }

    /// The interface index this handle changes.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Reads the interface's name, MTU, queue length and up state.
    pub fn state(&self) -> Result<LinkState, LinkError> {
        let request = RouteNetlinkMessage::GetLink(self.link_message());
        let reply = self
            .netlink
            .get(request)
            .map_err(|e| self.error(LinkOp::Get, e))?;
        let RouteNetlinkMessage::NewLink(link) = reply else {
            return Err(self.error(
                LinkOp::Get,
                NlError::Decode(format!("expected a link, got {reply:?}")),
            ));
        };
        let mut state = LinkState {
            name: String::new(),
            mtu: 0,
            txqueuelen: 0,
            up: link.header.flags.contains(LinkFlags::Up),
        };
        for attribute in link.attributes {
            match attribute {
                LinkAttribute::IfName(name) => state.name = name,
                LinkAttribute::Mtu(mtu) => state.mtu = mtu,
                LinkAttribute::TxQueueLen(len) => state.txqueuelen = len,
                _ => {}
            }
        }
        Ok(state)
    }

    /// Sets the MTU; the guard restores the previous one.
    pub fn set_mtu(&self, mtu: u32) -> Result<LinkGuard, LinkError> {
        let before = self.state()?.mtu;
        if before == mtu {
            return Ok(self.guard(None));
        }
        self.apply(Change::Mtu(mtu))?;
        Ok(self.guard(Some(Change::Mtu(before))))
    }

    /// Sets the transmit queue length (packets); the guard restores the previous one.
    pub fn set_txqueuelen(&self, len: u32) -> Result<LinkGuard, LinkError> {
        let before = self.state()?.txqueuelen;
        if before == len {
            return Ok(self.guard(None));
        }
        self.apply(Change::TxQueueLen(len))?;
        Ok(self.guard(Some(Change::TxQueueLen(before))))
    }

    /// Brings the link up; if it was down, the guard brings it down again.
    pub fn set_up(&self) -> Result<LinkGuard, LinkError> {
        if self.state()?.up {
            return Ok(self.guard(None));
        }
        self.apply(Change::Up(true))?;
        Ok(self.guard(Some(Change::Up(false))))
    }

    /// Adds `address` (with its prefix length, e.g. `10.0.0.1/24`, which also adds the
    /// prefix route). IPv6 addresses skip duplicate address detection (`IFA_F_NODAD`),
    /// and on a link that is up this returns only once the kernel delivers packets for
    /// the address locally (bounded wait, normally under a millisecond), so it is
    /// usable at once. If the address is already present the guard does nothing;
    /// otherwise it removes the address.
    pub fn add_address(&self, address: IpNet) -> Result<LinkGuard, LinkError> {
        match self.apply(Change::AddAddress(address)) {
            Ok(()) => {
                let guard = self.guard(Some(Change::DelAddress(address)));
                if let IpAddr::V6(ip) = address.addr() {
                    self.wait_until_local(ip, LinkOp::AddAddress(address))?;
                }
                Ok(guard)
            }
            Err(LinkError::Refused {
                errno: libc::EEXIST,
                ..
            }) => Ok(self.guard(None)),
            Err(error) => Err(error),
        }
    }

    /// Waits until `ip` is routed locally, if the link is up (on a down link the
    /// kernel installs the local route only when it comes up).
    fn wait_until_local(&self, ip: Ipv6Addr, op: LinkOp) -> Result<(), LinkError> {
        if !self.state()?.up {
            return Ok(());
        }
        let deadline = Instant::now() + LOCAL_ROUTE_WAIT;
        while !self.routes_locally(ip, op)? {
            if Instant::now() >= deadline {
                tracing::debug!(ifindex = self.ifindex, %ip, "no local route yet; not waiting longer");
                break;
            }
            std::thread::sleep(LOCAL_ROUTE_POLL);
        }
        Ok(())
    }

    /// Whether the kernel's route lookup for `ip` says "deliver locally".
    fn routes_locally(&self, ip: Ipv6Addr, op: LinkOp) -> Result<bool, LinkError> {
        let mut route = RouteMessage::default();
        route.header.address_family = AddressFamily::Inet6;
        route.header.destination_prefix_length = 128;
        route
            .attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet6(ip)));
        match self.netlink.get(RouteNetlinkMessage::GetRoute(route)) {
            Ok(RouteNetlinkMessage::NewRoute(route)) => Ok(route.header.kind == RouteType::Local),
            Ok(_) | Err(NlError::Refused { .. }) => Ok(false),
            Err(error) => Err(self.error(op, error)),
        }
    }

    fn guard(&self, undo: Option<Change>) -> LinkGuard {
        LinkGuard {
            link: self.clone(),
            undo,
        }
    }

    fn apply(&self, change: Change) -> Result<(), LinkError> {
        let (message, flags) = match change {
            Change::Mtu(mtu) => {
                let mut link = self.link_message();
                link.attributes.push(LinkAttribute::Mtu(mtu));
                (RouteNetlinkMessage::SetLink(link), 0)
            }
            Change::TxQueueLen(len) => {
                let mut link = self.link_message();
                link.attributes.push(LinkAttribute::TxQueueLen(len));
                (RouteNetlinkMessage::SetLink(link), 0)
            }
            Change::Up(up) => {
                let mut link = self.link_message();
                link.header.change_mask = LinkFlags::Up;
                if up {
                    link.header.flags = LinkFlags::Up;
                }
                (RouteNetlinkMessage::SetLink(link), 0)
            }
            Change::AddAddress(address) => (
                RouteNetlinkMessage::NewAddress(self.address_message(address)),
                NLM_F_CREATE | NLM_F_EXCL,
            ),
            Change::DelAddress(address) => (
                RouteNetlinkMessage::DelAddress(self.address_message(address)),
                0,
            ),
        };
        self.netlink
            .ack(message, flags)
            .map_err(|e| self.error(change.op(), e))
    }

    fn link_message(&self) -> LinkMessage {
        let mut link = LinkMessage::default();
        link.header.index = self.ifindex;
        link
    }

    fn address_message(&self, address: IpNet) -> AddressMessage {
        let mut message = AddressMessage::default();
        message.header.index = self.ifindex;
        message.header.prefix_len = address.prefix_len();
        message.header.scope = AddressScope::Universe;
        let ip = address.addr();
        message.attributes.push(AddressAttribute::Local(ip));
        message.attributes.push(AddressAttribute::Address(ip));
        match address {
            IpNet::V4(_) => message.header.family = AddressFamily::Inet,
            IpNet::V6(_) => {
                message.header.family = AddressFamily::Inet6;
                message.header.flags = AddressHeaderFlags::Nodad;
                message
                    .attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
        }
        message
    }

    fn error(&self, op: LinkOp, error: NlError) -> LinkError {
        let ifindex = self.ifindex;
        match error {
            NlError::Io(error) => LinkError::Io { op, ifindex, error },
            NlError::Refused { errno, message } => LinkError::Refused {
                op,
                ifindex,
                errno,
                message,
            },
            NlError::Decode(reason) => LinkError::Decode {
                op,
                ifindex,
                reason,
            },
        }
    }
}

/// One change, as applied or as its undo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Mtu(u32),
    TxQueueLen(u32),
    Up(bool),
    AddAddress(IpNet),
    DelAddress(IpNet),
}

impl Change {
    fn op(self) -> LinkOp {
        match self {
            Change::Mtu(mtu) => LinkOp::SetMtu(mtu),
            Change::TxQueueLen(len) => LinkOp::SetTxQueueLen(len),
            Change::Up(true) => LinkOp::SetUp,
            Change::Up(false) => LinkOp::SetDown,
            Change::AddAddress(address) => LinkOp::AddAddress(address),
            Change::DelAddress(address) => LinkOp::DelAddress(address),
        }
    }
}

/// Undoes one interface change when dropped (see the module docs). A failed
/// restore on drop is logged as a warning, except when the interface or the address
/// is already gone. Use [`LinkGuard::restore`] to see the error instead, or
/// [`LinkGuard::forget`] to keep the change.
#[must_use = "dropping the guard undoes the change at once"]
pub struct LinkGuard {
    link: Link,
    undo: Option<Change>,
}

impl LinkGuard {
    /// Keeps the change: nothing is undone. For a device we created, whose settings
    /// vanish with it when its descriptor closes.
    pub fn forget(mut self) {
        self.undo = None;
    }

    /// Undoes the change now and reports failure. An interface or address that is
    /// already gone counts as restored.
    pub fn restore(mut self) -> Result<(), LinkError> {
        self.undo_now()
    }

    /// The change this guard will undo, or `None` if it has nothing to undo.
    pub fn undoes(&self) -> Option<LinkOp> {
        self.undo.map(Change::op)
    }

    fn undo_now(&mut self) -> Result<(), LinkError> {
        let Some(change) = self.undo.take() else {
            return Ok(());
        };
        match self.link.apply(change) {
            Err(LinkError::Refused { errno, .. })
                if errno == libc::ENODEV
                    || (errno == libc::EADDRNOTAVAIL
                        && matches!(change, Change::DelAddress(_))) =>
            {
                tracing::debug!(ifindex = self.link.ifindex, op = %change.op(), "already gone");
                Ok(())
            }
            result => result,
        }
    }
}

impl Drop for LinkGuard {
    fn drop(&mut self) {
        if let Err(error) = self.undo_now() {
            tracing::warn!(%error, "could not restore interface setting");
        }
    }
}

impl fmt::Debug for LinkGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkGuard")
            .field("ifindex", &self.link.ifindex)
            .field("undoes", &self.undoes())
            .finish()
    }
}
