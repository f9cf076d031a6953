//! UDP and DNS benchmark: the app namespace to the target namespace, through
//! tun2socks + our SOCKS server, beside the kernel's own path (the proxy namespace
//! forwarding) in the same run. Prints a table and the same figures as JSON; asserts
//! nothing. Needs root, dnsmasq and prlimit.
//!
//! Per path: UDP echo p50/p99 (single 64-byte round trips), datagrams/s received and
//! loss at 50,000/s and 100,000/s offered (100-byte payloads), DNS queries/s to
//! dnsmasq in the target (fake-ip: answered by the tunnel), and the tunnel's RSS with
//! 5,000 idle UDP associations (5,000 sockets each send one datagram, then idle).
//! Tunnels: the device the tunnel creates (its default MTU) and a hand-made MTU 1500
//! device it attaches to; on each, UDP and DNS with the defaults, then DNS with
//! `--dns udp`, `--dns tcp` and `--dns fake-ip`, then the idle associations. A tunnel
//! that refuses its options gets an "n/a (tunnel refused: ...)" row.
//!
//! `cargo bench --bench udp_dns`. `BENCH_SECS` (default 2) per rate measurement,
//! `BENCH_PROBES` (default 2000) latency round trips, `BENCH_IDLE` (default 5000)
//! idle associations.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tun2socks::testbed::attach::{create_tun, refusal_reason, start_tunnel_attached, vm_rss_kib};
use tun2socks::testbed::bench::{cpu_seconds, env_or, is_root, json_str, raise_nofile};
use tun2socks::testbed::dns_client::{QueryRateReport, TYPE_A, dns_query, dns_query_rate};
use tun2socks::testbed::dnsmasq::{DNS_PORT, Dnsmasq};
use tun2socks::testbed::tunnel::{proxy_addr, start_server, start_tunnel};
use tun2socks::testbed::udp::{UDP_ECHO_PORT, UdpServices};
use tun2socks::testbed::udp_client::{RateReport, udp_echo_check, udp_latency, udp_rate};
use tun2socks::testbed::udp_probes::UdpFanout;
use tun2socks::testbed::{Namespace, Process, TARGET_V4, TARGET_V6, Topology};

/// The hand-made device's name (the created one is `tun0`).
const HAND_TUN: &str = "tunb";
/// Rates offered, datagrams/s.
const RATES: [u64; 2] = [50_000, 100_000];
/// Payload of the rate test.
const RATE_PAYLOAD: usize = 100;
/// Names dnsmasq knows, queried round robin (fake-ip maps each to its own address).
const DNS_NAMES: usize = 64;
/// Queries in flight of the DNS rate client.
const DNS_WINDOW: usize = 32;

#[derive(Debug, Default)]
struct Udp {
    p50_us: Option<u128>,
    p99_us: Option<u128>,
    /// Latency probes without a reply in time.
    probes_lost: usize,
    rates: Vec<RateReport>,
}

#[derive(Debug, Default)]
struct Rss {
    /// The tunnel's RSS before and with the idle sockets (none on the kernel path).
    before_kib: Option<u64>,
    after_kib: Option<u64>,
    answered: usize,
    sockets: usize,
}

#[derive(Debug, Default)]
struct Row {
    path: String,
    refused: Option<String>,
    udp: Option<Result<Udp, String>>,
    dns: Option<Result<QueryRateReport, String>>,
    rss: Option<Result<Rss, String>>,
    /// The tunnel's CPU seconds over the UDP and DNS measurements.
    cpu: Option<f64>,
}

struct Settings {
    secs: Duration,
    probes: usize,
    idle: usize,
    names: Vec<String>,
}

fn echo_target() -> SocketAddr {
    SocketAddr::new(TARGET_V4.into(), UDP_ECHO_PORT)
}

fn dns_server() -> SocketAddr {
    SocketAddr::new(TARGET_V4.into(), DNS_PORT)
}

