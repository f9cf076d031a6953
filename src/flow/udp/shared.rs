//! What the association tasks share with the NAT: the upstream, the egress, the
//! table, what the proxy last said about UDP, and the once-per-burst warnings.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use super::{Assoc, LastSent, UdpConfig};
use crate::egress::{Egress, Unreachable};
use crate::flow::BurstLog;
use crate::metrics::{Metrics, SocksCommand};
use crate::socks::Address;
use crate::upstream::{RelayError, UdpAssociation, Upstream, UpstreamError};

/// Why the proxy will not carry UDP right now, and until when we believe it.
#[derive(Debug, Clone)]
pub(super) struct Refusal {
    pub(super) until: Instant,
    pub(super) why: String,
}

/// The warnings the NAT logs once per burst.
#[derive(Debug)]
pub(super) struct NatLogs {
    /// The proxy refused or could not be reached.
    pub(super) refusals: BurstLog,
    /// `--max-udp` reached.
    pub(super) limit: BurstLog,
    /// The proxy speaks SOCKS4.
    pub(super) no_udp: BurstLog,
    /// The relay socket reported an ICMP error.
    pub(super) relay_unreachable: BurstLog,
}

/// What the association tasks share with the NAT.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) upstream: Upstream,
    pub(super) egress: Arc<Egress>,
    pub(super) config: UdpConfig,
    pub(super) table: Arc<Mutex<HashMap<SocketAddr, Arc<Assoc>>>>,
    pub(super) refusal: Arc<Mutex<Option<Refusal>>>,
    /// DNS in `udp` mode goes over TCP (see [`super::NatTable`]).
    pub(super) dns_over_tcp: Arc<AtomicBool>,
    /// See [`super::NatTable`].
    pub(super) dns_silence: Arc<Mutex<Option<(Instant, u32)>>>,
    /// Sends a DNS query (application, queried address, resolver, query) over TCP:
    /// for the queries that waited on an association the proxy refused.
    pub(super) dns_fallback: Option<super::DnsFallback>,
    /// The counters (those of egress: one set for the tunnel).
    pub(super) metrics: Arc<Metrics>,
    pub(super) logs: Arc<NatLogs>,
    /// The clock associations count idle time from.
    pub(super) epoch: Instant,
}

impl Shared {
    pub(super) fn table(&self) -> MutexGuard<'_, HashMap<SocketAddr, Arc<Assoc>>> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn refusal(&self, now: Instant) -> Option<Refusal> {
        let mut refusal = self.refusal.lock().unwrap_or_else(PoisonError::into_inner);
        match &*refusal {
            Some(r) if now < r.until => Some(r.clone()),
            Some(_) => {
                *refusal = None;
                None
            }
            None => None,
        }
    }

    /// Remembers that the proxy would not (or could not) associate, and logs it once
    /// per burst.
    pub(super) fn refused(&self, error: &UpstreamError) {
        self.metrics.socks.record(SocksCommand::UdpAssociate, error);
        let now = Instant::now();
        let unreachable = error.proxy_unreachable();
        let memory = if unreachable {
            self.config.unreachable_memory
        } else {
            self.dns_over_tcp.store(true, Relaxed);
            self.config.refusal_memory
        };
        *self.refusal.lock().unwrap_or_else(PoisonError::into_inner) = Some(Refusal {
            until: now + memory,
            why: error.to_string(),
        });
        if let Some(suppressed) = self.logs.refusals.check(now) {
            if unreachable {
                tracing::warn!(
                    error = %error, remembered = ?memory, suppressed,
                    "UDP association failed; answering datagrams with port unreachable"
                );
            } else {
                tracing::warn!(
                    error = %error, remembered = ?memory, suppressed,
                    "UDP association failed; answering datagrams with port unreachable \
                     (DNS queries go over TCP from now on)"
                );
            }
        }
    }

    /// Answers a datagram the proxy will not carry with port unreachable.
    pub(super) fn unreachable(&self, app: SocketAddr, dst: SocketAddr, payload: &[u8]) {
        self.metrics.udp.refused.fetch_add(1, Relaxed);
        self.egress.port_unreachable(app, dst, payload);
    }

    /// Sends one datagram of `assoc` to the relay now, or drops and counts it; then
    /// settles what the relay socket reported (see [`Shared::settle`]).
    pub(super) fn relay(
        &self,
        assoc: &Assoc,
        relay: &UdpAssociation,
        dst: SocketAddr,
        target: &Address,
        payload: &[u8],
        scratch: &mut Vec<u8>,
    ) {
        let sent = match relay.try_send_to(payload, target, scratch) {
            Ok(()) => {
                self.metrics.udp.datagrams_up.fetch_add(1, Relaxed);
                self.metrics
                    .udp
                    .bytes_up
                    .fetch_add(payload.len() as u64, Relaxed);
                Some(LastSent::new(dst, payload))
            }
            Err(e) => {
                self.metrics.udp.relay_busy.fetch_add(1, Relaxed);
                tracing::trace!(error = %e, "relay socket refused a datagram");
                None
            }
        };
        self.settle(assoc, relay, sent);
    }

    /// After a send or receive on `assoc`'s relay socket: an ICMP error it reported
    /// from the relay's address belongs to a datagram sent before (the one sent last,
    /// as far as we know), and is passed on to the application as the same kind of
    /// unreachable from that datagram's destination, as the kernel's own path would
    /// report it. `sent`: the datagram the call sent last, now the one to blame for
    /// the next.
    pub(super) fn settle(&self, assoc: &Assoc, relay: &UdpAssociation, sent: Option<LastSent>) {
        let blamed = {
            let mut state = assoc.state();
            let blamed = relay
                .take_error()
                .and_then(|error| Some((error, state.last_sent.take()?)));
            if sent.is_some() {
                state.last_sent = sent;
            }
            blamed
        };
        let Some((error, blamed)) = blamed else {
            return;
        };
        self.metrics.udp.relay_unreachable.fetch_add(1, Relaxed);
        let why = match error {
            RelayError::Refused => Unreachable::Port,
            RelayError::Prohibited => Unreachable::Prohibited,
            RelayError::NetUnreachable => Unreachable::Net,
        };
        self.egress
            .unreachable(assoc.app, blamed.dst, blamed.head(), why);
        if let Some(suppressed) = self.logs.relay_unreachable.check(Instant::now()) {
            match error {
                RelayError::Refused => tracing::info!(
                    relay = %relay.relay(), to = %blamed.dst, suppressed,
                    "port unreachable from the proxy's UDP relay, passed on to the application \
                     (the relay is not listening, or the proxy passed on the destination's)"
                ),
                RelayError::Prohibited | RelayError::NetUnreachable => tracing::warn!(
                    relay = %relay.relay(), to = %blamed.dst, ?error, suppressed,
                    "the proxy's UDP relay is unreachable or prohibited (ICMP from the relay's \
                     address; a firewall in front of the proxy rejecting its relay ports?), \
                     passed on to the application"
                ),
            }
        }
    }

    pub(super) fn millis(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }
}
