//! Latency, connection rate and one stream through the tunnel beside the kernel path,
//! in one run: TCP request/response p50/p99 (one connection, small messages),
//! connections/s (W workers: connect, 1-byte echo, close), UDP echo p50/p99 and one TCP
//! stream each way. The kernel path and the tunnel alternate in every round on the
//! same topology (the app's route to the target network is switched between the
//! forwarding proxy namespace and the TUN), so load on the machine hits both alike. Needs root. Prints one row per round and the medians.
//!
//! ```sh
//! cargo build --release && sudo target/release/examples/latency
//! ```
//!
//! Environment: `T2S_BIN` (the tun2socks binary; default `target/release/tun2socks`),
//! `LAT_ROUNDS` (3), `LAT_RR` (round trips per round, 5000), `LAT_RR_SIZE` (1),
//! `LAT_CONN_SECS` (3), `LAT_WORKERS` (32), `LAT_UDP` (datagrams, 2000), `LAT_MTU`
//! (1500), `LAT_DEVICE` (`hand`: a device made with `ip tuntap` that the tunnel
//! attaches to; `created`: the tunnel creates it), `LAT_TUNNEL_ARGS` (extra tunnel
//! arguments, split at spaces), `LAT_SERVER_ARGS` (extra server arguments),
//! `LAT_PROXY` (URL scheme and credentials, default `socks5://`), `LAT_ONLY`
//! (`rr`, `conn`, `bulk` or `udp`: only that measurement), `LAT_BULK_SECS` (3: one
//! TCP stream each way, 1 MiB writes and reads, this program's own client and target
//! services), `LAT_SOCKS_DIRECT` (`1`: a third row per round with no tunnel at all,
//! this program speaking SOCKS5 to the server itself, for the connection rate and the
//! stream: what the server alone allows, which bounds any tunnel in front of it),
//! `LAT_NICE` (a nice value for every thread of this program, the tunnel and the
//! server, e.g. -10 on a shared machine),
//! `LAT_CPUS` (a CPU list for `taskset`: every thread of this program, the tunnel and
//! the server runs there, e.g. `0` to see the cost of wake-ups across CPUs).
//!
//! Besides the rates, the tunnel rows show the CPU time the tunnel and the server
//! spent per connection in the connection-rate run (from `/proc/PID/stat`): a figure
//! that load on the machine disturbs much less than the rate itself.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tun2socks::testbed::attach::{create_tun, start_tunnel_attached};
use tun2socks::testbed::load::{
    ConnRateReport, EchoServer, LOAD_ECHO_PORT, RrReport, prepare_client, tcp_rr_in,
};
use tun2socks::testbed::tunnel::{TUN_NAME, proxy_addr, start_server, start_tunnel};
use tun2socks::testbed::udp::{UDP_ECHO_PORT, UdpServices};
use tun2socks::testbed::udp_client::udp_latency;
use tun2socks::testbed::{APP_NET_V4, PROXY_OUT_V4, PROXY_V4, TARGET_NET_V4, TARGET_V4, Topology};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Debug, Default, Clone)]
struct Row {
    rr: Option<RrReport>,
    conn: Option<ConnRateReport>,
    udp: Option<(u64, u64, usize)>,
    /// CPU microseconds per connection of the tunnel and the server.
    cpu: Option<(f64, f64)>,
    /// One TCP stream for `LAT_BULK_SECS` each way, Gbit/s: (up, down).
    bulk: Option<(f64, f64)>,
}

/// utime + stime of a process, in clock ticks (100 per second).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which ends at the last ')'): utime is the 12th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

/// Runs every thread of `pid` on `cpus` (a `taskset` list).
fn pin(pid: u32, cpus: &str) {
    let _ = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status();
}

/// Gives every thread of `pid` the nice value `nice`.
fn renice(pid: u32, nice: &str) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for task in tasks.flatten() {
        let tid = task.file_name().to_string_lossy().into_owned();
        let _ = std::process::Command::new("renice")
            .args(["-n", nice, "-p", &tid])
            .stdout(std::process::Stdio::null())
            .status();
    }
}

struct Settings {
    rr: usize,
    rr_size: usize,
    conn_secs: f64,
    workers: usize,
    udp: usize,
    only: String,
    bulk_secs: Duration,
}