/// Latency and rates, after a short check that the echo answers at all (so a path
/// without UDP costs seconds, not minutes of timeouts).
fn measure_udp(app: &Namespace, s: &Settings) -> Result<Udp, String> {
    let first = udp_echo_check(app, echo_target(), 3, 64..=64).map_err(|e| e.to_string())?;
    if !first.all_ok() {
        return Err(format!("no echo ({first})"));
    }
    let latency = udp_latency(app, echo_target(), s.probes, 64).map_err(|e| e.to_string())?;
    eprintln!("  latency: {latency}");
    let mut udp = Udp {
        p50_us: latency.percentile(50.0).map(|d| d.as_micros()),
        p99_us: latency.percentile(99.0).map(|d| d.as_micros()),
        probes_lost: latency.lost,
        rates: Vec::new(),
    };
    for rate in RATES {
        let report =
            udp_rate(app, echo_target(), rate, s.secs, RATE_PAYLOAD).map_err(|e| e.to_string())?;
        eprintln!("  {rate}/s offered: {report:?}");
        udp.rates.push(report);
        std::thread::sleep(Duration::from_millis(300));
    }
    Ok(udp)
}

fn measure_dns(app: &Namespace, s: &Settings) -> Result<QueryRateReport, String> {
    let first = s.names.first().ok_or("no names")?;
    let answer = dns_query(app, dns_server(), first, TYPE_A, Duration::from_secs(2))
        .map_err(|e| e.to_string())?;
    if answer.addresses().is_empty() {
        return Err(format!("no address in the answer: {answer:?}"));
    }
    let names: Vec<&str> = s.names.iter().map(String::as_str).collect();
    dns_query_rate(app, dns_server(), &names, TYPE_A, DNS_WINDOW, s.secs).map_err(|e| e.to_string())
}

/// The tunnel's RSS before and after `idle` sockets each sent one datagram (and got
/// its echo) and then stay open and silent.
fn measure_rss(app: &Namespace, tunnel: Option<&Process>, idle: usize) -> Result<Rss, String> {
    let first = udp_echo_check(app, echo_target(), 3, 64..=64).map_err(|e| e.to_string())?;
    if !first.all_ok() {
        return Err(format!("no echo ({first})"));
    }
    let rss = || {
        tunnel
            .map(|p| vm_rss_kib(p.id()).map_err(|e| e.to_string()))
            .transpose()
    };
    let before_kib = rss()?;
    let fanout = UdpFanout::open(app, TARGET_V4.into(), idle).map_err(|e| e.to_string())?;
    let report = fanout
        .echo_once(echo_target(), 32, Duration::from_secs(15))
        .map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_secs(1));
    let after_kib = rss()?;
    drop(fanout);
    Ok(Rss {
        before_kib,
        after_kib,
        answered: report.answered,
        sockets: report.sockets,
    })
}

/// Starts a tunnel on the created device (`hand_made` false) or on [`HAND_TUN`].
fn tunnel(
    topo: &Topology,
    binary: &Path,
    hand_made: bool,
    extra: &[&str],
) -> Result<Process, String> {
    let url = format!("socks5://{}", proxy_addr());
    let mut args = vec!["--log-level", "warn"];
    args.extend_from_slice(extra);
    let started = if hand_made {
        start_tunnel_attached(topo.app(), binary, &url, HAND_TUN, &args)
    } else {
        start_tunnel(topo.app(), binary, &url, &args)
    };
    started.map_err(|e| refusal_reason(&e.to_string()))
}

fn kernel_row(s: &Settings) -> Row {
    let topo = Topology::create("benchuk").unwrap();
    topo.enable_kernel_path().unwrap();
    let _udp = UdpServices::start(topo.target()).unwrap();
    let _dns = dnsmasq(topo.target(), s);
    eprintln!("kernel path");
    Row {
        path: "kernel (proxy ns forwards)".into(),
        udp: Some(measure_udp(topo.app(), s)),
        dns: Some(measure_dns(topo.app(), s)),
        // The client side of the idle test, as a check that it works at this scale.
        rss: Some(measure_rss(topo.app(), None, s.idle)),
        ..Row::default()
    }
}

fn dnsmasq(target: &Namespace, s: &Settings) -> Dnsmasq {
    let records: Vec<(&str, _, _)> = s
        .names
        .iter()
        .map(|n| (n.as_str(), TARGET_V4, TARGET_V6))
        .collect();
    Dnsmasq::start_with(target, &records, false).unwrap()
}

