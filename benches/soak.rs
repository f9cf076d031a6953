//! Soak benchmark: mixed load (bulk TCP at 200 Mbit/s, 200 short connections/s, 1,000
//! UDP datagrams/s, 100 DNS queries/s) through tun2socks and our SOCKS server in
//! namespaces, printing the tunnel's and the server's RSS, descriptors and CPU with
//! the counts every 30 s; then 6 s to settle and 10 s of idleness. Exits non-zero on
//! any load error, UDP/DNS loss over 0.1%, RSS or descriptor drift over 10% after the
//! warm-up (the first third), idle CPU over 1% of a core, or an unclean exit
//! (`tun2socks::testbed::soak`). Needs root and dnsmasq.
//!
//! `cargo bench --bench soak -- --duration SECS` (or `T2S_SOAK_SECS`; default 600).
//! `T2S_SOAK_TUNNEL_ARGS` adds tunnel options (split at spaces), e.g.
//! `T2S_SOAK_TUNNEL_ARGS="--busy-poll 0"` to compare.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use tun2socks::testbed::soak::{SoakConfig, run_soak};
use tun2socks::testbed::{require_program, require_root};

/// The default length of the load.
const DEFAULT_SECS: u64 = 600;

/// `--duration SECS` from the arguments (cargo adds `--bench`, which is ignored),
/// else `T2S_SOAK_SECS`, else [`DEFAULT_SECS`].
fn duration() -> Result<u64, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(at) = args.iter().position(|a| a == "--duration") {
        let value = args.get(at + 1).ok_or("--duration needs SECS")?;
        return value
            .parse()
            .map_err(|_| format!("--duration: {value:?} is not a number of seconds"));
    }
    if let Some(value) = args.iter().find_map(|a| a.strip_prefix("--duration=")) {
        return value
            .parse()
            .map_err(|_| format!("--duration: {value:?} is not a number of seconds"));
    }
    match std::env::var("T2S_SOAK_SECS") {
        Ok(value) => value
            .parse()
            .map_err(|_| format!("T2S_SOAK_SECS: {value:?} is not a number of seconds")),
        Err(_) => Ok(DEFAULT_SECS),
    }
}

fn main() {
    let secs = match duration() {
        Ok(secs) if secs >= 3 => secs,
        Ok(secs) => {
            eprintln!("soak: {secs} s is too short to judge drift (at least 3)");
            std::process::exit(2);
        }
        Err(e) => {
            eprintln!("soak: {e}");
            std::process::exit(2);
        }
    };
    for requirement in [require_root("soak"), require_program("dnsmasq", "soak")] {
        if let Err(missing) = requirement {
            eprintln!("{missing}");
            std::process::exit(2);
        }
    }
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_tun2socks"));
    let mut config = SoakConfig::new(Duration::from_secs(secs));
    if let Ok(extra) = std::env::var("T2S_SOAK_TUNNEL_ARGS") {
        config
            .tunnel_args
            .extend(extra.split_whitespace().map(str::to_owned));
    }
    println!(
        "soak: {secs} s; bulk {} Mbit/s, {} short connections/s, {} UDP datagrams/s, {} DNS queries/s; tunnel {}",
        config.bulk_mbit,
        config.short_per_sec,
        config.udp_per_sec,
        config.dns_per_sec,
        config.tunnel_args.join(" ")
    );
    let report = match run_soak(&binary, &config, &mut std::io::stdout()) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("soak: setup failed: {e}");
            std::process::exit(2);
        }
    };
    println!("{report}");
    if !report.passed() {
        std::process::exit(1);
    }
}
