//! DNS over TCP through the proxy (RFC 7766): each message framed by a 2-byte length,
//! carried over a SOCKS CONNECT to the resolver.
//!
//! Stage: between the DNS module and the upstream proxy. Concurrent queries share
//! connections: at most `connections` per resolver, each with at most `pipeline`
//! queries outstanding, answers matched by message ID in any order. IDs are
//! rewritten per connection (two clients that both use ID 0x1234 never collide) and
//! restored on the way back. A connection closes after `idle` without outstanding
//! queries; one that dies (or never connects) fails its queries, and each is retried
//! once on another connection. Every query has a deadline.
//!
//! It must not parse more than the ID of a message (the caller decides truncation),
//! must not hold a lock across an `.await`, and must not queue without bound: a query
//! that finds every connection full waits for a slot until its deadline.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tracing::Instrument;

use super::frames::Frames;
use super::message::{HEADER_LEN, id_of, set_id};
use crate::metrics::Metrics;
use crate::socks::Address;
use crate::upstream::Upstream;

/// The largest batch of queued queries written with one `write_all`.
const WRITE_BATCH: usize = 16 * 1024;
/// Bytes read from the resolver per `read`.
const READ_CHUNK: usize = 8 * 1024;

/// How the client shares connections.
#[derive(Debug, Clone, Copy)]
pub struct TcpSettings {
    /// Connections per resolver (at least 1).
    pub connections: usize,
    /// Outstanding queries per connection (at least 1).
    pub pipeline: usize,
    /// Deadline of one query, retry included.
    pub timeout: Duration,
    /// A connection with nothing outstanding for this long is closed.
    pub idle: Duration,
}

/// Why a query over TCP got no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TcpError {
    /// The query is shorter than a DNS header.
    #[error("query of {len} bytes is shorter than a DNS header")]
    Short {
        /// Its length.
        len: usize,
    },
    /// The query does not fit a TCP length prefix.
    #[error("query of {len} bytes is longer than 65535")]
    TooLong {
        /// Its length.
        len: usize,
    },
    /// No answer before the deadline.
    #[error("no answer from {resolver} over TCP within {timeout:?}")]
    Timeout {
        /// The resolver.
        resolver: SocketAddr,
        /// The deadline.
        timeout: Duration,
    },
    /// The connection carrying the query failed, twice (first try and retry).
    #[error("DNS over TCP to {resolver} failed: {reason}")]
    Lost {
        /// The resolver.
        resolver: SocketAddr,
        /// What happened to the connection (proxy error, reset, closed).
        reason: Arc<str>,
    },
}

/// Counters of the TCP client (their group of the one set of counters).
pub use crate::metrics::DnsTcpCounters as TcpCounters;

/// An answer slot: the sequence number that registered it, and where the answer goes.
type Waiter = (u64, oneshot::Sender<Vec<u8>>);

#[derive(Debug, Default)]
struct ConnState {
    pending: HashMap<u16, Waiter>,
    next_id: u16,
    next_seq: u64,
    closed: bool,
    /// When the last message arrived from the resolver.
    last_heard: Option<Instant>,
    /// Why it closed, for the queries it fails.
    reason: Option<Arc<str>>,
}

