//! `--setup`: make the TUN the default gateway (IPv4 and IPv6) without a routing
//! loop, and put everything back on exit; and the start-time loop check that runs in
//! every mode.
//!
//! The policy, in the style of wg-quick and sing-box's auto-route (numbers are the
//! defaults below):
//!
//! ```text
//! table 727:  default dev TUN                      (v4 and v6)
//! pref 7260:  to 127.0.0.0/8, ::1/128, 169.254.0.0/16, fe80::/10,
//!             to each proxy address, to each --exclude network   lookup main
//! pref 7265:  from each address of the other interfaces          lookup main
//! pref 7266:  ipproto udp dport 53, ipproto tcp dport 53          lookup 727
//!             (only with `--dns fake-ip` or `--dns-server`)
//! pref 7269:  lookup main suppress_prefixlength 0  (more specific routes of main win)
//! pref 7270:  not fwmark 0x2d7 lookup 727          (everything else: the tunnel)
//! ```
//!
//! Rule 7265 keeps connections *into* this host working (an SSH session from a
//! remote network): their replies leave from the address the client connected to,
//! an address of another interface, while a connection the host opens takes the
//! TUN's address as its source (the route to anywhere is the TUN), so it is not
//! affected. It is made only for a family the TUN has an address of: without one,
//! the kernel would give new connections another interface's address, and rule 7265
//! would then take their later packets off the tunnel.
//!
//! Rule 7266 sends every DNS query into the tunnel, a resolver on the LAN
//! included (rule 7269 would otherwise send it there directly, past the proxy: a
//! leak, and fake IPs never handed out). It is made only when the tunnel's answer
//! does not depend on reaching the queried address through the proxy: `--dns
//! fake-ip` (answered in the tunnel) or `--dns-server` (asked instead). In the
//! other modes a resolver on a direct network stays direct, and the start says so.
//!
//! Every socket to the proxy carries the mark (`upstream::DialOptions::fwmark`), so
//! the proxy connection and the UDP relay traffic skip rule 7270 and follow the
//! original routes. Each entry is recorded in the state file ([`state`]) before it is
//! made and deleted, newest first, when the [`Setup`] drops (SIGINT, SIGTERM, a
//! fatal error, a panic that unwinds); a start after a crash deletes what the file
//! lists first.
//!
//! Stage: beside the data path, at start and exit only. It must not touch packets,
//! and it holds no OS code: netlink lives in `tun2socks-platform`.

pub mod state;

use std::io;
use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use tun2socks_platform::{
    Family, MAIN_TABLE, Route, RouteError, RouteGuard, Routing, RoutingEntry, Rule,
};

use crate::device::Device;
use crate::upstream::{DialOptions, Upstream};

pub use state::Lock;

/// The firewall mark `--setup` puts on every socket to the proxy when `--fwmark` is
/// not given: `0x2d7` (727). Packets carrying it skip the tunnel.
pub const DEFAULT_FWMARK: u32 = 0x2d7;
/// The routing table holding the default routes through the TUN: 727.
pub const DEFAULT_TABLE: u32 = 727;
/// The priority of the rule `not fwmark MARK lookup TABLE`: 7270. The
/// `suppress_prefixlength 0` rule is one lower (7269), the rules for replies from
/// this host's other addresses five lower (7265), the direct rules (loopback,
/// link-local, the proxy, `--exclude`) ten lower (7260).
pub const DEFAULT_PRIORITY: u32 = 7270;
/// Where the lock and the state file live.
pub const DEFAULT_STATE_DIR: &str = "/run/tun2socks";

/// Networks that never enter the tunnel: loopback and link-local.
const ALWAYS_DIRECT: [&str; 4] = ["127.0.0.0/8", "169.254.0.0/16", "::1/128", "fe80::/10"];

/// What `--setup` does, apart from the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetupConfig {
    /// The mark on sockets to the proxy ([`DEFAULT_FWMARK`] unless `--fwmark`).
    pub fwmark: u32,
    /// The routing table of the TUN's default routes.
    pub table: u32,
    /// The priority of the tunnel rule (see the module docs for the others).
    pub priority: u32,
    /// Networks kept off the tunnel (`--exclude`).
    pub exclude: Vec<IpNet>,
    /// Send every DNS query (UDP and TCP port 53) into the tunnel, whatever its
    /// destination (rule 7266).
    pub hijack_dns: bool,
    /// `--dns-server` was given: queries the tunnel forwards go there, not to the
    /// address they were sent to.
    pub dns_server: bool,
    /// Directory of the lock and state files.
    pub state_dir: PathBuf,
}

