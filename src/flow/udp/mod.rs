//! UDP flows: a full-cone NAT from application endpoints to SOCKS5 UDP associations.
//!
//! Stage: between the stack (which hands in each UDP datagram read from the TUN,
//! already classified and checksum-checked) and the proxy. UDP bypasses smoltcp.
//!
//! One association per application source endpoint (address and port), reused for
//! every destination that endpoint talks to: endpoint-independent mapping and
//! filtering (RFC 4787 "full cone"), so a reply from any remote reaches the
//! application with that remote as its source. Each association is a task
//! (`association`) that sets up the SOCKS5 UDP ASSOCIATE, relays the proxy's
//! datagrams back through [`Egress`], re-associates when the proxy drops the control
//! connection, and ends after `idle_timeout` without traffic (shorter for
//! associations that only ever carried DNS).
//!
//! The way out is cheap: once an association is up, the stack's datagrams go
//! straight to its relay socket (non-blocking), a burst at a time: the first
//! datagram after a flush goes at once (a lone request waits for nothing), the
//! others of the burst wait in a bounded outbox (`outbox`) until [`UdpNat::flush`],
//! called when the stack has read its burst from the TUN, sends each association's
//! datagrams with one system call. A socket that cannot take one drops it and counts it, as a full
//! router queue does. While the association is being set up, datagrams wait in a
//! small bounded queue.
//!
//! When the proxy has no UDP (SOCKS4/4a, or a SOCKS5 server that refuses UDP
//! ASSOCIATE with 0x07 or any failure), the application gets an ICMP / ICMPv6 port
//! unreachable at once; the refusal is remembered for a while, so each datagram does
//! not cost a new handshake, and it is logged once per burst.
//!
//! It must not touch smoltcp, read the TUN, or resolve names.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod association;
mod outbox;
mod shared;

use shared::{NatLogs, Refusal, Shared};

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::sync::Notify;
use tokio::task::JoinSet;

use super::BurstLog;
use crate::egress::Egress;
use crate::socks::{Address, Protocol};
use crate::upstream::{UdpAssociation, Upstream};

/// DNS queries sent to a relay that has never answered anything, the first at
/// least [`SILENT_FOR`] ago, after which DNS goes over TCP: the next query (a
/// resolver retries after 1-5 s) is carried over TCP.
pub const SILENT_QUERIES: u32 = 1;
/// See [`SILENT_QUERIES`].
pub const SILENT_FOR: Duration = Duration::from_secs(2);

/// Sends one DNS query over TCP: application, queried address, resolver, query.
pub type DnsSend = dyn Fn(SocketAddr, SocketAddr, SocketAddr, &[u8]) + Send + Sync;

/// A [`DnsSend`] to share ([`UdpNat::with_dns_fallback`]).
#[derive(Clone)]
pub struct DnsFallback(pub Arc<DnsSend>);

impl std::fmt::Debug for DnsFallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DnsFallback")
    }
}

/// How a DNS query in `udp` mode goes ([`UdpNat::dns_over_tcp_at`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsTransport {
    /// Through the association, as any datagram.
    Udp,
    /// Over TCP: the proxy's UDP was found wanting before.
    Tcp,
    /// Over TCP from this query on: the relay has answered nothing while
    /// `queries` went to it over `silent_for`.
    TcpFromNow {
        /// Queries sent to the relay.
        queries: u32,
        /// Since the first of them.
        silent_for: Duration,
    },
}

/// The largest UDP payload over IPv4 (65535 - 20 - 8): the relay datagram, SOCKS
/// header included, must fit in it.
const MAX_RELAY_DATAGRAM: usize = 65_507;
/// Remote aliases remembered per association (see [`Assoc::present`]).
const MAX_ALIASES: usize = 16;

/// UDP settings.
#[derive(Debug, Clone)]
pub struct UdpConfig {
    /// An association without traffic either way for this long is closed.
    pub idle_timeout: Duration,
    /// The same for associations that only ever carried DNS (port 53).
    pub dns_idle_timeout: Duration,
    /// Associations at once; datagrams from further endpoints are dropped.
    pub max_associations: usize,
    /// Datagrams queued per association while it is being set up.
    pub pending: usize,
    /// How long a refusal of UDP by the proxy is remembered.
    pub refusal_memory: Duration,
    /// How long "the proxy cannot be reached" is remembered.
    pub unreachable_memory: Duration,
    /// The device's networks: datagrams to their broadcast addresses are dropped.
    pub local_nets: Vec<IpNet>,
}

