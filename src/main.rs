//! The `tun2socks` binary: command line -> plain config; tracing; signals -> shutdown;
//! errors -> exit codes. The library never sees clap.
//!
//! Exit codes: 0 success; 1 runtime failure; 2 invalid arguments (bad URL, bad CIDR,
//! open-proxy refusal); 3 no permission (CAP_NET_ADMIN); 4 device busy (another
//! process has the TUN open, or another instance runs `--setup` in this network
//! namespace); 5 routing loop (the route to the proxy enters the TUN and neither a
//! mark nor `--interface` keeps it off). `exec` returns the program's status
//! (128 + signal if killed), or 125 if it failed itself.

use std::ffi::OsString;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;
use tun2socks::config::{OffloadMode, ProxyUrl, ProxyUrlError};
use tun2socks::device::{Device, DeviceConfig, DeviceError};
use tun2socks::dns::{DnsConfig, DnsMode};
use tun2socks::exec::{self, ExecConfig};
use tun2socks::flow::udp::UdpConfig;
use tun2socks::metrics::{self, Metrics, Observers};
use tun2socks::server::{self, ServerConfig};
use tun2socks::setup::{self, SetupConfig, SetupError};
use tun2socks::socks::Protocol;
use tun2socks::socks::{Credentials, ServerPolicy, Users};
use tun2socks::stack::queues::{Queue, QueueRuntime, StopFlag};
use tun2socks::stack::{self, StackConfig};
use tun2socks::upstream::{DialOptions, Upstream};
use tun2socks_platform::{Tun, TunError};

/// Exit code for invalid arguments or configuration.
const EXIT_USAGE: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "tun2socks",
    version,
    about = "System-wide SOCKS proxifier: a TUN device whose TCP and UDP flows go through a SOCKS proxy",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    tunnel: TunnelArgs,

    /// Log level (error, warn, info, debug, trace) or a tracing filter; overrides RUST_LOG.
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the reference SOCKS4/4a/5 server.
    Server(ServerArgs),
    /// Run PROGRAM in a private network namespace whose only route is the tunnel
    /// (as root, or as an ordinary user where user namespaces are allowed).
    Exec(ExecArgs),
    /// Build test namespaces, run server and tunnel, drive TCP through every protocol
    /// variant, print a table; exit 0 only if every check passes (needs root).
    Selftest,
}

