//! The load clients: request/response (rr) round trips of a small message on one
//! connection, and the connection rate of W workers (connect + 1-byte echo + close),
//! each with its report. Both run in the calling thread's namespace; the `*_in` forms
//! run them from a thread inside another.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::super::context;
use super::super::namespace::Namespace;
use super::super::udp_client::percentile;
use super::{LOAD_TIMEOUT, MAX_RR_MESSAGE};

/// What a request/response run measured.
#[derive(Debug, Clone, Default)]
pub struct RrReport {
    /// Round trips timed (every one came back intact).
    pub round_trips: usize,
    /// Median round trip, microseconds.
    pub p50_us: u64,
    /// 99th percentile round trip, microseconds.
    pub p99_us: u64,
    /// Slowest round trip, microseconds.
    pub max_us: u64,
    /// Every round trip, in order.
    pub rtts: Vec<Duration>,
}

impl RrReport {
    /// Summarises `rtts` (nearest-rank percentiles; all zero when empty).
    pub fn from_rtts(rtts: Vec<Duration>) -> RrReport {
        let us = |p| percentile(&rtts, p).map_or(0, |d: Duration| micros(d));
        RrReport {
            round_trips: rtts.len(),
            p50_us: us(50.0),
            p99_us: us(99.0),
            max_us: rtts.iter().copied().max().map_or(0, micros),
            rtts,
        }
    }
}

impl std::fmt::Display for RrReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} round trips, p50 {} µs, p99 {} µs, max {} µs",
            self.round_trips, self.p50_us, self.p99_us, self.max_us
        )
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Request/response on one connection to an echo server at `target`: `round_trips`
/// times, sends a message of `size` bytes (1 to [`MAX_RR_MESSAGE`]) and waits until
/// all of it came back, checking every byte. Runs in the calling thread's namespace.
///
/// The connection's setup is not timed. Fails on a refused connection, a timeout
/// ([`LOAD_TIMEOUT`] per reply), an early close or an altered reply.
pub fn tcp_rr(target: SocketAddr, round_trips: usize, size: usize) -> io::Result<RrReport> {
    if size == 0 || size > MAX_RR_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("rr message size {size} is not within 1..={MAX_RR_MESSAGE}"),
        ));
    }
    let mut stream = TcpStream::connect_timeout(&target, LOAD_TIMEOUT)
        .map_err(context(format!("rr: connect {target}")))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(LOAD_TIMEOUT))?;
    stream.set_write_timeout(Some(LOAD_TIMEOUT))?;
    let mut message = vec![0u8; size];
    let mut reply = vec![0u8; size];
    let mut rtts = Vec::with_capacity(round_trips);
    for i in 0..round_trips {
        fill_message(&mut message, i as u64);
        let start = Instant::now();
        stream
            .write_all(&message)
            .map_err(context(format!("rr: send {i}")))?;
        stream
            .read_exact(&mut reply)
            .map_err(context(format!("rr: reply {i}")))?;
        rtts.push(start.elapsed());
        if reply != message {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("rr: reply {i} differs from the request"),
            ));
        }
    }
    Ok(RrReport::from_rtts(rtts))
}

/// [`tcp_rr`] from a thread inside `ns`.
pub fn tcp_rr_in(
    ns: &Namespace,
    target: SocketAddr,
    round_trips: usize,
    size: usize,
) -> io::Result<RrReport> {
    ns.within(move || tcp_rr(target, round_trips, size))
}

/// Message `i`: every byte differs from the previous message's, so a stale reply shows.
fn fill_message(message: &mut [u8], i: u64) {
    for (k, byte) in message.iter_mut().enumerate() {
        *byte = (i as u8)
            .wrapping_add(k as u8)
            .wrapping_mul(31)
            .wrapping_add(7);
    }
}

/// What a connection-rate run measured.
#[derive(Debug, Clone, Default)]
pub struct ConnRateReport {
    /// Connections that completed: connect, one byte out, the same byte back, close.
    pub connections: u64,
    /// Attempts that failed (refused, reset, timed out, wrong byte).
    pub errors: u64,
    /// The first failure, for the log.
    pub first_error: Option<String>,
    /// How long the workers ran.
    pub elapsed: Duration,
}

impl ConnRateReport {
    /// Completed connections per second.
    pub fn per_sec(&self) -> f64 {
        self.connections as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl std::fmt::Display for ConnRateReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} connections in {:.2} s ({:.0}/s), {} errors",
            self.connections,
            self.elapsed.as_secs_f64(),
            self.per_sec(),
            self.errors
        )?;
        if let Some(e) = &self.first_error {
            write!(f, " (first: {e})")?;
        }
        Ok(())
    }
}

/// Connection rate against an echo server at `target`: `workers` concurrent tasks, each
/// repeating connect + 1-byte echo + close (the client closes first) until `duration`
/// has passed. Runs in the calling thread's namespace on a current-thread runtime of
/// its own.
///
/// Each closed connection leaves a TIME_WAIT socket in the client's namespace, so long
/// runs at high rates can run out of ports: see [`prepare_client`].
pub fn tcp_conn_rate(
    target: SocketAddr,
    workers: usize,
    duration: Duration,
) -> io::Result<ConnRateReport> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(context("tokio runtime"))?;
    runtime.block_on(conn_rate(target, workers.max(1), duration))
}

