//! The binary's command line (clap): the tunnel's, `exec`'s and the server's options,
//! each turned into the library's plain configs. The library never sees clap.

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use ipnet::IpNet;
use tun2socks::config::{OffloadMode, ProxyUrl, ProxyUrlError};
use tun2socks::device::DeviceConfig;
use tun2socks::dns::{DnsConfig, DnsMode};
use tun2socks::flow::udp::UdpConfig;
use tun2socks::metrics;
use tun2socks::server::ServerConfig;
use tun2socks::setup::{self, SetupConfig};
use tun2socks::socks::Protocol;
use tun2socks::socks::{Credentials, ServerPolicy, Users};
use tun2socks::stack::StackConfig;
use tun2socks::upstream::{DialOptions, Pipelining, Upstream};

#[derive(Debug, Args)]
pub(crate) struct TunnelArgs {
    /// Upstream proxy: socks5://[user:pass@]host:port, socks4://[userid@]host:port or socks4a://...
    #[arg(long, value_name = "URL", required = true)]
    proxy: Option<String>,
    /// TUN device to create, or to attach to if a TUN device of that name exists.
    #[arg(long, value_name = "NAME", default_value = "tun0")]
    pub(crate) device: String,
    /// Address of the device (repeatable) [default for a device we create:
    /// 198.18.0.1/16 and fd18::1/64; an attached device gets none]
    #[arg(long, value_name = "CIDR")]
    address: Vec<IpNet>,
    /// MTU [default for a device we create: 65000; an attached device keeps its own]
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
    /// Buffers of a newly connected TCP flow, in KiB, at most --tcp-buffer (equal to it:
    /// fixed buffers that never grow or shrink).
    #[arg(long, value_name = "KIB", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=65536))]
    tcp_buffer_initial: u32,
    /// Memory for all TCP buffers, in MiB. When it is spent, buffers stop growing (the
    /// flows get smaller windows); no connection is refused or reset for it.
    #[arg(long, value_name = "MIB", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    memory_limit: u64,
    /// TCP connections at once; further SYNs are reset [default: from the open-files
    /// limit (raised to its hard limit at start): 256 kept in reserve, three quarters of
    /// the rest (14,808 of 20,000), the last quarter for UDP associations (two each)]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_flows: Option<u64>,
    /// Seconds to wait for the proxy to accept and answer.
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    connect_timeout: u64,
    /// Microseconds the packet loop keeps polling after traffic before it sleeps, while
    /// traffic comes at least that often (request/response latency for CPU; an idle
    /// tunnel never polls); 0 turns it off.
    #[arg(long, value_name = "MICROS", default_value_t = DEFAULT_BUSY_POLL_MICROS, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    busy_poll: u64,
    /// Send the SOCKS5 greeting, login and request in one write, saving a round trip
    /// per connection: on (the flag alone; for servers known to read it: ours and
    /// Dante do, microsocks drops the request and the connection times out), auto
    /// (connections start unpipelined; after the first one succeeds, one extra probe
    /// connection asks the proxy with a pipelined UDP ASSOCIATE, and an answer turns
    /// pipelining on) or off
    #[arg(long, value_name = "auto|on|off", default_value = "off", num_args = 0..=1, default_missing_value = "on", value_parser = parse_pipelining)]
    socks_pipeline: Pipelining,
    /// Seconds without traffic after which a UDP association is closed (associations
    /// that only carried DNS: 10 s or this, whichever is shorter).
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    udp_timeout: u64,
    /// DNS mode for queries to port 53 entering the TUN (any destination address):
    /// udp (through the UDP association), tcp (DNS over TCP through SOCKS CONNECT; works
    /// with every proxy) or fake-ip (A/AAAA answered locally; flows go to the proxy by
    /// name) [default: udp; tcp with a socks4:// or socks4a:// proxy, which has no UDP]
    #[arg(long, value_name = "MODE")]
    dns: Option<DnsMode>,
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
    pub(crate) fn threads(&self) -> usize {
        self.threads
            .map_or_else(tun2socks::config::default_threads, usize::from)
    }

