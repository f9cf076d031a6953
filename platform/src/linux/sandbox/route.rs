//! The sandbox's only way out: default routes (IPv4 and IPv6) through one interface,
//! added over rtnetlink in the calling thread's (new, private) network namespace.
//! Nothing here is undone: the routes vanish with the namespace.
//!
//! This module must not add routes anywhere but in a namespace that is about to be
//! given to a sandboxed program.

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::route::{
    RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use super::super::netlink::{Netlink, NlError};

/// Which default route could not be added, and why.
#[derive(Debug)]
pub(crate) struct RouteFailure {
    pub(crate) family: &'static str,
    pub(crate) reason: String,
}

/// Adds `default dev IFINDEX` for IPv4 and IPv6 to the main table. IPv6 is skipped
/// when the kernel has it disabled (`EAFNOSUPPORT`).
pub(crate) fn add_default_routes(ifindex: u32) -> Result<(), RouteFailure> {
    let netlink = Netlink::open().map_err(|e| RouteFailure {
        family: "any",
        reason: format!("netlink socket: {e}"),
    })?;
    for (family, name) in [
        (AddressFamily::Inet, "IPv4"),
        (AddressFamily::Inet6, "IPv6"),
    ] {
        let message = RouteNetlinkMessage::NewRoute(default_route(family, ifindex));
        match netlink.ack(message, NLM_F_CREATE | NLM_F_EXCL) {
            Ok(()) => {}
            Err(NlError::Refused {
                errno: libc::EAFNOSUPPORT,
                ..
            }) if family == AddressFamily::Inet6 => {}
            Err(error) => {
                return Err(RouteFailure {
                    family: name,
                    reason: describe(error),
                });
            }
        }
    }
    Ok(())
}

/// `default dev IFINDEX` in the main table (`ip route add default dev X`).
fn default_route(family: AddressFamily, ifindex: u32) -> RouteMessage {
    let mut route = RouteMessage::default();
    route.header.address_family = family;
    route.header.destination_prefix_length = 0;
    route.header.table = RouteHeader::RT_TABLE_MAIN;
    route.header.protocol = RouteProtocol::Boot;
    route.header.scope = RouteScope::Universe;
    route.header.kind = RouteType::Unicast;
    route.attributes.push(RouteAttribute::Oif(ifindex));
    route
}

fn describe(error: NlError) -> String {
    match error {
        NlError::Io(e) => e.to_string(),
        NlError::Refused { errno, message } => {
            let text = std::io::Error::from_raw_os_error(errno);
            match message {
                Some(kernel) => format!("{text} (kernel: {kernel})"),
                None => text.to_string(),
            }
        }
        NlError::Decode(reason) => format!("undecodable reply: {reason}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_route_is_a_default_unicast_route_out_of_the_interface() {
        let route = default_route(AddressFamily::Inet6, 5);
        assert_eq!(route.header.destination_prefix_length, 0);
        assert_eq!(route.header.table, RouteHeader::RT_TABLE_MAIN);
        assert_eq!(route.header.kind, RouteType::Unicast);
        assert_eq!(route.attributes, vec![RouteAttribute::Oif(5)]);
    }
}
