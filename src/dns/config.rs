//! The DNS module's settings: mode, resolver override, fake-IP pools, limits; their
//! defaults, and the checks run before the tunnel starts.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;

use super::DnsError;

/// Default fake-IP pool for IPv4: the upper half of the TUN's default network
/// 198.18.0.0/16 — routed into the TUN without `--setup`, and away from the device
/// address 198.18.0.1.
pub const DEFAULT_POOL_V4: &str = "198.18.128.0/17";
/// Default fake-IP pool for IPv6: the upper half of the TUN's default fd18::/64,
/// away from the device address fd18::1.
pub const DEFAULT_POOL_V6: &str = "fd18::8000:0:0:0/65";
/// TTL of fake answers. Short, so a client's cache follows the map closely.
pub const DEFAULT_FAKE_TTL: Duration = Duration::from_secs(60);
/// How long past the TTL an unused entry keeps its address before it may be recycled
/// (clients that hold answers a little past their TTL; connection set-up after a
/// lookup).
pub const DEFAULT_FAKE_GRACE: Duration = Duration::from_secs(300);
/// Most names the fake-IP map holds per address family.
pub const DEFAULT_MAX_FAKE_ENTRIES: usize = 65_536;
/// DNS-over-TCP connections per resolver.
pub const DEFAULT_TCP_CONNECTIONS: usize = 4;
/// Outstanding queries per DNS-over-TCP connection.
pub const DEFAULT_TCP_PIPELINE: usize = 32;
/// The largest pipeline accepted.
pub const MAX_TCP_PIPELINE: usize = 4096;
/// Deadline of a query sent over TCP (retry included).
pub const DEFAULT_QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// A DNS-over-TCP connection with nothing outstanding is closed after this long.
pub const DEFAULT_TCP_IDLE: Duration = Duration::from_secs(10);
/// A fake-IP pool with fewer usable addresses than this is warned about at start: a
/// name keeps its address until it has gone unused for the answer's TTL and a grace
/// period, so such a pool runs out after that many names, and further names are
/// answered SERVFAIL until one is free.
pub const SMALL_POOL: u128 = 256;

/// What happens to a DNS query (a UDP datagram to port 53) that enters the TUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DnsMode {
    /// Relayed as ordinary UDP through the SOCKS5 association.
    #[default]
    Udp,
    /// Sent as DNS over TCP through a SOCKS CONNECT; answered as UDP.
    Tcp,
    /// A / AAAA answered at once from the fake-IP pool; flows to a fake address go to
    /// the proxy by name. Other queries go over TCP.
    FakeIp,
}

impl FromStr for DnsMode {
    type Err = DnsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "udp" => Ok(DnsMode::Udp),
            "tcp" => Ok(DnsMode::Tcp),
            "fake-ip" => Ok(DnsMode::FakeIp),
            other => Err(DnsError::UnknownMode {
                given: other.to_owned(),
            }),
        }
    }
}

impl fmt::Display for DnsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DnsMode::Udp => "udp",
            DnsMode::Tcp => "tcp",
            DnsMode::FakeIp => "fake-ip",
        })
    }
}

/// Settings of the DNS module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// `--dns`.
    pub mode: DnsMode,
    /// `--dns-server`: send every query here (port 53) instead of where it was
    /// addressed; answers still appear to come from the queried address.
    pub server: Option<IpAddr>,
    /// `--fake-ip-pool`: fake-IP pools, v4 and v6 (used in fake-ip mode only).
    pub fake_pools: Vec<IpNet>,
    /// TTL of fake answers.
    pub fake_ttl: Duration,
    /// Unused time past the TTL before a fake entry may be recycled.
    pub fake_grace: Duration,
    /// Most names the fake-IP map holds per family (further capped by pool size).
    pub max_fake_entries: usize,
    /// DNS-over-TCP connections per resolver.
    pub tcp_connections: usize,
    /// Outstanding queries per DNS-over-TCP connection.
    pub tcp_pipeline: usize,
    /// Deadline of a query over TCP.
    pub query_timeout: Duration,
    /// Idle DNS-over-TCP connections are closed after this long.
    pub tcp_idle: Duration,
}