#[derive(Debug, Args)]
struct TunnelArgs {
    /// Upstream proxy: socks5://[user:pass@]host:port, socks4://[userid@]host:port or socks4a://...
    #[arg(long, value_name = "URL", required = true)]
    proxy: Option<String>,
    /// TUN device to create, or to attach to if a TUN device of that name exists.
    #[arg(long, value_name = "NAME", default_value = "tun0")]
    device: String,
    /// Address of the device (repeatable) [default for a device we create:
    /// 198.18.0.1/16 and fd18::1/64; an attached device gets none]
    #[arg(long, value_name = "CIDR")]
    address: Vec<IpNet>,
    /// MTU [default for a device we create: 9000; an attached device keeps its own]
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u16).range(576..))]
    mtu: Option<u16>,
    /// TUN offload: auto asks the kernel for checksum and segmentation offload
    /// (IFF_VNET_HDR, TUNSETOFFLOAD: 64 KiB TCP segments each way) and falls back to
    /// plain packets, logged, if it refuses; off never asks.
    #[arg(long, value_name = "auto|off", default_value = "auto", value_parser = parse_offload)]
    offload: OffloadMode,
    /// Send to the proxy through this interface only (SO_BINDTODEVICE).
    #[arg(long, value_name = "IFNAME")]
    interface: Option<String>,
    /// Mark sockets to the proxy (SO_MARK), for policy routing around the TUN
    /// [default with --setup: 0x2d7 (727)].
    #[arg(long, value_name = "N", value_parser = parse_u32)]
    fwmark: Option<u32>,
    /// Make the TUN the default gateway (v4 and v6: table 727, rules 7260-7270), keep
    /// the proxy's traffic off it with the fwmark, undo it all on exit.
    #[arg(long)]
    setup: bool,
    /// With --setup: keep this network off the tunnel (repeatable).
    #[arg(long, value_name = "CIDR", value_parser = parse_net, requires = "setup")]
    exclude: Vec<IpNet>,
    /// Largest receive and send buffer of each TCP flow, in KiB. A flow's buffers start
    /// at --tcp-buffer-initial once its proxy connection is up (none before), double
    /// while they limit the flow, and shrink back after 5 s idle.
    #[arg(long, value_name = "KIB", default_value_t = 512, value_parser = clap::value_parser!(u32).range(4..=65536))]
    tcp_buffer: u32,
    /// Buffers of a newly connected TCP flow, in KiB (equal to --tcp-buffer: fixed
    /// buffers that never grow or shrink).
    #[arg(long, value_name = "KIB", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=65536))]
    tcp_buffer_initial: u32,
    /// Memory for all TCP buffers, in MiB. When it is spent, buffers stop growing (the
    /// flows get smaller windows); no connection is refused or reset for it.
    #[arg(long, value_name = "MIB", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    memory_limit: u64,
    /// TCP connections at once; further SYNs are reset [default: from the open-files
    /// limit (raised to its hard limit at start): 256 kept in reserve, three quarters of
    /// the rest (14,808 of 20,000), the last quarter for UDP associations (two each)]
    #[arg(long, value_name = "N")]
    max_flows: Option<usize>,
    /// Seconds to wait for the proxy to accept and answer.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    connect_timeout: u64,
    /// Microseconds the packet loop keeps polling after traffic before it sleeps, while
    /// traffic comes at least that often (request/response latency for CPU; an idle
    /// tunnel never polls); 0 turns it off.
    #[arg(long, value_name = "MICROS", default_value_t = 200, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    busy_poll: u64,
    /// Send the SOCKS5 greeting, login and request in one write, saving a round trip
    /// per connection. Only for servers that read a pipelined handshake (ours and
    /// Dante do; microsocks drops the request and the connection times out).
    #[arg(long)]
    socks_pipeline: bool,
    /// Seconds without traffic after which a UDP association is closed (associations
    /// that only carried DNS: 10 s or this, whichever is shorter).
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    udp_timeout: u64,
    /// DNS mode for queries to port 53 entering the TUN (any destination address):
    /// udp (through the UDP association), tcp (DNS over TCP through SOCKS CONNECT; works
    /// with every proxy) or fake-ip (A/AAAA answered locally; flows go to the proxy by
    /// name).
    #[arg(long, value_name = "MODE", default_value = "udp")]
    dns: DnsMode,
    /// Send every DNS query to this resolver (port 53) instead of the address it was
    /// sent to; answers still come from the queried address.
    #[arg(long, value_name = "IP")]
    dns_server: Option<IpAddr>,
    /// Fake-IP pool, repeatable (v4 and/or v6) [default: 198.18.128.0/17 and
    /// fd18::8000:0:0:0/65]
    #[arg(long, value_name = "CIDR")]
    fake_ip_pool: Vec<IpNet>,
    /// UDP associations at once (one per application socket); datagrams from further
    /// sockets are dropped and the limit is logged.
    #[arg(long, value_name = "N", default_value_t = 8192, value_parser = clap::value_parser!(u64).range(1..))]
    max_udp: u64,
    /// Seconds without a byte either way after which a TCP flow is reset on both
    /// sides (default: 2 h 4 min, RFC 5382's minimum for NATs); 0: never.
    #[arg(long, value_name = "SECS", default_value_t = 7440, value_parser = clap::value_parser!(u64).range(..=MAX_IDLE_SECS))]
    tcp_idle_timeout: u64,
    /// Seconds of silence before TCP keep-alive probes, to the application and to the
    /// proxy; a peer that answers none for about twice as long is reset; 0: off.
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(..=MAX_KEEPALIVE_SECS))]
    tcp_keepalive: u64,
    /// Log a summary line of the counters every SECS seconds (0: never).
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    stats_interval: u64,
    /// Serve the counters in the Prometheus text format at http://ADDR/metrics, e.g.
    /// 127.0.0.1:9727 (a non-loopback address is allowed, with a warning).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Packet threads: the TUN is opened multi-queue and each queue gets a thread with
    /// its own stack (a TCP flow stays on the thread whose queue saw its SYN); 1: one
    /// thread for everything. A device made without multi_queue gets one
    /// [default: the number of cores]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=tun2socks::config::MAX_THREADS as i64))]
    threads: Option<u16>,
}

