//! The stack's TCP flows: a SYN becomes a socket and a flow task (its SYN-ACK held
//! until the CONNECT succeeds), a refused one gets its RST, and a flow's socket
//! transmits and schedules its next timer.
//!
//! Stage: inside the stack, on its thread; it never talks to the proxy (the flow task
//! does) and never blocks.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use smoltcp::iface::{PollResult, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::IpListenEndpoint;
use tracing::Instrument;

use super::classify::DropReason;
use super::phy::OnePacket;
use super::{
    ACK_DELAY, EGRESS_PER_POLL, MAX_PENDING, MIN_TIMER, PacketIo, Stack, smol_now, std_at, tsclock,
};
use crate::flow::{FlowId, FourTuple, TcpFlow};
use crate::metrics::bump;

impl<D: PacketIo> Stack<D> {
    /// A SYN (sequence number `seq`) to a connection we do not have: give it a socket
    /// whose SYN-ACK waits for the flow's upstream CONNECT, and start the flow.
    pub(super) fn open(&mut self, tuple: FourTuple, seq: u32, syn: &[u8], now: Instant) {
        if self.cx.upstream.is_proxy(tuple.dst) {
            // The proxy's own address through the tunnel would loop: refuse it.
            bump(&self.stats.flows.loops_refused);
            if let Some(suppressed) = self.loop_log.check(now) {
                tracing::warn!(
                    %tuple, suppressed,
                    "a connection to the proxy itself entered the tunnel; reset (routing loop: \
                     use --setup, --fwmark or --interface so the proxy is reached directly)"
                );
            }
            self.refuse(syn, now);
            return;
        }
        let Some(target) = self.datagrams.target_for(tuple.dst, now) else {
            // A fake-IP address that maps to no name (any more): never a wrong
            // destination, a reset.
            self.refuse(syn, now);
            return;
        };
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            bump(&self.stats.flows.over_limit);
            if let Some(suppressed) = self.limit_log.check(now) {
                tracing::warn!(
                    limit = self.config.max_flows,
                    suppressed,
                    "flow limit reached; resetting new connections"
                );
            }
            self.refuse(syn, now);
            return;
        };
        let Ok(pending) = self.pending.clone().try_acquire_owned() else {
            bump(&self.stats.flows.over_limit);
            if let Some(suppressed) = self.limit_log.check(now) {
                tracing::warn!(
                    limit = MAX_PENDING,
                    suppressed,
                    "too many connections waiting for the proxy; resetting new ones"
                );
            }
            self.refuse(syn, now);
            return;
        };
        // No rings until the CONNECT succeeds (the flow then adds them), but the window
        // scale announced in the SYN-ACK is the one for the largest ring.
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(Vec::new()),
            tcp::SocketBuffer::new(Vec::new()),
        );
        socket.set_window_shift_capacity(self.config.tcp_rx_buffer);
        socket.set_nagle_enabled(false);
        // RFC 7323 timestamps, as a kernel peer offers them (smoltcp drops them when
        // the SYN had none): the application's kernel measures RTT on every ACK, and
        // its TIME_WAIT sockets can be reused by `tcp_tw_reuse` (which needs them), so
        // a host opening thousands of short connections through the tunnel does not
        // run out of ports sooner than without it.
        socket.set_tsval_generator(Some(tsclock::tsval));
        socket.set_ack_delay(Some(ACK_DELAY.into()));
        socket.set_timeout(Some(self.config.tcp_timeout.into()));
        socket.pause_synack(true);
        let endpoint = IpListenEndpoint {
            addr: Some(ip_of(tuple.dst.ip())),
            port: tuple.dst.port(),
        };
        if socket.listen(endpoint).is_err() {
            self.drop_packet(DropReason::NotUnicast);
            return;
        }
        let mut sockets = SocketSet::new(Vec::with_capacity(1));
        let handle = sockets.add(socket);
        self.deliver(syn, &mut sockets, now);
        if sockets.get::<tcp::Socket>(handle).state() != tcp::State::SynReceived {
            // smoltcp did not take the SYN (it answered it, or dropped it).
            return;
        }
        let id = self.next_id;
        self.next_id = self.next_id.saturating_add(1);
        let flow = Arc::new(TcpFlow::new(
            id,
            tuple,
            seq,
            target,
            sockets,
            handle,
            self.buffers.clone(),
        ));
        self.flows.insert(id, flow.clone());
        self.by_tuple.insert(tuple, id);
        bump(&self.stats.flows.opened);
        let span =
            tracing::info_span!("flow", id, proto = "tcp", src = %tuple.src, dst = %tuple.dst);
        self.tasks
            .spawn(crate::flow::tcp::run(flow, self.cx.clone(), permit, pending).instrument(span));
    }

    /// Answers a segment with RST (smoltcp does it for a segment no socket takes).
    pub(super) fn refuse(&mut self, segment: &[u8], now: Instant) {
        let mut none = std::mem::replace(&mut self.no_sockets, SocketSet::new(Vec::new()));
        self.deliver(segment, &mut none, now);
        self.no_sockets = none;
    }

    /// Lets one flow's socket transmit, then schedules its next timer or, once it is
    /// closed and its task has ended, forgets the flow.
    pub(super) fn egress(&mut self, id: FlowId, now: Instant) {
        let Some(flow) = self.flows.get(&id).cloned() else {
            return;
        };
        let ts = smol_now(self.epoch, now);
        let mut sockets = flow.sockets();
        let shrink_at = flow.resize_buffers(sockets.get_mut::<tcp::Socket>(flow.handle), now);
        // Bounded: a socket that keeps finding something to send must not hold the
        // loop (and every other flow, and shutdown) for ever; it is polled again next
        // pass.
        let mut more = false;
        {
            let mut dev = OnePacket::new(None, &*self.device, &mut self.scratch, &mut self.tx);
            let mut sent = 0;
            while self.iface.poll_egress(ts, &mut dev, &mut sockets)
                == PollResult::SocketStateChanged
            {
                sent += 1;
                if sent >= EGRESS_PER_POLL {
                    more = true;
                    break;
                }
            }
        }
        let state = sockets.get::<tcp::Socket>(flow.handle).state();
        let closed = matches!(state, tcp::State::Closed | tcp::State::TimeWait);
        if closed && flow.task_done() {
            drop(sockets);
            if matches!(flow.target, crate::socks::Address::Domain(..)) {
                // The fake address stays its name's until the TTL (and the grace)
                // has passed since its last flow ended.
                self.datagrams.dns().touch(flow.tuple.dst.ip(), now);
            }
            self.flows.remove(&id);
            self.by_tuple.remove(&flow.tuple);
            self.timers.cancel(id);
            return;
        }
        let poll_at = self
            .iface
            .poll_at(ts, &sockets)
            .map(|at| std_at(self.epoch, at));
        let again = more.then_some(now);
        if let Some(at) = poll_at.into_iter().chain(shrink_at).chain(again).min() {
            self.timers.schedule(id, at.max(now + MIN_TIMER));
        }
    }
}

fn ip_of(ip: IpAddr) -> smoltcp::wire::IpAddress {
    match ip {
        IpAddr::V4(v4) => smoltcp::wire::IpAddress::Ipv4(v4),
        IpAddr::V6(v6) => smoltcp::wire::IpAddress::Ipv6(v6),
    }
}
