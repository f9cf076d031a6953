//! The three hosts of the test topology and the links between them.
//!
//! ```text
//!   [app] to-proxy ---- to-app [proxy] to-target ---- to-proxy [target]
//!   198.19.1.1/24      198.19.1.2/24   198.19.2.1/24      198.19.2.2/24
//!   fd19:1::1/64       fd19:1::2/64    fd19:2::1/64       fd19:2::2/64
//! ```
//!
//! By default the proxy does not forward, the app has no route to the target network
//! and the target none to the app network: whatever reaches the target from the app
//! went through a program in the proxy namespace.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

use super::namespace::Namespace;
use super::stale::{cleanup_stale, unique_name};

/// The app's address on the app-proxy link.
pub const APP_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 1);
/// The app's IPv6 address on the app-proxy link.
pub const APP_V6: Ipv6Addr = Ipv6Addr::new(0xfd19, 1, 0, 0, 0, 0, 0, 1);
/// The proxy's address on the app-proxy link: where the app reaches the SOCKS server.
pub const PROXY_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 2);
/// The proxy's IPv6 address on the app-proxy link.
pub const PROXY_V6: Ipv6Addr = Ipv6Addr::new(0xfd19, 1, 0, 0, 0, 0, 0, 2);
/// The proxy's address on the proxy-target link: the source the target sees.
pub const PROXY_OUT_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 1);
/// The proxy's IPv6 address on the proxy-target link.
pub const PROXY_OUT_V6: Ipv6Addr = Ipv6Addr::new(0xfd19, 2, 0, 0, 0, 0, 0, 1);
/// The target's address: where test servers listen.
pub const TARGET_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 2);
/// The target's IPv6 address.
pub const TARGET_V6: Ipv6Addr = Ipv6Addr::new(0xfd19, 2, 0, 0, 0, 0, 0, 2);

/// The prefix length of both IPv4 links.
const V4_PREFIX: u8 = 24;
/// The prefix length of both IPv6 links.
const V6_PREFIX: u8 = 64;

/// The app-proxy network.
pub const APP_NET_V4: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(198, 19, 1, 0), V4_PREFIX);
/// The app-proxy IPv6 network.
pub const APP_NET_V6: Ipv6Net =
    Ipv6Net::new_assert(Ipv6Addr::new(0xfd19, 1, 0, 0, 0, 0, 0, 0), V6_PREFIX);
/// The proxy-target network.
pub const TARGET_NET_V4: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(198, 19, 2, 0), V4_PREFIX);
/// The proxy-target IPv6 network.
pub const TARGET_NET_V6: Ipv6Net =
    Ipv6Net::new_assert(Ipv6Addr::new(0xfd19, 2, 0, 0, 0, 0, 0, 0), V6_PREFIX);

/// The app's interface toward the proxy.
pub const APP_LINK: &str = "to-proxy";
/// The proxy's interface toward the app.
pub const PROXY_APP_LINK: &str = "to-app";
/// The proxy's interface toward the target.
pub const PROXY_TARGET_LINK: &str = "to-target";
/// The target's interface toward the proxy.
pub const TARGET_LINK: &str = "to-proxy";

/// The app, proxy and target namespaces, linked and addressed; all three are
/// deleted on drop (also while a test unwinds from a panic).
#[derive(Debug)]
pub struct Topology {
    app: Namespace,
    proxy: Namespace,
    target: Namespace,
}

impl Topology {
    /// Removes what crashed runs left ([`cleanup_stale`]), then builds the topology
    /// in namespaces named `t2s-TAG-PID-N-{app,proxy,target}`.
    pub fn create(tag: &str) -> io::Result<Topology> {
        if let Err(e) = cleanup_stale() {
            tracing::warn!("stale namespaces not cleaned: {e}");
        }
        let base = unique_name(tag);
        let topology = Topology {
            app: Namespace::create(format!("{base}-app"))?,
            proxy: Namespace::create(format!("{base}-proxy"))?,
            target: Namespace::create(format!("{base}-target"))?,
        };
        link(&topology.app, APP_LINK, &topology.proxy, PROXY_APP_LINK)?;
        link(
            &topology.proxy,
            PROXY_TARGET_LINK,
            &topology.target,
            TARGET_LINK,
        )?;
        address(&topology.app, APP_LINK, APP_V4, APP_V6)?;
        address(&topology.proxy, PROXY_APP_LINK, PROXY_V4, PROXY_V6)?;
        address(
            &topology.proxy,
            PROXY_TARGET_LINK,
            PROXY_OUT_V4,
            PROXY_OUT_V6,
        )?;
        address(&topology.target, TARGET_LINK, TARGET_V4, TARGET_V6)?;
        Ok(topology)
    }

