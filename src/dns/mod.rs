//! DNS: what happens to every UDP datagram to port 53 that enters the TUN, whatever
//! its destination address, per `--dns` mode:
//!
//! - `udp`: relayed as ordinary UDP through the SOCKS5 association, to the queried
//!   address or to `--dns-server` ([`Decision::Relay`]);
//! - `tcp`: sent as DNS over TCP (RFC 7766) through a SOCKS CONNECT to the queried
//!   address or `--dns-server`; the answer comes back as UDP, truncated (TC=1) when
//!   the client cannot take it whole ([`Decision::Tcp`], then [`Dns::query_tcp`]);
//! - `fake-ip`: A / AAAA (class IN, one question) answered at once with an address
//!   from the pool; a flow to that address goes to the proxy by name
//!   ([`Dns::target_for`]). Other queries go over TCP as in `tcp` mode.
//!
//! Stage: beside the stack, which classifies packets and hands port-53 datagrams
//! here, and asks where each new flow goes. The synchronous calls
//! ([`Dns::on_query`], [`Dns::target_for`]) take short std locks and never block on
//! I/O; the async one ([`Dns::query_tcp`]) holds no lock across an `.await`. This
//! module writes no packets (the caller sends answers back through the egress path)
//! and never resolves a name itself.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

pub mod config;
pub mod fakeip;
pub mod frames;
pub mod message;
pub mod tcp;

#[cfg(test)]
mod tests;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hickory_proto::rr::{DNSClass, RecordType};
use ipnet::IpNet;

pub use config::{DnsConfig, DnsMode};
use fakeip::{Assigned, FakeTable, Lookup};
use message::{MAX_NAME_LEN, Message, MessageError};
pub use tcp::TcpError;
use tcp::{TcpClient, TcpSettings};

use crate::metrics::Metrics;
use crate::socks::Address;
use crate::upstream::Upstream;

/// The DNS port.
pub const DNS_PORT: u16 = 53;
/// At most one "fake-IP pool exhausted" warning per this long.
const EXHAUSTED_LOG_EVERY: Duration = Duration::from_secs(10);