fn tunnel_rows(s: &Settings, binary: &Path) -> Vec<Row> {
    let topo = Topology::create("benchut").unwrap();
    let _udp = UdpServices::start(topo.target()).unwrap();
    let _dns = dnsmasq(topo.target(), s);
    let max = (s.idle * 2 + 1000).to_string();
    let _server = start_server(
        topo.proxy(),
        binary,
        &["--log-level", "warn", "--max-connections", &max],
    )
    .unwrap();
    create_tun(topo.app(), HAND_TUN, 1500).unwrap();
    let max_udp = (s.idle + 1000).to_string();
    let mut rows = Vec::new();
    for (hand_made, device) in [(false, "created tun0"), (true, "hand-made MTU 1500")] {
        // UDP with the tunnel's defaults (DNS then goes as plain UDP, as `--dns udp`).
        // And with busy polling off, to show what it buys and costs in the same run.
        for (suffix, extra) in [
            ("", &[][..]),
            (", --busy-poll 0", &["--busy-poll", "0"][..]),
        ] {
            let mut row = Row {
                path: format!("tunnel, {device}{suffix}"),
                ..Row::default()
            };
            eprintln!("{}", row.path);
            match tunnel(&topo, binary, hand_made, extra) {
                Err(reason) => row.refused = Some(reason),
                Ok(mut process) => {
                    row.udp = Some(measure_udp(topo.app(), s));
                    row.dns = Some(measure_dns(topo.app(), s));
                    row.cpu = cpu_seconds(process.id()).ok();
                    let _ = process.terminate();
                }
            }
            rows.push(row);
        }
        for mode in ["udp", "tcp", "fake-ip"] {
            let mut row = Row {
                path: format!("tunnel, {device}, --dns {mode}"),
                ..Row::default()
            };
            eprintln!("{}", row.path);
            match tunnel(&topo, binary, hand_made, &["--dns", mode]) {
                Err(reason) => row.refused = Some(reason),
                Ok(mut process) => {
                    row.dns = Some(measure_dns(topo.app(), s));
                    let _ = process.terminate();
                }
            }
            rows.push(row);
        }
        // Memory: a fresh tunnel, so earlier runs' associations do not count.
        let mut row = Row {
            path: format!("tunnel, {device}, {} idle UDP", s.idle),
            ..Row::default()
        };
        eprintln!("{}", row.path);
        let extra = ["--max-udp", &max_udp, "--udp-timeout", "300"];
        match tunnel(&topo, binary, hand_made, &extra) {
            Err(reason) => row.refused = Some(reason),
            Ok(mut process) => {
                row.rss = Some(measure_rss(topo.app(), Some(&process), s.idle));
                let _ = process.terminate();
            }
        }
        rows.push(row);
    }
    rows
}

fn main() {
    if !is_root() {
        println!("udp_dns benchmark: needs root (network namespaces); skipped");
        return;
    }
    raise_nofile();
    let s = Settings {
        secs: Duration::from_secs(env_or("BENCH_SECS", 2)),
        probes: env_or("BENCH_PROBES", 2000),
        idle: env_or("BENCH_IDLE", 5000),
        names: (0..DNS_NAMES)
            .map(|i| format!("host{i}.t2s.test"))
            .collect(),
    };
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_tun2socks"));
    let started = std::time::Instant::now();
    let mut rows = vec![kernel_row(&s)];
    rows.extend(tunnel_rows(&s, &binary));
    print_table(&rows, &s);
    println!();
    println!("{}", json(&rows));
    eprintln!(
        "udp_dns benchmark took {:.0} s",
        started.elapsed().as_secs_f64()
    );
}

fn cell_udp(row: &Row) -> Vec<String> {
    match &row.udp {
        None => vec!["".into(); 2 + RATES.len()],
        Some(Err(_)) => {
            let mut cells = vec!["err".to_owned()];
            cells.resize(2 + RATES.len(), String::new());
            cells
        }
        Some(Ok(u)) => {
            let mut cells = vec![opt(u.p50_us), opt(u.p99_us)];
            for r in &u.rates {
                cells.push(format!(
                    "{:.0} ({:.2}%)",
                    r.received_per_sec(),
                    r.loss_percent()
                ));
            }
            cells
        }
    }
}