impl Default for UdpConfig {
    fn default() -> Self {
        UdpConfig {
            idle_timeout: Duration::from_secs(60),
            dns_idle_timeout: Duration::from_secs(10),
            max_associations: 8192,
            pending: 64,
            refusal_memory: Duration::from_secs(30),
            unreachable_memory: Duration::from_secs(2),
            local_nets: Vec::new(),
        }
    }
}

/// UDP counters (their group of the one set of counters).
pub use crate::metrics::UdpStats;

/// A datagram on its way out: where the application sent it, and how the proxy is to
/// be asked to deliver it (the same address, or a name for a fake-IP destination, or
/// the configured resolver for DNS).
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    /// The application's endpoint.
    pub app: SocketAddr,
    /// The destination as the application addressed it.
    pub dst: SocketAddr,
    /// The destination as the proxy is asked to reach it.
    pub target: &'a Address,
    /// The payload.
    pub payload: &'a [u8],
}

/// The associations by application endpoint, and what the proxy last said about UDP.
/// Cloning shares them: the stacks of a multi-queue tunnel each have a [`UdpNat`]
/// over one table ([`UdpNat::with_table`]), so a datagram from an endpoint that
/// arrives on any queue finds the one association of that endpoint (full cone holds
/// whichever queue the kernel picked). Replies go out through the egress of the
/// stack that opened the association.
#[derive(Debug, Clone)]
pub struct NatTable {
    table: Arc<Mutex<HashMap<SocketAddr, Arc<Assoc>>>>,
    refusal: Arc<Mutex<Option<Refusal>>>,
    /// DNS in `udp` mode goes over TCP from now on: the proxy has refused a UDP
    /// ASSOCIATE (it answered, with a failure), or its relay never answered.
    dns_over_tcp: Arc<AtomicBool>,
    /// While the relay has never answered anything: when the first DNS query went
    /// to it, and how many have gone since (every stack's).
    dns_silence: Arc<Mutex<Option<(Instant, u32)>>>,
    /// Once-per-burst warnings, once for all sharers.
    logs: Arc<NatLogs>,
    /// The clock associations count idle time from (one for every sharer).
    epoch: Instant,
}

impl Default for NatTable {
    fn default() -> Self {
        NatTable {
            table: Arc::default(),
            refusal: Arc::default(),
            dns_over_tcp: Arc::default(),
            dns_silence: Arc::default(),
            logs: Arc::new(NatLogs {
                refusals: BurstLog::new(Duration::from_secs(5)),
                limit: BurstLog::new(Duration::from_secs(5)),
                no_udp: BurstLog::new(Duration::from_secs(5)),
                relay_unreachable: BurstLog::new(Duration::from_secs(5)),
            }),
            epoch: Instant::now(),
        }
    }
}

/// A datagram waiting for its association to come up.
#[derive(Debug)]
struct Queued {
    dst: SocketAddr,
    target: Address,
    payload: Vec<u8>,
}

/// Where an association stands.
#[derive(Debug)]
enum Phase {
    /// Being set up (or waiting to be set up again): datagrams queue.
    Pending(VecDeque<Queued>),
    /// Up: datagrams go straight to the relay socket.
    Ready(Arc<UdpAssociation>),
}

#[derive(Debug)]
struct AssocState {
    phase: Phase,
    /// How the application addressed destinations that the proxy knows by another
    /// address (a name for a fake IP, the configured resolver for DNS), newest last.
    /// Once a name is among them, direct destinations are recorded too, so that a
    /// reply from one is never taken for the name's.
    aliases: VecDeque<(Address, SocketAddr)>,
    /// Some alias is a name.
    has_names: bool,
    /// The datagram sent last, to blame for a port unreachable the relay socket
    /// reports later.
    last_sent: Option<LastSent>,
}

/// Payload bytes of the last datagram kept for the quote of a port unreachable
/// blamed on it (the application's stack matches the error by the quoted headers).
const QUOTED_HEAD: usize = 32;