/// Errors of the DNS module.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// `--dns` got something other than `udp`, `tcp` or `fake-ip`.
    #[error("unknown DNS mode {given:?} (expected udp, tcp or fake-ip)")]
    UnknownMode {
        /// What was given.
        given: String,
    },
    /// A fake-IP pool contains one of the TUN device's own addresses.
    #[error("fake-IP pool {pool} contains the device address {addr}")]
    PoolContainsDevice {
        /// The pool.
        pool: IpNet,
        /// The device address.
        addr: IpAddr,
    },
    /// A fake-IP pool contains the `--dns-server` address.
    #[error("fake-IP pool {pool} contains the DNS server {server}")]
    PoolContainsServer {
        /// The pool.
        pool: IpNet,
        /// The server.
        server: IpAddr,
    },
    /// `--dns-server` is an address of the TUN device itself: queries sent there
    /// through the proxy reach nothing.
    #[error(
        "--dns-server {server} is an address of the TUN device itself: queries would go through the proxy to an address it cannot reach; give the resolver's own address"
    )]
    ServerIsDevice {
        /// The server.
        server: IpAddr,
    },
    /// Two fake-IP pools overlap.
    #[error("fake-IP pools {a} and {b} overlap")]
    PoolsOverlap {
        /// One pool.
        a: IpNet,
        /// The other.
        b: IpNet,
    },
    /// A limit is out of range.
    #[error("{name}: {reason}")]
    InvalidSetting {
        /// The setting.
        name: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The query to send over TCP does not decode.
    #[error("{0}")]
    Message(#[from] MessageError),
    /// The query over TCP got no answer.
    #[error("{0}")]
    Tcp(#[from] TcpError),
}

/// What the caller does with one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Send this back to the client now (a fake-IP answer, or FORMERR / SERVFAIL /
    /// "no data" built here), from the address the query went to.
    Answer(Vec<u8>),
    /// `udp` mode: relay the datagram as UDP to `resolver` (the queried address, or
    /// `--dns-server`); the reply goes back as if from the queried address.
    Relay {
        /// Where to send it.
        resolver: SocketAddr,
    },
    /// Spawn [`Dns::query_tcp`]`(resolver, payload, ..)` and send its answer back.
    Tcp {
        /// Where to send it.
        resolver: SocketAddr,
    },
    /// Drop the datagram (counted): not a DNS query at all.
    Drop(&'static str),
}

/// Where a new TCP or UDP flow goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// To the address itself.
    Direct(SocketAddr),
    /// A fake address: to this name (the proxy resolves it).
    Name(Address),
    /// A fake address no name holds (never handed out, or recycled): refuse the flow
    /// (TCP reset, ICMP port unreachable); never send it anywhere.
    Unknown,
}

/// A snapshot of the DNS counters (defined with the one set of counters).
pub use crate::metrics::DnsStats;

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The fake-IP tables (one per family; `None` where the mode is not fake-ip or no pool
/// of the family exists). Cloning shares them: every stack of a multi-queue tunnel
/// answers from one map, so a name has one fake address whichever queue asked, and a
/// flow on any queue finds its name.
#[derive(Debug, Clone, Default)]
pub struct FakeIps {
    v4: Option<Arc<Mutex<FakeTable>>>,
    v6: Option<Arc<Mutex<FakeTable>>>,
}

impl FakeIps {
    /// Empty tables for `config`'s pools (nothing unless the mode is fake-ip).
    pub fn new(config: &DnsConfig) -> FakeIps {
        let hold = config.fake_ttl.saturating_add(config.fake_grace);
        let table = |v6: bool| {
            (config.mode == DnsMode::FakeIp)
                .then(|| FakeTable::new(&config.fake_pools, v6, config.max_fake_entries, hold))
                .flatten()
                .map(|table| Arc::new(Mutex::new(table)))
        };
        FakeIps {
            v4: table(false),
            v6: table(true),
        }
    }
}

/// The DNS module: `Send + Sync`, shared as `Arc<Dns>` by the stack and flow tasks.
#[derive(Debug)]
pub struct Dns {
    config: DnsConfig,
    /// Fake-IP tables (possibly shared with other stacks' `Dns`).
    v4: Option<Arc<Mutex<FakeTable>>>,
    v6: Option<Arc<Mutex<FakeTable>>>,
    tcp: TcpClient,
    metrics: Arc<Metrics>,
}

impl Dns {
    /// The module for `config` (checked with [`DnsConfig::validate`] beforehand),
    /// reaching resolvers over TCP through `upstream`, with counters of its own.
    pub fn new(config: DnsConfig, upstream: Upstream) -> Self {
        Dns::with_metrics(config, upstream, Arc::default())
    }

    /// As [`Dns::new`], counting into `metrics`.
    pub fn with_metrics(config: DnsConfig, upstream: Upstream, metrics: Arc<Metrics>) -> Self {
        let fake = FakeIps::new(&config);
        Dns::with_fake_ips(config, upstream, metrics, &fake)
    }

    /// As [`Dns::with_metrics`], answering from `fake` (shared with other `Dns`
    /// values made from it). DNS-over-TCP connections stay this value's own (their
    /// tasks run on the runtime that opened them).
    pub fn with_fake_ips(
        config: DnsConfig,
        upstream: Upstream,
        metrics: Arc<Metrics>,
        fake: &FakeIps,
    ) -> Self {
        let tcp = TcpClient::new(
            upstream,
            TcpSettings {
                connections: config.tcp_connections,
                pipeline: config.tcp_pipeline,
                timeout: config.query_timeout,
                idle: config.tcp_idle,
            },
            metrics.clone(),
        );
        Dns {
            config,
            v4: fake.v4.clone(),
            v6: fake.v6.clone(),
            tcp,
            metrics,
        }
    }

    /// The mode.
    pub fn mode(&self) -> DnsMode {
        self.config.mode
    }

    /// The settings.
    pub fn config(&self) -> &DnsConfig {
        &self.config
    }

    /// Where a query addressed to `dst` goes: `dst`, or `--dns-server` on port 53.
    pub fn resolver_for(&self, dst: SocketAddr) -> SocketAddr {
        self.config
            .server
            .map_or(dst, |server| SocketAddr::new(server, DNS_PORT))
    }

    /// One UDP datagram to port 53 from the TUN (`payload` = the DNS message).
    /// Synchronous and cheap: in fake-ip mode an A / AAAA query is answered here.
    pub fn on_query(
        &self,
        payload: &[u8],
        _src: SocketAddr,
        dst: SocketAddr,
        now: Instant,
    ) -> Decision {
        bump(&self.metrics.dns.queries);
        let Some(&flags) = payload
            .get(2)
            .filter(|_| payload.len() >= message::HEADER_LEN)
        else {
            bump(&self.metrics.dns.malformed);
            return Decision::Drop("shorter than a DNS header");
        };
        if flags & 0x80 != 0 {
            bump(&self.metrics.dns.dropped);
            return Decision::Drop("a DNS response sent to port 53");
        }
        let resolver = self.resolver_for(dst);
        match self.config.mode {
            DnsMode::Udp => {
                bump(&self.metrics.dns.via_udp);
                Decision::Relay { resolver }
            }
            DnsMode::Tcp => match Message::decode_query(payload) {
                Ok(_) => self.via_tcp(resolver),
                Err(_) => self.format_error(payload),
            },
            DnsMode::FakeIp => match Message::decode_query(payload) {
                Ok(query) => self.fake(&query, resolver, now),
                Err(_) => self.format_error(payload),
            },
        }
    }

    fn via_tcp(&self, resolver: SocketAddr) -> Decision {
        bump(&self.metrics.dns.via_tcp);
        Decision::Tcp { resolver }
    }

    fn format_error(&self, payload: &[u8]) -> Decision {
        bump(&self.metrics.dns.malformed);
        let mut out = Vec::with_capacity(message::HEADER_LEN);
        match message::format_error(payload, &mut out) {
            Some(()) => Decision::Answer(out),
            None => Decision::Drop("shorter than a DNS header"),
        }
    }

    /// fake-ip mode: A / AAAA of one IN question with a name the proxy can take is
    /// answered from the pool; anything else goes over TCP.
    fn fake(&self, query: &Message<'_>, resolver: SocketAddr, now: Instant) -> Decision {
        let Some(question) = query.question() else {
            return self.via_tcp(resolver);
        };
        let v6 = match question.qtype {
            RecordType::A => false,
            RecordType::AAAA => true,
            _ => return self.via_tcp(resolver),
        };
        if !query.is_standard_query()
            || query.question_count() != 1
            || question.qclass != DNSClass::IN
        {
            return self.via_tcp(resolver);
        }
        let mut buf = [0u8; MAX_NAME_LEN];
        let Some(name) = message::map_name(&question.name, &mut buf) else {
            return self.via_tcp(resolver);
        };
        let mut out = Vec::with_capacity(query_answer_len(query));
        let Some(table) = (if v6 { &self.v6 } else { &self.v4 }) else {
            bump(&self.metrics.dns.answered_empty);
            message::empty_response(query, message::RCODE_NOERROR, &mut out);
            return Decision::Answer(out);
        };
        let (assigned, warn) = {
            let mut table = lock(table);
            let assigned = table.assign(name, now);
            let warn = assigned.is_err() && table.warn_exhausted(now, EXHAUSTED_LOG_EVERY);
            (assigned, warn)
        };
        match assigned {
            Ok((ip, how)) => {
                if how == Assigned::Fresh {
                    bump(&self.metrics.dns.fake_entries);
                }
                if how == Assigned::Recycled {
                    bump(&self.metrics.dns.fake_recycled);
                }
                bump(&self.metrics.dns.answered_fake);
                let ttl = u32::try_from(self.config.fake_ttl.as_secs()).unwrap_or(u32::MAX);
                message::address_answer(query, ip, ttl, &mut out);
            }
            Err(_) => {
                bump(&self.metrics.dns.servfail);
                if warn {
                    tracing::warn!(
                        name,
                        family = if v6 { "IPv6" } else { "IPv4" },
                        "fake-IP pool exhausted: every address was used within the TTL \
                         and grace period; answering SERVFAIL"
                    );
                }
                message::empty_response(query, message::RCODE_SERVFAIL, &mut out);
            }
        }
        Decision::Answer(out)
    }

    fn table(&self, ip: IpAddr) -> Option<&Mutex<FakeTable>> {
        match ip {
            IpAddr::V4(_) => self.v4.as_deref(),
            IpAddr::V6(_) => self.v6.as_deref(),
        }
    }

    /// Where a TCP/UDP flow to `dst` must go: the address itself; the name a fake
    /// address stands for (its entry counts as used at `now`); or `Unknown` for a fake
    /// address no name holds.
    pub fn target_for(&self, dst: SocketAddr, now: Instant) -> Target {
        let Some(table) = self.table(dst.ip()) else {
            return Target::Direct(dst);
        };
        let lookup = lock(table).lookup(dst.ip(), now, true);
        match lookup {
            Lookup::NotFake => Target::Direct(dst),
            Lookup::Name(name) => match Address::domain(name.as_ref(), dst.port()) {
                Ok(address) => Target::Name(address),
                Err(_) => self.unknown(),
            },
            Lookup::Unmapped => self.unknown(),
        }
    }

    fn unknown(&self) -> Target {
        bump(&self.metrics.dns.fake_unknown);
        Target::Unknown
    }

    /// Marks the entry of a fake address as used at `now` (a live flow keeps its
    /// address from being recycled). No effect on other addresses.
    pub fn touch(&self, ip: IpAddr, now: Instant) {
        if let Some(table) = self.table(ip) {
            lock(table).lookup(ip, now, true);
        }
    }

    /// For UDP replies in fake-ip mode: the fake address of `name` (any case, with or
    /// without the trailing dot), if mapped.
    pub fn fake_address_of(&self, name: &str, family_v6: bool) -> Option<IpAddr> {
        let table = if family_v6 { &self.v6 } else { &self.v4 };
        let key = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        lock(table.as_deref()?).address_of(&key)
    }

    /// DNS over TCP through the proxy to `resolver` (tcp mode, and fake-ip's other
    /// queries). Returns the answer to send back as UDP: the client's ID restored, and
    /// truncated (TC=1, header and question) if larger than the client accepts (512
    /// bytes, or its EDNS0 size) or than `max_udp_payload`.
    pub async fn query_tcp(
        &self,
        resolver: SocketAddr,
        query: &[u8],
        max_udp_payload: usize,
    ) -> Result<Vec<u8>, DnsError> {
        let parsed = Message::decode_query(query)?;
        let limit = parsed.udp_limit(max_udp_payload);
        let answer = match self.tcp.exchange(resolver, query).await {
            Ok(answer) => answer,
            Err(e) => {
                bump(&self.metrics.dns.tcp_errors);
                return Err(e.into());
            }
        };
        bump(&self.metrics.dns.tcp_answers);
        if answer.len() <= limit {
            return Ok(answer);
        }
        bump(&self.metrics.dns.truncated);
        let mut out = Vec::with_capacity(query.len().saturating_add(16));
        message::truncated(&answer, &parsed, &mut out);
        Ok(out)
    }

    /// One query an application sent over TCP to port 53 at `dst` (fake-ip mode,
    /// which answers those in the tunnel too): the answer to frame and send back, as
    /// [`Dns::on_query`] decides it; a query it sends on goes over TCP, its whole
    /// answer returned (no truncation: the client asked over TCP), SERVFAIL if that
    /// fails. `None`: not a query at all; the connection is to be closed.
    pub async fn answer_stream(
        &self,
        query: &[u8],
        src: SocketAddr,
        dst: SocketAddr,
    ) -> Option<Vec<u8>> {
        match self.on_query(query, src, dst, Instant::now()) {
            Decision::Answer(answer) => Some(answer),
            Decision::Tcp { resolver } | Decision::Relay { resolver } => {
                match self.tcp.exchange(resolver, query).await {
                    Ok(answer) => {
                        bump(&self.metrics.dns.tcp_answers);
                        Some(answer)
                    }
                    Err(e) => {
                        bump(&self.metrics.dns.tcp_errors);
                        tracing::debug!(error = %e, %resolver, "DNS over TCP failed");
                        self.servfail(query)
                    }
                }
            }
            Decision::Drop(why) => {
                tracing::debug!(why, "not a DNS query; closing the connection");
                None
            }
        }
    }

    /// A SERVFAIL answer to `query` (for a query over TCP that failed); `None` if the
    /// query does not decode.
    pub fn servfail(&self, query: &[u8]) -> Option<Vec<u8>> {
        bump(&self.metrics.dns.servfail);
        Self::empty(query, message::RCODE_SERVFAIL)
    }

    /// A REFUSED answer to `query` (a zone transfer asked for in the middle of a
    /// connection the tunnel answers itself); `None` if the query does not decode.
    pub fn refused(&self, query: &[u8]) -> Option<Vec<u8>> {
        Self::empty(query, message::RCODE_REFUSED)
    }

    fn empty(query: &[u8], rcode: u8) -> Option<Vec<u8>> {
        let parsed = Message::decode_query(query).ok()?;
        let mut out = Vec::with_capacity(query.len().saturating_add(16));
        message::empty_response(&parsed, rcode, &mut out);
        Some(out)
    }

    /// The counters.
    pub fn stats(&self) -> DnsStats {
        DnsStats::of(&self.metrics)
    }

    /// Open DNS-over-TCP connections to `resolver`.
    pub fn tcp_connections(&self, resolver: SocketAddr) -> usize {
        self.tcp.open_connections(resolver)
    }
}

/// Room for an answer to `query`: header, question, one record, one OPT record.
fn query_answer_len(query: &Message<'_>) -> usize {
    message::HEADER_LEN + query.question_wire_len() + 28 + 11
}
