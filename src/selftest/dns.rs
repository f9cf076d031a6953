//! The selftest's DNS rows, one set per `--dns` mode the variant's tunnel runs with.
//!
//! dnsmasq in `target` answers for [`TARGET_NAME`]; queries are built and read by the
//! crate's own client ([`crate::testbed::dns_client`]), so the selftest needs no `dig`.
//! `app` has no route to the resolver but the tunnel (with `--setup`, every query to
//! port 53 enters the TUN), so an answer proves the mode's path: the UDP association,
//! DNS over TCP through SOCKS CONNECT, or the fake-IP pool and a CONNECT by name to
//! [`PROXY_ONLY_NAME`], which only the proxy namespace can resolve.
//! Without dnsmasq, the rows that need a resolver say "skipped" and pass.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use crate::dns::{DnsConfig, DnsMode};
use crate::testbed::Namespace;
use crate::testbed::dns_client::{
    DnsResponse, TYPE_A, TYPE_AAAA, TYPE_TXT, dns_query, dns_query_tcp,
};
use crate::testbed::dnsmasq::{
    DNS_PORT, Dnsmasq, PROXY_ONLY_NAME, TARGET_NAME, TXT_NAME, TXT_VALUE,
};
use crate::testbed::services::HTTP_PORT;
use crate::testbed::{TARGET_V4, TARGET_V6};

use super::{Row, client, download, ms};

/// What a row that needs dnsmasq says when it is not installed.
pub(super) const NO_DNSMASQ: &str = "skipped (dnsmasq not installed)";
/// How long one query may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(3);
/// A resolver address that exists nowhere (TEST-NET-3): only the tunnel's "every query
/// to port 53" rule answers it.
const NOWHERE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 53);

/// The rows for a tunnel running with `--dns mode`. `ipv6`: whether the proxy
/// protocol reaches the resolver's IPv6 address (over TCP, SOCKS4 cannot).
pub(super) fn rows(
    app: &Namespace,
    variant: &str,
    mode: DnsMode,
    ipv6: bool,
    dnsmasq: Option<&Dnsmasq>,
) -> Vec<Row> {
    let prefix = format!("{variant} DNS {mode}:");
    match mode {
        DnsMode::Udp | DnsMode::Tcp => {
            let resolvers = if ipv6 {
                "IPv4 + IPv6 resolver"
            } else {
                "IPv4 resolver"
            };
            let name = format!("{prefix} A + AAAA of {TARGET_NAME}, {resolvers}");
            let result = match dnsmasq {
                Some(_) => real_answers(app, ipv6),
                None => Ok(NO_DNSMASQ.into()),
            };
            vec![(name, result)]
        }
        DnsMode::FakeIp => fake_ip_rows(app, &prefix, dnsmasq),
    }
}

fn query(app: &Namespace, server: IpAddr, name: &str, qtype: u16) -> Result<DnsResponse, String> {
    let at = SocketAddr::new(server, DNS_PORT);
    let response = dns_query(app, at, name, qtype, QUERY_TIMEOUT).map_err(|e| e.to_string())?;
    if response.rcode != 0 {
        return Err(format!(
            "{name} type {qtype} via {server}: rcode {}",
            response.rcode
        ));
    }
    Ok(response)
}

/// A and AAAA of [`TARGET_NAME`] from dnsmasq, asked at its IPv4 (and IPv6) address.
fn real_answers(app: &Namespace, ipv6: bool) -> Result<String, String> {
    let mut servers = vec![IpAddr::from(TARGET_V4)];
    if ipv6 {
        servers.push(TARGET_V6.into());
    }
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for server in servers {
        for (qtype, want) in [
            (TYPE_A, IpAddr::from(TARGET_V4)),
            (TYPE_AAAA, TARGET_V6.into()),
        ] {
            let asked = Instant::now();
            let got = query(app, server, TARGET_NAME, qtype)?.addresses();
            if got != [want] {
                return Err(format!(
                    "type {qtype} via {server}: {got:?}, expected {want}"
                ));
            }
            slowest = slowest.max(asked.elapsed());
        }
    }
    Ok(format!(
        "{TARGET_V4}, {TARGET_V6}; slowest {}, all {}",
        ms(slowest),
        ms(started.elapsed())
    ))
}

