//! A real resolver in the target namespace (dnsmasq, Debian's `dnsmasq-base`), `dig`
//! run inside a namespace, and a name that only the proxy namespace resolves (for
//! fake-IP: the proxy must resolve it, the app and the target cannot).
//!
//! dnsmasq answers only for the records it is given (no upstream, no `/etc/hosts`),
//! on the target's two addresses, port 53, UDP and TCP, and logs every query to its
//! process log, so a test can count the queries that reached it.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use super::context;
use super::namespace::Namespace;
use super::process::Process;
use super::topology::{TARGET_V4, TARGET_V6, Topology};
use super::wait::{wait_for_tcp, wait_for_udp};

/// The DNS port.
pub const DNS_PORT: u16 = 53;
/// The domain dnsmasq is authoritative for: other names in it get NXDOMAIN.
pub const DNS_DOMAIN: &str = "t2s.test";
/// A name with A and AAAA records: the target's addresses ([`default_records`]).
pub const TARGET_NAME: &str = "target.t2s.test";
/// A name with one short TXT record, [`TXT_VALUE`].
pub const TXT_NAME: &str = "txt.t2s.test";
/// The text of [`TXT_NAME`].
pub const TXT_VALUE: &str = "tun2socks-txt-record";
/// A name whose TXT answer is larger than 512 bytes ([`big_txt_strings`]): over UDP
/// without EDNS it comes back truncated (TC), over TCP whole.
pub const BIG_TXT_NAME: &str = "big.t2s.test";
/// A name whose TXT answer (about 2.5 KB) is larger than a 1500-byte MTU: over UDP
/// with EDNS0 it arrives as IP fragments ([`huge_txt_strings`]).
pub const HUGE_TXT_NAME: &str = "huge.t2s.test";
/// A name that only the proxy namespace resolves ([`set_proxy_only_name`]); dnsmasq
/// does not know it either.
pub const PROXY_ONLY_NAME: &str = "only-proxy.t2s.test";

/// How long dnsmasq gets to listen.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Number and length of the character-strings of [`BIG_TXT_NAME`].
const BIG_TXT_PARTS: usize = 4;
const BIG_TXT_PART_LEN: usize = 200;

/// The records of a typical run: [`TARGET_NAME`] with the target's two addresses.
pub fn default_records() -> Vec<(&'static str, Ipv4Addr, Ipv6Addr)> {
    vec![(TARGET_NAME, TARGET_V4, TARGET_V6)]
}

/// The character-strings of [`BIG_TXT_NAME`]: 4 x 200 letters and digits (the TXT
/// RDATA alone is 804 bytes).
pub fn big_txt_strings() -> Vec<String> {
    let alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..BIG_TXT_PARTS)
        .map(|part| {
            (0..BIG_TXT_PART_LEN)
                .map(|i| {
                    let at = (part * 7 + i) % alphabet.len();
                    char::from(alphabet.get(at).copied().unwrap_or(b'x'))
                })
                .collect()
        })
        .collect()
}

/// The character-strings of [`HUGE_TXT_NAME`]: 10 x 250 bytes (the TXT RDATA alone
/// is 2,510 bytes).
pub fn huge_txt_strings() -> Vec<String> {
    (0..10u8)
        .map(|part| char::from(b'a' + part).to_string().repeat(250))
        .collect()
}

/// A running dnsmasq, stopped on drop.
#[derive(Debug)]
pub struct Dnsmasq {
    process: Process,
}

impl Dnsmasq {
    /// Starts dnsmasq in `ns` (the target) with `records` (name, A, AAAA), the TXT
    /// records [`TXT_NAME`], [`BIG_TXT_NAME`] and [`HUGE_TXT_NAME`], query logging
    /// on; returns once it
    /// listens on UDP and TCP on both target addresses.
    pub fn start(ns: &Namespace, records: &[(&str, Ipv4Addr, Ipv6Addr)]) -> io::Result<Dnsmasq> {
        Dnsmasq::start_with(ns, records, true)
    }

