//! Memory-per-flow benchmark (issue 8): the tunnel's resident memory idle, with 9,000
//! established idle flows, and under a 20,000-SYN storm against a blackholed proxy;
//! single-stream iperf3 throughput with growing buffers (the default) beside fixed
//! `--tcp-buffer`-sized ones (`--tcp-buffer-initial` = `--tcp-buffer`), in the same
//! run. Prints a table; asserts nothing. Needs root, iperf3, nft and python3.
//!
//! `cargo bench --bench memory`. `BENCH_FLOWS` (default 9000), `BENCH_SYNS` (default
//! 20000), `BENCH_SECS` (default 5) and `BENCH_ROUNDS` (default 3, median) for iperf3.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/memory/mod.rs"]
mod memory;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tun2socks::testbed::bench::{
    env_or, hold_flows, iperf, is_root, median, raise_nofile, rss_mib, start_iperf_server,
};
use tun2socks::testbed::services::{ECHO_PORT, Services, echo_round_trip};
use tun2socks::testbed::tunnel::{PROXY_PORT, proxy_addr, start_server, start_tunnel};
use tun2socks::testbed::{Namespace, Process, TARGET_V4, Topology};

/// Where the connection-holding server listens in the target namespace.
const HOLD_PORT: u16 = 7100;

/// One run's pieces; the tunnel is restarted per measurement.
struct Bench {
    binary: PathBuf,
    topo: Topology,
    _services: Services,
    _iperf: Process,
    _holder: Process,
    _server: Process,
}

impl Bench {
    fn start(binary: &Path) -> Bench {
        let topo = Topology::create("benchm").unwrap();
        let services = Services::start(topo.target(), 1024, 1).unwrap();
        let iperf = start_iperf_server(topo.target(), TARGET_V4.into()).unwrap();
        let holder = memory::start_holder(topo.target(), (TARGET_V4, HOLD_PORT).into()).unwrap();
        let server = start_server(
            topo.proxy(),
            binary,
            &["--max-connections", "20000", "--log-level", "warn"],
        )
        .unwrap();
        Bench {
            binary: binary.to_owned(),
            topo,
            _services: services,
            _iperf: iperf,
            _holder: holder,
            _server: server,
        }
    }

    fn tunnel(&self, extra: &[&str]) -> Process {
        let mut args = vec!["--log-level", "warn"];
        args.extend_from_slice(extra);
        let t = start_tunnel(
            self.topo.app(),
            &self.binary,
            &format!("socks5://{}", proxy_addr()),
            &args,
        )
        .unwrap();
        echo(self.topo.app());
        t
    }

    /// Tears the tunnel down and removes its routes (the next one adds them again).
    fn stop(&self, tunnel: Process) {
        drop(tunnel);
        std::thread::sleep(Duration::from_millis(300));
        let _ = self.topo.app().ip(["route", "del", "default"]);
        let _ = self.topo.app().ip(["-6", "route", "del", "default"]);
    }
}

/// One echo through the tunnel (retried while it comes up).
fn echo(app: &Namespace) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = tun2socks::testbed::namespace::join(app.enter_async(|| async {
            let once = async {
                let mut s = tokio::net::TcpStream::connect((TARGET_V4, ECHO_PORT)).await?;
                echo_round_trip(&mut s, b"warm").await.map(|_| ())
            };
            tokio::time::timeout(Duration::from_secs(3), once)
                .await
                .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
        }));
        if r.is_ok() || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Opens `n` connections through the tunnel to the holder and keeps them; returns
/// (established, still open after `hold`, RSS in MiB while held).
fn hold(app: &Namespace, tunnel: &Process, n: usize, hold: Duration) -> (usize, usize, f64) {
    let pid = tunnel.id();
    let dst: SocketAddr = (TARGET_V4, HOLD_PORT).into();
    let held = hold_flows(app, dst, n, hold, move || rss_mib(pid).unwrap_or(f64::NAN)).unwrap();
    (held.established, held.open, held.probe)
}