#[derive(Debug)]
struct Conn {
    id: u64,
    resolver: SocketAddr,
    frames: mpsc::Sender<Vec<u8>>,
    state: Mutex<ConnState>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Conn {
    fn load(&self) -> Option<usize> {
        let st = lock(&self.state);
        (!st.closed).then_some(st.pending.len())
    }

    /// Reserves an ID on this connection for an answer.
    fn register(&self, pipeline: usize) -> Option<(u16, u64, oneshot::Receiver<Vec<u8>>)> {
        let mut st = lock(&self.state);
        if st.closed || st.pending.len() >= pipeline {
            return None;
        }
        let mut id = st.next_id;
        while st.pending.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        st.next_id = id.wrapping_add(1);
        let seq = st.next_seq;
        st.next_seq = seq.wrapping_add(1);
        let (tx, rx) = oneshot::channel();
        st.pending.insert(id, (seq, tx));
        Some((id, seq, rx))
    }

    /// Hands an answer to its waiter; false if no query waits for its ID.
    fn deliver(&self, message: Vec<u8>) -> bool {
        let Some(id) = id_of(&message) else {
            return false;
        };
        let waiter = {
            let mut st = lock(&self.state);
            st.last_heard = Some(Instant::now());
            st.pending.remove(&id)
        };
        match waiter {
            Some((_, tx)) => {
                let _ = tx.send(message);
                true
            }
            None => false,
        }
    }

    fn forget(&self, id: u16, seq: u64) {
        let mut st = lock(&self.state);
        if st.pending.get(&id).is_some_and(|(s, _)| *s == seq) {
            st.pending.remove(&id);
        }
    }

    /// After a query sent at `sent` timed out: a connection that has not delivered a
    /// single message since then is presumed dead (a resolver that stopped answering,
    /// a path that black-holes) and is closed, so later queries open a fresh one; its
    /// other queries are retried.
    fn close_if_silent_since(&self, sent: Instant) -> bool {
        let silent = {
            let st = lock(&self.state);
            !st.closed && st.last_heard.is_none_or(|heard| heard < sent)
        };
        if silent {
            self.close(Arc::from(
                "no answer on the connection within the query deadline",
            ));
        }
        silent
    }

    /// Closes the connection if nothing is outstanding.
    fn close_if_idle(&self) -> bool {
        let mut st = lock(&self.state);
        if st.pending.is_empty() {
            st.closed = true;
        }
        st.closed
    }

    /// Marks it closed and fails every outstanding query (their receivers see the
    /// sender dropped). Returns how many there were.
    fn close(&self, reason: Arc<str>) -> usize {
        let pending = {
            let mut st = lock(&self.state);
            st.closed = true;
            st.reason.get_or_insert(reason);
            std::mem::take(&mut st.pending)
        };
        pending.len()
    }

    fn reason(&self) -> Arc<str> {
        lock(&self.state)
            .reason
            .clone()
            .unwrap_or_else(|| Arc::from("connection closed"))
    }
}

/// Removes a query's answer slot when the query ends early (deadline, cancellation).
struct Reservation {
    conn: Arc<Conn>,
    id: u16,
    seq: u64,
    freed: Arc<Notify>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.conn.forget(self.id, self.seq);
        self.freed.notify_waiters();
    }
}

#[derive(Debug)]
struct Inner {
    upstream: Upstream,
    settings: TcpSettings,
    resolvers: Mutex<HashMap<SocketAddr, Vec<Arc<Conn>>>>,
    /// Signalled whenever a slot frees up or a connection closes.
    freed: Arc<Notify>,
    next_conn: AtomicU64,
    metrics: Arc<Metrics>,
}

/// The pipelined DNS-over-TCP client. Cheap to clone; `Send + Sync`.
#[derive(Debug, Clone)]
pub struct TcpClient {
    inner: Arc<Inner>,
}

impl TcpClient {
    /// A client that reaches resolvers through `upstream`, counting into `metrics`.
    pub fn new(upstream: Upstream, settings: TcpSettings, metrics: Arc<Metrics>) -> Self {
        let settings = TcpSettings {
            connections: settings.connections.max(1),
            pipeline: settings.pipeline.clamp(1, usize::from(u16::MAX)),
            ..settings
        };
        TcpClient {
            inner: Arc::new(Inner {
                upstream,
                settings,
                resolvers: Mutex::new(HashMap::new()),
                freed: Arc::new(Notify::new()),
                next_conn: AtomicU64::new(0),
                metrics,
            }),
        }
    }

    /// The client's counters.
    pub fn counters(&self) -> &TcpCounters {
        &self.inner.metrics.dns.tcp
    }

    /// Open connections to `resolver` (for tests and stats).
    pub fn open_connections(&self, resolver: SocketAddr) -> usize {
        lock(&self.inner.resolvers)
            .get(&resolver)
            .map_or(0, |conns| {
                conns.iter().filter(|c| c.load().is_some()).count()
            })
    }

