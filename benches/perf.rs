//! The performance benchmark (issue 9): every row on every path in the same run, the
//! kernel's path first. Paths: the kernel (the proxy namespace forwards); tun2socks
//! attached to a hand-made TUN device at MTU 1500 (the main comparison); tun2socks on
//! a device it creates (its default MTU, 9000); and peers whose binary is given
//! (hev-socks5-tunnel, tun2proxy) on the same hand-made device through the same SOCKS
//! server. Rows: TCP 1 and 8 streams each way, request/response p50/p99,
//! connections/s, UDP echo p50/p99 and a fixed-rate run with loss, DNS queries/s, RSS
//! idle and with held flows, CPU seconds per GB. Prints a table and a JSON document;
//! asserts nothing; skips (exit 0) when not root.
//!
//! `cargo bench --bench perf`. Settings (`T2S_BENCH_*`) are listed in the README's
//! "Benchmark" section and in `perfbench/settings.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "perfbench/mod.rs"]
mod perfbench;

use std::path::PathBuf;

use perfbench::report::{json, table};
use perfbench::settings::Settings;

fn main() {
    if !tun2socks::testbed::bench::is_root() {
        println!("perf benchmark: needs root (network namespaces); skipped");
        return;
    }
    let built = PathBuf::from(env!("CARGO_BIN_EXE_tun2socks"));
    let settings = match Settings::from_env(built) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("perf benchmark: {e}");
            std::process::exit(2);
        }
    };
    let report = perfbench::run(&settings);
    let json = json(&report, &settings);
    println!();
    println!("{}", table(&report, &settings));
    println!("{json}");
    if let Some(path) = &settings.json_path {
        if let Err(e) = std::fs::write(path, format!("{json}\n")) {
            eprintln!("perf benchmark: writing {}: {e}", path.display());
        }
    }
}