    /// Whether `--setup` was given.
    pub(crate) fn setup(&self) -> bool {
        self.setup
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
pub(crate) struct Observe {
    pub(crate) interval: Duration,
    pub(crate) listener: Option<std::net::TcpListener>,
}

impl TunnelArgs {
    /// Binds the metrics address now, so that a bad one stops the start (exit 2).
    pub(crate) fn observe(&self) -> Result<Observe, String> {
        let listener = self.metrics.map(metrics::http::bind).transpose();
        Ok(Observe {
            interval: Duration::from_secs(self.stats_interval),
            listener: listener.map_err(|e| e.to_string())?,
        })
    }
}

#[derive(Debug, Args)]
pub(crate) struct ExecArgs {
    #[command(flatten)]
    pub(crate) tunnel: TunnelArgs,
    /// The program and its arguments, best after `--`.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "PROGRAM"
    )]
    pub(crate) command: Vec<OsString>,
}

#[derive(Debug, Args)]
pub(crate) struct ServerArgs {
    /// Address to listen on (repeatable).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:1080")]
    pub(crate) listen: Vec<SocketAddr>,
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
    /// Microseconds a busy UDP association keeps polling its sockets after a
    /// datagram before it sleeps, while datagrams come at least that often (latency
    /// for CPU; one association at a time, never on one CPU); 0 turns it off.
    #[arg(long, value_name = "MICROS", default_value_t = DEFAULT_BUSY_POLL_MICROS, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    busy_poll: u64,
    /// Refuse BIND (reply 0x07).
    #[arg(long)]
    no_bind: bool,
    /// Seconds a client has to complete its handshake.
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    handshake_timeout: u64,
    /// Seconds to wait for a destination to accept a connection.
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    connect_timeout: u64,
    /// Seconds a BIND waits for the peer.
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    bind_timeout: u64,
    /// Seconds without traffic after which a UDP association is closed.
    #[arg(long, value_name = "SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
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

fn parse_offload(s: &str) -> Result<OffloadMode, String> {
    s.parse()
}

fn parse_pipelining(s: &str) -> Result<Pipelining, String> {
    s.parse()
}

/// A number, decimal or `0x` hexadecimal.
fn parse_u32(s: &str) -> Result<u32, String> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|_| format!("{s:?} is not a 32-bit number (decimal or 0x hexadecimal)"))
}

/// `--log-level`: a level name, or a tracing filter with at least one directive
/// (`tun2socks=debug`, `info,tun2socks::flow=trace`). A bare word that is not a
/// level is refused: the filter syntax would take it as a module name and log
/// nothing at all, so `--log-level verbose` used to silence every message.
pub(crate) fn parse_log_level(s: &str) -> Result<String, String> {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::filter::LevelFilter;
    const LEVELS: &str = "off, error, warn, info, debug, trace";
    let word = s.trim();
    if word.eq_ignore_ascii_case("warning") {
        return Ok("warn".to_owned());
    }
    if !word.contains(['=', ',', '[', ':']) {
        return match word.parse::<LevelFilter>() {
            Ok(_) if !word.is_empty() => Ok(word.to_ascii_lowercase()),
            _ => Err(format!(
                "{s:?} is not a log level ({LEVELS}) or a filter like tun2socks=debug"
            )),
        };
    }
    EnvFilter::try_new(word)
        .map(|_| word.to_owned())
        .map_err(|e| format!("{s:?} is not a log filter: {e}"))
}

fn parse_user(s: &str) -> Result<Credentials, String> {
    let (name, pass) = s
        .split_once(':')
        .ok_or_else(|| format!("--user {s:?}: expected NAME:PASS"))?;
    Credentials::new(name, pass).map_err(|e| format!("--user {name:?}: {e}"))
}

impl ServerArgs {
    pub(crate) fn config(&self) -> Result<ServerConfig, String> {
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
            udp_busy_poll: Duration::from_micros(self.busy_poll),
        };
        config.validate(&self.listen).map_err(|e| e.to_string())?;
        Ok(config)
    }
}

