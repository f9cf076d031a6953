//! The stack's seam for everything that is not TCP: each UDP datagram the classifier
//! accepted goes to DNS (any datagram to port 53, whatever its destination address)
//! or to the UDP NAT ([`crate::flow::udp`]). Replies and errors go out through
//! [`Egress`]. This file decides only where a datagram goes; the protocols live in
//! their own modules.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::egress::{Egress, PacketSink};
use crate::flow::FourTuple;
use crate::flow::udp::{Outgoing, UdpConfig, UdpNat};
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
}

/// Where UDP datagrams go.
#[derive(Debug)]
pub(super) struct Datagrams {
    udp: UdpNat,
    egress: Arc<Egress>,
    upstream: Upstream,
}

impl Datagrams {
    pub(super) fn new(upstream: Upstream, egress: Arc<Egress>, config: UdpConfig) -> Self {
        Datagrams {
            udp: UdpNat::new(upstream.clone(), egress.clone(), config),
            egress,
            upstream,
        }
    }

    pub(super) fn udp(&self) -> &UdpNat {
        &self.udp
    }

    pub(super) fn egress(&self) -> &Egress {
        &self.egress
    }

    /// Where a flow to `dst` (TCP or UDP) must go, as the proxy is to be asked; `None`
    /// when it must be refused.
    pub(super) fn target_for(&self, dst: SocketAddr, _now: Instant) -> Option<Address> {
        Some(Address::from(dst))
    }

    /// Handles one UDP datagram from the TUN; `payload` is where its payload lies.
    pub(super) fn ingress(&mut self, tuple: FourTuple, payload: &[u8], now: Instant) {
        if self.upstream.is_proxy(tuple.dst) {
            // Would loop: the proxy's own address is never relayed.
            self.egress.port_unreachable(tuple.src, tuple.dst, payload);
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

    /// Collects ended tasks.
    pub(super) fn reap(&mut self) {
        self.udp.reap();
    }

    /// Ends every association.
    pub(super) async fn close(&mut self) {
        self.udp.close().await;
    }
}
