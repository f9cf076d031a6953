//! The sandbox's only way out: default routes (IPv4 and IPv6) through one interface,
//! added in the calling thread's (new, private) network namespace with the same
//! route code as `--setup` ([`Routing`]). Nothing here is undone: the routes vanish
//! with the namespace.
//!
//! This module must not add routes anywhere but in a namespace that is about to be
//! given to a sandboxed program.

use crate::{MAIN_TABLE, Route, RoutingEntry};

use super::super::route::Routing;

/// Which default route could not be added, and why.
#[derive(Debug)]
pub(crate) struct RouteFailure {
    pub(crate) family: &'static str,
    pub(crate) reason: String,
}

/// Adds `default dev IFINDEX` for IPv4 and IPv6 to the main table. IPv6 is skipped
/// when the kernel has it disabled (`EAFNOSUPPORT`).
pub(crate) fn add_default_routes(ifindex: u32) -> Result<(), RouteFailure> {
    let routing = Routing::new().map_err(|e| RouteFailure {
        family: "any",
        reason: e.to_string(),
    })?;
    for (route, name) in default_routes(ifindex) {
        match routing.add(RoutingEntry::Route(route)) {
            // The route goes with the namespace: nothing to undo.
            Ok(guard) => guard.forget(),
            Err(e) if name == "IPv6" && e.errno() == Some(libc::EAFNOSUPPORT) => {}
            Err(e) => {
                return Err(RouteFailure {
                    family: name,
                    reason: e.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// `default dev IFINDEX` in the main table, IPv4 then IPv6.
fn default_routes(ifindex: u32) -> [(Route, &'static str); 2] {
    let route = |destination: &str| Route {
        destination: destination.parse().unwrap_or_default(),
        ifindex,
        table: MAIN_TABLE,
    };
    [(route("0.0.0.0/0"), "IPv4"), (route("::/0"), "IPv6")]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_routes_are_default_routes_out_of_the_interface_in_main() {
        let [(v4, a), (v6, b)] = default_routes(5);
        assert_eq!((a, b), ("IPv4", "IPv6"));
        assert_eq!(v4.destination.to_string(), "0.0.0.0/0");
        assert_eq!(v6.destination.to_string(), "::/0");
        for r in [v4, v6] {
            assert_eq!((r.ifindex, r.table), (5, MAIN_TABLE));
        }
    }
}
