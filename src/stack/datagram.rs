//! The stack's seam for everything that is not TCP: each UDP datagram the classifier
//! accepted goes to DNS (any datagram to port 53, whatever its destination address)
//! or to the UDP NAT ([`crate::flow::udp`]). Replies and errors go out through
//! [`Egress`]. This file decides only where a datagram goes; the protocols live in
//! their own modules.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::dns::{Decision, Dns, Target};
use crate::egress::{Egress, PacketSink};
use crate::flow::FourTuple;
use crate::flow::udp::{DnsFallback, DnsTransport, NatTable, Outgoing, UdpConfig, UdpNat};
use crate::metrics::bump;
use crate::socks::Address;
use crate::upstream::Upstream;

use super::PacketIo;

/// The device as egress sees it.
pub(super) struct DeviceSink<D>(pub(super) Arc<D>);

impl<D: PacketIo> PacketSink for DeviceSink<D> {
    fn send_packet(&self, packet: &[u8]) -> std::io::Result<()> {
        self.0.try_send(packet)
    }

    fn max_packet(&self) -> usize {
        self.0.mtu()
    }

    fn udp_offload(&self) -> bool {
        let offload = self.0.offload();
        offload.vnet_hdr && offload.csum && offload.uso
    }

    fn send_offload(&self, hdr: &crate::offload::VnetHdr, packet: &[u8]) -> std::io::Result<()> {
        self.0.try_send_hdr(hdr, packet)
    }
}

/// DNS queries over TCP in flight at once; further queries are dropped (the
/// client retries) and counted.
const MAX_TCP_QUERIES: usize = 1024;

/// Where UDP datagrams go.
#[derive(Debug)]
pub(super) struct Datagrams {
    udp: UdpNat,
    egress: Arc<Egress>,
    upstream: Upstream,
    dns: Arc<Dns>,
    /// DNS-over-TCP queries in flight.
    dns_tasks: JoinSet<()>,
    dns_permits: Arc<Semaphore>,
    /// "DNS goes over TCP" was logged (this stack's first query after the proxy
    /// refused UDP).
    dns_over_tcp_logged: bool,
}

impl Datagrams {
    /// `table`: the UDP associations, shared by every stack of the tunnel.
    pub(super) fn new(
        upstream: Upstream,
        egress: Arc<Egress>,
        config: UdpConfig,
        dns: Arc<Dns>,
        table: &NatTable,
    ) -> Self {
        let dns_permits = Arc::new(Semaphore::new(MAX_TCP_QUERIES));
        // The queries that waited on an association the proxy refused go over TCP
        // (under the same limit as the others).
        let fallback = {
            let (dns, egress, permits) = (dns.clone(), egress.clone(), dns_permits.clone());
            DnsFallback(Arc::new(move |app, queried, resolver, query: &[u8]| {
                let Some(permit) = tcp_permit(&permits, &egress) else {
                    return;
                };
                let (dns, egress, query) = (dns.clone(), egress.clone(), query.to_vec());
                tokio::spawn(async move {
                    let _permit = permit;
                    answer_over_tcp(&dns, &egress, app, queried, resolver, &query).await;
                });
            }))
        };
        Datagrams {
            udp: UdpNat::with_table(upstream.clone(), egress.clone(), config, table)
                .with_dns_fallback(fallback),
            egress,
            upstream,
            dns,
            dns_tasks: JoinSet::new(),
            dns_permits,
            dns_over_tcp_logged: false,
        }
    }

    pub(super) fn dns(&self) -> &Dns {
        &self.dns
    }

    /// Where a flow to `dst` (TCP or UDP) must go, as the proxy is to be asked; `None`
    /// when it must be refused.
    /// A fake-IP address goes by its name; one that no name holds is refused. Port 53
    /// goes to `--dns-server` when one is set (DNS over TCP from applications too).
    pub(super) fn target_for(&self, dst: SocketAddr, now: Instant) -> Option<Address> {
        match self.dns.target_for(dst, now) {
            Target::Direct(addr) if addr.port() == 53 => {
                Some(Address::from(self.dns.resolver_for(addr)))
            }
            Target::Direct(addr) => Some(Address::from(addr)),
            Target::Name(name) => Some(name),
            Target::Unknown => None,
        }
    }

    /// Handles one UDP datagram from the TUN; `payload` is where its payload lies.
    pub(super) fn ingress(&mut self, tuple: FourTuple, payload: &[u8], now: Instant) {
        if self.upstream.is_proxy(tuple.dst) {
            // Would loop: the proxy's own address is never relayed.
            self.egress.port_unreachable(tuple.src, tuple.dst, payload);
            return;
        }
        if tuple.dst.port() == 53 {
            // Every query to port 53, whatever its destination address.
            self.dns_query(tuple, payload, now);
            return;
        }
        let Some(target) = self.target_for(tuple.dst, now) else {
            self.egress.port_unreachable(tuple.src, tuple.dst, payload);
            return;
        };
        self.send(tuple.src, tuple.dst, &target, payload, now);
    }