/// What a port unreachable blamed on a datagram after it went needs: its destination
/// as the application addressed it, and the start of its payload to quote.
#[derive(Debug, Clone, Copy)]
struct LastSent {
    dst: SocketAddr,
    head: [u8; QUOTED_HEAD],
    len: usize,
}

impl LastSent {
    fn new(dst: SocketAddr, payload: &[u8]) -> LastSent {
        let len = payload.len().min(QUOTED_HEAD);
        let mut head = [0u8; QUOTED_HEAD];
        if let (Some(to), Some(from)) = (head.get_mut(..len), payload.get(..len)) {
            to.copy_from_slice(from);
        }
        LastSent { dst, head, len }
    }

    fn head(&self) -> &[u8] {
        self.head.get(..self.len).unwrap_or_default()
    }
}

/// One application endpoint's association.
#[derive(Debug)]
struct Assoc {
    app: SocketAddr,
    state: Mutex<AssocState>,
    /// Wakes the task when a datagram is queued while it waits to re-associate.
    queued: Notify,
    /// Last traffic either way, in milliseconds since `Shared::epoch`.
    last_used: AtomicU64,
    /// Every datagram so far went to port 53.
    only_dns: AtomicBool,
}

impl Assoc {
    fn state(&self) -> MutexGuard<'_, AssocState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The source to show the application for a reply from `from`: the address the
    /// application used, when the proxy knows that destination by another address;
    /// `from` itself otherwise. `None`: a name we cannot map back.
    fn present(&self, from: &Address) -> Option<SocketAddr> {
        let state = self.state();
        let aliases = &state.aliases;
        if let Some((_, dst)) = aliases.iter().rev().find(|(target, _)| target == from) {
            return Some(*dst);
        }
        let Address::Ip(ip) = from else {
            return None;
        };
        // A reply from the address a name resolved to at the proxy: show it as the
        // fake address the application sent to on that port (the proxy reports the
        // real address, which the application never saw).
        aliases
            .iter()
            .rev()
            .find(|(target, _)| matches!(target, Address::Domain(_, port) if *port == ip.port()))
            .map_or(Some(*ip), |(_, dst)| Some(*dst))
    }

    fn remember_alias(&self, state: &mut AssocState, target: &Address, dst: SocketAddr) {
        if state
            .aliases
            .back()
            .is_some_and(|(t, d)| t == target && *d == dst)
        {
            return;
        }
        if let Some(at) = state.aliases.iter().position(|(t, _)| t == target) {
            state.aliases.remove(at);
        } else if state.aliases.len() >= MAX_ALIASES {
            state.aliases.pop_front();
        }
        state.aliases.push_back((target.clone(), dst));
    }
}

/// The NAT table: the stack's handle on the UDP path.
#[derive(Debug)]
pub struct UdpNat {
    shared: Arc<Shared>,
    tasks: JoinSet<()>,
    /// The proxy speaks SOCKS5 (the only version with UDP).
    udp_capable: bool,
    /// Datagrams for ready associations, until [`UdpNat::flush`].
    outbox: outbox::Outbox,
    /// A datagram went since the last flush: the burst's next ones wait.
    in_burst: bool,
    /// The encoding buffer of a datagram sent at once (reused).
    scratch: Vec<u8>,
}

impl UdpNat {
    /// A NAT whose associations go through `upstream` and whose replies go out
    /// through `egress`.
    pub fn new(upstream: Upstream, egress: Arc<Egress>, config: UdpConfig) -> Self {
        UdpNat::with_table(upstream, egress, config, &NatTable::default())
    }

    /// As [`UdpNat::new`], over `table` (shared with the other NATs made from it);
    /// the associations this NAT opens run as tasks on the runtime that calls
    /// [`UdpNat::send`], and their replies go out through `egress`.
    pub fn with_table(
        upstream: Upstream,
        egress: Arc<Egress>,
        config: UdpConfig,
        table: &NatTable,
    ) -> Self {
        let udp_capable = upstream.proxy().protocol == Protocol::Socks5;
        UdpNat {
            shared: Arc::new(Shared {
                metrics: egress.metrics().clone(),
                upstream,
                egress,
                config,
                table: table.table.clone(),
                refusal: table.refusal.clone(),
                dns_over_tcp: table.dns_over_tcp.clone(),
                dns_silence: table.dns_silence.clone(),
                dns_fallback: None,
                logs: table.logs.clone(),
                epoch: table.epoch,
            }),
            tasks: JoinSet::new(),
            udp_capable,
            outbox: outbox::Outbox::default(),
            in_burst: false,
            scratch: Vec::with_capacity(2048),
        }
    }