impl TunnelArgs {
    /// `--threads`, or its default.
    fn threads(&self) -> usize {
        self.threads
            .map_or_else(tun2socks::config::default_threads, usize::from)
    }
}

/// The longest `--tcp-keepalive`: Linux's limit for `TCP_KEEPIDLE` (32767 s).
const MAX_KEEPALIVE_SECS: u64 = 32_767;
/// The longest idle limit: 30 days.
const MAX_IDLE_SECS: u64 = 30 * 24 * 3600;

/// Seconds, 0 meaning "off".
fn secs_or_off(secs: u64) -> Option<Duration> {
    (secs > 0).then(|| Duration::from_secs(secs))
}

/// `--stats-interval` and `--metrics`, the listener already bound.
#[derive(Debug)]
struct Observe {
    interval: Duration,
    listener: Option<std::net::TcpListener>,
}

impl TunnelArgs {
    /// Binds the metrics address now, so that a bad one stops the start (exit 2).
    fn observe(&self) -> Result<Observe, String> {
        let listener = self.metrics.map(metrics::http::bind).transpose();
        Ok(Observe {
            interval: Duration::from_secs(self.stats_interval),
            listener: listener.map_err(|e| e.to_string())?,
        })
    }
}

#[derive(Debug, Args)]
struct ExecArgs {
    #[command(flatten)]
    tunnel: TunnelArgs,
    /// The program and its arguments, best after `--`.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "PROGRAM"
    )]
    command: Vec<OsString>,
}

#[derive(Debug, Args)]
struct ServerArgs {
    /// Address to listen on (repeatable).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:1080")]
    listen: Vec<SocketAddr>,
    /// Require RFC 1929 login with this account (repeatable); SOCKS4 is then refused.
    #[arg(long, value_name = "NAME:PASS")]
    user: Vec<String>,
    /// Only serve clients from this network (repeatable).
    #[arg(long, value_name = "CIDR", value_parser = parse_net)]
    allow: Vec<IpNet>,
    /// Refuse destinations in this network with reply 0x02 (repeatable).
    #[arg(long, value_name = "CIDR", value_parser = parse_net)]
    deny: Vec<IpNet>,
    /// Refuse destinations on this host or its local networks (loopback, link-local,
    /// private and shared ranges) with 0x02, checked on the resolved address.
    #[arg(long)]
    deny_private: bool,
    /// Address to listen on and announce for BIND (default: the interface towards the peer).
    #[arg(long, value_name = "IP")]
    bind_external: Option<IpAddr>,
    /// Refuse UDP ASSOCIATE (reply 0x07).
    #[arg(long)]
    no_udp: bool,
    /// Refuse BIND (reply 0x07).
    #[arg(long)]
    no_bind: bool,
    /// Seconds a client has to complete its handshake.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    handshake_timeout: u64,
    /// Seconds to wait for a destination to accept a connection.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    connect_timeout: u64,
    /// Seconds a BIND waits for the peer.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    bind_timeout: u64,
    /// Seconds without traffic after which a UDP association is closed.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    udp_timeout: u64,
    /// Sessions served at once; clients beyond are closed immediately.
    #[arg(long, value_name = "N", default_value_t = 4096)]
    max_connections: usize,
    /// Seconds without a byte either way after which a CONNECT relay is reset
    /// on both sides (default: 2 h 4 min); 0: never.
    #[arg(long, value_name = "SECS", default_value_t = 7440, value_parser = clap::value_parser!(u64).range(..=MAX_IDLE_SECS))]
    idle_timeout: u64,
    /// Seconds of silence before TCP keep-alive probes on the client's and the
    /// destination's sockets; 0: off.
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(..=MAX_KEEPALIVE_SECS))]
    tcp_keepalive: u64,
}

/// A CIDR, or a bare address meaning a single host.
fn parse_net(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is not a CIDR (like 10.0.0.0/8) or an IP address"))
}

/// A number, decimal or `0x` hexadecimal.
fn parse_offload(s: &str) -> Result<OffloadMode, String> {
    s.parse()
}

