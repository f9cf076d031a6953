//! What a run measures and on which paths, from `T2S_BENCH_*` environment variables.

use std::path::PathBuf;

use tun2socks::testbed::bench::env_or;

/// A group of rows, as `T2S_BENCH_ONLY` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Group {
    /// Resident memory idle and with held flows (measured first, on fresh processes).
    Rss,
    /// iperf3, 1 and 8 streams, each way.
    Tcp,
    /// CPU seconds per GB during the TCP rows (runs them if `tcp` is not selected).
    Cpu,
    /// Request/response round trips on one connection.
    Rr,
    /// UDP echo latency and a fixed-rate run.
    Udp,
    /// DNS queries per second.
    Dns,
    /// Connections per second: last, because tens of thousands of connections leave
    /// TIME_WAIT sockets behind (and wedge some peers) for a minute.
    Conn,
}

impl Group {
    /// Every group, in the order a run measures them.
    pub const ALL: [Group; 7] = [
        Group::Rss,
        Group::Tcp,
        Group::Cpu,
        Group::Rr,
        Group::Udp,
        Group::Dns,
        Group::Conn,
    ];

    /// The group's name in `T2S_BENCH_ONLY` and in the JSON.
    pub fn name(self) -> &'static str {
        match self {
            Group::Rss => "rss",
            Group::Tcp => "tcp",
            Group::Cpu => "cpu",
            Group::Rr => "rr",
            Group::Conn => "conn",
            Group::Udp => "udp",
            Group::Dns => "dns",
        }
    }

    fn parse(name: &str) -> Option<Group> {
        Group::ALL.into_iter().find(|g| g.name() == name)
    }
}

/// One way from the app to the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathKind {
    /// The proxy namespace forwards (no SOCKS at all): the baseline.
    Kernel,
    /// tun2socks attached to a hand-made TUN device (`ip tuntap add`) at the run's MTU.
    Attached,
    /// tun2socks on a device it creates itself (its default MTU unless set).
    Created,
    /// hev-socks5-tunnel (binary given) on a hand-made device at the run's MTU.
    Hev(PathBuf),
    /// tun2proxy (binary given) on a hand-made device at the run's MTU.
    Tun2proxy(PathBuf),
}

impl PathKind {
    /// The path's key in `T2S_BENCH_PATHS` and in the JSON.
    pub fn key(&self) -> &'static str {
        match self {
            PathKind::Kernel => "kernel",
            PathKind::Attached => "attached",
            PathKind::Created => "created",
            PathKind::Hev(_) => "hev",
            PathKind::Tun2proxy(_) => "tun2proxy",
        }
    }

    /// The column heading.
    pub fn label(&self, s: &Settings) -> String {
        match self {
            PathKind::Kernel => "kernel".into(),
            PathKind::Attached => format!("tun2socks MTU {}", s.mtu),
            PathKind::Created => match s.created_mtu {
                Some(mtu) => format!("tun2socks own dev {mtu}"),
                None => "tun2socks own dev".into(),
            },
            PathKind::Hev(_) => format!("hev MTU {}", s.mtu),
            PathKind::Tun2proxy(_) => format!("tun2proxy MTU {}", s.mtu),
        }
    }
}

/// Everything a run needs to know.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The tunnel binary measured (`T2S_BENCH_BINARY`, else cargo's build).
    pub binary: PathBuf,
    /// The SOCKS server's binary (`T2S_BENCH_SERVER_BINARY`, else cargo's build).
    pub server_binary: PathBuf,
    /// Extra tunnel arguments (`T2S_BENCH_TUNNEL_ARGS`, split at spaces).
    pub tunnel_args: Vec<String>,
    /// Seconds per TCP, conn and DNS measurement (`T2S_BENCH_SECS`, default 5).
    pub secs: u64,
    /// Rounds per row, the median kept (`T2S_BENCH_ROUNDS`, default 3); RSS runs once.
    pub rounds: usize,
    /// The groups measured (`T2S_BENCH_ONLY`, default all).
    pub groups: Vec<Group>,
    /// The paths measured (`T2S_BENCH_PATHS`, default kernel,attached,created; peers
    /// whose binary is given are added).
    pub paths: Vec<PathKind>,
    /// The hand-made device's MTU (`T2S_BENCH_MTU`, default 1500).
    pub mtu: u32,
    /// Whether the hand-made device of tun2socks and hev has several queues
    /// (`T2S_BENCH_MULTI_QUEUE=1`; tun2proxy's stays single-queue: it cannot open one).
    pub multi_queue: bool,
    /// `--mtu` for the device tun2socks creates (`T2S_BENCH_CREATED_MTU`; unset:
    /// the tunnel's default, 65000).
    pub created_mtu: Option<u32>,
    /// Flows held open for the RSS row (`T2S_BENCH_FLOWS`, default 2000).
    pub held_flows: usize,
    /// Round trips per rr measurement (`T2S_BENCH_RR`, default 10000).
    pub rr_round_trips: usize,
    /// Workers of the connection-rate client (`T2S_BENCH_CONN_WORKERS`, default 32).
    pub conn_workers: usize,
    /// UDP latency probes (`T2S_BENCH_UDP_PROBES`, default 2000).
    pub udp_probes: usize,
    /// Datagrams/s offered in the UDP rate row (`T2S_BENCH_UDP_RATE`, default 100000).
    pub udp_rate: u64,
    /// Seconds of the UDP rate row (`T2S_BENCH_UDP_SECS`, default 10).
    pub udp_secs: u64,
    /// Where the JSON goes besides stdout (`T2S_BENCH_JSON`).
    pub json_path: Option<PathBuf>,
}

