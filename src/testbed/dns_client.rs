//! A minimal DNS client for tests and benchmarks: queries built by hand (RFC 1035
//! section 4.1: header, one question), answers read just far enough to count them
//! and to extract A / AAAA addresses, and a query-rate client over UDP.
//!
//! Deliberately tiny and independent of the crate's `dns/` module: it checks that
//! module from the outside.

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::context;
use super::namespace::Namespace;
use super::udp_client::{connected_socket, recv_retrying};

/// Query type A.
pub const TYPE_A: u16 = 1;
/// Query type TXT.
pub const TYPE_TXT: u16 = 16;
/// Query type AAAA.
pub const TYPE_AAAA: u16 = 28;
/// Class IN.
const CLASS_IN: u16 = 1;
/// Header flags of a query: RD (recursion desired).
const FLAGS_RD: u16 = 0x0100;
/// The DNS header length.
const HEADER_LEN: usize = 12;

/// The bytes of a standard query for `name` (dotted, a trailing dot optional) of
/// type `qtype`, class IN, with RD set. Fails for an empty label, a label over 63
/// bytes or a name over 253.
pub fn build_query(id: u16, name: &str, qtype: u16) -> io::Result<Vec<u8>> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.len() > 253 {
        return Err(invalid(format!("name of {} bytes", name.len())));
    }
    let mut query = Vec::with_capacity(HEADER_LEN + name.len() + 6);
    query.extend_from_slice(&id.to_be_bytes());
    query.extend_from_slice(&FLAGS_RD.to_be_bytes());
    query.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // qd 1, an 0, ns 0, ar 0
    if !name.is_empty() {
        for label in name.split('.') {
            let len = u8::try_from(label.len())
                .ok()
                .filter(|&l| (1..=63).contains(&l))
                .ok_or_else(|| invalid(format!("label {label:?} in {name:?}")))?;
            query.push(len);
            query.extend_from_slice(label.as_bytes());
        }
    }
    query.push(0);
    query.extend_from_slice(&qtype.to_be_bytes());
    query.extend_from_slice(&CLASS_IN.to_be_bytes());
    Ok(query)
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, format!("dns query: {what}"))
}

/// One resource record of the answer section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsAnswer {
    /// Its type (A, AAAA, TXT, CNAME...).
    pub rtype: u16,
    /// Its TTL in seconds.
    pub ttl: u32,
    /// Its RDATA, uninterpreted.
    pub data: Vec<u8>,
}

/// The parts of a response that tests look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsResponse {
    /// The ID (matches the query's).
    pub id: u16,
    /// The RCODE (0 NOERROR, 2 SERVFAIL, 3 NXDOMAIN, 5 REFUSED).
    pub rcode: u8,
    /// The TC bit: the answer did not fit.
    pub truncated: bool,
    /// The answer section.
    pub answers: Vec<DnsAnswer>,
}

impl DnsResponse {
    /// The A and AAAA addresses of the answer section.
    pub fn addresses(&self) -> Vec<IpAddr> {
        self.answers
            .iter()
            .filter_map(|a| match (a.rtype, a.data.len()) {
                (TYPE_A, 4) => <[u8; 4]>::try_from(a.data.as_slice())
                    .ok()
                    .map(|b| IpAddr::V4(Ipv4Addr::from(b))),
                (TYPE_AAAA, 16) => <[u8; 16]>::try_from(a.data.as_slice())
                    .ok()
                    .map(|b| IpAddr::V6(Ipv6Addr::from(b))),
                _ => None,
            })
            .collect()
    }
}

/// Reads a response: `None` unless it is a well-formed response (QR set) whose
/// question and answer sections are complete. Names are skipped, not decoded.
pub fn parse_response(bytes: &[u8]) -> Option<DnsResponse> {
    let u16_at = |at: usize| -> Option<u16> {
        Some(u16::from_be_bytes([*bytes.get(at)?, *bytes.get(at + 1)?]))
    };
    let flags = u16_at(2)?;
    if flags & 0x8000 == 0 {
        return None;
    }
    let (questions, answer_count) = (u16_at(4)?, u16_at(6)?);
    let mut at = HEADER_LEN;
    for _ in 0..questions {
        at = skip_name(bytes, at)?.checked_add(4)?;
    }
    let mut answers = Vec::with_capacity(usize::from(answer_count));
    for _ in 0..answer_count {
        at = skip_name(bytes, at)?;
        let rtype = u16_at(at)?;
        let ttl = u32::from_be_bytes(bytes.get(at + 4..at + 8)?.try_into().ok()?);
        let len = usize::from(u16_at(at + 8)?);
        let data = bytes.get(at + 10..at + 10 + len)?.to_vec();
        at += 10 + len;
        answers.push(DnsAnswer { rtype, ttl, data });
    }
    Some(DnsResponse {
        id: u16_at(0)?,
        rcode: (flags & 0x000f) as u8,
        truncated: flags & 0x0200 != 0,
        answers,
    })
}