    /// [`Dnsmasq::start`], choosing whether every query is logged (benchmarks turn
    /// it off: the log costs dnsmasq more than the answer).
    pub fn start_with(
        ns: &Namespace,
        records: &[(&str, Ipv4Addr, Ipv6Addr)],
        log_queries: bool,
    ) -> io::Result<Dnsmasq> {
        let mut command = ns.command("dnsmasq");
        command.args(dnsmasq_args(records, log_queries));
        let mut process = ns.spawn(command)?;
        for addr in [
            SocketAddr::from((TARGET_V4, DNS_PORT)),
            SocketAddr::from((TARGET_V6, DNS_PORT)),
        ] {
            let listening = wait_for_udp(ns, addr, START_TIMEOUT)
                .and_then(|()| wait_for_tcp(ns, addr, START_TIMEOUT));
            if let Err(e) = listening {
                let _ = process.try_wait();
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "dnsmasq did not listen: {e}\n{}",
                        process.log().unwrap_or_default()
                    ),
                ));
            }
        }
        Ok(Dnsmasq { process })
    }

    /// The dnsmasq process (its log holds the queries).
    pub fn process(&self) -> &Process {
        &self.process
    }

    /// How many queries reached dnsmasq so far (with query logging on).
    pub fn queries(&self) -> io::Result<usize> {
        Ok(query_lines(&self.process.log()?, None))
    }

    /// How many queries for `name` (any type) reached dnsmasq so far.
    pub fn queries_for(&self, name: &str) -> io::Result<usize> {
        Ok(query_lines(&self.process.log()?, Some(name)))
    }
}

/// The command line of dnsmasq after the program name.
pub fn dnsmasq_args(records: &[(&str, Ipv4Addr, Ipv6Addr)], log_queries: bool) -> Vec<String> {
    let mut args: Vec<String> = [
        // Not --no-daemon: that debug mode serves one TCP connection at a time.
        "--keep-in-foreground",
        // No pid file: several instances (one per test namespace) run at once.
        "--pid-file",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--no-poll",
        "--bind-interfaces",
        "--log-facility=-",
        "--cache-size=1000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(format!("--port={DNS_PORT}"));
    args.push(format!("--listen-address={TARGET_V4}"));
    args.push(format!("--listen-address={TARGET_V6}"));
    args.push(format!("--local=/{DNS_DOMAIN}/"));
    if log_queries {
        args.push("--log-queries".into());
    }
    for (name, v4, v6) in records {
        args.push(format!("--host-record={name},{v4},{v6}"));
    }
    // On the command line the strings are bare (quotes would be part of the text);
    // commas separate the character-strings.
    args.push(format!("--txt-record={TXT_NAME},{TXT_VALUE}"));
    args.push(format!(
        "--txt-record={BIG_TXT_NAME},{}",
        big_txt_strings().join(",")
    ));
    args.push(format!(
        "--txt-record={HUGE_TXT_NAME},{}",
        huge_txt_strings().join(",")
    ));
    // Answers up to 4096 bytes over UDP when the query's EDNS0 allows (the default
    // of dnsmasq, said here so that a changed default does not change the tests).
    args.push("--edns-packet-max=4096".into());
    args
}

/// Counts dnsmasq's `query[TYPE] NAME from ADDR` log lines (of `name` only, if given).
fn query_lines(log: &str, name: Option<&str>) -> usize {
    log.lines()
        .filter_map(|line| line.split_once("query[").map(|(_, rest)| rest))
        .filter(|rest| name.is_none_or(|name| rest.split_whitespace().nth(1) == Some(name)))
        .count()
}

/// How `dig` reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigTransport {
    /// UDP (dig's default; it retries over TCP itself only if the answer is truncated
    /// and `+ignore` is not given).
    Udp,
    /// TCP from the start (`+tcp`).
    Tcp,
}

/// Runs `dig @SERVER NAME TYPE +short +time=2 +tries=1` (plus `+tcp`) in `ns` and
/// returns the answer lines (empty for NXDOMAIN or no data). A timeout or a failure
/// to reach the server is an error.
pub fn dig(
    ns: &Namespace,
    server: IpAddr,
    name: &str,
    rtype: &str,
    transport: DigTransport,
) -> io::Result<Vec<String>> {
    let mut extra = vec!["+short"];
    if transport == DigTransport::Tcp {
        extra.push("+tcp");
    }
    let out = dig_raw(ns, server, name, rtype, &extra)?;
    Ok(out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with(";;"))
        .map(str::to_owned)
        .collect())
}

