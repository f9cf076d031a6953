//! One association's task: set up the SOCKS5 UDP ASSOCIATE, flush what queued
//! meanwhile, relay the proxy's datagrams back to the application, set up again when
//! the proxy drops the control connection, and end when idle.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use super::{Assoc, Phase, Queued, Shared};
use tun2socks_platform::mmsg;

use crate::socks::Address;
use crate::upstream::{RelayError, UdpAssociation};

/// Datagrams relayed per wake-up before the task lets others run.
const BATCH: usize = 256;
/// Receive buffer without batching: the largest datagram plus its SOCKS header.
const RECV_BUFFER: usize = 65_536 + 512;
/// Bytes of the per-thread batch receive buffer (slots of [`RECV_BUFFER`], up to
/// [`mmsg::MAX_BATCH`] of them). Virtual memory: the allocator maps it zeroed and
/// only the pages datagrams land on become resident.
const BATCH_BYTES: usize = 2 << 20;

thread_local! {
    /// One receive buffer per thread, shared by every association on it (they never
    /// hold it across an await), so an idle association holds no buffer at all; and
    /// where the last batch's datagrams lie in it.
    static RECV: RefCell<(Vec<u8>, Vec<mmsg::Datagram>)> = RefCell::default();
}

/// Why a relay loop ended.
enum Ended {
    /// No traffic for the idle timeout.
    Idle,
    /// The proxy closed the control connection: the relay is gone.
    ControlClosed,
    /// The relay socket failed.
    Failed(io::Error),
}

pub(super) async fn run(assoc: Arc<Assoc>, shared: Arc<Shared>) {
    let why = serve(&assoc, &shared).await;
    tracing::debug!(ended = why, "UDP association closed");
    let mut table = shared.table();
    if table
        .get(&assoc.app)
        .is_some_and(|current| Arc::ptr_eq(current, &assoc))
    {
        table.remove(&assoc.app);
    }
    shared.metrics.udp.active.store(table.len() as u64, Relaxed);
    drop(table);
    // Whatever still waits was never sent: tell the application; a DNS query goes
    // over TCP instead once the proxy has refused UDP (see `Shared::dns_fallback`).
    for q in take_queue(&assoc) {
        match (&shared.dns_fallback, &q.target) {
            (Some(fallback), Address::Ip(resolver))
                if q.dst.port() == 53 && shared.dns_over_tcp.load(Relaxed) =>
            {
                (fallback.0)(assoc.app, q.dst, *resolver, &q.payload);
            }
            _ => shared.unreachable(assoc.app, q.dst, &q.payload),
        }
    }
}

async fn serve(assoc: &Assoc, shared: &Shared) -> &'static str {
    loop {
        if !wait_for_datagram(assoc, shared).await {
            return "idle";
        }
        let relay = match shared.upstream.udp_associate().await {
            Ok(relay) => Arc::new(relay),
            Err(e) => {
                shared.refused(&e);
                return "proxy refused or unreachable";
            }
        };
        shared.metrics.udp.associations.fetch_add(1, Relaxed);
        tracing::debug!(relay = %relay.relay(), "UDP association up");
        flush(assoc, shared, &relay);
        match relay_loop(assoc, shared, &relay).await {
            Ended::Idle => return "idle",
            Ended::Failed(e) => {
                tracing::debug!(error = %e, "relay socket failed");
                return "relay socket failed";
            }
            Ended::ControlClosed => {
                // Set up again when the application next sends.
                shared.metrics.udp.reassociations.fetch_add(1, Relaxed);
                tracing::debug!("proxy closed the association; will set it up again");
                assoc.state().phase = Phase::Pending(VecDeque::new());
            }
        }
    }
}

/// Waits until a datagram is queued (true) or the idle timeout passes (false).
async fn wait_for_datagram(assoc: &Assoc, shared: &Shared) -> bool {
    loop {
        if matches!(&assoc.state().phase, Phase::Pending(q) if !q.is_empty()) {
            return true;
        }
        let Some(deadline) = idle_deadline(assoc, shared) else {
            return false;
        };
        tokio::select! {
            () = assoc.queued.notified() => {}
            () = tokio::time::sleep_until(deadline) => {}
        }
    }
}

/// When the association falls idle, or `None` if it already has.
fn idle_deadline(assoc: &Assoc, shared: &Shared) -> Option<tokio::time::Instant> {
    let timeout = if assoc.only_dns.load(Relaxed) {
        shared.config.dns_idle_timeout
    } else {
        shared.config.idle_timeout
    };
    let last = shared.epoch + Duration::from_millis(assoc.last_used.load(Relaxed));
    let deadline = last + timeout;
    (std::time::Instant::now() < deadline).then(|| tokio::time::Instant::from_std(deadline))
}

fn take_queue(assoc: &Assoc) -> VecDeque<Queued> {
    match &mut assoc.state().phase {
        Phase::Pending(queue) => std::mem::take(queue),
        Phase::Ready(_) => VecDeque::new(),
    }
}

/// Sends what queued while the association was set up, and switches the stack to
/// sending straight to the relay.
fn flush(assoc: &Assoc, shared: &Shared, relay: &Arc<UdpAssociation>) {
    let queue = {
        let mut state = assoc.state();
        let old = std::mem::replace(&mut state.phase, Phase::Ready(relay.clone()));
        match old {
            Phase::Pending(queue) => queue,
            Phase::Ready(_) => VecDeque::new(),
        }
    };
    let mut scratch = Vec::new();
    for q in queue {
        shared.relay(assoc, relay, q.dst, &q.target, &q.payload, &mut scratch);
    }
}

