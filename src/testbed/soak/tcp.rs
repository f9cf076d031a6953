//! The TCP loads of the soak, each run on a current-thread runtime on a thread inside
//! the app namespace, so every connection goes through the tunnel:
//!
//! - bulk: back-to-back transfers of one body, alternating an upload to the discard
//!   sink (which answers the byte count) and a download from the HTTP blob server
//!   (checked byte for byte), paced to a fixed rate on both sides so that it does not
//!   starve the other loads; a pause of [`IO_TIMEOUT`] without progress is an error;
//! - short: connections opened at a fixed rate, each sending a request to the echo,
//!   half-closing and reading the echoed bytes to EOF; anything else than the exact
//!   bytes back within [`SHORT_TIMEOUT`] is an error.
//!
//! Destinations alternate between the target's IPv4 and IPv6 addresses.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::{Instant, MissedTickBehavior, sleep, timeout};

use super::super::services::{DISCARD_PORT, ECHO_PORT, HTTP_PORT, echo_round_trip};
use super::super::topology::{TARGET_V4, TARGET_V6};
use super::super::udp_client::{echo_payload, echo_size};
use super::counters::{Counters, Kind};

/// The longest a bulk transfer may go without progress (connect, a write, a read).
pub const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest a short connection may take, connect to close.
pub const SHORT_TIMEOUT: Duration = Duration::from_secs(15);
/// Short connections in flight at most; beyond, the pace waits.
const SHORT_IN_FLIGHT: u32 = 256;
/// Request sizes of the short connections.
const SHORT_SIZES: std::ops::RangeInclusive<usize> = 16..=4096;
/// The largest piece of a bulk transfer written or read at once.
const CHUNK: usize = 64 * 1024;
/// The smallest grant the pacer waits for (unless less is left).
const MIN_GRANT: usize = 8 * 1024;
/// How much unused rate the pacer lets build up (no bursts after a pause).
const MAX_CREDIT: Duration = Duration::from_millis(50);
/// The largest HTTP response head accepted.
const MAX_HEAD: usize = 16 * 1024;

/// The target's address of family `n % 2` (even: IPv4, odd: IPv6) at `port`.
pub fn target(n: u64, port: u16) -> SocketAddr {
    if n % 2 == 0 {
        SocketAddr::from((TARGET_V4, port))
    } else {
        SocketAddr::from((TARGET_V6, port))
    }
}

/// `f` within `limit`, a timeout being an error that says what timed out.
async fn within<T>(
    limit: Duration,
    what: &str,
    f: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    timeout(limit, f).await.unwrap_or_else(|_| {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{what}: no progress in {limit:?}"),
        ))
    })
}

/// Hands out bytes at a fixed rate.
#[derive(Debug)]
struct Pacer {
    start: Instant,
    bytes_per_sec: f64,
    done: u64,
}

impl Pacer {
    fn new(bytes_per_sec: u64) -> Pacer {
        Pacer {
            start: Instant::now(),
            bytes_per_sec: bytes_per_sec as f64,
            done: 0,
        }
    }

    /// Waits until at least `min(want, MIN_GRANT)` bytes are due, and returns how many
    /// (at most `want`); [`Pacer::used`] then says how many were moved.
    async fn grant(&mut self, want: usize) -> usize {
        let floor = want.min(MIN_GRANT) as u64;
        let cap = (self.bytes_per_sec * MAX_CREDIT.as_secs_f64()) as u64;
        loop {
            let due = (self.bytes_per_sec * self.start.elapsed().as_secs_f64()) as u64;
            self.done = self.done.max(due.saturating_sub(cap.max(floor)));
            let credit = due.saturating_sub(self.done);
            if credit >= floor {
                return credit.min(want as u64) as usize;
            }
            sleep(Duration::from_millis(2)).await;
        }
    }

    fn used(&mut self, bytes: usize) {
        self.done = self.done.saturating_add(bytes as u64);
    }
}

/// Bulk transfers of `body` at `bytes_per_sec` (both directions share the pace) until
/// `stop`; a transfer in progress when it is set is finished.
pub async fn bulk(
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    bytes_per_sec: u64,
    body: Arc<Vec<u8>>,
) {
    let mut pacer = Pacer::new(bytes_per_sec.max(1));
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let result = if n % 2 == 0 {
            upload(target(n / 2, DISCARD_PORT), &body, &mut pacer).await
        } else {
            download(target(n / 2, HTTP_PORT), &body, &mut pacer).await
        };
        match result {
            Ok(bytes) => counters.op(Kind::Bulk, bytes),
            Err(e) => {
                counters.error(Kind::Bulk, e);
                // Do not spin on a path that fails at once.
                sleep(Duration::from_millis(200)).await;
            }
        }
        n += 1;
    }
}

/// Sends `body` to the discard sink at `dst`, half-closes, and checks the byte count
/// it answers.
async fn upload(dst: SocketAddr, body: &[u8], pacer: &mut Pacer) -> io::Result<u64> {
    let what = format!("upload to {dst}");
    let mut stream = within(IO_TIMEOUT, &what, async { TcpStream::connect(dst).await }).await?;
    let mut sent = 0;
    while let Some(rest) = body.get(sent..).filter(|r| !r.is_empty()) {
        let n = pacer.grant(rest.len().min(CHUNK)).await;
        let piece = rest.get(..n).unwrap_or(rest);
        within(IO_TIMEOUT, &what, stream.write_all(piece)).await?;
        pacer.used(piece.len());
        sent += piece.len();
    }
    within(IO_TIMEOUT, &what, stream.shutdown()).await?;
    let mut answer = String::new();
    within(IO_TIMEOUT, &what, stream.read_to_string(&mut answer)).await?;
    let counted: u64 = answer
        .trim()
        .parse()
        .map_err(|_| io::Error::other(format!("{what}: the sink answered {answer:?}")))?;
    if counted != body.len() as u64 {
        return Err(io::Error::other(format!(
            "{what}: sent {} bytes, the sink counted {counted}",
            body.len()
        )));
    }
    Ok(counted)
}

