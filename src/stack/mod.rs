//! The userspace TCP/IP stack: smoltcp in any-IP mode over the TUN.
//!
//! Stage: between the device and the flows. One task runs the poll loop: it reads
//! packets from the device in batches, classifies each ([`classify`]), hands UDP
//! datagrams to the datagram seam (`datagram`: DNS for port 53, the UDP NAT for the
//! rest; neither touches smoltcp), hands TCP segments to their flow's socket (a SYN to a new destination first gets a socket
//! of its own, with its SYN-ACK paused until the flow's upstream CONNECT succeeds),
//! then lets the sockets that changed transmit, and sleeps until the device has a
//! packet, a flow asks for a poll, or a socket timer is due (after small traffic it
//! first polls for a moment: [`crate::busy`]). A flow's start, refusal and transmission are
//! in `tcp_flows`.
//!
//! Every socket lives in a one-socket set of its own ([`TcpFlow`]), so the work per
//! packet does not grow with the number of flows, and timers come from a heap
//! (`timers`) rather than from walking every socket.
//!
//! The stack must not talk to the proxy (flows do) and must not block: the only
//! errors that end it are the device's.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

pub mod classify;
mod config;
mod datagram;
mod ipv6_ext;
mod packet_io;
mod phy;
pub mod queues;
mod reassembly;
mod shared;
mod tcp_flows;
mod timers;
mod tsclock;

pub use config::{DEFAULT_BUSY_POLL, DEFAULT_MEMORY_LIMIT, StackConfig, default_max_flows};
pub use packet_io::PacketIo;
pub use shared::Shared;

use std::collections::HashMap;
use std::future::poll_fn;
use std::io;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use crate::busy::BusyPoll;
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::HardwareAddress;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::dns::{Dns, DnsMode};
use crate::egress::Egress;
use crate::flow::buffers::Buffers;
use crate::flow::tcp::FlowContext;
use crate::flow::{BurstLog, FlowId, FourTuple, Signal, TcpFlow};
use crate::metrics::{Metrics, bump};
use crate::offload::VnetHdr;
use crate::upstream::Upstream;
use classify::{Class, DropReason};
use datagram::{Datagrams, DeviceSink};
use phy::{OnePacket, TxCounters};
use timers::Timers;

/// Packets handled per wake-up before the loop yields to flow tasks.
const BATCH: usize = 256;
/// Largest packet read from the device (a TUN never hands more than its MTU, or a
/// 64 KiB super-segment with offload).
const RX_BUFFER: usize = crate::offload::MAX_PACKET;
/// The longest one busy-poll pass runs before the loop checks shutdown and timers.
const MAX_SPIN: Duration = Duration::from_millis(2);
/// How long a busy-poll pass spins without giving way to other threads on its CPU
/// (a reply that comes this soon is caught at the cost of a few microseconds).
const SPIN_ALONE: Duration = Duration::from_micros(50);
/// CONNECTs in progress at once; further flows wait for a place (their SYNs stay
/// paused). Plenty for a live proxy (a dial takes a round trip); against a dead one,
/// it keeps a SYN storm's memory to the paused SYNs.
const CONCURRENT_DIALS: usize = 1024;
/// Flows whose CONNECT has not finished yet (paused SYNs), as the kernel's SYN
/// backlog (`somaxconn`, 4096): against a dead or blackholed proxy, SYNs beyond it are
/// reset at once instead of each holding a paused socket (about 2 KiB) for the whole
/// connect timeout.
pub const MAX_PENDING: usize = 4096;
/// Segments one flow may send per poll (a 4 MiB window of 4 KiB segments).
const EGRESS_PER_POLL: usize = 1024;
/// Shortest sleep between timer-driven polls of one flow (guards against spinning).
const MIN_TIMER: Duration = Duration::from_millis(1);
/// How long an application's small segment may wait for its ACK to ride on a reply
/// (smoltcp's default is 10 ms). An application whose Nagle holds its next write
/// until then stalls for this long when the reply waits for that write.
const ACK_DELAY: Duration = Duration::from_millis(1);

/// What the stack did, reported when it stops: a snapshot of the tunnel's counters.
pub type StackStats = crate::metrics::Snapshot;

/// Runs the stack on `device` until `shutdown` resolves or the device fails. Every
/// TCP connection becomes a flow that goes through `upstream`.
pub async fn run<D: PacketIo>(
    device: D,
    config: StackConfig,
    upstream: Upstream,
    shutdown: impl Future<Output = ()>,
) -> io::Result<StackStats> {
    run_with_metrics(device, config, upstream, Arc::default(), shutdown).await
}