fn parse_u32(s: &str) -> Result<u32, String> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|_| format!("{s:?} is not a 32-bit number (decimal or 0x hexadecimal)"))
}

fn parse_user(s: &str) -> Result<Credentials, String> {
    let (name, pass) = s
        .split_once(':')
        .ok_or_else(|| format!("--user {s:?}: expected NAME:PASS"))?;
    Credentials::new(name, pass).map_err(|e| format!("--user {name:?}: {e}"))
}

impl ServerArgs {
    fn config(&self) -> Result<ServerConfig, String> {
        let users = self
            .user
            .iter()
            .map(|u| parse_user(u))
            .collect::<Result<Vec<_>, _>>()?;
        let config = ServerConfig {
            policy: ServerPolicy {
                users: Arc::new(Users::new(users)),
                bind: !self.no_bind,
                udp_associate: !self.no_udp,
            },
            allow: self.allow.clone(),
            deny: self.deny.clone(),
            deny_private: self.deny_private,
            bind_external: self.bind_external,
            handshake_timeout: Duration::from_secs(self.handshake_timeout),
            connect_timeout: Duration::from_secs(self.connect_timeout),
            bind_timeout: Duration::from_secs(self.bind_timeout),
            udp_idle_timeout: Duration::from_secs(self.udp_timeout),
            max_connections: self.max_connections,
            idle_timeout: secs_or_off(self.idle_timeout),
            keepalive: secs_or_off(self.tcp_keepalive),
        };
        config.validate(&self.listen).map_err(|e| e.to_string())?;
        Ok(config)
    }
}

fn init_tracing(level: Option<&str>, default: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(level) => EnvFilter::try_new(level),
        None => EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new(default)),
    }
    .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        tracing::warn!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => tracing::info!("SIGINT"),
        _ = term.recv() => tracing::info!("SIGTERM"),
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