/// Runs `dig @SERVER NAME TYPE +time=2 +tries=1 EXTRA...` in `ns` and returns its
/// whole output (for flags, status, `+noedns`/`+bufsize` truncation tests). A
/// non-zero exit (timeout, no server) is an error that carries the output.
pub fn dig_raw(
    ns: &Namespace,
    server: IpAddr,
    name: &str,
    rtype: &str,
    extra: &[&str],
) -> io::Result<String> {
    let mut command = ns.command("dig");
    command
        .arg(format!("@{server}"))
        .args([name, rtype, "+time=2", "+tries=1"])
        .args(extra);
    let line = super::command_line(&command);
    let output = command
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(context(&line))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(io::Error::other(format!(
            "`{line}` failed ({}): {}{}",
            output.status,
            stdout.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// The entries that make [`PROXY_ONLY_NAME`] resolve to the target (v4 and v6).
pub fn proxy_only_hosts() -> [(&'static str, IpAddr); 2] {
    [
        (PROXY_ONLY_NAME, IpAddr::V4(TARGET_V4)),
        (PROXY_ONLY_NAME, IpAddr::V6(TARGET_V6)),
    ]
}

/// Writes the proxy namespace's `/etc/netns/NAME/hosts` with [`proxy_only_hosts`]
/// (and `extra` entries), and gives the app and target namespaces a `resolv.conf`
/// naming only the target (whose dnsmasq, if any, does not know the name): programs
/// started with [`Namespace::command`] in the proxy namespace (our server, danted)
/// resolve [`PROXY_ONLY_NAME`], those in the app and the target do not.
pub fn set_proxy_only_name(topology: &Topology, extra: &[(&str, IpAddr)]) -> io::Result<()> {
    let mut entries = proxy_only_hosts().to_vec();
    entries.extend_from_slice(extra);
    topology.proxy().set_hosts(&entries)?;
    for ns in [topology.app(), topology.target()] {
        ns.set_resolv_conf(&[IpAddr::V4(TARGET_V4)])?;
    }
    Ok(())
}

/// The addresses `getent ahosts NAME` finds in `ns` (through `ip netns exec`, so the
/// namespace's `/etc/netns` files apply); empty when the name does not resolve.
pub fn resolve_in(ns: &Namespace, name: &str) -> io::Result<Vec<IpAddr>> {
    let mut command = ns.command("getent");
    command.args(["ahosts", name]);
    let output = command
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(context(format!("getent ahosts {name}")))?;
    // getent exits 2 for "not found"; anything else non-zero is a real failure.
    match output.status.code() {
        Some(0) | Some(2) => {}
        _ => {
            return Err(io::Error::other(format!(
                "getent ahosts {name} in {}: {} {}",
                ns.name(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
    }
    let mut found: Vec<IpAddr> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    found.sort();
    found.dedup();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_txt_is_over_512_bytes_in_valid_strings() {
        let parts = big_txt_strings();
        let rdata: usize = parts.iter().map(|p| p.len() + 1).sum();
        assert!(rdata > 512, "{rdata}");
        assert!(parts.iter().all(|p| p.len() <= 255 && p.is_ascii()));
        assert!(parts.iter().all(|p| !p.contains([',', '"', ' '])));
    }

    #[test]
    fn args_carry_records_and_listen_addresses() {
        let args = dnsmasq_args(&default_records(), true);
        assert!(args.contains(&"--host-record=target.t2s.test,198.19.2.2,fd19:2::2".to_owned()));
        assert!(args.contains(&"--listen-address=198.19.2.2".to_owned()));
        assert!(args.contains(&"--log-queries".to_owned()));
        assert!(!dnsmasq_args(&[], false).contains(&"--log-queries".to_owned()));
    }

    #[test]
    fn counts_query_log_lines() {
        let log = "dnsmasq: started\n\
                   dnsmasq: query[A] target.t2s.test from 198.19.2.1\n\
                   dnsmasq: config target.t2s.test is 198.19.2.2\n\
                   dnsmasq: query[AAAA] target.t2s.test from 198.19.2.1\n\
                   dnsmasq: query[TXT] txt.t2s.test from 198.19.2.1\n";
        assert_eq!(query_lines(log, None), 3);
        assert_eq!(query_lines(log, Some("target.t2s.test")), 2);
        assert_eq!(query_lines(log, Some("nothing")), 0);
    }
}