/// The offset after the (possibly compressed) name at `at`.
fn skip_name(bytes: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *bytes.get(at)?;
        match len {
            0 => return at.checked_add(1),
            l if l & 0xc0 == 0xc0 => return at.checked_add(2).filter(|&end| end <= bytes.len()),
            l if l & 0xc0 == 0 => at = at.checked_add(1 + usize::from(l))?,
            _ => return None,
        }
    }
}

/// One query over UDP from `ns` to `server`, waiting up to `timeout` for the answer
/// with its ID (other datagrams are ignored).
pub fn dns_query(
    ns: &Namespace,
    server: SocketAddr,
    name: &str,
    qtype: u16,
    timeout: Duration,
) -> io::Result<DnsResponse> {
    let socket = connected_socket(ns, server)?;
    let id = (std::process::id() as u16) ^ 0x5a5a;
    socket
        .send(&build_query(id, name, qtype)?)
        .map_err(context(format!("dns: send to {server}")))?;
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 65_536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("dns: no answer from {server} for {name} in {timeout:?}"),
            ));
        }
        socket
            .set_read_timeout(Some(left))
            .map_err(context("dns: read timeout"))?;
        match recv_retrying(&socket, &mut buf) {
            Ok(n) => {
                if let Some(response) = buf.get(..n).and_then(parse_response) {
                    if response.id == id {
                        return Ok(response);
                    }
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(context(format!("dns: recv from {server}"))(e)),
        }
    }
}

/// Queries over one TCP connection to `server` from `ns` (RFC 7766 framing), all
/// sent back to back (pipelined) before the first answer is read; returns the
/// answers in the order they came, each checked against its query's ID in order.
pub fn dns_query_tcp(
    ns: &Namespace,
    server: SocketAddr,
    queries: &[(&str, u16)],
    timeout: Duration,
) -> io::Result<Vec<DnsResponse>> {
    use std::io::{Read, Write};
    let mut framed = Vec::new();
    let mut ids = Vec::new();
    for (i, (name, qtype)) in queries.iter().enumerate() {
        let id = 0x7100_u16.wrapping_add(u16::try_from(i).unwrap_or(u16::MAX));
        let query = build_query(id, name, *qtype)?;
        let len = u16::try_from(query.len()).map_err(io::Error::other)?;
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&query);
        ids.push(id);
    }
    let mut stream = ns.within(move || std::net::TcpStream::connect_timeout(&server, timeout))?;
    stream.set_read_timeout(Some(timeout))?;
    stream
        .write_all(&framed)
        .map_err(context(format!("dns: send to {server} over TCP")))?;
    let mut answers = Vec::new();
    for id in ids {
        let mut len = [0u8; 2];
        stream
            .read_exact(&mut len)
            .map_err(context(format!("dns: answer from {server} over TCP")))?;
        let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream
            .read_exact(&mut body)
            .map_err(context(format!("dns: answer from {server} over TCP")))?;
        let response = parse_response(&body)
            .ok_or_else(|| io::Error::other(format!("dns: not a DNS response from {server}")))?;
        if response.id != id {
            return Err(io::Error::other(format!(
                "dns: answer {:#06x} from {server}, expected {id:#06x} (out of order)",
                response.id
            )));
        }
        answers.push(response);
    }
    Ok(answers)
}

/// What a query-rate run saw.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueryRateReport {
    /// Queries sent.
    pub sent: u64,
    /// NOERROR responses with at least one answer.
    pub answered: u64,
    /// Responses with another RCODE or no answer.
    pub failed: u64,
    /// Queries without a response in time.
    pub lost: u64,
    /// From the first send to the last response (or timeout).
    pub elapsed: Duration,
}