impl Settings {
    /// The settings from the environment; `built` is cargo's build of tun2socks. Fails
    /// on an unknown group or path name.
    pub fn from_env(built: PathBuf) -> Result<Settings, String> {
        let path_var = |name: &str| std::env::var_os(name).map(PathBuf::from);
        let groups = match std::env::var("T2S_BENCH_ONLY") {
            Ok(list) if !list.trim().is_empty() => parse_groups(&list)?,
            _ => Group::ALL.to_vec(),
        };
        let mut paths = match std::env::var("T2S_BENCH_PATHS") {
            Ok(list) if !list.trim().is_empty() => parse_paths(&list)?,
            _ => vec![PathKind::Kernel, PathKind::Attached, PathKind::Created],
        };
        if let Some(hev) = path_var("T2S_BENCH_PEER_HEV") {
            paths.push(PathKind::Hev(hev));
        }
        if let Some(t2p) = path_var("T2S_BENCH_PEER_TUN2PROXY") {
            paths.push(PathKind::Tun2proxy(t2p));
        }
        Ok(Settings {
            binary: path_var("T2S_BENCH_BINARY").unwrap_or_else(|| built.clone()),
            server_binary: path_var("T2S_BENCH_SERVER_BINARY").unwrap_or(built),
            tunnel_args: std::env::var("T2S_BENCH_TUNNEL_ARGS")
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            secs: env_or("T2S_BENCH_SECS", 5u64).max(1),
            rounds: env_or("T2S_BENCH_ROUNDS", 3usize).max(1),
            groups,
            paths,
            mtu: env_or("T2S_BENCH_MTU", 1500),
            multi_queue: env_or("T2S_BENCH_MULTI_QUEUE", 0u8) == 1,
            created_mtu: std::env::var("T2S_BENCH_CREATED_MTU")
                .ok()
                .and_then(|v| v.trim().parse().ok()),
            held_flows: env_or("T2S_BENCH_FLOWS", 2000),
            rr_round_trips: env_or("T2S_BENCH_RR", 10_000usize).max(1),
            conn_workers: env_or("T2S_BENCH_CONN_WORKERS", 32usize).max(1),
            udp_probes: env_or("T2S_BENCH_UDP_PROBES", 2000usize).max(1),
            udp_rate: env_or("T2S_BENCH_UDP_RATE", 100_000u64).max(1),
            udp_secs: env_or("T2S_BENCH_UDP_SECS", 10u64).max(1),
            json_path: path_var("T2S_BENCH_JSON"),
        })
    }

    /// Whether `group` is measured.
    pub fn wants(&self, group: Group) -> bool {
        self.groups.contains(&group)
    }
}

/// `tcp,rr,...` into groups, in measuring order.
pub fn parse_groups(list: &str) -> Result<Vec<Group>, String> {
    let mut groups = Vec::new();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let group = Group::parse(name).ok_or_else(|| {
            format!("T2S_BENCH_ONLY: unknown group {name:?} (tcp,rr,conn,udp,dns,rss,cpu)")
        })?;
        if !groups.contains(&group) {
            groups.push(group);
        }
    }
    groups.sort();
    Ok(groups)
}

/// `kernel,attached,created` into paths (peers come from their own variables).
pub fn parse_paths(list: &str) -> Result<Vec<PathKind>, String> {
    let mut paths = Vec::new();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let path = match name {
            "kernel" => PathKind::Kernel,
            "attached" => PathKind::Attached,
            "created" => PathKind::Created,
            other => {
                return Err(format!(
                    "T2S_BENCH_PATHS: unknown path {other:?} (kernel,attached,created; \
                     peers: T2S_BENCH_PEER_HEV, T2S_BENCH_PEER_TUN2PROXY)"
                ));
            }
        };
        if !paths.contains(&path) {
            paths.push(path);
        }
    }
    Ok(paths)
}
