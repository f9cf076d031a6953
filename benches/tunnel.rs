//! The old tunnel benchmark's name, kept as an alias of `perf` (`benches/perf.rs`)
//! limited to its TCP rows: iperf3 1 and 8 streams each way on the kernel path,
//! tun2socks attached to a hand-made TUN device at MTU 1500 and tun2socks on its own
//! device (its default MTU, 65000), with CPU seconds per GB. Every `T2S_BENCH_*` setting of `perf`
//! applies; `T2S_BENCH_ONLY` defaults to `tcp,cpu` here.
//!
//! `cargo bench --bench tunnel`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "perfbench/mod.rs"]
mod perfbench;

use perfbench::settings::Group;

fn main() {
    let built = std::path::PathBuf::from(env!("CARGO_BIN_EXE_tun2socks"));
    perfbench::bench_main("tunnel", built, Some(&[Group::Tcp, Group::Cpu]));
}
