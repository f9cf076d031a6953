//! The UDP loads of the soak, each run on a current-thread runtime on a thread inside
//! the app namespace, so every datagram goes through the tunnel:
//!
//! - udp: one socket per family (one long-lived association each) sends datagrams of
//!   varied sizes to the echo at a fixed rate; every reply is matched by sequence
//!   number and checked byte for byte. No reply within [`REPLY_TIMEOUT`] is *loss*
//!   (counted, judged against an allowed rate); an altered or unknown reply, or a
//!   socket error, is an *error*;
//! - dns: every second a fresh socket (a new association, as a stub resolver's fresh
//!   source port) sends that second's queries to dnsmasq in the target, alternating
//!   A and AAAA for [`TARGET_NAME`] and the server's family. A query unanswered for
//!   [`DNS_RETRY`] is sent again (each retransmission counts as loss), up to
//!   [`DNS_TRIES`] times; still unanswered, or answered wrongly, it is an *error*.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior, interval, sleep};

use super::super::dns_client::{TYPE_A, TYPE_AAAA, build_query, parse_response};
use super::super::dnsmasq::{DNS_PORT, TARGET_NAME};
use super::super::topology::{TARGET_V4, TARGET_V6};
use super::super::udp::{UDP_ECHO_PORT, bind_udp};
use super::super::udp_client::{MIN_PAYLOAD, echo_payload, echo_size, wildcard};
use super::counters::{Counters, Kind};

/// How long a datagram waits for its echo before it counts as lost.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a DNS query waits before it is sent again.
pub const DNS_RETRY: Duration = Duration::from_secs(1);
/// How often a DNS query is sent at most.
pub const DNS_TRIES: u32 = 3;
/// Datagram payload sizes of the UDP echo load (fit a 1500-byte path with room for
/// the SOCKS UDP header).
const UDP_SIZES: std::ops::RangeInclusive<usize> = MIN_PAYLOAD..=1400;
/// The send pace is caught up this often.
const TICK: Duration = Duration::from_millis(5);
/// Late replies remembered at most (to tell "late" from "unknown").
const MAX_REMEMBERED: usize = 100_000;

/// A UDP socket bound to the wildcard of `dst`'s family and connected to it, with
/// large buffers (8 MiB asked, as far as `net.core.rmem_max` lets), so that the
/// client is not where a datagram is lost.
async fn connected(dst: SocketAddr) -> io::Result<UdpSocket> {
    let socket = bind_udp(wildcard(dst))?;
    socket.set_nonblocking(true)?;
    let socket = UdpSocket::from_std(socket)?;
    socket.connect(dst).await?;
    Ok(socket)
}

/// Datagrams to the echo of the target at `per_sec` until `stop`, one socket per
/// family, half the rate each.
pub async fn udp_echo(counters: Arc<Counters>, stop: Arc<AtomicBool>, per_sec: u64) {
    let half = per_sec.div_ceil(2);
    let v4 = echo_socket(
        counters.clone(),
        stop.clone(),
        half,
        (TARGET_V4, UDP_ECHO_PORT).into(),
    );
    let v6 = echo_socket(counters, stop, half, (TARGET_V6, UDP_ECHO_PORT).into());
    tokio::join!(v4, v6);
}

async fn echo_socket(
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    per_sec: u64,
    dst: SocketAddr,
) {
    let socket = match connected(dst).await {
        Ok(socket) => socket,
        Err(e) => return counters.error(Kind::Udp, format!("socket to {dst}: {e}")),
    };
    let mut in_flight: HashMap<u64, (Instant, usize)> = HashMap::new();
    let mut expired: HashSet<u64> = HashSet::new();
    let mut tick = interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut buf = vec![0u8; 65_536];
    let start = Instant::now();
    let mut stopped_at: Option<Instant> = None;
    let mut next: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if stopped_at.is_none() && stop.load(Ordering::Relaxed) {
                    stopped_at = Some(Instant::now());
                }
                if stopped_at.is_none() {
                    let due = (per_sec as f64 * start.elapsed().as_secs_f64()) as u64;
                    while next < due {
                        let len = echo_size(next as usize, &UDP_SIZES);
                        match socket.send(&echo_payload(next, len)).await {
                            Ok(_) => {
                                counters.sent(Kind::Udp, 1);
                                in_flight.insert(next, (Instant::now(), len));
                            }
                            Err(e) => counters.error(Kind::Udp, format!("send to {dst}: {e}")),
                        }
                        next += 1;
                    }
                }
                let now = Instant::now();
                let before = in_flight.len();
                in_flight.retain(|&seq, (at, _)| {
                    let keep = now.duration_since(*at) < REPLY_TIMEOUT;
                    if !keep && expired.len() < MAX_REMEMBERED {
                        expired.insert(seq);
                    }
                    keep
                });
                counters.lost(Kind::Udp, (before - in_flight.len()) as u64);
                if stopped_at.is_some() && in_flight.is_empty() {
                    return;
                }
            }
            received = socket.recv(&mut buf) => match received {
                Ok(n) => check_echo(buf.get(..n).unwrap_or_default(), &mut in_flight, &expired, &counters, dst),
                Err(e) => {
                    counters.error(Kind::Udp, format!("recv from {dst}: {e}"));
                    sleep(TICK).await;
                }
            },
        }
    }
}

