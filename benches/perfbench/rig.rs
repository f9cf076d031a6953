//! One path set up and running: its own topology (app | proxy | target), the target's
//! services (iperf3, the load echo server, UDP echo, dnsmasq), and for every path but
//! the kernel's our SOCKS server in the proxy namespace and a tunnel in the app
//! namespace. Everything stops and the namespaces go when the rig is dropped.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use tun2socks::testbed::attach::{
    create_tun, create_tun_with, route_when_attached, start_tunnel_attached,
};
use tun2socks::testbed::bench::start_iperf_server;
use tun2socks::testbed::dnsmasq::Dnsmasq;
use tun2socks::testbed::load::{EchoServer, LOAD_ECHO_PORT, prepare_client};
use tun2socks::testbed::tunnel::{PROXY_PORT, proxy_addr, start_server, start_tunnel};
use tun2socks::testbed::udp::UdpServices;
use tun2socks::testbed::{PROXY_V4, Process, TARGET_V4, TARGET_V6, Topology, unique_name};

use super::settings::{PathKind, Settings};

/// The hand-made device's name in the app namespace.
pub const HAND_TUN: &str = "tunb";
/// tun2proxy's `--max-sessions` at least: it counts closed sessions for a while, and
/// its default (200) or a few thousand stop it after the held flows and a conn/s round.
pub const TUN2PROXY_SESSIONS: usize = 65_536;
/// Names dnsmasq knows, queried round robin.
pub const DNS_NAMES: usize = 64;

/// The name of DNS record `i`.
pub fn dns_name(i: usize) -> String {
    format!("host{i}.t2s.test")
}

/// A path, ready to measure.
#[derive(Debug)]
pub struct Rig {
    /// Which path.
    pub kind: PathKind,
    // Fields drop in order: the target's services, the tunnel, the server, then the
    // namespaces.
    _iperf: Process,
    _echo: EchoServer,
    _udp: UdpServices,
    _dns: Dnsmasq,
    /// The tunnel (none on the kernel path).
    pub tunnel: Option<Process>,
    /// Our SOCKS server (none on the kernel path).
    pub server: Option<Process>,
    /// A peer's config directory, removed on drop.
    config_dir: Option<PathBuf>,
    /// The three namespaces (dropped last).
    pub topo: Topology,
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(dir) = &self.config_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Rig {
    /// Builds the topology and starts everything `kind` needs.
    pub fn start(kind: &PathKind, s: &Settings) -> io::Result<Rig> {
        let topo = Topology::create(&format!("perf{}", kind.key()))?;
        // The app opens thousands of short connections (conn/s), and so does the SOCKS
        // server toward the target: each side that closes first keeps a TIME_WAIT
        // socket, and without port reuse the server's connects slow down to a crawl
        // after ~15,000 connections (the ephemeral range fills).
        prepare_client(topo.app())?;
        prepare_client(topo.proxy())?;
        let iperf = start_iperf_server(topo.target(), IpAddr::V4(TARGET_V4))?;
        let echo = EchoServer::start_in(topo.target())?;
        let udp = UdpServices::start(topo.target())?;
        let names: Vec<String> = (0..DNS_NAMES).map(dns_name).collect();
        let records: Vec<(&str, _, _)> = names
            .iter()
            .map(|n| (n.as_str(), TARGET_V4, TARGET_V6))
            .collect();
        let dns = Dnsmasq::start_with(topo.target(), &records, false)?;
        let mut config_dir = None;
        let (server, tunnel) = if *kind == PathKind::Kernel {
            topo.enable_kernel_path()?;
            (None, None)
        } else {
            let max = (s.held_flows * 2 + 4000).to_string();
            let server = start_server(
                topo.proxy(),
                &s.server_binary,
                &["--log-level", "warn", "--max-connections", &max],
            )?;
            let tunnel = match start_path_tunnel(kind, &topo, s, &mut config_dir) {
                Ok(tunnel) => tunnel,
                Err(e) => {
                    if let Some(dir) = &config_dir {
                        let _ = std::fs::remove_dir_all(dir);
                    }
                    return Err(e);
                }
            };
            (Some(server), Some(tunnel))
        };
        Ok(Rig {
            kind: kind.clone(),
            _iperf: iperf,
            _echo: echo,
            _udp: udp,
            _dns: dns,
            tunnel,
            server,
            config_dir,
            topo,
        })
    }

    /// The tunnel's and the server's process IDs (for CPU time).
    pub fn pids(&self) -> (Option<u32>, Option<u32>) {
        (
            self.tunnel.as_ref().map(Process::id),
            self.server.as_ref().map(Process::id),
        )
    }

    /// The load echo server in the target (rr, conn, held flows).
    pub fn echo_target(&self) -> SocketAddr {
        SocketAddr::from((TARGET_V4, LOAD_ECHO_PORT))
    }
}

/// Starts the tunnel of `kind` (not the kernel path) and routes the app into it.
fn start_path_tunnel(
    kind: &PathKind,
    topo: &Topology,
    s: &Settings,
    config_dir: &mut Option<PathBuf>,
) -> io::Result<Process> {
    let url = format!("socks5://{}", proxy_addr());
    let mut ours: Vec<&str> = vec!["--log-level", "warn"];
    ours.extend(s.tunnel_args.iter().map(String::as_str));
    let app = topo.app();
    if let PathKind::Hev(peer) | PathKind::Tun2proxy(peer) = kind {
        if !peer.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("peer binary {} not found", peer.display()),
            ));
        }
    }
    match kind {
        PathKind::Kernel => Err(io::Error::other("the kernel path has no tunnel")),
        PathKind::Attached => {
            create_tun_with(app, HAND_TUN, s.mtu, s.multi_queue)?;
            start_tunnel_attached(app, &s.binary, &url, HAND_TUN, &ours)
        }
        PathKind::Created => {
            let mtu = s.created_mtu.map(|m| m.to_string());
            if let Some(mtu) = &mtu {
                ours.extend(["--mtu", mtu.as_str()]);
            }
            start_tunnel(app, &s.binary, &url, &ours)
        }
        PathKind::Hev(binary) => {
            create_tun_with(app, HAND_TUN, s.mtu, s.multi_queue)?;
            let dir = std::env::temp_dir().join(unique_name("perfhev"));
            std::fs::create_dir_all(&dir)?;
            *config_dir = Some(dir.clone());
            let config = dir.join("hev.yml");
            let yaml = hev_config(HAND_TUN, s.mtu, s.multi_queue, PROXY_V4, PROXY_PORT);
            std::fs::write(&config, yaml)?;
            let mut command = app.command(binary);
            command.arg(&config);
            route_when_attached(app, app.spawn(command)?, HAND_TUN)
        }
        PathKind::Tun2proxy(binary) => {
            create_tun(app, HAND_TUN, s.mtu)?;
            let mut command = app.command(binary);
            command.args(tun2proxy_args(
                HAND_TUN,
                &url,
                s.mtu,
                (s.held_flows * 2 + 1000).max(TUN2PROXY_SESSIONS),
            ));
            route_when_attached(app, app.spawn(command)?, HAND_TUN)
        }
    }
}