/// [`tcp_conn_rate`] from a thread inside `ns`.
pub fn tcp_conn_rate_in(
    ns: &Namespace,
    target: SocketAddr,
    workers: usize,
    duration: Duration,
) -> io::Result<ConnRateReport> {
    ns.within(move || tcp_conn_rate(target, workers, duration))
}

/// Lets a client namespace open many short connections: the whole port range for
/// ephemeral ports and `tcp_tw_reuse`, so TIME_WAIT sockets do not exhaust them.
pub fn prepare_client(ns: &Namespace) -> io::Result<()> {
    ns.set_sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    ns.set_sysctl("net.ipv4.tcp_tw_reuse", "1")
}

#[derive(Default)]
struct Tally {
    connections: AtomicU64,
    errors: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
}

async fn conn_rate(
    target: SocketAddr,
    workers: usize,
    duration: Duration,
) -> io::Result<ConnRateReport> {
    let tally = Arc::new(Tally::default());
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..workers {
        let tally = tally.clone();
        tasks.spawn(async move {
            let mut i = worker as u8;
            while Instant::now() < deadline {
                i = i.wrapping_add(1);
                let attempt = tokio::time::timeout(LOAD_TIMEOUT, one_connection(target, i)).await;
                match attempt {
                    Ok(Ok(())) => {
                        tally.connections.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(e)) => tally.error(e.to_string()),
                    Err(_) => tally.error(format!("no echo within {LOAD_TIMEOUT:?}")),
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let first_error = tally
        .first_error
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    Ok(ConnRateReport {
        connections: tally.connections.load(Ordering::Relaxed),
        errors: tally.errors.load(Ordering::Relaxed),
        first_error,
        elapsed: start.elapsed(),
    })
}

impl Tally {
    fn error(&self, message: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self
            .first_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        first.get_or_insert(message);
    }
}

async fn one_connection(target: SocketAddr, byte: u8) -> io::Result<()> {
    let mut stream = tokio::net::TcpStream::connect(target).await?;
    stream.set_nodelay(true)?;
    stream.write_all(&[byte]).await?;
    let mut back = [0u8; 1];
    stream.read_exact(&mut back).await?;
    if back[0] != byte {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("echo sent {:#04x} back for {byte:#04x}", back[0]),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::EchoServer;
    use super::*;
    use std::net::{Ipv4Addr, TcpListener};

    fn loopback() -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
    }

    #[test]
    fn rr_times_every_round_trip_on_loopback() {
        let server = EchoServer::start(loopback()).unwrap();
        let report = tcp_rr(server.local_addr(), 200, 64).unwrap();
        assert_eq!(report.round_trips, 200);
        assert_eq!(report.rtts.len(), 200);
        assert!(report.p50_us <= report.p99_us && report.p99_us <= report.max_us);
        assert!(report.max_us > 0, "{report}");
        let one = tcp_rr(server.local_addr(), 10, 1).unwrap();
        assert_eq!(one.round_trips, 10);
    }

    #[test]
    fn rr_rejects_an_altered_reply_and_a_bad_size() {
        // A server that answers every message with the same wrong bytes.
        let listener = TcpListener::bind(loopback()).unwrap();
        let addr = listener.local_addr().unwrap();
        let liar = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 16];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&vec![0xee; n]).is_err() {
                    break;
                }
            }
        });
        let err = tcp_rr(addr, 5, 16).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        liar.join().unwrap();
        assert!(tcp_rr(addr, 1, 0).is_err());
        assert!(tcp_rr(addr, 1, MAX_RR_MESSAGE + 1).is_err());
    }

    #[test]
    fn rr_fails_when_the_server_closes() {
        let listener = TcpListener::bind(loopback()).unwrap();
        let addr = listener.local_addr().unwrap();
        let closer = std::thread::spawn(move || drop(listener.accept().unwrap()));
        assert!(tcp_rr(addr, 3, 8).is_err());
        closer.join().unwrap();
    }

    #[test]
    fn conn_rate_counts_completed_connections() {
        let server = EchoServer::start(loopback()).unwrap();
        let report = tcp_conn_rate(server.local_addr(), 4, Duration::from_millis(300)).unwrap();
        assert_eq!(report.errors, 0, "{report}");
        assert!(report.connections >= 4, "{report}");
        assert!(report.per_sec() > 0.0);
        assert!(report.elapsed >= Duration::from_millis(300));
    }

    #[test]
    fn conn_rate_counts_refused_connections_as_errors() {
        // Bind then drop: nothing listens on the port.
        let addr = TcpListener::bind(loopback()).unwrap().local_addr().unwrap();
        let report = tcp_conn_rate(addr, 2, Duration::from_millis(100)).unwrap();
        assert_eq!(report.connections, 0, "{report}");
        assert!(report.errors > 0, "{report}");
        assert!(report.first_error.is_some());
    }

    #[test]
    fn conn_rate_flags_a_wrong_echo() {
        let listener = TcpListener::bind(loopback()).unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(mut s) = s else { return };
                let mut b = [0u8; 1];
                if s.read_exact(&mut b).is_ok() {
                    let _ = s.write_all(&[b[0] ^ 0xff]);
                }
            }
        });
        let report = tcp_conn_rate(addr, 1, Duration::from_millis(100)).unwrap();
        assert_eq!(report.connections, 0, "{report}");
        assert!(report.errors > 0);
        assert!(report.first_error.unwrap().contains("back for"));
    }
}