fn fake_ip_rows(app: &Namespace, prefix: &str, dnsmasq: Option<&Dnsmasq>) -> Vec<Row> {
    let mut rows = Vec::new();
    let fakes = fake_answers(app, dnsmasq);
    let name = format!("{prefix} A + AAAA from the pool, any resolver address");
    rows.push((name, fakes.as_deref().map(describe).map_err(String::clone)));
    let name = format!("{prefix} A + AAAA over TCP (pipelined): the same fake addresses");
    let result = match &fakes {
        Ok(fakes) => fakes_over_tcp(app, fakes),
        Err(e) => Err(format!("no fake addresses over UDP: {e}")),
    };
    rows.push((name, result));
    let name = format!("{prefix} TXT relayed over TCP");
    let result = match dnsmasq {
        Some(_) => txt(app),
        None => Ok(NO_DNSMASQ.into()),
    };
    rows.push((name, result));
    let name = format!("{prefix} HTTP GET 8 MiB by a name only the proxy resolves");
    let result = match fakes {
        Ok(fakes) => fetch_by_fake(app, &fakes),
        Err(e) => Err(format!("no fake addresses: {e}")),
    };
    rows.push((name, result));
    rows
}

fn describe(fakes: &[IpAddr]) -> String {
    let list: Vec<String> = fakes.iter().map(IpAddr::to_string).collect();
    list.join(", ")
}

/// A and AAAA of [`PROXY_ONLY_NAME`], asked of an address that exists nowhere: both
/// must come from the default pools, and none may reach dnsmasq.
fn fake_answers(app: &Namespace, dnsmasq: Option<&Dnsmasq>) -> Result<Vec<IpAddr>, String> {
    let pools = DnsConfig::default_pools();
    let mut fakes = Vec::new();
    for qtype in [TYPE_A, TYPE_AAAA] {
        let got = query(app, NOWHERE.into(), PROXY_ONLY_NAME, qtype)?.addresses();
        match got.as_slice() {
            [fake] if pools.iter().any(|pool| pool.contains(fake)) => fakes.push(*fake),
            _ => {
                return Err(format!(
                    "type {qtype}: {got:?}, not one address of {pools:?}"
                ));
            }
        }
    }
    if let Some(dnsmasq) = dnsmasq {
        let reached = dnsmasq
            .queries_for(PROXY_ONLY_NAME)
            .map_err(|e| e.to_string())?;
        if reached != 0 {
            return Err(format!(
                "{reached} queries for {PROXY_ONLY_NAME} left the tunnel"
            ));
        }
    }
    Ok(fakes)
}

/// A and AAAA of [`PROXY_ONLY_NAME`] asked over one TCP connection (both queries sent
/// before the first answer): answered in the tunnel with the addresses UDP got.
fn fakes_over_tcp(app: &Namespace, fakes: &[IpAddr]) -> Result<String, String> {
    let started = Instant::now();
    let answers = dns_query_tcp(
        app,
        SocketAddr::new(NOWHERE.into(), DNS_PORT),
        &[(PROXY_ONLY_NAME, TYPE_A), (PROXY_ONLY_NAME, TYPE_AAAA)],
        QUERY_TIMEOUT,
    )
    .map_err(|e| e.to_string())?;
    let got: Vec<IpAddr> = answers.iter().flat_map(DnsResponse::addresses).collect();
    if got != fakes {
        return Err(format!("{got:?} over TCP, {fakes:?} over UDP"));
    }
    Ok(format!("{} in {}", describe(&got), ms(started.elapsed())))
}

/// A TXT query (not answered from the pool) goes to dnsmasq over TCP.
fn txt(app: &Namespace) -> Result<String, String> {
    let started = Instant::now();
    let response = query(app, TARGET_V4.into(), TXT_NAME, TYPE_TXT)?;
    let found = response
        .answers
        .iter()
        .any(|a| a.rtype == TYPE_TXT && a.data.get(1..) == Some(TXT_VALUE.as_bytes()));
    if found {
        Ok(format!("{TXT_VALUE:?} in {}", ms(started.elapsed())))
    } else {
        Err(format!("no {TXT_VALUE:?} in {:?}", response.answers))
    }
}

/// Fetches the blob from each fake address: the tunnel sends the flow to the proxy
/// as a CONNECT by name, and the proxy resolves [`PROXY_ONLY_NAME`] to the target.
fn fetch_by_fake(app: &Namespace, fakes: &[IpAddr]) -> Result<String, String> {
    let mut took = Vec::new();
    for fake in fakes {
        let dst = SocketAddr::new(*fake, HTTP_PORT);
        let time = client(app, download(dst)).map_err(|e| format!("via {fake}: {e}"))?;
        took.push(format!("{time} via {fake}"));
    }
    Ok(took.join(", "))
}