/// hev-socks5-tunnel's YAML config (its README's format): the hand-made device by
/// name, MTU and queue mode, the addresses [`create_tun`] gave the device, SOCKS5 with
/// UDP over UDP ASSOCIATE.
pub fn hev_config(device: &str, mtu: u32, multi_queue: bool, proxy: Ipv4Addr, port: u16) -> String {
    format!(
        "tunnel:\n  name: {device}\n  mtu: {mtu}\n  multi-queue: {multi_queue}\n  ipv4: 198.18.0.1\n  \
         ipv6: 'fd18::1'\nsocks5:\n  port: {port}\n  address: {proxy}\n  udp: 'udp'\n\
         misc:\n  log-level: warn\n"
    )
}

/// tun2proxy 0.8's arguments: the existing device by name and its MTU, the proxy URL,
/// DNS as plain UDP through the proxy (`--dns direct`), an MSS of MTU - 40 in its
/// SYN-ACKs (its help advises it: without it the kernel falls back to 536), room for
/// `sessions` flows (its default, 200, would cut the held-flows row), warnings only.
pub fn tun2proxy_args(device: &str, url: &str, mtu: u32, sessions: usize) -> Vec<String> {
    let mut args: Vec<String> = ["--tun", device, "--proxy", url, "--dns", "direct"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    args.extend([
        "--mtu".to_owned(),
        mtu.to_string(),
        "--tcp-mss".to_owned(),
        mtu.saturating_sub(40).to_string(),
        "--max-sessions".to_owned(),
        sessions.to_string(),
        "--verbosity".to_owned(),
        "warn".to_owned(),
    ]);
    args
}