fn main() {
    if !is_root() {
        println!("memory benchmark: needs root (network namespaces); skipped");
        return;
    }
    raise_nofile();
    let flows: usize = env_or("BENCH_FLOWS", 9000);
    let syns: usize = env_or("BENCH_SYNS", 20_000);
    let secs: u64 = env_or("BENCH_SECS", 5);
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_tun2socks"));
    let bench = Bench::start(&binary);
    let app = bench.topo.app();

    // Idle, then 9,000 established idle flows.
    let tunnel = bench.tunnel(&[]);
    std::thread::sleep(Duration::from_secs(1));
    let idle = memory::rss_mib(&tunnel);
    eprintln!("idle RSS {idle:.1} MiB");
    let (established, open, held_rss) = hold(app, &tunnel, flows, Duration::from_secs(3));
    eprintln!("{established} established, {open} open, RSS {held_rss:.1} MiB");
    bench.stop(tunnel);

    // The SYN storm with the proxy blackholed.
    let tunnel = bench.tunnel(&[]);
    std::thread::sleep(Duration::from_millis(500));
    let before = memory::rss_mib(&tunnel);
    memory::blackhole(bench.topo.proxy(), PROXY_PORT).unwrap();
    let started = Instant::now();
    memory::syn_storm(app, syns, 0x5eed).unwrap();
    let storm_secs = started.elapsed().as_secs_f64();
    let peak = memory::peak_rss_mib(&tunnel, Duration::from_secs(3));
    memory::lift_blackhole(bench.topo.proxy()).unwrap();
    let back = Instant::now();
    echo(app);
    let recovery = back.elapsed().as_secs_f64();
    eprintln!("storm: {before:.1} -> {peak:.1} MiB; service back in {recovery:.1} s");
    bench.stop(tunnel);

    // Single-stream throughput: growing rings, then fixed 512 KiB rings.
    let mut throughput = Vec::new();
    for (label, extra) in [
        ("growing 4 KiB .. 512 KiB (default)", vec![]),
        (
            "fixed 512 KiB (--tcp-buffer-initial 512)",
            vec!["--tcp-buffer-initial", "512"],
        ),
    ] {
        let tunnel = bench.tunnel(&extra);
        let gbps = |reverse| {
            let runs: Vec<f64> = (0..rounds)
                .map(|_| {
                    iperf(app, TARGET_V4.into(), secs, 1, reverse).map_or_else(
                        |e| {
                            eprintln!("iperf3 failed: {e}");
                            f64::NAN
                        },
                        |r| r.gbps,
                    )
                })
                .collect();
            median(&runs)
        };
        let (up, down) = (gbps(false), gbps(true));
        let rss = memory::rss_mib(&tunnel);
        eprintln!("{label}: up {up:.2} down {down:.2} Gbit/s, RSS after {rss:.1} MiB");
        throughput.push((label, up, down, rss));
        bench.stop(tunnel);
    }

    println!();
    println!(
        "Memory benchmark: tunnel RSS (VmRSS), release build, its own device (MTU {}), {} CPUs",
        tun2socks::device::DEFAULT_MTU,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "| {:<52} | {:>16} | {:>10} |",
        "measurement", "value", "target"
    );
    println!("|{:-<54}|{:->18}|{:->12}|", "", "", "");
    println!(
        "| {:<52} | {:>12.1} MiB | {:>10} |",
        "idle", idle, "<= 4 MiB"
    );
    println!(
        "| {:<52} | {:>12.1} MiB | {:>10} |",
        format!("{flows} idle flows ({established} established, {open} still open)"),
        held_rss,
        "<= 100 MiB"
    );
    println!(
        "| {:<52} | {:>12.1} KiB | {:>10} |",
        "  per flow, above idle",
        (held_rss - idle) * 1024.0 / flows as f64,
        "~11 KiB"
    );
    println!(
        "| {:<52} | {:>12.1} MiB | {:>10} |",
        format!("{syns} SYNs, proxy blackholed ({storm_secs:.1} s): growth"),
        peak - before,
        "< 32 MiB"
    );
    println!(
        "| {:<52} | {:>14.1} s | {:>10} |",
        "  service back after the proxy returned", recovery, "recovers"
    );
    println!();
    println!("Single stream, iperf3 {secs} s, median of {rounds}, same run:");
    println!(
        "| {:<44} | {:>13} | {:>15} | {:>13} |",
        "TCP buffers", "upload Gbit/s", "download Gbit/s", "RSS after MiB"
    );
    println!("|{:-<46}|{:->15}|{:->17}|{:->15}|", "", "", "", "");
    for (label, up, down, rss) in throughput {
        println!("| {label:<44} | {up:>13.2} | {down:>15.2} | {rss:>13.1} |");
    }
}