fn opt(v: Option<u128>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

fn print_table(rows: &[Row], s: &Settings) {
    println!();
    println!(
        "UDP/DNS benchmark: app -> target, {} CPUs, {} s per rate, {} probes; \
         rates: received/s (loss %); DNS: answered q/s (lost)",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        s.secs.as_secs(),
        s.probes
    );
    println!(
        "| {:<44} | {:>7} | {:>7} | {:>18} | {:>18} | {:>16} | {:>22} | {:>9} |",
        "path",
        "p50 µs",
        "p99 µs",
        "50k/s offered",
        "100k/s offered",
        "DNS q/s",
        "tunnel RSS KiB",
        "tunnel s"
    );
    println!(
        "|{:-<46}|{:->9}|{:->9}|{:->20}|{:->20}|{:->18}|{:->24}|{:->11}|",
        "", "", "", "", "", "", "", ""
    );
    for row in rows {
        if let Some(reason) = &row.refused {
            println!("| {:<44} | n/a (tunnel refused: {reason})", row.path);
            continue;
        }
        let udp = cell_udp(row);
        let dns = match &row.dns {
            None => String::new(),
            Some(Ok(d)) => format!("{:.0} ({})", d.per_sec(), d.lost),
            Some(Err(_)) => "err".into(),
        };
        let rss = match &row.rss {
            None => String::new(),
            Some(Ok(r)) => format!(
                "{} -> {} ({}/{} ok)",
                opt(r.before_kib.map(u128::from)),
                opt(r.after_kib.map(u128::from)),
                r.answered,
                r.sockets
            ),
            Some(Err(_)) => "err".into(),
        };
        let cpu = row.cpu.map_or(String::new(), |c| format!("{c:.2}"));
        println!(
            "| {:<44} | {:>7} | {:>7} | {:>18} | {:>18} | {:>16} | {:>22} | {:>9} |",
            row.path, udp[0], udp[1], udp[2], udp[3], dns, rss, cpu
        );
    }
    for row in rows {
        for e in errors(row) {
            println!("err: {}: {e}", row.path);
        }
    }
}

fn json_opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or("null".into(), |v| v.to_string())
}

fn json(rows: &[Row]) -> String {
    let items: Vec<String> = rows
        .iter()
        .map(|row| {
            let mut fields = vec![format!("\"path\":{}", json_str(&row.path))];
            fields.push(format!(
                "\"refused\":{}",
                row.refused.as_deref().map_or("null".into(), json_str)
            ));
            let udp = row.udp.as_ref().and_then(|u| u.as_ref().ok());
            fields.push(format!("\"udp_p50_us\":{}", json_opt(udp.and_then(|u| u.p50_us))));
            fields.push(format!("\"udp_p99_us\":{}", json_opt(udp.and_then(|u| u.p99_us))));
            fields.push(format!("\"udp_probes_lost\":{}", json_opt(udp.map(|u| u.probes_lost))));
            let rates: Vec<String> = udp
                .map(|u| u.rates.as_slice())
                .unwrap_or_default()
                .iter()
                .map(|r| {
                    format!(
                        "{{\"offered\":{},\"sent_per_s\":{:.0},\"received_per_s\":{:.0},\"loss_percent\":{:.3}}}",
                        r.offered,
                        r.sent_per_sec(),
                        r.received_per_sec(),
                        r.loss_percent()
                    )
                })
                .collect();
            fields.push(format!("\"udp_rates\":[{}]", rates.join(",")));
            let dns = row.dns.as_ref().and_then(|d| d.as_ref().ok());
            fields.push(format!(
                "\"dns_qps\":{}",
                json_opt(dns.map(|d| format!("{:.0}", d.per_sec())))
            ));
            fields.push(format!("\"dns_lost\":{}", json_opt(dns.map(|d| d.lost))));
            let rss = row.rss.as_ref().and_then(|r| r.as_ref().ok());
            fields.push(format!("\"rss_before_kib\":{}", json_opt(rss.and_then(|r| r.before_kib))));
            fields.push(format!("\"rss_idle_kib\":{}", json_opt(rss.and_then(|r| r.after_kib))));
            fields.push(format!("\"idle_answered\":{}", json_opt(rss.map(|r| r.answered))));
            fields.push(format!(
                "\"tunnel_cpu_s\":{}",
                json_opt(row.cpu.map(|c| format!("{c:.2}")))
            ));
            let errors: Vec<String> = errors(row).into_iter().map(|e| json_str(e)).collect();
            fields.push(format!("\"errors\":[{}]", errors.join(",")));
            format!("{{{}}}", fields.join(","))
        })
        .collect();
    format!("{{\"udp_dns_bench\":[{}]}}", items.join(","))
}

/// The measurements of `row` that failed.
fn errors(row: &Row) -> Vec<&String> {
    fn err<T>(r: &Option<Result<T, String>>) -> Option<&String> {
        r.as_ref()?.as_ref().err()
    }
    [err(&row.udp), err(&row.dns), err(&row.rss)]
        .into_iter()
        .flatten()
        .collect()
}