impl QueryRateReport {
    /// Answered queries per second.
    pub fn per_sec(&self) -> f64 {
        self.answered as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// How long the rate client waits for any response before it counts all in flight lost.
const RATE_REPLY_TIMEOUT: Duration = Duration::from_millis(300);

/// Sends queries of `qtype` for `names` (round robin) from one UDP socket in `ns` to
/// `server` for `duration`, keeping `window` queries in flight, and counts answers.
pub fn dns_query_rate(
    ns: &Namespace,
    server: SocketAddr,
    names: &[&str],
    qtype: u16,
    window: usize,
    duration: Duration,
) -> io::Result<QueryRateReport> {
    if names.is_empty() {
        return Err(invalid("no names to query".into()));
    }
    let socket = connected_socket(ns, server)?;
    socket
        .set_read_timeout(Some(RATE_REPLY_TIMEOUT))
        .map_err(context("dns rate: read timeout"))?;
    // One prebuilt query per name; the ID is patched into the first two bytes.
    let queries = names
        .iter()
        .map(|name| build_query(0, name, qtype))
        .collect::<io::Result<Vec<_>>>()?;
    let window = window.clamp(1, 30_000);
    let mut report = QueryRateReport::default();
    let mut in_flight: HashSet<u16> = HashSet::with_capacity(window);
    let mut next_id: u16 = 0;
    let mut buf = vec![0u8; 65_536];
    let start = Instant::now();
    loop {
        let sending = start.elapsed() < duration;
        while sending && in_flight.len() < window {
            next_id = next_id.wrapping_add(1);
            if in_flight.contains(&next_id) {
                continue;
            }
            let index = usize::from(next_id) % queries.len();
            let Some(mut query) = queries.get(index).cloned() else {
                break;
            };
            if let Some(id) = query.get_mut(..2) {
                id.copy_from_slice(&next_id.to_be_bytes());
            }
            socket
                .send(&query)
                .map_err(context(format!("dns rate: send to {server}")))?;
            in_flight.insert(next_id);
            report.sent += 1;
        }
        if !sending && in_flight.is_empty() {
            break;
        }
        match recv_retrying(&socket, &mut buf) {
            Ok(n) => {
                let Some(response) = buf.get(..n).and_then(parse_response) else {
                    continue;
                };
                if !in_flight.remove(&response.id) {
                    continue;
                }
                if response.rcode == 0 && !response.answers.is_empty() {
                    report.answered += 1;
                } else {
                    report.failed += 1;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                report.lost += in_flight.len() as u64;
                in_flight.clear();
                if !sending {
                    break;
                }
            }
            Err(e) => return Err(context(format!("dns rate: recv from {server}"))(e)),
        }
    }
    report.elapsed = start.elapsed();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_bytes_match_rfc_1035() {
        let q = build_query(0x1234, "a.bc.", TYPE_AAAA).unwrap();
        let expected = [
            0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, // header
            1, b'a', 2, b'b', b'c', 0, // name
            0, 28, 0, 1, // AAAA, IN
        ];
        assert_eq!(q, expected);
        assert!(build_query(1, "a..b", TYPE_A).is_err());
        assert!(build_query(1, &"x".repeat(64), TYPE_A).is_err());
        assert_eq!(build_query(1, ".", TYPE_A).unwrap().len(), HEADER_LEN + 5);
    }

    #[test]
    fn parses_an_answer_with_a_compressed_name() {
        let mut r = build_query(7, "a.bc", TYPE_A).unwrap();
        r[2] = 0x81; // QR, RD
        r[3] = 0x80; // RA, NOERROR
        r[7] = 2; // two answers
        for last in [1u8, 2] {
            r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 0, 0, last]);
        }
        let parsed = parse_response(&r).unwrap();
        assert_eq!((parsed.id, parsed.rcode, parsed.truncated), (7, 0, false));
        assert_eq!(
            parsed.addresses(),
            vec![IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2])]
        );
        assert_eq!(parsed.answers[0].ttl, 60);
        // Every truncation of it is rejected, never a panic.
        for cut in 0..r.len() {
            assert!(parse_response(&r[..cut]).is_none(), "cut at {cut}");
        }
        // A query (QR clear) is not a response.
        assert!(parse_response(&build_query(7, "a.bc", TYPE_A).unwrap()).is_none());
    }
}