/// GETs the HTTP blob at `dst`, reading at the pacer's rate, and checks it is `body`.
async fn download(dst: SocketAddr, body: &[u8], pacer: &mut Pacer) -> io::Result<u64> {
    let what = format!("download from {dst}");
    let mut stream = within(IO_TIMEOUT, &what, async { TcpStream::connect(dst).await }).await?;
    let request = b"GET /soak HTTP/1.1\r\nHost: target\r\nConnection: close\r\n\r\n";
    within(IO_TIMEOUT, &what, stream.write_all(request)).await?;
    let (length, mut got) = read_head(&mut stream, &what).await?;
    if length != body.len() {
        return Err(io::Error::other(format!(
            "{what}: Content-Length {length}, expected {}",
            body.len()
        )));
    }
    check_piece(body, 0, &got, &what)?;
    let mut received = got.len();
    got.resize(CHUNK, 0);
    loop {
        let n = pacer.grant(CHUNK).await;
        let buf = got.get_mut(..n).unwrap_or_default();
        let k = within(IO_TIMEOUT, &what, stream.read(buf)).await?;
        if k == 0 {
            break;
        }
        pacer.used(k);
        check_piece(body, received, buf.get(..k).unwrap_or_default(), &what)?;
        received += k;
    }
    if received != body.len() {
        return Err(io::Error::other(format!(
            "{what}: {received} of {} bytes, then EOF",
            body.len()
        )));
    }
    Ok(received as u64)
}

/// Reads the response head; returns its Content-Length and the body bytes read with it.
async fn read_head(stream: &mut TcpStream, what: &str) -> io::Result<(usize, Vec<u8>)> {
    let mut head = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            let text = String::from_utf8_lossy(head.get(..end).unwrap_or_default()).into_owned();
            let rest = head.get(end + 4..).unwrap_or_default().to_vec();
            let length = text
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse().ok())
                .ok_or_else(|| {
                    io::Error::other(format!("{what}: no Content-Length in {text:?}"))
                })?;
            return Ok((length, rest));
        }
        if head.len() > MAX_HEAD {
            return Err(io::Error::other(format!("{what}: no end of head")));
        }
        let n = within(IO_TIMEOUT, what, stream.read(&mut buf)).await?;
        if n == 0 {
            return Err(io::Error::other(format!("{what}: EOF in the head")));
        }
        head.extend_from_slice(buf.get(..n).unwrap_or_default());
    }
}

/// Checks that `piece` is `body` at offset `at`.
fn check_piece(body: &[u8], at: usize, piece: &[u8], what: &str) -> io::Result<()> {
    if body.get(at..at + piece.len()) == Some(piece) {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{what}: {} bytes at offset {at} differ from the blob (or run past it)",
            piece.len()
        )))
    }
}

/// Opens `per_sec` short connections per second to the echo until `stop`, then
/// waits for those in flight.
pub async fn short(counters: Arc<Counters>, stop: Arc<AtomicBool>, per_sec: u64) {
    let permits = Arc::new(Semaphore::new(SHORT_IN_FLIGHT as usize));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_sec.max(1) as f64));
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let counters = counters.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match within(SHORT_TIMEOUT, "short connection", exchange(n)).await {
                Ok(bytes) => counters.op(Kind::Short, bytes),
                Err(e) => counters.error(Kind::Short, e),
            }
        });
        n += 1;
    }
    let _all_done = permits.acquire_many(SHORT_IN_FLIGHT).await;
}

/// Short connection `n`: request to the echo, half-close, the same bytes back, close.
async fn exchange(n: u64) -> io::Result<u64> {
    let dst = target(n, ECHO_PORT);
    let request = echo_payload(n, echo_size(n as usize, &SHORT_SIZES));
    let mut stream = TcpStream::connect(dst)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("connect to {dst}: {e}")))?;
    let back = echo_round_trip(&mut stream, &request)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("echo with {dst}: {e}")))?;
    if back != request {
        return Err(io::Error::other(format!(
            "echo with {dst}: sent {} bytes, {} came back{}",
            request.len(),
            back.len(),
            if back.len() == request.len() {
                ", altered"
            } else {
                ""
            }
        )));
    }
    Ok(2 * request.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_pacer_keeps_its_rate_without_bursts() {
        let mut pacer = Pacer::new(1_000_000);
        let start = Instant::now();
        let mut moved = 0;
        while moved < 500_000 {
            let n = pacer.grant(CHUNK).await;
            assert!((MIN_GRANT..=CHUNK).contains(&n), "{n}");
            pacer.used(n);
            moved += n;
        }
        // 500 kB at 1 MB/s: about half a second (paused time is exact, sleeps 2 ms).
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(480), "{took:?}");
        assert!(took <= Duration::from_millis(560), "{took:?}");
        // After a long pause, at most MAX_CREDIT (50 ms = 50 kB) is granted at once.
        tokio::time::advance(Duration::from_secs(10)).await;
        let n = pacer.grant(10_000_000).await;
        assert!(n <= 50_000, "{n}");
    }

    #[test]
    fn targets_alternate_families() {
        assert!(target(0, 80).is_ipv4());
        assert!(target(1, 80).is_ipv6());
        assert_eq!(target(2, 81).port(), 81);
    }
}
