//! The performance benchmark (issue 9): every row on every path in the same run, the
//! kernel's path first. Paths: the kernel (the proxy namespace forwards); tun2socks
//! attached to a hand-made TUN device at MTU 1500 (the main comparison); tun2socks on
//! a device it creates (its default MTU, 65000); and peers whose binary is given
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

fn main() {
    let built = std::path::PathBuf::from(env!("CARGO_BIN_EXE_tun2socks"));
    perfbench::bench_main("perf", built, None);
}