impl Default for SetupConfig {
    fn default() -> Self {
        SetupConfig {
            fwmark: DEFAULT_FWMARK,
            table: DEFAULT_TABLE,
            priority: DEFAULT_PRIORITY,
            exclude: Vec::new(),
            hijack_dns: false,
            dns_server: false,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
        }
    }
}

/// Setting up, checking or restoring routing failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// Another instance runs `--setup` in this network namespace.
    #[error(
        "another tun2socks{} already runs --setup in this network namespace, on device \
         {device} (lock {lock:?}); stop it first",
        Pid(*pid)
    )]
    Busy {
        /// The holder's device, as its lock file says.
        device: String,
        /// The holder's pid, if the lock file says.
        pid: Option<u32>,
        /// The lock file.
        lock: PathBuf,
    },
    /// The lock or state file could not be read or written.
    #[error("state file {path:?}: {error}")]
    StateFile {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        error: io::Error,
    },
    /// The kernel refused a route, rule or lookup.
    #[error(transparent)]
    Routing(#[from] RouteError),
    /// The proxy's host name did not resolve.
    #[error("cannot resolve proxy host {host}: {error}")]
    Resolve {
        /// The name.
        host: String,
        /// The resolver's error.
        error: io::Error,
    },
    /// The connection to the proxy would enter the TUN itself.
    #[error(
        "routing loop: the route to the proxy {proxy} leaves through {device}, the tunnel \
         itself{}; use --setup (policy routing with a mark), or --fwmark N with your own \
         rule that keeps marked packets off {device}, or --interface IF",
        Mark(*mark)
    )]
    Loop {
        /// The proxy address whose route enters the TUN.
        proxy: IpAddr,
        /// The TUN device.
        device: String,
        /// The mark the lookup used.
        mark: Option<u32>,
    },
}

impl SetupError {
    /// `true` when the OS refused for lack of privilege (`CAP_NET_ADMIN`, or write
    /// access to the state directory).
    pub fn permission_denied(&self) -> bool {
        match self {
            SetupError::Routing(error) => error.errno() == Some(nix::libc::EPERM),
            SetupError::StateFile { error, .. } => error.kind() == io::ErrorKind::PermissionDenied,
            _ => false,
        }
    }
}

struct Pid(Option<u32>);

impl std::fmt::Display for Pid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(pid) => write!(f, " (pid {pid})"),
            None => Ok(()),
        }
    }
}

struct Mark(Option<u32>);

impl std::fmt::Display for Mark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(mark) => write!(f, " even for packets with mark {mark:#x}"),
            None => f.write_str(" and its sockets carry no mark"),
        }
    }
}

/// The entries `--setup` makes for a TUN with index `ifindex`, per family, in the
/// order they are made: the table's default route first, the rule that diverts
/// traffic into it last (so it goes first when undone). `replies_from`: this host's
/// addresses whose packets keep the main table ([`replies_from`]).
pub fn plan(
    ifindex: u32,
    proxy: &[IpAddr],
    replies_from: &[IpAddr],
    config: &SetupConfig,
) -> Vec<(Family, Vec<RoutingEntry>)> {
    let direct_priority = config.priority.saturating_sub(10);
    let replies_priority = config.priority.saturating_sub(5);
    let dns_priority = config.priority.saturating_sub(4);
    let suppress_priority = config.priority.saturating_sub(1);
    let direct: Vec<IpNet> = ALWAYS_DIRECT
        .iter()
        .filter_map(|net| net.parse().ok())
        .chain(proxy.iter().map(|ip| IpNet::from(*ip)))
        .chain(config.exclude.iter().map(IpNet::trunc))
        .collect();
    [(Family::V4, "0.0.0.0/0"), (Family::V6, "::/0")]
        .into_iter()
        .filter_map(|(family, default)| Some((family, default.parse::<IpNet>().ok()?)))
        .map(|(family, default)| {
            let mut entries = vec![RoutingEntry::Route(Route {
                destination: default,
                ifindex,
                table: config.table,
            })];
            for net in direct.iter().filter(|net| Family::of(net) == family) {
                let mut rule = Rule::lookup(family, direct_priority, MAIN_TABLE);
                rule.destination = Some(*net);
                entries.push(RoutingEntry::Rule(rule));
            }
            for ip in replies_from {
                let source = IpNet::from(ip.to_canonical());
                if Family::of(&source) == family {
                    let mut rule = Rule::lookup(family, replies_priority, MAIN_TABLE);
                    rule.source = Some(source);
                    entries.push(RoutingEntry::Rule(rule));
                }
            }
            if config.hijack_dns {
                for protocol in [17, 6] {
                    let mut rule = Rule::lookup(family, dns_priority, config.table);
                    rule.ip_protocol = Some(protocol);
                    rule.destination_port = Some(crate::dns::DNS_PORT);
                    entries.push(RoutingEntry::Rule(rule));
                }
            }
            let mut suppress = Rule::lookup(family, suppress_priority, MAIN_TABLE);
            suppress.suppress_prefix_len = Some(0);
            entries.push(RoutingEntry::Rule(suppress));
            let mut tunnel = Rule::lookup(family, config.priority, config.table);
            tunnel.invert = true;
            tunnel.fwmark = Some(config.fwmark);
            entries.push(RoutingEntry::Rule(tunnel));
            (family, entries)
        })
        .collect()
}