    /// The host of the applications (and of the TUN device under test).
    pub fn app(&self) -> &Namespace {
        &self.app
    }

    /// The host of the SOCKS server.
    pub fn proxy(&self) -> &Namespace {
        &self.proxy
    }

    /// The host of the test servers (HTTP, iperf3, DNS, echo).
    pub fn target(&self) -> &Namespace {
        &self.target
    }

    /// The kernel baseline: the proxy forwards (v4 and v6), the app routes the target
    /// network via the proxy and the target routes the app network back.
    pub fn enable_kernel_path(&self) -> io::Result<()> {
        self.proxy.set_sysctl("net.ipv4.ip_forward", "1")?;
        self.proxy.set_sysctl("net.ipv6.conf.all.forwarding", "1")?;
        let routes = [
            (&self.app, TARGET_NET_V4.to_string(), PROXY_V4.to_string()),
            (&self.app, TARGET_NET_V6.to_string(), PROXY_V6.to_string()),
            (
                &self.target,
                APP_NET_V4.to_string(),
                PROXY_OUT_V4.to_string(),
            ),
            (
                &self.target,
                APP_NET_V6.to_string(),
                PROXY_OUT_V6.to_string(),
            ),
        ];
        for (namespace, network, via) in &routes {
            namespace.ip(["route", "add", network, "via", via])?;
        }
        Ok(())
    }

    /// An ordinary host: the app's default routes (v4 and v6) go via the proxy, and the
    /// target routes the app network back via the proxy. Whether the proxy forwards
    /// is set apart ([`Topology::set_forwarding`]); without forwarding, the app
    /// reaches the target only through a program in the proxy namespace.
    pub fn route_app_via_proxy(&self) -> io::Result<()> {
        self.app
            .ip(["route", "add", "default", "via", &PROXY_V4.to_string()])?;
        self.app.ip([
            "-6",
            "route",
            "add",
            "default",
            "via",
            &PROXY_V6.to_string(),
        ])?;
        self.target.ip([
            "route",
            "add",
            &APP_NET_V4.to_string(),
            "via",
            &PROXY_OUT_V4.to_string(),
        ])?;
        self.target.ip([
            "-6",
            "route",
            "add",
            &APP_NET_V6.to_string(),
            "via",
            &PROXY_OUT_V6.to_string(),
        ])?;
        Ok(())
    }

    /// Turns IPv4 and IPv6 forwarding in the proxy namespace on or off.
    pub fn set_forwarding(&self, on: bool) -> io::Result<()> {
        let value = if on { "1" } else { "0" };
        self.proxy.set_sysctl("net.ipv4.ip_forward", value)?;
        self.proxy.set_sysctl("net.ipv6.conf.all.forwarding", value)
    }

    /// Sets the MTU of all four veth ends (benchmarks use large ones).
    pub fn set_mtu(&self, mtu: u32) -> io::Result<()> {
        let mtu = mtu.to_string();
        let ends = [
            (&self.app, APP_LINK),
            (&self.proxy, PROXY_APP_LINK),
            (&self.proxy, PROXY_TARGET_LINK),
            (&self.target, TARGET_LINK),
        ];
        for (namespace, link) in ends {
            namespace.ip(["link", "set", "dev", link, "mtu", &mtu])?;
        }
        Ok(())
    }
}

/// A veth pair from `a` (named `a_link`) to `b` (named `b_link`), made inside `a` with
/// its peer placed straight into `b`: it never exists in the root namespace.
fn link(a: &Namespace, a_link: &str, b: &Namespace, b_link: &str) -> io::Result<()> {
    a.ip([
        "link",
        "add",
        a_link,
        "type",
        "veth",
        "peer",
        "name",
        b_link,
        "netns",
        b.name(),
    ])?;
    Ok(())
}

/// Brings `link` in `namespace` up and gives it the two addresses (IPv6 without DAD).
fn address(namespace: &Namespace, link: &str, v4: Ipv4Addr, v6: Ipv6Addr) -> io::Result<()> {
    // Up first, then the addresses: an IPv6 address added while the link is down
    // makes the first neighbour solicitation from that end go unanswered, and the
    // first IPv6 packet across the link waits a second for the retry.
    namespace.ip(["link", "set", "dev", link, "up"])?;
    namespace.ip(["addr", "add", &format!("{v4}/{V4_PREFIX}"), "dev", link])?;
    namespace.ip([
        "addr",
        "add",
        &format!("{v6}/{V6_PREFIX}"),
        "dev",
        link,
        "nodad",
    ])?;
    Ok(())
}