impl TunnelArgs {
    pub(crate) fn configs(&self) -> Result<(DeviceConfig, StackConfig, Upstream), String> {
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
        if self.tcp_buffer_initial > self.tcp_buffer {
            return Err(format!(
                "--tcp-buffer-initial {} KiB is larger than --tcp-buffer {} KiB (the largest a flow's buffers grow to)",
                self.tcp_buffer_initial, self.tcp_buffer
            ));
        }
        let initial = usize::try_from(self.tcp_buffer_initial)
            .unwrap_or(4)
            .saturating_mul(1024)
            .min(buffer);
        let memory_limit = usize::try_from(self.memory_limit)
            .unwrap_or(usize::MAX)
            .saturating_mul(1024 * 1024);
        let max_flows = self.max_flows.map_or_else(
            || tun2socks::stack::default_max_flows(crate::open_files_limit()),
            |n| usize::try_from(n).unwrap_or(usize::MAX),
        );
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
            mode: self.dns_mode(proxy.protocol),
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
        let timeout = Duration::from_secs(self.connect_timeout);
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
        .pipelining(self.socks_pipeline);
        Ok((device, stack, upstream))
    }

    /// `--dns`, or its default: `udp`, except through SOCKS4/4a, which has no UDP
    /// ASSOCIATE, so that every query would be answered "port unreachable": `tcp`
    /// there. `--dns udp` asked for with SOCKS4 is kept, with a warning.
    fn dns_mode(&self, protocol: Protocol) -> DnsMode {
        let no_udp = matches!(protocol, Protocol::Socks4 | Protocol::Socks4a);
        match self.dns {
            Some(DnsMode::Udp) if no_udp => {
                tracing::warn!(
                    "--dns udp through a SOCKS4 proxy, which carries no UDP: every DNS \
                     query will be answered port unreachable; --dns tcp carries DNS over TCP"
                );
                DnsMode::Udp
            }
            Some(mode) => mode,
            None if no_udp => {
                tracing::info!("DNS goes over TCP (--dns tcp): a SOCKS4 proxy carries no UDP");
                DnsMode::Tcp
            }
            None => DnsMode::Udp,
        }
    }

    pub(crate) fn setup_config(&self) -> Option<SetupConfig> {
        self.setup.then(|| SetupConfig {
            fwmark: self.fwmark.unwrap_or(setup::DEFAULT_FWMARK),
            exclude: self.exclude.clone(),
            hijack_dns: self.dns == Some(DnsMode::FakeIp) || self.dns_server.is_some(),
            dns_server: self.dns_server.is_some(),
            ..SetupConfig::default()
        })
    }
}

/// `--busy-poll`'s default, for the tunnel and the server alike.
const DEFAULT_BUSY_POLL_MICROS: u64 = tun2socks::busy::DEFAULT_WINDOW.as_micros() as u64;

#[cfg(test)]
mod tests {
    use super::{ServerArgs, parse_log_level};
    use clap::Parser;
    use std::time::Duration;

    #[derive(Debug, Parser)]
    struct Server {
        #[command(flatten)]
        args: ServerArgs,
    }

    #[test]
    fn the_servers_udp_busy_polling_defaults_to_the_tunnels_and_can_be_turned_off() {
        let parse = |extra: &[&str]| {
            let argv = ["server"].iter().chain(extra).copied();
            Server::try_parse_from(argv).map(|s| s.args.config())
        };
        let default = parse(&[]).expect("parses").expect("valid");
        assert_eq!(default.udp_busy_poll, Duration::from_micros(200));
        let off = parse(&["--busy-poll", "0"])
            .expect("parses")
            .expect("valid");
        assert_eq!(off.udp_busy_poll, Duration::ZERO);
        assert!(
            parse(&["--busy-poll", "10001"]).is_err(),
            "over 10 ms refused"
        );
        assert!(parse(&["--busy-poll", "-1"]).is_err());
    }

    #[test]
    fn log_levels_and_filters_are_taken_and_other_words_refused() {
        for (given, taken) in [
            ("info", "info"),
            ("DEBUG", "debug"),
            ("warning", "warn"),
            ("off", "off"),
            ("tun2socks=debug", "tun2socks=debug"),
            ("info,tun2socks::flow=trace", "info,tun2socks::flow=trace"),
        ] {
            assert_eq!(parse_log_level(given).as_deref(), Ok(taken), "{given}");
        }
        for bad in ["verbose", "nonsense", "", "inf"] {
            let err = parse_log_level(bad).expect_err(bad);
            assert!(err.contains("not a log level"), "{bad}: {err}");
        }
        let err = parse_log_level("tun2socks=loud").expect_err("bad level in a directive");
        assert!(err.contains("not a log filter"), "{err}");
    }
}