/// As [`run`], counting into `metrics` (which a stats line or a metrics endpoint
/// reads while the stack runs).
pub async fn run_with_metrics<D: PacketIo>(
    device: D,
    config: StackConfig,
    upstream: Upstream,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<StackStats> {
    let shared = Arc::new(Shared::new(&config, metrics));
    run_queue(device, config, upstream, shared, 0, shutdown).await
}

/// As [`run`], for one queue (`queue`, counted from 0, names it in logs) of a
/// multi-queue tunnel: every queue's stack gets the same `config` and `shared`, and
/// runs on a runtime of its own. Returns the counters of the whole tunnel when this
/// stack stopped.
pub async fn run_queue<D: PacketIo>(
    device: D,
    config: StackConfig,
    upstream: Upstream,
    shared: Arc<Shared>,
    queue: usize,
    shutdown: impl Future<Output = ()>,
) -> io::Result<StackStats> {
    let mut stack = Stack::new(device, config, upstream, &shared);
    let result = stack.run(shutdown).await;
    // Rings held when the stack stopped, before closing resets the flows.
    let held = shared.ring_bytes();
    stack.close().await;
    tracing::info!(
        queue,
        packets_in = stack.packets_in,
        flows = stack.next_id.saturating_sub(1),
        "queue stopped"
    );
    result.map(|()| StackStats {
        ring_bytes: held,
        ..stack.stats.snapshot()
    })
}

struct Stack<D: PacketIo> {
    device: Arc<D>,
    iface: Interface,
    /// The instant smoltcp's clock counts from.
    epoch: Instant,
    config: StackConfig,
    flows: HashMap<FlowId, Arc<TcpFlow>>,
    by_tuple: HashMap<FourTuple, FlowId>,
    next_id: FlowId,
    timers: Timers,
    permits: Arc<Semaphore>,
    /// Places for flows whose CONNECT has not finished ([`MAX_PENDING`]).
    pending: Arc<Semaphore>,
    cx: Arc<FlowContext>,
    /// Ring sizes and the budget, shared with every flow.
    buffers: Arc<Buffers>,
    tasks: JoinSet<()>,
    /// An empty set: packets of no flow go here, and smoltcp answers them with RST.
    no_sockets: SocketSet<'static>,
    scratch: Vec<u8>,
    tx: TxCounters,
    dirty: Vec<FlowId>,
    stats: Arc<Metrics>,
    limit_log: BurstLog,
    loop_log: BurstLog,
    datagrams: Datagrams,
    /// IP fragments from the applications, until their datagram is whole.
    reassembly: reassembly::Reassembly,
    /// ICMPv6 errors about extension headers go out here.
    egress: Arc<Egress>,
    /// A TCP segment's IPv6 packet without its extension headers ([`ipv6_ext`]).
    stripped: Vec<u8>,
    busy: BusyPoll,
    /// Packets this stack (its queue) read from the device.
    packets_in: u64,
    /// Bytes read from the device since [`Stack::take_moved`].
    bytes_in: usize,
}

impl<D: PacketIo> Stack<D> {
    fn new(device: D, config: StackConfig, upstream: Upstream, shared: &Shared) -> Self {
        let stats = shared.metrics.clone();
        let device = Arc::new(device);
        let sink = Arc::new(DeviceSink(device.clone()));
        let egress = Arc::new(Egress::with_metrics(sink, stats.clone()));
        let dns = Arc::new(Dns::with_fake_ips(
            config.dns.clone(),
            upstream.clone(),
            stats.clone(),
            &shared.fake_ips,
        ));
        let local_dns = (dns.mode() == DnsMode::FakeIp).then(|| dns.clone());
        let datagrams = Datagrams::new(
            upstream.clone(),
            egress.clone(),
            config.udp.clone(),
            dns,
            &shared.udp,
        );
        let busy_poll = config.busy_poll;
        let epoch = Instant::now();
        let mut scratch = Vec::with_capacity(RX_BUFFER);
        let mut tx = TxCounters::new(stats.clone(), device.offload());
        let mut iface_config = Config::new(HardwareAddress::Ip);
        iface_config.random_seed = random_seed();
        let iface = {
            let mut probe = OnePacket::new(None, &*device, &mut scratch, &mut tx);
            let mut iface = Interface::new(iface_config, &mut probe, smol_now(epoch, epoch));
            // Accept every destination: the TUN is the default route.
            iface.set_any_ip(true);
            iface
        };
        let cx = Arc::new(FlowContext {
            upstream,
            signal: Arc::new(Signal::default()),
            stats: stats.clone(),
            egress: egress.clone(),
            local_dns,
            failures: BurstLog::new(Duration::from_secs(5)),
            dials: Semaphore::new(CONCURRENT_DIALS),
        });
        Stack {
            device,
            iface,
            buffers: shared.buffers.clone(),
            epoch,
            permits: shared.permits.clone(),
            pending: shared.pending.clone(),
            config,
            flows: HashMap::new(),
            by_tuple: HashMap::new(),
            next_id: 1,
            timers: Timers::default(),
            cx,
            tasks: JoinSet::new(),
            no_sockets: SocketSet::new(Vec::new()),
            scratch,
            tx,
            dirty: Vec::new(),
            stats,
            limit_log: BurstLog::new(Duration::from_secs(5)),
            loop_log: BurstLog::new(Duration::from_secs(5)),
            datagrams,
            reassembly: reassembly::Reassembly::default(),
            egress,
            stripped: Vec::new(),
            busy: BusyPoll::new(busy_poll),
            packets_in: 0,
            bytes_in: 0,
        }
    }

    async fn run(&mut self, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        let mut shutdown = pin!(shutdown);
        let mut rx = vec![0u8; RX_BUFFER];
        // With no timer pending the loop sleeps "far" ahead, counted from each pass
        // (a deadline fixed at start would lie in the past after an hour: a spin).
        let far = || tokio::time::Instant::now() + Duration::from_secs(3600);
        let mut sleep = pin!(tokio::time::sleep_until(far()));
        let signal = self.cx.signal.clone();
        loop {
            let (received, asked) = tokio::select! {
                biased;
                () = &mut shutdown => return Ok(()),
                r = poll_fn(|cx| self.device.poll_recv_hdr(cx, &mut rx)) => (Some(r?), false),
                () = signal.notified() => (None, true),
                () = &mut sleep => (None, false),
            };
            let now = Instant::now();
            tsclock::tick(now);
            bump(&self.stats.stack.wakeups);
            if let Some((n, hdr)) = received {
                self.ingress(rx.get(..n).unwrap_or_default(), &hdr, now);
                self.ingress_batch(&mut rx, now)?;
            }
            self.poll_flows(now);
            self.expire_fragments(now);
            let moved = self.take_moved();
            self.busy.moved(now, moved);
            if received.is_some() || asked {
                self.busy.work(now);
                if let Some(until) = self.busy.spin_until(Instant::now()) {
                    self.spin(until, &mut rx).await?;
                }
            }
            while self.tasks.try_join_next().is_some() {}
            self.datagrams.reap();
            let next = match (self.timers.next(), self.reassembly.next_expiry()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
            .map_or_else(far, tokio::time::Instant::from_std);
            sleep.as_mut().reset(next);
        }
    }

    /// Busy polling (see [`crate::busy`]): keeps handling packets and flows' requests,
    /// yielding to the runtime between passes, until `until` passes without work or
    /// [`MAX_SPIN`] is reached (so shutdown and timers are never held off).
    async fn spin(&mut self, mut until: Instant, rx: &mut [u8]) -> io::Result<()> {
        let started = Instant::now();
        let mut last_work = started;
        loop {
            tokio::task::yield_now().await;
            let now = Instant::now();
            tsclock::tick(now);
            let mut worked = self.cx.signal.pending();
            // The runtime polled its reactor while this task yielded, so the device's
            // readiness is current: read only when it is set (a read that would find
            // nothing is a syscall per pass, 40,000 a second in a bulk transfer).
            match poll_fn(|cx| Poll::Ready(self.device.poll_recv_hdr(cx, rx))).await {
                Poll::Ready(Ok((n, hdr))) => {
                    self.ingress(rx.get(..n).unwrap_or_default(), &hdr, now);
                    self.ingress_batch(rx, now)?;
                    worked = true;
                }
                Poll::Pending => {}
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Poll::Ready(Err(e)) => return Err(e),
            }
            if worked {
                last_work = now;
                bump(&self.stats.stack.spin_hits);
                self.poll_flows(now);
                let moved = self.take_moved();
                match self.busy.extend(now, moved) {
                    Some(later) => until = later,
                    None => return Ok(()),
                }
            }
            if now >= until || now.saturating_duration_since(started) >= MAX_SPIN {
                return Ok(());
            }
            if now.saturating_duration_since(last_work) >= SPIN_ALONE {
                // Past the first moments, spin only on a CPU nobody else wants: a
                // thread that is ready to run here (the proxy, the application we
                // wait for) goes first.
                std::thread::yield_now();
            }
        }
    }

    /// Bytes read from and written to the device since the last call.
    fn take_moved(&mut self) -> usize {
        std::mem::take(&mut self.bytes_in).saturating_add(self.tx.take_bytes())
    }

    /// Reads and handles queued packets, up to a batch.
    fn ingress_batch(&mut self, rx: &mut [u8], now: Instant) -> io::Result<()> {
        for _ in 1..BATCH {
            match self.device.try_recv_hdr(rx) {
                Ok((n, hdr)) => self.ingress(rx.get(..n).unwrap_or_default(), &hdr, now),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        // The burst's UDP datagrams go to the proxy now, a system call per association.
        self.datagrams.flush();
        Ok(())
    }

    /// Polls every flow that received packets, asked for it, or has a timer due.
    fn poll_flows(&mut self, now: Instant) {
        // Every queued id is in `dirty` once the queue is drained, so clearing the
        // queued mark of every dirty flow loses no request.
        self.cx.signal.drain_into(&mut self.dirty);
        for id in &self.dirty {
            if let Some(flow) = self.flows.get(id) {
                flow.take_queued();
            }
        }
        self.timers.expire(now, &mut self.dirty);
        self.dirty.sort_unstable();
        self.dirty.dedup();
        let dirty = std::mem::take(&mut self.dirty);
        for id in &dirty {
            self.egress(*id, now);
        }
        self.dirty = dirty;
        self.dirty.clear();
    }

    fn drop_packet(&mut self, reason: DropReason) {
        self.stats.stack.drop_packet(reason);
    }

    /// Handles one packet from the device. A TCP super-segment (offload) goes to
    /// smoltcp whole (it takes segments beyond its MSS); a UDP super-packet is cut
    /// into its datagrams first.
    fn ingress(&mut self, packet: &[u8], hdr: &VnetHdr, now: Instant) {
        bump(&self.stats.stack.packets_in);
        self.packets_in = self.packets_in.wrapping_add(1);
        self.bytes_in = self.bytes_in.saturating_add(packet.len());
        let class = classify::classify_offload(packet, hdr.checksum_trusted());
        self.dispatch(packet, class, hdr, now);
    }

    /// Handles one classified packet; a fragment waits for the rest of its datagram.
    fn dispatch(&mut self, packet: &[u8], class: Class, hdr: &VnetHdr, now: Instant) {
        match class {
            // IPv6 with extension headers (checked by classify): smoltcp takes the
            // segment behind the fixed header alone.
            Class::Tcp { .. } if ipv6_ext::has_extensions(packet) => {
                self.dispatch_stripped(packet, class, hdr, now);
            }
            Class::Tcp { tuple, syn, seq } => match self.by_tuple.get(&tuple).copied() {
                Some(id) => {
                    if let Some(flow) = self.flows.get(&id).cloned() {
                        let mut sockets = flow.sockets();
                        self.deliver(packet, &mut sockets, now);
                        self.dirty.push(id);
                    }
                }
                None if syn => self.open(tuple, seq, packet, now),
                // No such connection: smoltcp answers with RST.
                None => self.refuse(packet, now),
            },
            Class::Udp {
                tuple,
                payload: (offset, len),
            } => {
                let payload = packet
                    .get(offset..offset.saturating_add(len))
                    .unwrap_or_default();
                match hdr.udp_segment_size() {
                    None => self.datagrams.ingress(tuple, payload, now),
                    Some(size) => {
                        for datagram in crate::offload::udp_segments(payload, size) {
                            self.datagrams.ingress(tuple, datagram, now);
                        }
                    }
                }
            }
            Class::Drop(DropReason::Fragment) => self.reassemble(packet, now),
            Class::Ipv6Error(error) => {
                tracing::trace!(?error, "IPv6 packet discarded for its extension headers");
                self.drop_packet(DropReason::Ipv6Extension);
                self.egress.param_problem(packet, error.code, error.pointer);
            }
            Class::Drop(reason) => {
                tracing::trace!(reason = reason.name(), "packet dropped");
                self.drop_packet(reason);
            }
        }
    }

    /// Handles a TCP segment of an IPv6 packet with extension headers as the same
    /// packet without them (a copy: such packets are rare).
    fn dispatch_stripped(&mut self, packet: &[u8], class: Class, hdr: &VnetHdr, now: Instant) {
        let mut stripped = std::mem::take(&mut self.stripped);
        match ipv6_ext::walk(packet) {
            ipv6_ext::Chain::Upper { protocol, offset }
                if ipv6_ext::strip(packet, protocol, offset, &mut stripped) =>
            {
                if ipv6_ext::has_extensions(&stripped) {
                    self.drop_packet(DropReason::Malformed);
                } else {
                    self.dispatch(&stripped, class, hdr, now);
                }
            }
            _ => self.drop_packet(DropReason::Malformed),
        }
        self.stripped = stripped;
    }

    /// Adds a fragment; once its datagram is whole, handles it as one packet (see
    /// [`reassembly`]). Discarded fragments and expired datagrams count as fragment
    /// drops.
    fn reassemble(&mut self, fragment: &[u8], now: Instant) {
        let added = self.reassembly.add(fragment, now);
        if added.dropped > 0 {
            tracing::debug!(reason = ?added.reason, fragments = added.dropped, "IP fragments discarded");
            for _ in 0..added.dropped {
                self.drop_packet(DropReason::Fragment);
            }
        }
        if let Some(whole) = added.whole {
            bump(&self.stats.stack.reassembled);
            match classify::classify(&whole) {
                // Fragments inside a fragment: not a datagram anyone sends.
                Class::Drop(DropReason::Fragment) => self.drop_packet(DropReason::Malformed),
                class => self.dispatch(&whole, class, &VnetHdr::NONE, now),
            }
        }
    }

    /// Discards the datagrams whose fragments have not all come in time: their
    /// fragments count as dropped, and the source of each whose first fragment came
    /// is told (ICMP Time Exceeded, code 1).
    fn expire_fragments(&mut self, now: Instant) {
        if self.reassembly.next_expiry().is_none_or(|at| at > now) {
            return;
        }
        for expired in self.reassembly.expire(now) {
            tracing::debug!(
                fragments = expired.fragments,
                "IP datagram not reassembled in time"
            );
            for _ in 0..expired.fragments {
                self.drop_packet(DropReason::Fragment);
            }
            if let Some(first) = expired.first {
                self.egress.reassembly_time_exceeded(&first);
            }
        }
    }

    /// Feeds one packet to smoltcp against `sockets`; replies go to the device.
    fn deliver(&mut self, packet: &[u8], sockets: &mut SocketSet<'static>, now: Instant) {
        let ts = smol_now(self.epoch, now);
        let mut dev = OnePacket::new(Some(packet), &*self.device, &mut self.scratch, &mut self.tx);
        self.iface.poll_ingress_single(ts, &mut dev, sockets);
    }

    /// Resets every connection (RST to the applications) and ends the flow tasks.
    async fn close(&mut self) {
        let now = Instant::now();
        let ids: Vec<FlowId> = self.flows.keys().copied().collect();
        for id in &ids {
            if let Some(flow) = self.flows.get(id) {
                flow.sockets().get_mut::<tcp::Socket>(flow.handle).abort();
            }
            self.egress(*id, now);
        }
        self.tasks.shutdown().await;
        self.datagrams.close().await;
        // Fragments of datagrams that never arrived whole count as dropped.
        for _ in 0..self.reassembly.held() {
            self.drop_packet(DropReason::Fragment);
        }
        self.flows.clear();
        self.by_tuple.clear();
    }
}

/// smoltcp's clock: microseconds since the stack started.
fn smol_now(epoch: Instant, now: Instant) -> smoltcp::time::Instant {
    let micros = now.saturating_duration_since(epoch).as_micros();
    smoltcp::time::Instant::from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
}

fn std_at(epoch: Instant, at: smoltcp::time::Instant) -> Instant {
    let micros = u64::try_from(at.total_micros()).unwrap_or(0);
    epoch + Duration::from_micros(micros)
}

/// A seed for smoltcp's initial sequence numbers, from the OS's randomness (through
/// std's hash keys, which are seeded per process).
fn random_seed() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(Instant::now())
}