    /// Sends `query` to `resolver` and returns its answer with the query's own ID.
    pub async fn exchange(&self, resolver: SocketAddr, query: &[u8]) -> Result<Vec<u8>, TcpError> {
        let Some(client_id) = id_of(query).filter(|_| query.len() >= HEADER_LEN) else {
            return Err(TcpError::Short { len: query.len() });
        };
        let len = u16::try_from(query.len()).map_err(|_| TcpError::TooLong { len: query.len() })?;
        let timeout = self.inner.settings.timeout;
        let deadline = Instant::now() + timeout;
        let timed_out = || {
            self.inner
                .metrics
                .dns
                .tcp
                .timeouts
                .fetch_add(1, Ordering::Relaxed);
            TcpError::Timeout { resolver, timeout }
        };
        let mut retried = false;
        loop {
            let reservation = match self.reserve(resolver, deadline).await {
                Some(r) => r,
                None => return Err(timed_out()),
            };
            let (slot, answer_rx) = reservation;
            let mut frame = Vec::with_capacity(query.len().saturating_add(2));
            frame.extend_from_slice(&len.to_be_bytes());
            frame.extend_from_slice(query);
            set_id(frame.get_mut(2..).unwrap_or_default(), slot.id);
            let sent = Instant::now();
            let exchange = async {
                slot.conn.frames.send(frame).await.ok()?;
                answer_rx.await.ok()
            };
            let answer = match tokio::time::timeout_at(deadline, exchange).await {
                Ok(answer) => answer,
                Err(_) => {
                    if slot.conn.close_if_silent_since(sent) {
                        self.inner.freed.notify_waiters();
                    }
                    return Err(timed_out());
                }
            };
            if let Some(mut answer) = answer {
                set_id(&mut answer, client_id);
                return Ok(answer);
            }
            let reason = slot.conn.reason();
            if retried {
                return Err(TcpError::Lost { resolver, reason });
            }
            tracing::debug!(%resolver, %reason, "DNS over TCP: connection lost, retrying once");
            self.inner
                .metrics
                .dns
                .tcp
                .retries
                .fetch_add(1, Ordering::Relaxed);
            retried = true;
        }
    }

    /// Waits for an answer slot on a connection to `resolver`, until `deadline`.
    async fn reserve(
        &self,
        resolver: SocketAddr,
        deadline: Instant,
    ) -> Option<(Reservation, oneshot::Receiver<Vec<u8>>)> {
        loop {
            let freed = self.inner.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(r) = self.try_reserve(resolver) {
                return Some(r);
            }
            tokio::time::timeout_at(deadline, freed).await.ok()?;
        }
    }

    fn try_reserve(
        &self,
        resolver: SocketAddr,
    ) -> Option<(Reservation, oneshot::Receiver<Vec<u8>>)> {
        let settings = self.inner.settings;
        let mut resolvers = lock(&self.inner.resolvers);
        let conns = resolvers.entry(resolver).or_default();
        conns.retain(|c| c.load().is_some());
        let best = conns
            .iter()
            .filter_map(|c| c.load().map(|load| (load, c)))
            .filter(|(load, _)| *load < settings.pipeline)
            .min_by_key(|(load, _)| *load)
            .map(|(load, c)| (load, c.clone()));
        // Spread queries over connections before pipelining on a busy one.
        let conn = match best {
            Some((load, conn)) if load == 0 || conns.len() >= settings.connections => conn,
            _ if conns.len() < settings.connections => {
                let conn = self.open(resolver);
                conns.push(conn.clone());
                conn
            }
            Some((_, conn)) => conn,
            None => return None,
        };
        // Still under the resolvers lock (order: resolvers, then a connection's
        // state), so no other query takes the slot just chosen.
        let (id, seq, rx) = conn.register(settings.pipeline)?;
        drop(resolvers);
        let reservation = Reservation {
            conn,
            id,
            seq,
            freed: self.inner.freed.clone(),
        };
        Some((reservation, rx))
    }

