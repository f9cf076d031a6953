//! Routes and policy rules over rtnetlink, each addition returning a [`RouteGuard`]
//! that deletes it again; deletion of a described entry (a crashed run's leftover);
//! and the kernel's route lookup (`ip route get ADDR mark M`).
//!
//! An entry that already existed gives a guard that does nothing, so restoring never
//! removes what someone else configured. An entry that is already gone when it is
//! deleted (its interface vanished and took its routes along) counts as deleted.
//! This module must not decide policy (which tables, marks or priorities).

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::IpProtocol;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{
    RuleAction, RuleAttribute, RuleFlags, RuleMessage, RulePortRange,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use super::netlink::{Netlink, NlError};
use crate::{Family, Route, RouteError, RouteOp, RoutingEntry, Rule};

/// `RT_TABLE_COMPAT`: the header's 8-bit table field when the table number does not
/// fit (the real number travels in the `Table` attribute).
const TABLE_COMPAT: u8 = 252;

/// Routes and rules in the network namespace of the thread that called
/// [`Routing::new`]. Cheap to clone; clones share one netlink socket.
#[derive(Debug, Clone)]
pub struct Routing {
    netlink: Arc<Netlink>,
}

impl Routing {
    /// Opens a netlink socket; it and every later change belong to the calling
    /// thread's network namespace.
    pub fn new() -> Result<Routing, RouteError> {
        let netlink = Netlink::open().map_err(|error| RouteError::Io {
            op: RouteOp::Open,
            error,
        })?;
        Ok(Routing {
            netlink: Arc::new(netlink),
        })
    }

    /// Adds `entry`; the guard deletes it again. If an identical entry exists
    /// already, nothing is added and the guard does nothing.
    pub fn add(&self, entry: RoutingEntry) -> Result<RouteGuard, RouteError> {
        let op = RouteOp::Add(entry);
        let message = match entry {
            RoutingEntry::Route(route) => RouteNetlinkMessage::NewRoute(route_message(&route)),
            RoutingEntry::Rule(rule) => RouteNetlinkMessage::NewRule(rule_message(&rule)),
        };
        let undo = match self.netlink.ack(message, NLM_F_CREATE | NLM_F_EXCL) {
            Ok(()) => Some(entry),
            Err(NlError::Refused {
                errno: libc::EEXIST,
                ..
            }) => {
                tracing::debug!(%entry, "exists already; leaving it alone");
                None
            }
            Err(error) => return Err(route_error(op, error)),
        };
        Ok(RouteGuard {
            routing: self.clone(),
            undo,
        })
    }

    /// Deletes `entry`. Returns `false` if there was nothing to delete (no such
    /// entry, or its interface is gone).
    pub fn remove(&self, entry: RoutingEntry) -> Result<bool, RouteError> {
        let message = match entry {
            RoutingEntry::Route(route) => {
                let mut message = route_message(&route);
                // Match any scope and protocol: only destination, device, table.
                message.header.scope = RouteScope::NoWhere;
                message.header.protocol = RouteProtocol::Unspec;
                RouteNetlinkMessage::DelRoute(message)
            }
            RoutingEntry::Rule(rule) => RouteNetlinkMessage::DelRule(rule_message(&rule)),
        };
        match self.netlink.ack(message, 0) {
            Ok(()) => Ok(true),
            Err(NlError::Refused { errno, .. })
                if errno == libc::ENOENT || errno == libc::ESRCH || errno == libc::ENODEV =>
            {
                Ok(false)
            }
            Err(error) => Err(route_error(RouteOp::Delete(entry), error)),
        }
    }

    /// The addresses of this network namespace's interfaces, each with its
    /// interface's name (`getifaddrs`; `ip -brief address`).
    pub fn local_addresses(&self) -> Result<Vec<(String, IpAddr)>, RouteError> {
        let all = nix::ifaddrs::getifaddrs().map_err(|errno| RouteError::Io {
            op: RouteOp::Addresses,
            error: std::io::Error::from(errno),
        })?;
        Ok(all
            .filter_map(|entry| {
                let address = entry.address?;
                let ip = match (address.as_sockaddr_in(), address.as_sockaddr_in6()) {
                    (Some(v4), _) => IpAddr::V4(v4.ip()),
                    (_, Some(v6)) => IpAddr::V6(v6.ip()),
                    _ => return None,
                };
                Some((entry.interface_name, ip))
            })
            .collect())
    }

    /// The interface a packet to `destination` would leave by, as the kernel decides
    /// now (policy rules included), for a socket carrying `mark` (`SO_MARK`) if given:
    /// `ip route get DESTINATION [mark M]`. `None` when the kernel has no route
    /// (unreachable, prohibited, blackhole).
    pub fn output_interface(
        &self,
        destination: IpAddr,
        mark: Option<u32>,
    ) -> Result<Option<u32>, RouteError> {
        let op = RouteOp::Lookup(destination, mark);
        let mut message = RouteMessage::default();
        let host = IpNet::from(destination);
        message.header.address_family = address_family(Family::of(&host));
        message.header.destination_prefix_length = host.prefix_len();
        message
            .attributes
            .push(RouteAttribute::Destination(route_address(destination)));
        if let Some(mark) = mark {
            message.attributes.push(RouteAttribute::Mark(mark));
        }
        let reply = match self.netlink.get(RouteNetlinkMessage::GetRoute(message)) {
            Ok(reply) => reply,
            Err(NlError::Refused { errno, .. })
                if errno == libc::ENETUNREACH
                    || errno == libc::EHOSTUNREACH
                    || errno == libc::EACCES =>
            {
                return Ok(None);
            }
            Err(error) => return Err(route_error(op, error)),
        };
        let RouteNetlinkMessage::NewRoute(route) = reply else {
            return Err(route_error(
                op,
                NlError::Decode(format!("expected a route, got {reply:?}")),
            ));
        };
        if route.header.kind != RouteType::Unicast && route.header.kind != RouteType::Local {
            return Ok(None);
        }
        Ok(route
            .attributes
            .iter()
            .find_map(|attribute| match attribute {
                RouteAttribute::Oif(ifindex) => Some(*ifindex),
                _ => None,
            }))
    }
}

fn address_family(family: Family) -> AddressFamily {
    match family {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    }
}

fn route_address(ip: IpAddr) -> RouteAddress {
    match ip {
        IpAddr::V4(ip) => RouteAddress::Inet(ip),
        IpAddr::V6(ip) => RouteAddress::Inet6(ip),
    }
}

/// The header's 8-bit table: the number itself when it fits, else `RT_TABLE_COMPAT`.
fn header_table(table: u32) -> u8 {
    u8::try_from(table).unwrap_or(TABLE_COMPAT)
}

/// `ip route add NET dev IFINDEX table T`: a unicast route without gateway, scope
/// link for IPv4 (as `ip` does for a device route), universe for IPv6.
fn route_message(route: &Route) -> RouteMessage {
    let family = Family::of(&route.destination);
    let mut message = RouteMessage::default();
    message.header.address_family = address_family(family);
    message.header.destination_prefix_length = route.destination.prefix_len();
    message.header.table = header_table(route.table);
    message.header.protocol = RouteProtocol::Static;
    message.header.scope = match family {
        Family::V4 => RouteScope::Link,
        Family::V6 => RouteScope::Universe,
    };
    message.header.kind = RouteType::Unicast;
    if route.destination.prefix_len() > 0 {
        message
            .attributes
            .push(RouteAttribute::Destination(route_address(
                route.destination.network(),
            )));
    }
    message.attributes.push(RouteAttribute::Oif(route.ifindex));
    message.attributes.push(RouteAttribute::Table(route.table));
    message
}

/// `ip rule add [not] [from NET] [to NET] [ipproto P] [dport N] [fwmark M] lookup T [suppress_prefixlength N] pref P`.
fn rule_message(rule: &Rule) -> RuleMessage {
    let mut message = RuleMessage::default();
    message.header.family = address_family(rule.family);
    message.header.table = header_table(rule.table);
    message.header.action = RuleAction::ToTable;
    if rule.invert {
        message.header.flags = RuleFlags::Invert;
    }
    let attributes = &mut message.attributes;
    attributes.push(RuleAttribute::Priority(rule.priority));
    attributes.push(RuleAttribute::Table(rule.table));
    if let Some(source) = rule.source {
        message.header.src_len = source.prefix_len();
        attributes.push(RuleAttribute::Source(source.network()));
    }
    if let Some(destination) = rule.destination {
        message.header.dst_len = destination.prefix_len();
        attributes.push(RuleAttribute::Destination(destination.network()));
    }
    if let Some(protocol) = rule.ip_protocol {
        attributes.push(RuleAttribute::IpProtocol(IpProtocol::from(protocol)));
    }
    if let Some(port) = rule.destination_port {
        attributes.push(RuleAttribute::DestinationPortRange(RulePortRange {
            start: port,
            end: port,
        }));
    }
    if let Some(mark) = rule.fwmark {
        attributes.push(RuleAttribute::FwMark(mark));
        attributes.push(RuleAttribute::FwMask(u32::MAX));
    }
    if let Some(len) = rule.suppress_prefix_len {
        attributes.push(RuleAttribute::SuppressPrefixLen(len));
    }
    message
}

fn route_error(op: RouteOp, error: NlError) -> RouteError {
    match error {
        NlError::Io(error) => RouteError::Io { op, error },
        NlError::Refused { errno, message } => RouteError::Refused { op, errno, message },
        NlError::Decode(reason) => RouteError::Decode { op, reason },
    }
}

/// Deletes one added route or rule when dropped. A failed delete on drop is logged as
/// a warning (an entry already gone counts as deleted). Use [`RouteGuard::restore`]
/// to see the error instead, or [`RouteGuard::forget`] to keep the entry.
#[must_use = "dropping the guard deletes the entry at once"]
pub struct RouteGuard {
    routing: Routing,
    undo: Option<RoutingEntry>,
}

impl RouteGuard {
    /// Keeps the entry: nothing is deleted.
    pub fn forget(mut self) {
        self.undo = None;
    }

    /// Deletes the entry now and reports failure.
    pub fn restore(mut self) -> Result<(), RouteError> {
        self.undo_now()
    }

    /// The entry this guard will delete, or `None` (it existed before, or was kept).
    pub fn undoes(&self) -> Option<RoutingEntry> {
        self.undo
    }

    fn undo_now(&mut self) -> Result<(), RouteError> {
        match self.undo.take() {
            Some(entry) => self.routing.remove(entry).map(drop),
            None => Ok(()),
        }
    }
}

impl Drop for RouteGuard {
    fn drop(&mut self) {
        if let Err(error) = self.undo_now() {
            tracing::warn!(%error, "could not restore routing");
        }
    }
}

impl fmt::Debug for RouteGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteGuard")
            .field("undoes", &self.undo.map(|entry| entry.to_string()))
            .finish()
    }
}

// Keep the header constant in view: the main table fits the 8-bit field.
const _: () = assert!(RouteHeader::RT_TABLE_MAIN as u32 == crate::MAIN_TABLE);
