//! The way out, a burst at a time: the datagrams the stack hands in while it reads
//! a burst from the TUN are encoded (SOCKS header and payload) into one buffer, and
//! sent when the burst ends ([`Outbox::flush`]): each association's consecutive
//! datagrams with one system call (a segmented send for a run of one size, where
//! the kernel allows; `sendmmsg` otherwise). Bounded: it flushes by itself when
//! [`MAX_DATAGRAMS`] or [`MAX_BYTES`] are waiting. A datagram the relay socket
//! cannot take now is dropped and counted, as before.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use super::shared::Shared;
use super::{Assoc, LastSent};
use crate::socks::{Address, udp};
use crate::upstream::UdpAssociation;

/// Datagrams waiting at most (the stack's read batch).
pub(super) const MAX_DATAGRAMS: usize = 256;
/// Bytes waiting at most (beyond it, the outbox flushes before it takes more).
pub(super) const MAX_BYTES: usize = 1 << 20;

/// One waiting datagram: its association and where its bytes end.
#[derive(Debug)]
struct Item {
    relay: Arc<UdpAssociation>,
    /// Whose it is, and where the application sent it: to blame it for a port
    /// unreachable the relay socket reports later.
    assoc: Arc<Assoc>,
    dst: SocketAddr,
    end: usize,
    payload: usize,
}

/// Datagrams waiting for the end of the burst.
#[derive(Debug, Default)]
pub(super) struct Outbox {
    bytes: Vec<u8>,
    items: Vec<Item>,
}

impl Outbox {
    /// Queues `payload` to `target` through `relay`; sends everything first if the
    /// outbox is full.
    pub(super) fn push(
        &mut self,
        relay: &Arc<UdpAssociation>,
        assoc: &Arc<Assoc>,
        dst: SocketAddr,
        target: &Address,
        payload: &[u8],
        shared: &Shared,
    ) {
        if self.items.len() >= MAX_DATAGRAMS || self.bytes.len() >= MAX_BYTES {
            self.flush(shared);
        }
        udp::encode_datagram(target, payload, &mut self.bytes);
        self.items.push(Item {
            relay: relay.clone(),
            assoc: assoc.clone(),
            dst,
            end: self.bytes.len(),
            payload: payload.len(),
        });
    }

    /// Datagrams waiting.
    pub(super) fn len(&self) -> usize {
        self.items.len()
    }

    /// Sends everything waiting: each run of one association's datagrams with one
    /// system call per batch; counts what went and what the socket refused, and
    /// settles a port unreachable the socket reported ([`Shared::settle`]).
    pub(super) fn flush(&mut self, shared: &Shared) {
        let metrics = &shared.metrics;
        let mut start = 0;
        let mut first = 0;
        while let Some(head) = self.items.get(first) {
            let run = self
                .items
                .get(first..)
                .unwrap_or_default()
                .iter()
                .take_while(|item| Arc::ptr_eq(&item.relay, &head.relay))
                .count()
                .max(1);
            let items = self.items.get(first..first + run).unwrap_or_default();
            let end = items.last().map_or(start, |item| item.end);
            let ends: Vec<usize> = items
                .iter()
                .map(|item| item.end.saturating_sub(start))
                .collect();
            let sent = match head
                .relay
                .try_send_contiguous(self.bytes.get(start..end).unwrap_or_default(), &ends)
            {
                Ok(sent) => sent,
                Err(e) => {
                    tracing::trace!(error = %e, "relay socket refused datagrams");
                    0
                }
            };
            let last = sent.checked_sub(1).and_then(|i| items.get(i)).map(|item| {
                let from = item.end.saturating_sub(item.payload);
                let payload = self.bytes.get(from..item.end).unwrap_or_default();
                LastSent::new(item.dst, payload)
            });
            shared.settle(&head.assoc, &head.relay, last);
            start = end;
            let bytes: usize = items.iter().take(sent).map(|item| item.payload).sum();
            metrics.udp.datagrams_up.fetch_add(sent as u64, Relaxed);
            metrics.udp.bytes_up.fetch_add(bytes as u64, Relaxed);
            let refused = (run - sent.min(run)) as u64;
            if refused > 0 {
                metrics.udp.relay_busy.fetch_add(refused, Relaxed);
            }
            first += run;
        }
        self.items.clear();
        self.bytes.clear();
    }
}
