//! The measurements of each row group on one path, into that path's [`PathResult`].
//! A failed measurement is recorded as an error of the path and leaves its rows empty;
//! the run goes on.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tun2socks::testbed::TARGET_V4;
use tun2socks::testbed::bench::{cpu_seconds, hold_flows, iperf, median, rss_mib};
use tun2socks::testbed::dns_client::{TYPE_A, dns_query_rate};
use tun2socks::testbed::dnsmasq::DNS_PORT;
use tun2socks::testbed::load::{tcp_conn_rate_in, tcp_rr_in};
use tun2socks::testbed::udp::UDP_ECHO_PORT;
use tun2socks::testbed::udp_client::{udp_echo_check, udp_latency, udp_rate};

use super::rig::{DNS_NAMES, Rig, dns_name};
use super::settings::{PathKind, Settings};

/// Payload of the UDP latency probes.
const UDP_PROBE_PAYLOAD: usize = 64;
/// Payload of the UDP rate row.
const UDP_RATE_PAYLOAD: usize = 100;
/// Bytes of each rr request (and response).
const RR_MESSAGE: usize = 1;
/// DNS queries in flight.
const DNS_WINDOW: usize = 32;
/// How long held flows stay idle before the RSS reading.
const HOLD: Duration = Duration::from_secs(2);

/// The TCP rows: (key, streams, download).
pub const TCP_ROWS: [(&str, usize, bool); 4] = [
    ("tcp1_up_gbps", 1, false),
    ("tcp1_down_gbps", 1, true),
    ("tcp8_up_gbps", 8, false),
    ("tcp8_down_gbps", 8, true),
];

/// Everything measured on one path.
#[derive(Debug, Clone)]
pub struct PathResult {
    /// The path's key (`kernel`, `attached`, ...).
    pub key: &'static str,
    /// Its column heading.
    pub label: String,
    /// Why the path could not be set up at all.
    pub setup_error: Option<String>,
    /// Samples per metric key (one per round).
    samples: BTreeMap<&'static str, Vec<f64>>,
    /// CPU seconds of the tunnel and the server during the TCP rows, bytes moved.
    tunnel_cpu: f64,
    server_cpu: f64,
    bytes: u64,
    /// Failed measurements, with what failed.
    pub errors: Vec<String>,
}

impl PathResult {
    /// An empty result for `kind`.
    pub fn new(kind: &PathKind, s: &Settings) -> PathResult {
        PathResult {
            key: kind.key(),
            label: kind.label(s),
            setup_error: None,
            samples: BTreeMap::new(),
            tunnel_cpu: 0.0,
            server_cpu: 0.0,
            bytes: 0,
            errors: Vec::new(),
        }
    }

    /// The metric's median over its samples, `None` when it was not measured.
    pub fn value(&self, key: &str) -> Option<f64> {
        let samples = self.samples.get(key)?;
        let m = median(samples);
        m.is_finite().then_some(m)
    }

    /// The metric's samples, one per round, in order (empty when not measured).
    pub fn samples(&self, key: &str) -> &[f64] {
        self.samples.get(key).map_or(&[], Vec::as_slice)
    }

    fn add(&mut self, key: &'static str, value: f64) {
        self.samples.entry(key).or_default().push(value);
    }

    fn fail(&mut self, what: &str, e: impl std::fmt::Display) {
        let message = format!("{what}: {e}");
        eprintln!("  {}: {message}", self.key);
        self.errors.push(message);
    }

    /// The CPU figures from the sums of the TCP rows (call once, after them).
    pub fn finish_cpu(&mut self, rig: &Rig) {
        let gb = self.bytes as f64 / 1e9;
        if gb <= 0.0 || rig.tunnel.is_none() {
            return;
        }
        self.add("cpu_tunnel_s_per_gb", self.tunnel_cpu / gb);
        self.add("cpu_server_s_per_gb", self.server_cpu / gb);
        self.add("cpu_s_per_gb", (self.tunnel_cpu + self.server_cpu) / gb);
    }
}

/// The four iperf3 rows, one round; CPU time of the tunnel and server added up.
pub fn tcp(rig: &Rig, s: &Settings, r: &mut PathResult) {
    let (tunnel, server) = rig.pids();
    let cpu = |pid: Option<u32>| pid.map_or(0.0, |p| cpu_seconds(p).unwrap_or(0.0));
    for (key, streams, reverse) in TCP_ROWS {
        let before = (cpu(tunnel), cpu(server));
        match iperf(rig.topo.app(), TARGET_V4.into(), s.secs, streams, reverse) {
            Ok(result) => {
                eprintln!("  {}: {key} {:.2} Gbit/s", r.key, result.gbps);
                r.add(key, result.gbps);
                r.tunnel_cpu += cpu(tunnel) - before.0;
                r.server_cpu += cpu(server) - before.1;
                r.bytes = r.bytes.saturating_add(result.bytes);
            }
            Err(e) => r.fail(key, e),
        }
    }
}