fn run_server(args: &ServerArgs) -> ExitCode {
    let config = match args.config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("tun2socks server: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let result = runtime().and_then(|rt| {
        rt.block_on(async {
            let mut listeners = Vec::new();
            for addr in &args.listen {
                let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                    std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"))
                })?;
                listeners.push(listener);
            }
            server::run(listeners, config, shutdown_signal()).await
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tun2socks server: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Exit code when opening the TUN needs privileges we lack.
const EXIT_NO_PERMISSION: u8 = 3;
/// Exit code when the TUN device is held by another process.
const EXIT_BUSY: u8 = 4;
/// Exit code when the connection to the proxy would loop through the TUN.
const EXIT_LOOP: u8 = 5;

impl TunnelArgs {
    fn configs(&self) -> Result<(DeviceConfig, StackConfig, Upstream), String> {
        let proxy = self.proxy.as_deref().ok_or("--proxy URL is required")?;
        let proxy: ProxyUrl = proxy.parse().map_err(|e: ProxyUrlError| e.to_string())?;
        let device = DeviceConfig {
            name: Some(self.device.clone()),
            addresses: (!self.address.is_empty()).then(|| self.address.clone()),
            mtu: self.mtu,
            txqueuelen: None,
            offload: self.offload,
        };
        let buffer = usize::try_from(self.tcp_buffer).unwrap_or(512) * 1024;
        let initial = usize::try_from(self.tcp_buffer_initial)
            .unwrap_or(4)
            .saturating_mul(1024)
            .min(buffer);
        let memory_limit = usize::try_from(self.memory_limit)
            .unwrap_or(usize::MAX)
            .saturating_mul(1024 * 1024);
        let max_flows = self
            .max_flows
            .unwrap_or_else(|| tun2socks::stack::default_max_flows(open_files_limit()));
        let udp_timeout = Duration::from_secs(self.udp_timeout);
        let udp = UdpConfig {
            idle_timeout: udp_timeout,
            dns_idle_timeout: udp_timeout.min(UdpConfig::default().dns_idle_timeout),
            max_associations: usize::try_from(self.max_udp).unwrap_or(usize::MAX),
            local_nets: device
                .addresses
                .clone()
                .unwrap_or_else(tun2socks::device::default_addresses),
            ..UdpConfig::default()
        };
        let dns = DnsConfig {
            mode: self.dns,
            server: self.dns_server,
            fake_pools: if self.fake_ip_pool.is_empty() {
                DnsConfig::default_pools()
            } else {
                self.fake_ip_pool.clone()
            },
            ..DnsConfig::default()
        };
        let device_ips: Vec<IpAddr> = udp.local_nets.iter().map(IpNet::addr).collect();
        dns.validate(&device_ips).map_err(|e| e.to_string())?;
        if dns.mode == DnsMode::FakeIp && proxy.protocol == Protocol::Socks4 {
            return Err(
                "--dns fake-ip needs a proxy that resolves names: socks5:// or \
                        socks4a://, not socks4://"
                    .into(),
            );
        }
        let stack = StackConfig {
            tcp_rx_buffer: buffer,
            tcp_tx_buffer: buffer,
            tcp_initial_buffer: initial,
            memory_limit,
            max_flows: max_flows.max(1),
            udp,
            dns,
            busy_poll: Duration::from_micros(self.busy_poll),
            ..StackConfig::default()
        };
        let timeout = Duration::from_secs(self.connect_timeout.max(1));
        let upstream = Upstream::new(
            proxy,
            DialOptions {
                connect_timeout: timeout,
                handshake_timeout: timeout,
                fwmark: self.fwmark.or(self.setup.then_some(setup::DEFAULT_FWMARK)),
                interface: self.interface.clone(),
                keepalive: secs_or_off(self.tcp_keepalive),
                idle_timeout: secs_or_off(self.tcp_idle_timeout),
            },
        )
        .pipelined(self.socks_pipeline);
        Ok((device, stack, upstream))
    }

    fn setup_config(&self) -> Option<SetupConfig> {
        self.setup.then(|| SetupConfig {
            fwmark: self.fwmark.unwrap_or(setup::DEFAULT_FWMARK),
            exclude: self.exclude.clone(),
            ..SetupConfig::default()
        })
    }
}

fn setup_exit_code(error: &SetupError) -> u8 {
    match error {
        SetupError::Busy { .. } => EXIT_BUSY,
        SetupError::Loop { .. } => EXIT_LOOP,
        error if error.permission_denied() => EXIT_NO_PERMISSION,
        _ => 1,
    }
}

fn device_exit_code(error: &DeviceError) -> u8 {
    match error {
        DeviceError::Open(TunError::PermissionDenied { .. }) => EXIT_NO_PERMISSION,
        DeviceError::Open(TunError::Busy { .. }) => EXIT_BUSY,
        DeviceError::Open(TunError::NameTooLong { .. } | TunError::InvalidName { .. }) => {
            EXIT_USAGE
        }
        _ => 1,
    }
}

fn run_tunnel(args: &TunnelArgs) -> ExitCode {
    let (device_config, stack_config, upstream) = match args.configs() {
        Ok(configs) => configs,
        Err(e) => {
            eprintln!("tun2socks: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let observe = match args.observe() {
        Ok(observe) => observe,
        Err(e) => {
            eprintln!("tun2socks: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // One thread per queue: a queue's stack and every flow it accepted share that
    // thread, so no lock is contended on the TCP path and no packet crosses threads.
    // The further queues' runtimes are built now, before the device exists, so that
    // once it is up the process holds all its descriptors; those a device without
    // multi_queue leaves unused are dropped after `block_on` (never inside it).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tun2socks: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut runtimes: Vec<_> = match (1..args.threads()).map(|_| QueueRuntime::new()).collect() {
        Ok(runtimes) => runtimes,
        Err(e) => {
            eprintln!("tun2socks: cannot start the runtimes: {e}");
            return ExitCode::FAILURE;
        }
    };
    let setup_config = args.setup_config();
    runtime.block_on(async {
        let lock = match setup_config.as_ref().map(|c| setup::begin(&args.device, c)) {
            Some(Err(e)) => {
                eprintln!("tun2socks: {e}");
                return ExitCode::from(setup_exit_code(&e));
            }
            lock => lock.and_then(Result::ok),
        };
        let (device, queues) = match Device::open_queues(&device_config, runtimes.len() + 1) {
            Ok((device, queues)) => {
                let runtimes = runtimes.drain(..queues.len());
                (device, queues.into_iter().zip(runtimes).collect())
            }
            Err(e) => {
                eprintln!("tun2socks: {e}");
                return ExitCode::from(device_exit_code(&e));
            }
        };
        resolve_proxy(&upstream).await;
        let lock = lock.zip(setup_config.as_ref());
        let routing = match setup::start(&device, &upstream, lock) {
            Ok(routing) => routing,
            Err(e) => {
                eprintln!("tun2socks: {e}");
                return ExitCode::from(setup_exit_code(&e));
            }
        };
        let _routing = routing; // undone when this block ends, after the stack stopped
        let tunnel = Tunnel {
            stack_config,
            upstream,
            observe,
        };
        match serve(device, queues, tunnel, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tun2socks: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Looks the proxy's name up, once, at start; again later only if every address fails:
/// once the host's DNS goes through the tunnel, a lookup per flow would loop.
async fn resolve_proxy(upstream: &Upstream) {
    if let Err(e) = upstream.resolve().await {
        tracing::warn!(error = %e, "cannot resolve the proxy yet; will retry with backoff");
    }
}

/// What every queue's stack runs with.
struct Tunnel {
    stack_config: StackConfig,
    upstream: Upstream,
    observe: Observe,
}

/// The tunnel, the same for `tun2socks` and `tun2socks exec`: serves `device` (on
/// this thread's runtime) and each of the further `queues` of it (each on a thread
/// and runtime of its own) until `shutdown` resolves or a queue fails; then stops
/// them all and logs the counters of all of them.
async fn serve(
    device: Device,
    queues: Vec<(Tun, QueueRuntime)>,
    tunnel: Tunnel,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let Tunnel {
        stack_config,
        upstream,
        observe,
    } = tunnel;
    if upstream.proxy_addrs().is_empty() {
        resolve_proxy(&upstream).await;
    }
    tracing::info!(
        proxy = %upstream.proxy(), device = device.name(), mtu = device.mtu(),
        threads = queues.len() + 1, "tunnel running"
    );
    let counters = Arc::new(Metrics::new());
    let side = Observers::start(&counters, observe.interval, observe.listener)
        .map_err(|e| format!("metrics endpoint: {e}"))?;
    let shared = Arc::new(stack::Shared::new(&stack_config, counters.clone()));
    // Set when any queue stops (shutdown, or its device failed): all stop.
    let stop = StopFlag::default();
    let mtu = device.mtu();
    let offload = device.offload();
    // The attached device keeps its configuration until every queue has stopped.
    let mut device = device;
    let _guards = device.take_guards();
    let mut workers = Vec::with_capacity(queues.len());
    for (index, (tun, runtime)) in queues.into_iter().enumerate() {
        let queue = Queue {
            queue: index + 1,
            tun,
            runtime,
            mtu,
            offload,
            config: stack_config.clone(),
            upstream: upstream.clone(),
            shared: shared.clone(),
            stop: stop.clone(),
        };
        match queue.spawn() {
            Ok(worker) => workers.push(worker),
            Err(e) => {
                tracing::warn!(queue = index + 1, error = %e, "cannot start a queue thread; serving with fewer");
            }
        }
    }
    let both = async {
        tokio::select! {
            () = shutdown => {}
            () = stop.stopped() => {}
        }
    };
    let trim = tokio::spawn(release_startup_code());
    let first = stack::run_queue(device, stack_config, upstream, shared, 0, both).await;
    trim.abort();
    stop.set();
    let mut result = first
        .map(|stats| stats.ring_bytes)
        .map_err(|e| format!("device failed: {e}"));
    for worker in workers {
        let joined = tokio::task::spawn_blocking(move || worker.join()).await;
        let failed = match joined {
            Ok(Ok(Ok(()))) => None,
            Ok(Ok(Err(e))) => Some(e.to_string()),
            Ok(Err(_)) | Err(_) => Some("a queue thread panicked".to_owned()),
        };
        if let (Some(e), Ok(_)) = (failed, &result) {
            result = Err(e);
        }
    }
    side.stop().await;
    let ring_bytes = result?;
    let stats = stack::StackStats {
        ring_bytes,
        ..counters.snapshot()
    };
    tracing::info!(stats = %stats, "stopped");
    Ok(())
}

/// Once the stack runs, gives back the pages of code that start-up touched (parsing,
/// device and route setup, runtime construction): an idle tunnel runs a few of them,
/// and the rest would otherwise stay counted in its resident memory. They remain in
/// the page cache and come back by a minor fault when used.
async fn release_startup_code() {
    tokio::time::sleep(RELEASE_CODE_AFTER).await;
    match tun2socks_platform::release_code() {
        Ok(bytes) => tracing::debug!(bytes, "released start-up code pages"),
        Err(e) => tracing::debug!(error = %e, "cannot release start-up code pages"),
    }
}

/// How long after start the tunnel releases its start-up code ([`release_startup_code`]).
const RELEASE_CODE_AFTER: Duration = Duration::from_millis(250);

/// `tun2socks exec`: forks the sandbox before any runtime exists (`exec::run`).
fn run_exec(args: &ExecArgs) -> ExitCode {
    let (device_config, stack_config, upstream) = match args.tunnel.configs() {
        Ok(configs) => configs,
        Err(e) => {
            eprintln!("tun2socks exec: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let mut stack_config = stack_config;
    if stack_config.dns.server.is_none() && stack_config.dns.mode != DnsMode::FakeIp {
        // The program's resolv.conf points into the tunnel; its queries go on to the
        // host's own resolver unless --dns-server says otherwise.
        let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        stack_config.dns.server = exec::host_resolver(&conf);
        if stack_config.dns.server.is_none() {
            tracing::warn!(
                "no --dns-server and no usable nameserver in /etc/resolv.conf: names will not \
                 resolve inside (use --dns-server IP or --dns fake-ip)"
            );
        }
    }
    let observe = match args.tunnel.observe() {
        Ok(observe) => observe,
        Err(e) => {
            eprintln!("tun2socks exec: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let config = ExecConfig::new(device_config);
    let tunnel = Tunnel {
        stack_config,
        upstream,
        observe,
    };
    // The sandbox hands over one descriptor, opened in its namespace: one queue.
    let tunnel = |device, stop| serve(device, Vec::new(), tunnel, stop);
    match exec::run(&config, &args.command, tunnel) {
        Ok(exit) => ExitCode::from(exit.shell_status()),
        Err(e) => {
            eprintln!("tun2socks exec: {e}");
            ExitCode::from(exec::EXIT_EXEC_FAILED)
        }
    }
}

fn run_selftest() -> ExitCode {
    let binary = match std::env::current_exe() {
        Ok(path) => path,
        Err(e) => {
            eprintln!("tun2socks selftest: cannot find this executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "tun2socks selftest: namespaces, reference server and tunnel ({})",
        binary.display()
    );
    let result = tun2socks::selftest::run(&binary, |check| {
        let mark = if check.ok { "ok  " } else { "FAIL" };
        eprintln!("  {mark} {} ({})", check.name, check.detail);
    });
    match result {
        Ok(report) => {
            println!();
            println!("{report}");
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            eprintln!("tun2socks selftest: {e} (run it as root: it creates network namespaces)");
            ExitCode::from(EXIT_NO_PERMISSION)
        }
        Err(e) => {
            eprintln!("tun2socks selftest: setup failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Raises the soft open-files limit to the hard one. Most systems start processes at
/// 1024 descriptors, and every TCP flow holds one, every UDP association two.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open-files limit"),
            Err(e) => tracing::warn!(soft, hard, error = %e, "cannot raise the open-files limit"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-files limit"),
    }
}

/// The soft open-files limit now (after `raise_open_files_limit`, for the tunnel).
fn open_files_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit};
    getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `exec` shares the terminal with its program: only warnings unless asked.
    let default_level = match &cli.command {
        Some(Command::Exec(_)) => "warn",
        _ => "info",
    };
    init_tracing(cli.log_level.as_deref(), default_level);
    match &cli.command {
        Some(Command::Server(args)) => {
            raise_open_files_limit();
            run_server(args)
        }
        // Not for exec: its program keeps the limits it was started with.
        Some(Command::Exec(args)) => run_exec(args),
        Some(Command::Selftest) => run_selftest(),
        None => {
            raise_open_files_limit();
            run_tunnel(&cli.tunnel)
        }
    }
}