/// The routing `--setup` made; undone, newest first, on drop. Holds the [`Lock`]
/// until then.
#[derive(Debug)]
pub struct Setup {
    guards: Vec<RouteGuard>,
    recorded: Vec<RoutingEntry>,
    lock: Lock,
}

impl Setup {
    /// Makes the entries of [`plan`], recording each in the state file before it is
    /// made. If IPv6 is unavailable (its default route is refused), IPv4 alone is set
    /// up and a warning logged. On error, what was made is undone.
    pub fn apply(
        lock: Lock,
        device: (u32, &str),
        proxy: &[IpAddr],
        config: &SetupConfig,
    ) -> Result<Setup, SetupError> {
        let (ifindex, name) = device;
        let routing = Routing::new()?;
        let mut setup = Setup {
            guards: Vec::new(),
            recorded: Vec::new(),
            lock,
        };
        let replies = match routing.local_addresses() {
            Ok(addresses) => replies_from(name, &addresses),
            Err(error) => {
                tracing::warn!(%error, "connections into this host may stall: their replies would enter the tunnel");
                Vec::new()
            }
        };
        for (family, entries) in plan(ifindex, proxy, &replies, config) {
            for (i, entry) in entries.into_iter().enumerate() {
                setup.recorded.push(entry);
                setup.lock.record(&setup.recorded)?;
                match routing.add(entry) {
                    Ok(guard) => {
                        if guard.undoes().is_none() {
                            setup.recorded.pop();
                            setup.lock.record(&setup.recorded)?;
                        }
                        setup.guards.push(guard);
                    }
                    // `ipproto`/`dport` rules need Linux 4.17.
                    Err(error) if dns_rule(&entry) && !permission(&error) => {
                        tracing::warn!(%error, "the kernel refused the DNS rule: DNS to resolvers on direct networks stays direct");
                        setup.recorded.pop();
                        setup.lock.record(&setup.recorded)?;
                    }
                    Err(error) if family == Family::V6 && i == 0 && !permission(&error) => {
                        tracing::warn!(%error, "IPv6 unavailable: setting up IPv4 only");
                        setup.recorded.pop();
                        setup.lock.record(&setup.recorded)?;
                        break;
                    }
                    Err(error) => return Err(error.into()),
                }
            }
        }
        tracing::info!(
            entries = setup.guards.len(),
            state = %setup.lock.state_path().display(),
            "routing set up"
        );
        Ok(setup)
    }
}

/// Of this host's `addresses` (by interface name), the ones whose packets keep the
/// main table: every address of an interface other than the TUN `device` and
/// loopback, except link-local ones (link-local destinations are direct anyway), in
/// a family the TUN has an address of (see the module docs).
pub fn replies_from(device: &str, addresses: &[(String, IpAddr)]) -> Vec<IpAddr> {
    let tun_has = |v4: bool| {
        addresses
            .iter()
            .any(|(name, ip)| name == device && ip.to_canonical().is_ipv4() == v4)
    };
    let (v4, v6) = (tun_has(true), tun_has(false));
    let mut out: Vec<IpAddr> = addresses
        .iter()
        .filter(|(name, _)| name != device)
        .map(|(_, ip)| ip.to_canonical())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified() && !ip.is_multicast())
        .filter(|ip| !crate::stack::classify::is_link_local(*ip))
        .filter(|ip| if ip.is_ipv4() { v4 } else { v6 })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// A rule of [`SetupConfig::hijack_dns`].
fn dns_rule(entry: &RoutingEntry) -> bool {
    matches!(entry, RoutingEntry::Rule(rule) if rule.destination_port.is_some())
}