/// Request/response round trips on one connection: p50 and p99.
pub fn rr(rig: &Rig, s: &Settings, r: &mut PathResult) {
    match tcp_rr_in(
        rig.topo.app(),
        rig.echo_target(),
        s.rr_round_trips,
        RR_MESSAGE,
    ) {
        Ok(report) => {
            eprintln!("  {}: rr {report}", r.key);
            r.add("rr_p50_us", report.p50_us as f64);
            r.add("rr_p99_us", report.p99_us as f64);
        }
        Err(e) => r.fail("rr", e),
    }
}

/// Connections per second from [`Settings::conn_workers`] workers.
pub fn conn(rig: &Rig, s: &Settings, r: &mut PathResult) {
    let secs = Duration::from_secs(s.secs);
    match tcp_conn_rate_in(rig.topo.app(), rig.echo_target(), s.conn_workers, secs) {
        Ok(report) => {
            eprintln!("  {}: conn {report}", r.key);
            r.add("conn_per_s", report.per_sec());
            r.add("conn_errors", report.errors as f64);
        }
        Err(e) => r.fail("conn", e),
    }
}

/// UDP echo latency every round; the fixed-rate row in the first round only.
pub fn udp(rig: &Rig, s: &Settings, r: &mut PathResult, round: usize) {
    let app = rig.topo.app();
    let echo = SocketAddr::from((TARGET_V4, UDP_ECHO_PORT));
    match udp_echo_check(app, echo, 3, 64..=64) {
        Ok(first) if first.all_ok() => {}
        Ok(first) => return r.fail("udp", format!("no echo ({first})")),
        Err(e) => return r.fail("udp", e),
    }
    match udp_latency(app, echo, s.udp_probes, UDP_PROBE_PAYLOAD) {
        Ok(report) => {
            eprintln!("  {}: udp latency {report}", r.key);
            if let (Some(p50), Some(p99)) = (report.percentile(50.0), report.percentile(99.0)) {
                r.add("udp_p50_us", p50.as_micros() as f64);
                r.add("udp_p99_us", p99.as_micros() as f64);
            }
        }
        Err(e) => r.fail("udp latency", e),
    }
    if round > 0 {
        return;
    }
    let secs = Duration::from_secs(s.udp_secs);
    match udp_rate(app, echo, s.udp_rate, secs, UDP_RATE_PAYLOAD) {
        Ok(report) => {
            eprintln!("  {}: udp rate {report:?}", r.key);
            r.add("udp_sent_per_s", report.sent_per_sec());
            r.add("udp_rx_per_s", report.received_per_sec());
            r.add("udp_loss_pct", report.loss_percent());
        }
        Err(e) => r.fail("udp rate", e),
    }
}

/// DNS queries per second to dnsmasq in the target (plain UDP from the app).
pub fn dns(rig: &Rig, s: &Settings, r: &mut PathResult) {
    let names: Vec<String> = (0..DNS_NAMES).map(dns_name).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let server = SocketAddr::from((TARGET_V4, DNS_PORT));
    let secs = Duration::from_secs(s.secs);
    match dns_query_rate(rig.topo.app(), server, &names, TYPE_A, DNS_WINDOW, secs) {
        Ok(report) => {
            eprintln!("  {}: dns {report:?}", r.key);
            r.add("dns_qps", report.per_sec());
            r.add("dns_lost", report.lost as f64);
        }
        Err(e) => r.fail("dns", e),
    }
}

/// The tunnel's RSS idle, then with [`Settings::held_flows`] idle flows held open
/// (none of it on the kernel path: no process to read).
pub fn rss(rig: &Rig, s: &Settings, r: &mut PathResult) {
    let Some(pid) = rig.tunnel.as_ref().map(|p| p.id()) else {
        return;
    };
    let idle = match rss_mib(pid) {
        Ok(idle) => idle,
        Err(e) => return r.fail("rss idle", e),
    };
    r.add("rss_idle_mib", idle);
    let held = hold_flows(
        rig.topo.app(),
        rig.echo_target(),
        s.held_flows,
        HOLD,
        move || rss_mib(pid).ok(),
    );
    match held {
        Ok(held) => {
            eprintln!(
                "  {}: rss idle {idle:.1} MiB, {} flows held ({} open): {:?} MiB",
                r.key, held.established, held.open, held.probe
            );
            r.add("held_open", held.open as f64);
            if let Some(mib) = held.probe {
                r.add("rss_held_mib", mib);
                if held.open > 0 {
                    r.add("rss_per_flow_kib", (mib - idle) * 1024.0 / held.open as f64);
                }
            }
        }
        Err(e) => r.fail("rss held flows", e),
    }
}