    /// Starts a connection task; queries queue in its channel while it connects.
    fn open(&self, resolver: SocketAddr) -> Arc<Conn> {
        let id = self.inner.next_conn.fetch_add(1, Ordering::Relaxed);
        let (frames, rx) = mpsc::channel(self.inner.settings.pipeline);
        let conn = Arc::new(Conn {
            id,
            resolver,
            frames,
            state: Mutex::new(ConnState {
                // Spread IDs of different connections apart; no meaning beyond that.
                next_id: u16::try_from(id.wrapping_mul(0x9E37) & 0xffff).unwrap_or(0),
                ..ConnState::default()
            }),
        });
        self.inner
            .metrics
            .dns
            .tcp
            .connections
            .fetch_add(1, Ordering::Relaxed);
        let span = tracing::debug_span!("dns_tcp", %resolver, conn = id);
        tokio::spawn(run(self.inner.clone(), conn.clone(), rx).instrument(span));
        conn
    }
}

/// One connection's life: connect, then write queries and read answers until it
/// idles out or fails; then fail what is outstanding. Runs in span
/// `dns_tcp{resolver, conn}`.
async fn run(inner: Arc<Inner>, conn: Arc<Conn>, mut queue: mpsc::Receiver<Vec<u8>>) {
    let result = drive(&inner, &conn, &mut queue).await;
    let reason: Arc<str> = match &result {
        Ok(ended) => Arc::from(*ended),
        Err(e) => Arc::from(e.as_str()),
    };
    let failed = conn.close(reason.clone());
    if failed > 0 || result.is_err() {
        inner
            .metrics
            .dns
            .tcp
            .failures
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(failed, %reason, "DNS over TCP connection failed");
    } else {
        tracing::trace!(%reason, "DNS over TCP connection ended");
    }
    {
        let mut resolvers = lock(&inner.resolvers);
        if let Some(conns) = resolvers.get_mut(&conn.resolver) {
            conns.retain(|c| c.id != conn.id);
            if conns.is_empty() {
                resolvers.remove(&conn.resolver);
            }
        }
    }
    inner.freed.notify_waiters();
}

async fn drive(
    inner: &Inner,
    conn: &Conn,
    queue: &mut mpsc::Receiver<Vec<u8>>,
) -> Result<&'static str, String> {
    let connected = inner
        .upstream
        .connect(Address::Ip(conn.resolver))
        .await
        .map_err(|e| e.to_string())?;
    let (mut rd, mut wr) = connected.stream.into_split();
    let mut frames = Frames::default();
    frames.push(&connected.leftover);
    let reader = async {
        let mut chunk = vec![0u8; READ_CHUNK];
        loop {
            while let Some(message) = frames.next_message() {
                if message.len() < HEADER_LEN || !conn.deliver(message) {
                    inner
                        .metrics
                        .dns
                        .tcp
                        .unmatched
                        .fetch_add(1, Ordering::Relaxed);
                }
                inner.freed.notify_waiters();
            }
            let n = match tokio::time::timeout(inner.settings.idle, rd.read(&mut chunk)).await {
                Err(_) if conn.close_if_idle() => return Ok("closed when idle"),
                Err(_) => continue,
                Ok(Ok(0)) => return Ok("closed by the resolver"),
                Ok(Ok(n)) => n,
                Ok(Err(e)) => return Err(format!("reading from the resolver: {e}")),
            };
            frames.push(chunk.get(..n).unwrap_or_default());
        }
    };
    let writer = async {
        let mut batch = Vec::with_capacity(WRITE_BATCH);
        while let Some(frame) = queue.recv().await {
            batch.clear();
            batch.extend_from_slice(&frame);
            while batch.len() < WRITE_BATCH {
                match queue.try_recv() {
                    Ok(more) => batch.extend_from_slice(&more),
                    Err(_) => break,
                }
            }
            wr.write_all(&batch)
                .await
                .map_err(|e| format!("writing to the resolver: {e}"))?;
        }
        Ok("queue closed")
    };
    tokio::select! {
        r = reader => r,
        w = writer => w,
    }
}