impl DnsConfig {
    /// The default pools ([`DEFAULT_POOL_V4`], [`DEFAULT_POOL_V6`]).
    pub fn default_pools() -> Vec<IpNet> {
        [DEFAULT_POOL_V4, DEFAULT_POOL_V6]
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect()
    }

    /// In fake-ip mode, the pools with fewer than [`SMALL_POOL`] usable addresses
    /// (network and IPv4 broadcast addresses are never handed out), with how many
    /// each has.
    pub fn small_pools(&self) -> Vec<(IpNet, u128)> {
        if self.mode != DnsMode::FakeIp {
            return Vec::new();
        }
        self.fake_pools
            .iter()
            .map(|pool| (pool.trunc(), super::fakeip::usable_addresses(pool.trunc())))
            .filter(|(_, usable)| *usable < SMALL_POOL)
            .collect()
    }

    /// Checks the settings against each other and against the TUN device's own
    /// addresses: the `--dns-server` must not be a device address, a pool must not
    /// contain a device address or the `--dns-server`, nor overlap another pool;
    /// limits must be positive.
    pub fn validate(&self, device_addrs: &[IpAddr]) -> Result<(), DnsError> {
        let invalid = |name: &'static str, reason: &'static str| {
            Err(DnsError::InvalidSetting { name, reason })
        };
        if self.fake_ttl < Duration::from_secs(1) || self.fake_ttl.as_secs() > u64::from(u32::MAX) {
            return invalid("fake-ip TTL", "must be between 1 s and 2^32-1 s");
        }
        if self.max_fake_entries == 0 {
            return invalid("fake-ip entries", "must be at least 1");
        }
        if self.tcp_connections == 0 {
            return invalid("DNS-over-TCP connections", "must be at least 1");
        }
        if self.tcp_pipeline == 0 || self.tcp_pipeline > MAX_TCP_PIPELINE {
            return invalid("DNS-over-TCP pipeline", "must be between 1 and 4096");
        }
        if self.query_timeout.is_zero() {
            return invalid("DNS query timeout", "must be positive");
        }
        if let Some(server) = self.server.filter(|s| device_addrs.contains(s)) {
            return Err(DnsError::ServerIsDevice { server });
        }
        if self.mode == DnsMode::FakeIp && self.fake_pools.is_empty() {
            return invalid("fake-ip pools", "fake-ip mode needs at least one pool");
        }
        for (i, pool) in self.fake_pools.iter().enumerate() {
            let pool = pool.trunc();
            if let Some(addr) = device_addrs.iter().find(|a| pool.contains(*a)) {
                return Err(DnsError::PoolContainsDevice { pool, addr: *addr });
            }
            if let Some(server) = self.server.filter(|s| pool.contains(s)) {
                return Err(DnsError::PoolContainsServer { pool, server });
            }
            for other in self.fake_pools.iter().skip(i.saturating_add(1)) {
                let other = other.trunc();
                if pool.contains(&other.network()) || other.contains(&pool.network()) {
                    return Err(DnsError::PoolsOverlap { a: pool, b: other });
                }
            }
        }
        Ok(())
    }
}

impl Default for DnsConfig {
    /// Mode `udp`, no resolver override, the default pools, TTL 60 s + 300 s grace,
    /// 65,536 names per family, 4 TCP connections per resolver with 32 queries each,
    /// 5 s query deadline, 10 s idle close.
    fn default() -> Self {
        DnsConfig {
            mode: DnsMode::Udp,
            server: None,
            fake_pools: Self::default_pools(),
            fake_ttl: DEFAULT_FAKE_TTL,
            fake_grace: DEFAULT_FAKE_GRACE,
            max_fake_entries: DEFAULT_MAX_FAKE_ENTRIES,
            tcp_connections: DEFAULT_TCP_CONNECTIONS,
            tcp_pipeline: DEFAULT_TCP_PIPELINE,
            query_timeout: DEFAULT_QUERY_TIMEOUT,
            tcp_idle: DEFAULT_TCP_IDLE,
        }
    }
}