/// Counts one echo reply: intact (an op), late (already counted lost: nothing more),
/// or altered / unknown (an error).
fn check_echo(
    reply: &[u8],
    in_flight: &mut HashMap<u64, (Instant, usize)>,
    expired: &HashSet<u64>,
    counters: &Counters,
    dst: SocketAddr,
) {
    let seq = reply
        .get(..MIN_PAYLOAD)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes);
    let Some(seq) = seq else {
        return counters.error(
            Kind::Udp,
            format!("{} bytes from {dst}: no sequence", reply.len()),
        );
    };
    match in_flight.remove(&seq) {
        Some((_, len)) if reply == echo_payload(seq, len).as_slice() => {
            counters.op(Kind::Udp, 2 * len as u64);
        }
        Some((_, len)) => counters.error(
            Kind::Udp,
            format!(
                "echo {seq} from {dst}: {len} bytes sent, {} altered ones back",
                reply.len()
            ),
        ),
        None if expired.contains(&seq) => {}
        None => counters.error(
            Kind::Udp,
            format!("echo {seq} from {dst}: never sent or a duplicate"),
        ),
    }
}

/// DNS queries at `per_sec` until `stop`: a new socket and association every second.
pub async fn dns(counters: Arc<Counters>, stop: Arc<AtomicBool>, per_sec: u64) {
    let mut rounds = JoinSet::new();
    let start = Instant::now();
    let mut round: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let server: IpAddr = if round % 2 == 0 {
            TARGET_V4.into()
        } else {
            TARGET_V6.into()
        };
        rounds.spawn(dns_round(
            counters.clone(),
            (server, DNS_PORT).into(),
            per_sec,
        ));
        round += 1;
        tokio::time::sleep_until(start + Duration::from_secs(round)).await;
        // Reap finished rounds as we go, so the set stays small.
        while rounds.try_join_next().is_some() {}
    }
    while rounds.join_next().await.is_some() {}
}

/// A query in flight: its type, when it was last sent, how often.
#[derive(Debug)]
struct Pending {
    qtype: u16,
    query: Vec<u8>,
    sent_at: Instant,
    tries: u32,
}

/// One second's queries from one fresh socket to `server`, spread over the second;
/// returns when each was answered or given up.
async fn dns_round(counters: Arc<Counters>, server: SocketAddr, count: u64) {
    let socket = match connected(server).await {
        Ok(socket) => socket,
        Err(e) => return counters.error(Kind::Dns, format!("socket to {server}: {e}")),
    };
    let mut pending: HashMap<u16, Pending> = HashMap::new();
    let mut tick = interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut buf = vec![0u8; 65_536];
    let start = Instant::now();
    let mut next: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let due = ((count as f64 * start.elapsed().as_secs_f64()) as u64).min(count);
                while next < due {
                    let id = next as u16;
                    let qtype = if next % 2 == 0 { TYPE_A } else { TYPE_AAAA };
                    match build_query(id, TARGET_NAME, qtype) {
                        Ok(query) => {
                            send_query(&socket, &query, &counters, server).await;
                            pending.insert(id, Pending { qtype, query, sent_at: Instant::now(), tries: 1 });
                        }
                        Err(e) => counters.error(Kind::Dns, e),
                    }
                    next += 1;
                }
                retry_or_give_up(&socket, &mut pending, &counters, server).await;
                if next >= count && pending.is_empty() {
                    return;
                }
            }
            received = socket.recv(&mut buf) => match received {
                Ok(n) => check_answer(buf.get(..n).unwrap_or_default(), &mut pending, &counters, server),
                Err(e) => {
                    counters.error(Kind::Dns, format!("recv from {server}: {e}"));
                    sleep(TICK).await;
                }
            },
        }
    }
}