/// Warns about each of the host's resolvers (`/etc/resolv.conf`, and
/// systemd-resolved's upstream list) that is reached past the tunnel: its queries
/// stay direct (without rule 7266), or (fake-ip without `--dns-server`) those the
/// tunnel forwards go through the proxy to an address it probably cannot reach.
fn warn_about_direct_resolvers(ifindex: u32, config: &SetupConfig) {
    if config.dns_server {
        return;
    }
    let Ok(routing) = Routing::new() else {
        return;
    };
    let mut servers: Vec<IpAddr> = ["/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .flat_map(|text| crate::exec::nameservers(&text).collect::<Vec<_>>())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .collect();
    servers.sort();
    servers.dedup();
    for server in servers {
        if let Ok(Some(out)) = routing.output_interface(server, None) {
            if out != ifindex && config.hijack_dns {
                tracing::warn!(
                    resolver = %server,
                    "this resolver is on a network routed around the tunnel: queries other than A/AAAA sent to it go through the proxy, which probably cannot reach it; give --dns-server IP"
                );
            } else if out != ifindex {
                tracing::warn!(
                    resolver = %server,
                    "DNS to this resolver goes directly, not through the proxy (its network is routed around the tunnel); --dns-server IP or --dns fake-ip would carry it"
                );
            }
        }
    }
}

fn permission(error: &RouteError) -> bool {
    error.errno() == Some(nix::libc::EPERM)
}

impl Drop for Setup {
    fn drop(&mut self) {
        let mut failed = Vec::new();
        while let Some(guard) = self.guards.pop() {
            let entry = guard.undoes();
            if let Err(error) = guard.restore() {
                tracing::warn!(%error, "could not restore routing; the next start retries");
                failed.extend(entry);
            }
        }
        failed.reverse();
        let result = if failed.is_empty() {
            self.lock.remove_state()
        } else {
            self.lock.record(&failed)
        };
        match result {
            Ok(()) => tracing::info!("routing restored"),
            Err(error) => tracing::warn!(%error, "could not update the state file"),
        }
    }
}

/// Takes the `--setup` lock of this network namespace (for `device`) and deletes
/// what a crashed run left; the first step of `--setup`, before the device is
/// opened.
pub fn begin(device: &str, config: &SetupConfig) -> Result<Lock, SetupError> {
    let lock = Lock::acquire(&config.state_dir, device)?;
    let removed = lock.clean_leftovers()?;
    if !removed.is_empty() {
        tracing::info!(
            count = removed.len(),
            "cleaned up after an earlier run that did not exit"
        );
    }
    Ok(lock)
}

/// Sets up routing (with `--setup`) and runs the loop check (always) for a tunnel on
/// `device` whose proxy is reached through `upstream`. The proxy's addresses are the
/// ones `upstream` resolved at start ([`Upstream::resolve`]); a name that did not
/// resolve yet gets no direct rule and no loop check (the flow-level guard in the
/// stack still resets connections to the proxy's own address).
pub fn start(
    device: &Device,
    upstream: &Upstream,
    setup: Option<(Lock, &SetupConfig)>,
) -> Result<Option<Setup>, SetupError> {
    let mut addresses: Vec<IpAddr> = upstream
        .proxy_addrs()
        .iter()
        .map(|a| a.ip().to_canonical())
        .collect();
    addresses.sort();
    addresses.dedup();
    if addresses.is_empty() {
        tracing::warn!("the proxy is not resolved yet: no loop check and no direct rule for it");
    }
    let setup = match setup {
        Some((lock, config)) => {
            let setup = Setup::apply(lock, (device.ifindex(), device.name()), &addresses, config)?;
            warn_about_direct_resolvers(device.ifindex(), config);
            Some(setup)
        }
        None => None,
    };
    check_loop(
        device.ifindex(),
        device.name(),
        &addresses,
        upstream.options(),
    )?;
    Ok(setup)
}

/// The loop check (every mode): fails with [`SetupError::Loop`] if a connection to
/// one of the proxy's addresses, carrying `options.fwmark`, would leave through the
/// TUN `device` (index `ifindex`), unless `options.interface` binds it elsewhere.
pub fn check_loop(
    ifindex: u32,
    device: &str,
    proxy: &[IpAddr],
    options: &DialOptions,
) -> Result<(), SetupError> {
    let looped = |proxy: IpAddr| SetupError::Loop {
        proxy,
        device: device.to_owned(),
        mark: options.fwmark,
    };
    match options.interface.as_deref() {
        Some(interface) if interface == device => {
            return proxy.first().map_or(Ok(()), |ip| Err(looped(*ip)));
        }
        Some(interface) => {
            // Bound to an interface, the proxy's sockets cannot enter the TUN. One
            // that does not exist (yet: a link that comes up later) fails every
            // connection with "No such device", which does not name it.
            if let Err(error) = tun2socks_platform::if_index(interface) {
                tracing::warn!(
                    interface,
                    %error,
                    "--interface names no interface of this network namespace (yet): every connection to the proxy fails until it exists"
                );
            }
            return Ok(());
        }
        None => {}
    }
    let routing = Routing::new()?;
    for ip in proxy {
        let out = routing.output_interface(*ip, options.fwmark)?;
        tracing::debug!(proxy = %ip, ?out, mark = ?options.fwmark, "route to the proxy");
        if out == Some(ifindex) {
            return Err(looped(*ip));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