    fn send(
        &mut self,
        app: SocketAddr,
        dst: SocketAddr,
        target: &Address,
        payload: &[u8],
        now: Instant,
    ) {
        self.udp.send(
            Outgoing {
                app,
                dst,
                target,
                payload,
            },
            now,
        );
    }

    /// One query to port 53, handled by the DNS mode.
    fn dns_query(&mut self, tuple: FourTuple, payload: &[u8], now: Instant) {
        let (app, queried) = (tuple.src, tuple.dst);
        match self.dns.on_query(payload, app, queried, now) {
            Decision::Answer(answer) => {
                self.egress.udp(queried, app, &answer);
            }
            Decision::Relay { resolver } if self.dns_over_tcp(now) => {
                // The proxy has no UDP (or its relay never answers): the query goes
                // over TCP, as in `--dns tcp`, instead of getting port unreachable
                // or no answer at all.
                if !self.dns_over_tcp_logged {
                    self.dns_over_tcp_logged = true;
                    tracing::info!(
                        "DNS queries go over TCP from now on (as with --dns tcp): the \
                         proxy's UDP refused or never answered"
                    );
                }
                self.query_over_tcp(app, queried, resolver, payload);
            }
            Decision::Relay { resolver } => {
                let target = Address::from(resolver);
                self.send(app, queried, &target, payload, now);
            }
            Decision::Tcp { resolver } => self.query_over_tcp(app, queried, resolver, payload),
            Decision::Drop(reason) => {
                tracing::trace!(%tuple, reason, "DNS datagram dropped");
                bump(&self.egress.metrics().dns.seam_dropped);
            }
        }
    }

    /// Whether a DNS query in `udp` mode goes over TCP (see
    /// [`UdpNat::dns_over_tcp_at`]).
    fn dns_over_tcp(&mut self, now: Instant) -> bool {
        match self.udp.dns_over_tcp_at(now) {
            DnsTransport::Udp => false,
            DnsTransport::Tcp => true,
            DnsTransport::TcpFromNow {
                queries,
                silent_for,
            } => {
                tracing::warn!(
                    queries,
                    ?silent_for,
                    "no DNS answer (no datagram at all) has come back through the proxy's \
                     UDP relay; DNS goes over TCP from now on"
                );
                true
            }
        }
    }

    /// Sends `query` (from `app` to `queried`) over TCP to `resolver` and its answer
    /// back as UDP (SERVFAIL if that fails), in a task.
    fn query_over_tcp(
        &mut self,
        app: SocketAddr,
        queried: SocketAddr,
        resolver: SocketAddr,
        query: &[u8],
    ) {
        let Some(permit) = tcp_permit(&self.dns_permits, &self.egress) else {
            return;
        };
        let (dns, egress) = (self.dns.clone(), self.egress.clone());
        let query = query.to_vec();
        self.dns_tasks.spawn(async move {
            let _permit = permit;
            answer_over_tcp(&dns, &egress, app, queried, resolver, &query).await;
        });
    }

    /// Sends the datagrams queued for the proxy during a burst (see
    /// [`UdpNat::flush`]): call it once the burst read from the device is handled.
    pub(super) fn flush(&mut self) {
        self.udp.flush();
    }

    /// Collects ended tasks (and sends anything still queued).
    pub(super) fn reap(&mut self) {
        self.udp.flush();
        self.udp.reap();
        while self.dns_tasks.try_join_next().is_some() {}
    }

    /// Ends every association and query.
    pub(super) async fn close(&mut self) {
        self.dns_tasks.shutdown().await;
        self.udp.close().await;
    }
}

/// A place among the DNS-over-TCP queries in flight; `None` (the query dropped and
/// counted, the client retries) when all are taken.
fn tcp_permit(permits: &Arc<Semaphore>, egress: &Egress) -> Option<OwnedSemaphorePermit> {
    let permit = permits.clone().try_acquire_owned().ok();
    if permit.is_none() {
        bump(&egress.metrics().dns.seam_dropped);
    }
    permit
}

/// Asks `resolver` over TCP (through the proxy) and sends the answer to `app` as
/// UDP from `queried`; SERVFAIL if that fails.
async fn answer_over_tcp(
    dns: &Dns,
    egress: &Egress,
    app: SocketAddr,
    queried: SocketAddr,
    resolver: SocketAddr,
    query: &[u8],
) {
    let max = egress.max_udp_payload(queried.ip());
    let answer = match dns.query_tcp(resolver, query, max).await {
        Ok(answer) => Some(answer),
        Err(e) => {
            tracing::debug!(%resolver, error = %e, "DNS over TCP failed");
            dns.servfail(query)
        }
    };
    if let Some(answer) = answer {
        egress.udp(queried, app, &answer);
    }
}