async fn send_query(socket: &UdpSocket, query: &[u8], counters: &Counters, server: SocketAddr) {
    match socket.send(query).await {
        Ok(_) => counters.sent(Kind::Dns, 1),
        Err(e) => counters.error(Kind::Dns, format!("send to {server}: {e}")),
    }
}

/// Sends again what waited [`DNS_RETRY`] (one loss each), gives up on what was sent
/// [`DNS_TRIES`] times (one error each).
async fn retry_or_give_up(
    socket: &UdpSocket,
    pending: &mut HashMap<u16, Pending>,
    counters: &Counters,
    server: SocketAddr,
) {
    let now = Instant::now();
    let overdue: Vec<u16> = pending
        .iter()
        .filter(|(_, p)| now.duration_since(p.sent_at) >= DNS_RETRY)
        .map(|(&id, _)| id)
        .collect();
    for id in overdue {
        let Some(p) = pending.get_mut(&id) else {
            continue;
        };
        counters.lost(Kind::Dns, 1);
        if p.tries >= DNS_TRIES {
            counters.error(
                Kind::Dns,
                format!("query {id} to {server}: no answer after {DNS_TRIES} tries"),
            );
            pending.remove(&id);
            continue;
        }
        p.tries += 1;
        p.sent_at = now;
        send_query(socket, &p.query, counters, server).await;
    }
}

/// Counts one answer: right (an op), for no query in flight (a duplicate after a
/// retransmission: nothing), or wrong (an error).
fn check_answer(
    bytes: &[u8],
    pending: &mut HashMap<u16, Pending>,
    counters: &Counters,
    server: SocketAddr,
) {
    let Some(response) = parse_response(bytes) else {
        return counters.error(
            Kind::Dns,
            format!("{} bytes from {server}: not a DNS response", bytes.len()),
        );
    };
    let Some(query) = pending.remove(&response.id) else {
        return;
    };
    let expected: IpAddr = if query.qtype == TYPE_A {
        TARGET_V4.into()
    } else {
        TARGET_V6.into()
    };
    if response.rcode == 0 && response.addresses() == [expected] {
        counters.op(Kind::Dns, bytes.len() as u64);
    } else {
        counters.error(
            Kind::Dns,
            format!(
                "query {} to {server}: rcode {}, addresses {:?}, expected {expected}",
                response.id,
                response.rcode,
                response.addresses()
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_replies_are_ops_late_or_errors() {
        let c = Counters::default();
        let dst: SocketAddr = "192.0.2.1:7".parse().unwrap();
        let mut in_flight = HashMap::from([(1, (Instant::now(), 40)), (2, (Instant::now(), 40))]);
        let expired = HashSet::from([9]);
        check_echo(&echo_payload(1, 40), &mut in_flight, &expired, &c, dst);
        check_echo(&echo_payload(9, 40), &mut in_flight, &expired, &c, dst);
        assert_eq!(
            (c.totals(Kind::Udp).ops, c.totals(Kind::Udp).errors),
            (1, 0)
        );
        let mut altered = echo_payload(2, 40);
        altered[20] ^= 0xff;
        check_echo(&altered, &mut in_flight, &expired, &c, dst);
        check_echo(&echo_payload(1, 40), &mut in_flight, &expired, &c, dst);
        check_echo(b"abc", &mut in_flight, &expired, &c, dst);
        assert_eq!(c.totals(Kind::Udp).errors, 3);
    }

    #[test]
    fn answers_must_name_the_target() {
        let c = Counters::default();
        let server: SocketAddr = "192.0.2.1:53".parse().unwrap();
        let answer = |id: u16, addr: [u8; 4]| {
            let mut r = build_query(id, TARGET_NAME, TYPE_A).unwrap();
            r[2] = 0x81;
            r[3] = 0x80;
            r[7] = 1;
            r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
            r.extend_from_slice(&addr);
            r
        };
        let pending = || Pending {
            qtype: TYPE_A,
            query: Vec::new(),
            sent_at: Instant::now(),
            tries: 1,
        };
        let mut waiting = HashMap::from([(1, pending()), (2, pending())]);
        check_answer(&answer(1, TARGET_V4.octets()), &mut waiting, &c, server);
        check_answer(&answer(1, TARGET_V4.octets()), &mut waiting, &c, server); // duplicate
        check_answer(&answer(2, [10, 0, 0, 1]), &mut waiting, &c, server);
        check_answer(b"junk", &mut waiting, &c, server);
        let dns = c.totals(Kind::Dns);
        assert_eq!((dns.ops, dns.errors), (1, 2));
        assert!(waiting.is_empty());
    }
}