/// Opens a TCP connection to `target`: straight (through whatever route the app
/// namespace has), or with a SOCKS5 CONNECT through `socks` (no authentication).
async fn open(socks: Option<SocketAddr>, target: SocketAddr) -> std::io::Result<TcpStream> {
    let Some(proxy) = socks else {
        let stream = TcpStream::connect(target).await?;
        stream.set_nodelay(true)?;
        return Ok(stream);
    };
    let std::net::IpAddr::V4(ip) = target.ip() else {
        return Err(std::io::ErrorKind::Unsupported.into());
    };
    let mut stream = TcpStream::connect(proxy).await?;
    stream.set_nodelay(true)?;
    stream.write_all(&[5, 1, 0]).await?;
    let mut method = [0u8; 2];
    stream.read_exact(&mut method).await?;
    let mut request = vec![5, 1, 0, 1];
    request.extend_from_slice(&ip.octets());
    request.extend_from_slice(&target.port().to_be_bytes());
    stream.write_all(&request).await?;
    let mut reply = [0u8; 10];
    stream.read_exact(&mut reply).await?;
    if method != [5, 0] || reply[1] != 0 {
        return Err(std::io::Error::other(format!(
            "SOCKS5 refused: method {method:?}, reply {}",
            reply[1]
        )));
    }
    Ok(stream)
}