    /// The NAT with `fallback` for the DNS queries that waited on an association
    /// the proxy refused: they go over TCP instead of getting port unreachable.
    pub fn with_dns_fallback(mut self, fallback: DnsFallback) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.dns_fallback = Some(fallback);
        }
        self
    }

    /// How a DNS query in `udp` mode, about to go to the proxy at `now`, should go
    /// (the same answer for every NAT sharing the table): over TCP once the proxy
    /// has refused UDP ASSOCIATE, or once its relay has never answered anything
    /// while [`SILENT_QUERIES`] queries went to it, the first at least
    /// [`SILENT_FOR`] ago (a relay that a firewall or NAT in front of the proxy
    /// swallows: UDP ASSOCIATE succeeds, every datagram vanishes). Once anything has
    /// come back from the relay, its silence no longer counts.
    pub fn dns_over_tcp_at(&self, now: Instant) -> DnsTransport {
        let shared = &self.shared;
        if shared.dns_over_tcp.load(Relaxed) {
            return DnsTransport::Tcp;
        }
        let mut silence = shared
            .dns_silence
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if shared.metrics.udp.datagrams_down.load(Relaxed) > 0 {
            *silence = None;
            return DnsTransport::Udp;
        }
        let (first, sent) = silence.get_or_insert((now, 0));
        let silent_for = now.saturating_duration_since(*first);
        if *sent >= SILENT_QUERIES && silent_for >= SILENT_FOR {
            shared.dns_over_tcp.store(true, Relaxed);
            return DnsTransport::TcpFromNow {
                queries: *sent,
                silent_for,
            };
        }
        *sent = sent.saturating_add(1);
        DnsTransport::Udp
    }

    /// The counters.
    pub fn stats(&self) -> &UdpStats {
        &self.shared.metrics.udp
    }

    /// Associations open now.
    pub fn len(&self) -> usize {
        self.shared.table().len()
    }

    /// True when no association is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sends one datagram from an application through its association, creating the
    /// association on first use. Never blocks. Once the association is up, the
    /// first datagram after a flush goes at once; the next ones wait in the outbox
    /// until [`UdpNat::flush`] (or until the outbox is full): call that when a burst
    /// has been handed in.
    pub fn send(&mut self, out: Outgoing<'_>, now: Instant) {
        let shared = self.shared.clone();
        if is_directed_broadcast(out.dst.ip(), &shared.config.local_nets) {
            shared.metrics.udp.broadcast.fetch_add(1, Relaxed);
            return;
        }
        if relay_len(out.target, out.payload.len()) > MAX_RELAY_DATAGRAM {
            shared.metrics.udp.oversized.fetch_add(1, Relaxed);
            return;
        }
        if !self.udp_capable {
            if let Some(suppressed) = self.shared.logs.no_udp.check(now) {
                tracing::warn!(
                    proxy = %shared.upstream.proxy(), suppressed,
                    "SOCKS4 has no UDP; answering datagrams with port unreachable"
                );
            }
            shared.unreachable(out.app, out.dst, out.payload);
            return;
        }
        let existing = shared.table().get(&out.app).cloned();
        let assoc = match existing {
            Some(assoc) => assoc,
            None => {
                if let Some(refusal) = shared.refusal(now) {
                    tracing::trace!(why = refusal.why, "UDP refused (remembered)");
                    shared.unreachable(out.app, out.dst, out.payload);
                    return;
                }
                match self.open(out.app, now) {
                    Some(assoc) => assoc,
                    None => return,
                }
            }
        };
        assoc.last_used.store(shared.millis(now), Relaxed);
        if out.dst.port() != 53 {
            assoc.only_dns.store(false, Relaxed);
        }
        let mut state = assoc.state();
        let named = matches!(out.target, Address::Domain(..));
        if named || state.has_names || *out.target != Address::from(out.dst) {
            state.has_names |= named;
            assoc.remember_alias(&mut state, out.target, out.dst);
        }
        match &mut state.phase {
            Phase::Ready(relay) => {
                // Sent with the state unlocked: a send may blame an earlier datagram
                // (which locks it), and a full outbox flushes (which may too).
                let relay = relay.clone();
                drop(state);
                if self.in_burst {
                    self.outbox
                        .push(&relay, &assoc, out.dst, out.target, out.payload, &shared);
                } else {
                    self.in_burst = true;
                    shared.relay(
                        &assoc,
                        &relay,
                        out.dst,
                        out.target,
                        out.payload,
                        &mut self.scratch,
                    );
                }
            }
            Phase::Pending(queue) if queue.len() < shared.config.pending => {
                queue.push_back(Queued {
                    dst: out.dst,
                    target: out.target.clone(),
                    payload: out.payload.to_vec(),
                });
                assoc.queued.notify_one();
            }
            Phase::Pending(_) => {
                shared.metrics.udp.queue_full.fetch_add(1, Relaxed);
            }
        }
    }

    /// A new association for `app`, its task started; `None` over the limit. If
    /// another stack sharing the table opened one for `app` since the caller looked,
    /// that one (checked under the same lock as the insert: one association per
    /// endpoint).
    fn open(&mut self, app: SocketAddr, now: Instant) -> Option<Arc<Assoc>> {
        let shared = &self.shared;
        let mut table = shared.table();
        if let Some(assoc) = table.get(&app) {
            return Some(assoc.clone());
        }
        if table.len() >= shared.config.max_associations {
            shared.metrics.udp.over_limit.fetch_add(1, Relaxed);
            if let Some(suppressed) = shared.logs.limit.check(now) {
                tracing::warn!(
                    limit = shared.config.max_associations,
                    suppressed,
                    "UDP association limit reached (--max-udp); dropping datagrams from new endpoints"
                );
            }
            return None;
        }
        let assoc = Arc::new(Assoc {
            app,
            state: Mutex::new(AssocState {
                phase: Phase::Pending(VecDeque::new()),
                aliases: VecDeque::new(),
                has_names: false,
                last_sent: None,
            }),
            queued: Notify::new(),
            last_used: AtomicU64::new(shared.millis(now)),
            only_dns: AtomicBool::new(true),
        });
        table.insert(app, assoc.clone());
        shared.metrics.udp.active.store(table.len() as u64, Relaxed);
        drop(table);
        let span = tracing::debug_span!("flow", proto = "udp", src = %app);
        self.tasks.spawn(tracing::Instrument::instrument(
            association::run(assoc.clone(), self.shared.clone()),
            span,
        ));
        Some(assoc)
    }

    /// Sends the datagrams [`UdpNat::send`] queued: each association's with one
    /// system call. Never blocks.
    pub fn flush(&mut self) {
        self.in_burst = false;
        if self.outbox.len() > 0 {
            self.outbox.flush(&self.shared);
        }
    }

    /// Collects ended association tasks (call now and then; never blocks).
    pub fn reap(&mut self) {
        while self.tasks.try_join_next().is_some() {}
    }

    /// Ends every association.
    pub async fn close(&mut self) {
        self.tasks.shutdown().await;
        self.shared.table().clear();
    }
}

/// The size of the relay datagram for `payload_len` bytes to `target`.
fn relay_len(target: &Address, payload_len: usize) -> usize {
    let address = match target {
        Address::Ip(SocketAddr::V4(_)) => 1 + 4 + 2,
        Address::Ip(SocketAddr::V6(_)) => 1 + 16 + 2,
        Address::Domain(name, _) => 1 + 1 + name.len() + 2,
    };
    3 + address + payload_len
}

/// Is `ip` the broadcast address of one of the device's IPv4 networks?
fn is_directed_broadcast(ip: IpAddr, nets: &[IpNet]) -> bool {
    nets.iter().any(|net| match net {
        IpNet::V4(v4) => v4.prefix_len() < 31 && IpAddr::V4(v4.broadcast()) == ip,
        IpNet::V6(_) => false,
    })
}

#[cfg(test)]
mod tests;
