//! Tunnel benchmark: iperf3 from the app namespace to the target namespace, through
//! tun2socks + our SOCKS server, beside the kernel's own path (the proxy namespace
//! forwarding) in the same topology and the same run. Prints a table; asserts
//! nothing. Needs root and iperf3.
//!
//! `cargo bench --bench tunnel`. `BENCH_SECS` (default 5) per measurement,
//! `BENCH_ROUNDS` (default 3; the median is shown), `BENCH_MTUS` (default
//! "9000,1500": tunnel MTUs to measure).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use tun2socks::testbed::tunnel::{proxy_addr, start_server, start_tunnel};
use tun2socks::testbed::{Namespace, Process, TARGET_V4, Topology, wait_for_tcp};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Gbit/s received, from iperf3's JSON (`end.sum_received.bits_per_second`).
fn iperf(app: &Namespace, secs: u64, reverse: bool) -> f64 {
    let mut args = vec![
        "-c".to_string(),
        TARGET_V4.to_string(),
        "-t".into(),
        secs.to_string(),
        "-J".into(),
        "-O".into(),
        "1".into(),
    ];
    if reverse {
        args.push("-R".into());
    }
    let out = app.run("iperf3", &args).expect("iperf3 client");
    let json = String::from_utf8_lossy(&out.stdout);
    let at = json
        .find("\"sum_received\"")
        .expect("no sum_received in iperf3 output");
    let rest = &json[at..];
    let bps = rest
        .find("\"bits_per_second\"")
        .expect("no bits_per_second");
    let number: String = rest[bps + 17..]
        .chars()
        .skip_while(|c| *c == ':' || c.is_whitespace())
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == 'e' || *c == '+')
        .collect();
    number.parse::<f64>().expect("bits_per_second") / 1e9
}

fn iperf_server(target: &Namespace) -> Process {
    let mut cmd = target.command("iperf3");
    cmd.args(["-s"]);
    let p = target.spawn(cmd).expect("iperf3 server");
    wait_for_tcp(target, (TARGET_V4, 5201).into(), Duration::from_secs(10)).expect("iperf3 -s");
    p
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// (upload, download) Gbit/s, median of `rounds`.
fn measure(app: &Namespace, secs: u64, rounds: usize) -> (f64, f64) {
    let up = (0..rounds).map(|_| iperf(app, secs, false)).collect();
    let down = (0..rounds).map(|_| iperf(app, secs, true)).collect();
    (median(up), median(down))
}

fn main() {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if !root {
        println!("tunnel benchmark: needs root (network namespaces); skipped");
        return;
    }
    let secs: u64 = env_or("BENCH_SECS", 5);
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    let mtus: Vec<u16> = env_or("BENCH_MTUS", "9000,1500".to_string())
        .split(',')
        .filter_map(|m| m.trim().parse().ok())
        .collect();
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_tun2socks"));

    // The kernel's path: app -> proxy (forwarding) -> target.
    let kernel = {
        let topo = Topology::create("benchk").unwrap();
        topo.enable_kernel_path().unwrap();
        let _server = iperf_server(topo.target());
        measure(topo.app(), secs, rounds)
    };
    eprintln!(
        "kernel path: up {:.2} down {:.2} Gbit/s",
        kernel.0, kernel.1
    );

    let mut rows = Vec::new();
    for mtu in &mtus {
        let topo = Topology::create("bencht").unwrap();
        let _iperf = iperf_server(topo.target());
        let server = start_server(topo.proxy(), &binary, &["--log-level", "warn"]).unwrap();
        let mtu_arg = mtu.to_string();
        let tunnel = start_tunnel(
            topo.app(),
            &binary,
            &format!("socks5://{}", proxy_addr()),
            &["--mtu", &mtu_arg, "--log-level", "warn"],
        )
        .unwrap();
        let r = measure(topo.app(), secs, rounds);
        eprintln!("tunnel mtu {mtu}: up {:.2} down {:.2} Gbit/s", r.0, r.1);
        rows.push((*mtu, r));
        drop(tunnel);
        drop(server);
    }

    println!();
    println!(
        "Tunnel benchmark: iperf3, 1 TCP stream, app -> target, {} CPUs, {secs} s, median of {rounds}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "| {:<34} | {:>13} | {:>9} | {:>15} | {:>9} |",
        "path", "upload Gbit/s", "vs kernel", "download Gbit/s", "vs kernel"
    );
    println!(
        "|{:-<36}|{:->15}|{:->11}|{:->17}|{:->11}|",
        "", "", "", "", ""
    );
    println!(
        "| {:<34} | {:>13.2} | {:>8.0}% | {:>15.2} | {:>8.0}% |",
        "kernel (proxy ns forwards)", kernel.0, 100.0, kernel.1, 100.0
    );
    for (mtu, (up, down)) in rows {
        println!(
            "| {:<34} | {:>13.2} | {:>8.0}% | {:>15.2} | {:>8.0}% |",
            format!("tun2socks + our server, MTU {mtu}"),
            up,
            up / kernel.0 * 100.0,
            down,
            down / kernel.1 * 100.0
        );
    }
}