/// Connection rate with this example's own client: `workers` at once, each repeating
/// open (straight or through SOCKS5) + 1-byte echo + close.
async fn conn_rate(
    socks: Option<SocketAddr>,
    target: SocketAddr,
    workers: usize,
    duration: Duration,
) -> std::io::Result<ConnRateReport> {
    async fn one(socks: Option<SocketAddr>, target: SocketAddr, byte: u8) -> std::io::Result<()> {
        let mut stream = open(socks, target).await?;
        stream.write_all(&[byte]).await?;
        let mut back = [0u8; 1];
        stream.read_exact(&mut back).await?;
        if back[0] == byte {
            Ok(())
        } else {
            Err(std::io::ErrorKind::InvalidData.into())
        }
    }
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = std::time::Instant::now();
    let deadline = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..workers {
        let (done, failed) = (done.clone(), failed.clone());
        tasks.spawn(async move {
            let mut byte = worker as u8;
            while std::time::Instant::now() < deadline {
                byte = byte.wrapping_add(1);
                match tokio::time::timeout(Duration::from_secs(5), one(socks, target, byte)).await {
                    Ok(Ok(())) => done.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(ConnRateReport {
        connections: done.load(Ordering::Relaxed),
        errors: failed.load(Ordering::Relaxed),
        first_error: None,
        elapsed: start.elapsed(),
    })
}

/// Bytes per write and per read of the bulk client and the target's bulk services.
const BULK_CHUNK: usize = 1 << 20;

/// The target's bulk services: a sink on [`BULK_SINK_PORT`] (reads until EOF) and a
/// source on [`BULK_SOURCE_PORT`] (writes until the peer goes away). Runs until the
/// program exits.
async fn bulk_services() -> std::io::Result<()> {
    let sink = TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, BULK_SINK_PORT)).await?;
    let source = TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, BULK_SOURCE_PORT)).await?;
    loop {
        tokio::select! {
            accepted = sink.accept() => {
                let (mut stream, _) = accepted?;
                tokio::spawn(async move {
                    let mut buf = vec![0u8; BULK_CHUNK];
                    while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
                });
            }
            accepted = source.accept() => {
                let (mut stream, _) = accepted?;
                tokio::spawn(async move {
                    let buf = vec![0x5au8; BULK_CHUNK];
                    while stream.write_all(&buf).await.is_ok() {}
                });
            }
        }
    }
}
const BULK_SINK_PORT: u16 = 7101;
const BULK_SOURCE_PORT: u16 = 7102;

/// One stream for `secs` each way (straight or through SOCKS5): (up, down) Gbit/s.
async fn bulk(socks: Option<SocketAddr>, secs: Duration) -> std::io::Result<(f64, f64)> {
    let gbits = |bytes: u64, elapsed: Duration| bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e9;
    let mut buf = vec![0xa5u8; BULK_CHUNK];
    let mut up = open(socks, SocketAddr::from((TARGET_V4, BULK_SINK_PORT))).await?;
    let (start, mut bytes) = (std::time::Instant::now(), 0u64);
    while start.elapsed() < secs {
        up.write_all(&buf).await?;
        bytes += BULK_CHUNK as u64;
    }
    let up_rate = gbits(bytes, start.elapsed());
    drop(up);
    let mut down = open(socks, SocketAddr::from((TARGET_V4, BULK_SOURCE_PORT))).await?;
    let (start, mut bytes) = (std::time::Instant::now(), 0u64);
    while start.elapsed() < secs {
        let n = down.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        bytes += n as u64;
    }
    Ok((up_rate, gbits(bytes, start.elapsed())))
}

fn current_thread() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// One round of one path. With `socks` (`LAT_SOCKS_DIRECT=1`) there is no tunnel at
/// all: this program speaks SOCKS5 to the server itself, for the connection rate and
/// the stream (what the server alone allows bounds what any tunnel in front of it can
/// reach); request/response and UDP are left out then.
fn measure(
    topo: &Topology,
    s: &Settings,
    pids: (u32, u32),
    socks: Option<SocketAddr>,
) -> anyhow::Result<Row> {
    let app = topo.app();
    let tcp_target = SocketAddr::from((TARGET_V4, LOAD_ECHO_PORT));
    let mut row = Row::default();
    if socks.is_none() && (s.only.is_empty() || s.only == "rr") {
        row.rr = Some(tcp_rr_in(app, tcp_target, s.rr, s.rr_size)?);
    }
    if s.only.is_empty() || s.only == "conn" {
        let secs = Duration::from_secs_f64(s.conn_secs);
        let before = (cpu_ticks(pids.0), cpu_ticks(pids.1));
        let workers = s.workers;
        let conn = app.within(move || {
            current_thread()?.block_on(conn_rate(socks, tcp_target, workers, secs))
        })?;
        let per_conn = |ticks: u64| ticks as f64 * 10_000.0 / conn.connections.max(1) as f64;
        row.cpu = Some((
            per_conn(cpu_ticks(pids.0).saturating_sub(before.0)),
            per_conn(cpu_ticks(pids.1).saturating_sub(before.1)),
        ));
        row.conn = Some(conn);
    }
    if s.only.is_empty() || s.only == "bulk" {
        let secs = s.bulk_secs;
        row.bulk = Some(app.within(move || current_thread()?.block_on(bulk(socks, secs)))?);
    }
    if socks.is_none() && (s.only.is_empty() || s.only == "udp") {
        let udp_target = SocketAddr::from((TARGET_V4, UDP_ECHO_PORT));
        let report = udp_latency(app, udp_target, s.udp, 64)?;
        let us = |p| report.percentile(p).map_or(0, |d| d.as_micros() as u64);
        row.udp = Some((us(50.0), us(99.0), report.lost));
    }
    Ok(row)
}

fn print_row(label: &str, row: &Row) {
    let rr = row.rr.as_ref().map_or("-".to_string(), |r| {
        format!("{:>5} {:>6} {:>7}", r.p50_us, r.p99_us, r.max_us)
    });
    let conn = row.conn.as_ref().map_or("-".to_string(), |c| {
        format!("{:>7.0} ({} err)", c.per_sec(), c.errors)
    });
    let udp = row.udp.map_or("-".to_string(), |(p50, p99, lost)| {
        format!("{p50:>5} {p99:>6} ({lost} lost)")
    });
    let cpu = row.cpu.map_or(String::new(), |(t, s)| {
        format!(" | cpu us/conn tunnel {t:.1} server {s:.1}")
    });
    let bulk = row.bulk.map_or(String::new(), |(up, down)| {
        format!(" | 1 stream up/down Gbit/s {up:.2} {down:.2}")
    });
    println!(
        "{label:<10} | rr p50/p99/max us {rr} | conn/s {conn} | udp p50/p99 us {udp}{cpu}{bulk}"
    );
    if let Some(e) = row.conn.as_ref().and_then(|c| c.first_error.as_ref()) {
        println!("{label:<10} | first connection error: {e}");
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Medians of a path's rounds: rr p50, rr p99, conn/s, UDP p50, bulk up, bulk down.
fn summary(label: &str, rows: &[Row]) -> (f64, f64, f64, f64, f64, f64) {
    let rr50 = median(
        rows.iter()
            .filter_map(|r| r.rr.as_ref())
            .map(|r| r.p50_us as f64)
            .collect(),
    );
    let rr99 = median(
        rows.iter()
            .filter_map(|r| r.rr.as_ref())
            .map(|r| r.p99_us as f64)
            .collect(),
    );
    let conn = median(
        rows.iter()
            .filter_map(|r| r.conn.as_ref())
            .map(|c| c.per_sec())
            .collect(),
    );
    let udp = median(
        rows.iter()
            .filter_map(|r| r.udp)
            .map(|u| u.0 as f64)
            .collect(),
    );
    let tcpu = median(rows.iter().filter_map(|r| r.cpu).map(|c| c.0).collect());
    let scpu = median(rows.iter().filter_map(|r| r.cpu).map(|c| c.1).collect());
    let up = median(rows.iter().filter_map(|r| r.bulk).map(|b| b.0).collect());
    let down = median(rows.iter().filter_map(|r| r.bulk).map(|b| b.1).collect());
    println!(
        "{label:<10} | median: rr p50 {rr50:.0} us, rr p99 {rr99:.0} us, {conn:.0} conn/s, udp p50 {udp:.0} us, cpu us/conn tunnel {tcpu:.1} server {scpu:.1}, 1 stream {up:.2} / {down:.2} Gbit/s"
    );
    (rr50, rr99, conn, udp, up, down)
}

/// Counters that explain stalls: SYN retransmissions, listen queue drops, TUN drops.
fn diagnostics(topo: &Topology) {
    let wanted = [
        "TcpExtTCPSynRetrans",
        "TcpExtListenOverflows",
        "TcpExtListenDrops",
        "TcpRetransSegs",
        "TcpExtTCPTimeouts",
        "TcpExtTW",
        "TcpExtTWRecycled",
        "TcpAttemptFails",
        "TcpEstabResets",
        "TcpOutRsts",
    ];
    for (name, ns) in [
        ("app", topo.app()),
        ("proxy", topo.proxy()),
        ("target", topo.target()),
    ] {
        if let Ok(out) = ns.run("nstat", ["-az"]) {
            let text = String::from_utf8_lossy(&out.stdout);
            let picked: Vec<String> = text
                .lines()
                .filter(|l| {
                    wanted
                        .iter()
                        .any(|w| l.split_whitespace().next() == Some(*w))
                })
                .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join("="))
                .collect();
            println!("{name}: {}", picked.join(" "));
        }
    }
    if let Ok(out) = topo.app().ip(["-s", "link", "show", "dev", TUN_NAME]) {
        println!("{}", String::from_utf8_lossy(&out.stdout));
    }
}

fn main() -> anyhow::Result<()> {
    let binary = PathBuf::from(
        std::env::var("T2S_BIN").unwrap_or_else(|_| "target/release/tun2socks".into()),
    );
    let rounds: usize = env_or("LAT_ROUNDS", 3);
    let settings = Settings {
        rr: env_or("LAT_RR", 5000),
        rr_size: env_or("LAT_RR_SIZE", 1),
        conn_secs: env_or("LAT_CONN_SECS", 3.0),
        bulk_secs: Duration::from_secs_f64(env_or("LAT_BULK_SECS", 3.0)),
        workers: env_or("LAT_WORKERS", 32),
        udp: env_or("LAT_UDP", 2000),
        only: env_or("LAT_ONLY", String::new()),
    };
    let mtu: u32 = env_or("LAT_MTU", 1500);
    let hand = env_or("LAT_DEVICE", "hand".to_string()) != "created";
    let tunnel_args: Vec<String> = env_or("LAT_TUNNEL_ARGS", String::new())
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let server_args: Vec<String> = env_or("LAT_SERVER_ARGS", String::new())
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let scheme = env_or("LAT_PROXY", "socks5://".to_string());

    let uptime = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average at start: {}", uptime.trim());
    let nice = std::env::var("LAT_NICE").ok();
    if let Some(nice) = &nice {
        renice(std::process::id(), nice);
    }
    let cpus = std::env::var("LAT_CPUS").ok();
    if let Some(cpus) = &cpus {
        pin(std::process::id(), cpus);
    }

    let topo = Topology::create("lat").context("topology")?;
    prepare_client(topo.app())?;
    prepare_client(topo.proxy())?;
    topo.set_forwarding(true)?;
    topo.target().ip([
        "route",
        "add",
        &APP_NET_V4.to_string(),
        "via",
        &PROXY_OUT_V4.to_string(),
    ])?;
    let _echo = EchoServer::start_in(topo.target()).context("echo server")?;
    let _udp = UdpServices::start(topo.target()).context("udp services")?;
    // Detached: the services run until this program exits.
    drop(topo.target().enter_async(bulk_services));
    let mut server_cmd: Vec<&str> = vec!["--log-level", "warn"];
    server_cmd.extend(server_args.iter().map(String::as_str));
    let server = start_server(topo.proxy(), &binary, &server_cmd).context("server")?;
    let url = format!("{scheme}{}", proxy_addr());
    let mtu_arg = mtu.to_string();
    let mut extra: Vec<&str> = vec!["--log-level", "warn"];
    extra.extend(tunnel_args.iter().map(String::as_str));
    let tunnel = if hand {
        create_tun(topo.app(), TUN_NAME, mtu)?;
        start_tunnel_attached(topo.app(), &binary, &url, TUN_NAME, &extra)?
    } else {
        extra.extend(["--mtu", &mtu_arg]);
        start_tunnel(topo.app(), &binary, &url, &extra)?
    };
    println!(
        "namespaces app {} proxy {} target {}",
        topo.app().name(),
        topo.proxy().name(),
        topo.target().name()
    );
    println!(
        "tunnel pid {} ({} device, MTU {mtu}, args {:?}), server pid {}",
        tunnel.id(),
        if hand { "hand-made" } else { "created" },
        tunnel_args,
        server.id()
    );
    if let Some(nice) = &nice {
        renice(tunnel.id(), nice);
        renice(server.id(), nice);
    }
    if let Some(cpus) = &cpus {
        pin(tunnel.id(), cpus);
        pin(server.id(), cpus);
    }
    let pids = (tunnel.id(), server.id());
    if let Ok(pause) = std::env::var("LAT_PAUSE") {
        // Time to attach perf to the pids above.
        std::thread::sleep(Duration::from_secs(pause.parse().unwrap_or(5)));
    }

    let kernel_route = |on: bool| -> anyhow::Result<()> {
        let net = TARGET_NET_V4.to_string();
        if on {
            topo.app()
                .ip(["route", "replace", &net, "via", &PROXY_V4.to_string()])?;
        } else {
            topo.app().ip(["route", "del", &net])?;
        }
        Ok(())
    };
    let (mut kernel, mut tunnelled) = (Vec::new(), Vec::new());
    let socks_direct = std::env::var("LAT_SOCKS_DIRECT").is_ok_and(|v| v == "1");
    let mut direct = Vec::new();
    for round in 1..=rounds {
        if socks_direct {
            let d = measure(&topo, &settings, pids, Some(proxy_addr()))?;
            print_row(&format!("socks {round}"), &d);
            direct.push(d);
        }
        kernel_route(true)?;
        let k = measure(&topo, &settings, pids, None)?;
        print_row(&format!("kernel {round}"), &k);
        kernel.push(k);
        kernel_route(false)?;
        let t = measure(&topo, &settings, pids, None)?;
        print_row(&format!("tunnel {round}"), &t);
        tunnelled.push(t);
    }
    let k = summary("kernel", &kernel);
    let t = summary("tunnel", &tunnelled);
    let pct = |ours: f64, kernel: f64| ours / kernel.max(f64::MIN_POSITIVE) * 100.0;
    if socks_direct {
        let d = summary("socks", &direct);
        println!(
            "SOCKS5 straight to the server, no tunnel, vs kernel: conn/s {:.0}%, 1 stream up {:.0}% / down {:.0}%",
            pct(d.2, k.2),
            pct(d.4, k.4),
            pct(d.5, k.5)
        );
    }
    println!(
        "tunnel vs kernel: rr p50 +{:.0} us, rr p99 x{:.2}, conn/s {:.0}%, udp p50 +{:.0} us, 1 stream up {:.0}% / down {:.0}%",
        t.0 - k.0,
        t.1 / k.1.max(1.0),
        pct(t.2, k.2),
        t.3 - k.3,
        pct(t.4, k.4),
        pct(t.5, k.5)
    );
    let uptime = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average at end: {}", uptime.trim());
    if std::env::var_os("LAT_DIAG").is_some() {
        diagnostics(&topo);
    }
    drop(tunnel);
    drop(server);
    Ok(())
}