async fn relay_loop(assoc: &Assoc, shared: &Shared, relay: &UdpAssociation) -> Ended {
    loop {
        let Some(deadline) = idle_deadline(assoc, shared) else {
            return Ended::Idle;
        };
        tokio::select! {
            ready = relay.readable() => {
                if let Err(e) = ready {
                    return Ended::Failed(e);
                }
                if let Err(e) = drain(assoc, shared, relay) {
                    return Ended::Failed(e);
                }
                tokio::task::yield_now().await;
            }
            refusal = relay.refusal() => {
                if let Err(e) = refusal {
                    return Ended::Failed(e);
                }
                shared.settle(assoc, relay, None);
            }
            () = relay.closed() => return Ended::ControlClosed,
            () = tokio::time::sleep_until(deadline) => {}
        }
    }
}

/// Relays up to a batch of queued datagrams from the proxy to the application,
/// receiving them a burst per system call.
fn drain(assoc: &Assoc, shared: &Shared, relay: &UdpAssociation) -> io::Result<()> {
    // A slot holds the largest UDP datagram, whatever the device's MTU: a reply
    // larger than the MTU reaches the application as IP fragments (egress), as it
    // would through the kernel's own path.
    let slot = RECV_BUFFER;
    let slots = (BATCH_BYTES / slot).clamp(1, mmsg::MAX_BATCH);
    RECV.with_borrow_mut(|(buf, got)| {
        if buf.len() != slot * slots {
            // A fresh zeroed allocation, not a resize: the allocator maps a buffer
            // this large zeroed without writing it (calloc), so only the pages the
            // kernel fills with datagrams become resident. Resizing wrote every byte:
            // 1 MiB per packet thread at MTU 65000 (16 slots of 64 KiB), most of it
            // never used by small datagrams.
            *buf = vec![0u8; slot * slots];
        }
        for _ in 0..BATCH.div_ceil(slots) {
            match relay.try_recv_batch(buf, slot, got) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // An ICMP error from the relay's address (port unreachable, host or
                // network prohibited), for a datagram sent before: passed on to the
                // application for that datagram, and the association stays. (Not a
                // refusal of UDP as a whole: Dante forwards a destination's port
                // unreachable to the client from its relay port, so one datagram to
                // a closed port looks the same as a relay that is not there.)
                Err(e) if RelayError::from_io(&e).is_some() => {
                    shared.settle(assoc, relay, None);
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                    return drain_one_by_one(assoc, shared, relay, buf);
                }
                Err(e) => return Err(e),
            }
            deliver_batch(assoc, shared, buf, slot, got);
        }
        Ok(())
    })
}

/// [`drain`] where the system has no batch receive: a datagram per system call.
fn drain_one_by_one(
    assoc: &Assoc,
    shared: &Shared,
    relay: &UdpAssociation,
    buf: &mut Vec<u8>,
) -> io::Result<()> {
    if buf.len() < RECV_BUFFER {
        buf.resize(RECV_BUFFER, 0);
    }
    for _ in 0..BATCH {
        let (from, range) = match relay.try_recv_from(buf) {
            Ok(Some(received)) => received,
            Ok(None) => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if RelayError::from_io(&e).is_some() => {
                shared.settle(assoc, relay, None);
                continue;
            }
            Err(e) => return Err(e),
        };
        deliver(assoc, shared, &from, buf.get(range).unwrap_or_default());
    }
    Ok(())
}

/// Hands the replies of one batch (datagram `i` in slot `i` of `buf`) to the
/// application through egress, in one write per run where the device allows.
fn deliver_batch(assoc: &Assoc, shared: &Shared, buf: &[u8], slot: usize, got: &[mmsg::Datagram]) {
    let mut replies: Vec<(SocketAddr, &[u8])> = Vec::with_capacity(got.len());
    for (i, datagram) in got.iter().enumerate() {
        if datagram.truncated {
            shared.metrics.egress.unsendable.fetch_add(1, Relaxed);
            continue;
        }
        let at = i.saturating_mul(slot);
        let raw = buf
            .get(at..at.saturating_add(datagram.len))
            .unwrap_or_default();
        let Some((from, range)) = UdpAssociation::parse_relayed(raw) else {
            continue;
        };
        let Some(source) = assoc.present(&from) else {
            shared.metrics.udp.unmappable.fetch_add(1, Relaxed);
            continue;
        };
        replies.push((source, raw.get(range).unwrap_or_default()));
    }
    if replies.is_empty() {
        return;
    }
    // Datagrams the device cannot take are counted by egress.
    let (sent, bytes) = shared.egress.udp_batch(assoc.app, &replies);
    shared
        .metrics
        .udp
        .datagrams_down
        .fetch_add(sent as u64, Relaxed);
    shared.metrics.udp.bytes_down.fetch_add(bytes, Relaxed);
    assoc
        .last_used
        .store(shared.millis(std::time::Instant::now()), Relaxed);
}

/// Hands one reply from `from` to the application through egress.
fn deliver(assoc: &Assoc, shared: &Shared, from: &Address, payload: &[u8]) {
    let Some(source) = assoc.present(from) else {
        shared.metrics.udp.unmappable.fetch_add(1, Relaxed);
        return;
    };
    // A datagram the device cannot take is counted by egress.
    if shared.egress.udp(source, assoc.app, payload) {
        shared.metrics.udp.datagrams_down.fetch_add(1, Relaxed);
        shared
            .metrics
            .udp
            .bytes_down
            .fetch_add(payload.len() as u64, Relaxed);
    }
    assoc
        .last_used
        .store(shared.millis(std::time::Instant::now()), Relaxed);
}
