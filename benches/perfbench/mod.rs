//! The machinery of `benches/perf.rs`, also run by `tests/perf_bench.rs` with tiny
//! durations so it cannot rot: settings from the environment ([`settings`]), one rig
//! per path ([`rig`]: topology, target services, our server, the tunnel or a peer),
//! the measurements ([`measure`]) and the table and JSON ([`report`]).
//!
//! All paths are set up first and stay up; then each group of rows runs round by
//! round, every path in turn, so that a machine busy with other work slows all paths
//! alike and the ratios to the kernel path stay meaningful.
#![allow(dead_code)]

pub mod measure;
pub mod report;
pub mod rig;
pub mod settings;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tun2socks::testbed::bench::{cpus, is_root, load_average, raise_nofile};

use measure::PathResult;
use report::Report;
use rig::Rig;
use settings::{Group, Settings};

/// A bench binary's `main`: skips unless root, reads the settings (`default_groups`
/// when `T2S_BENCH_ONLY` is unset), runs, prints the table and the JSON, and writes the
/// JSON to `T2S_BENCH_JSON` if set. `built` is cargo's build of tun2socks.
pub fn bench_main(name: &str, built: PathBuf, default_groups: Option<&[Group]>) {
    if !is_root() {
        println!("{name} benchmark: needs root (network namespaces); skipped");
        return;
    }
    let mut settings = match Settings::from_env(built) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{name} benchmark: {e}");
            std::process::exit(2);
        }
    };
    if let Some(groups) = default_groups {
        if std::env::var_os("T2S_BENCH_ONLY").is_none() {
            settings.groups = groups.to_vec();
        }
    }
    let report = run(&settings);
    let json = report::json(&report, &settings);
    println!();
    println!("{}", report::table(&report, &settings));
    println!("{json}");
    if let Some(path) = &settings.json_path {
        if let Err(e) = std::fs::write(path, format!("{json}\n")) {
            eprintln!("{name} benchmark: writing {}: {e}", path.display());
        }
    }
}

/// Sets up every path, measures every selected group on each, tears everything down.
pub fn run(s: &Settings) -> Report {
    let started = Instant::now();
    let load_before = load_average();
    raise_nofile();
    let mut paths: Vec<(PathResult, Option<Rig>)> = s
        .paths
        .iter()
        .map(|kind| {
            let mut result = PathResult::new(kind, s);
            eprintln!("setting up {}", result.label);
            let rig = match Rig::start(kind, s) {
                Ok(rig) => Some(rig),
                Err(e) => {
                    eprintln!("  {} not set up: {e}", result.label);
                    result.setup_error = Some(e.to_string());
                    None
                }
            };
            (result, rig)
        })
        .collect();
    // Let the processes settle before the idle RSS reading.
    std::thread::sleep(Duration::from_secs(1));
    let bulk = s.wants(Group::Tcp) || s.wants(Group::Cpu);
    let mut bulk_done = false;
    for group in &s.groups {
        if matches!(group, Group::Tcp | Group::Cpu) {
            if !bulk || bulk_done {
                continue;
            }
            bulk_done = true;
        }
        let rounds = if *group == Group::Rss { 1 } else { s.rounds };
        for round in 0..rounds {
            eprintln!("{} round {}/{rounds}", group.name(), round + 1);
            for (result, rig) in &mut paths {
                let Some(rig) = rig else { continue };
                match group {
                    Group::Rss => measure::rss(rig, s, result),
                    Group::Tcp | Group::Cpu => measure::tcp(rig, s, result),
                    Group::Rr => measure::rr(rig, s, result),
                    Group::Conn => measure::conn(rig, s, result),
                    Group::Udp => measure::udp(rig, s, result, round),
                    Group::Dns => measure::dns(rig, s, result),
                }
            }
        }
    }
    let mut results = Vec::with_capacity(paths.len());
    for (mut result, rig) in paths {
        if let Some(rig) = rig {
            if s.wants(Group::Cpu) {
                result.finish_cpu(&rig);
            }
            if !result.errors.is_empty() {
                result.errors.extend(log_tail(&rig));
            }
            result.errors.extend(crashed(rig));
        }
        results.push(result);
    }
    Report {
        paths: results,
        load_before,
        load_after: load_average(),
        cpus: cpus(),
        elapsed_s: started.elapsed().as_secs_f64(),
    }
}

/// The last lines of the tunnel's log, to show beside failed measurements.
fn log_tail(rig: &Rig) -> Option<String> {
    let log = rig.tunnel.as_ref()?.log().ok()?;
    let tail: Vec<&str> = log
        .lines()
        .rev()
        .filter(|l| !l.trim().is_empty())
        .take(3)
        .collect();
    (!tail.is_empty()).then(|| {
        let lines: Vec<&str> = tail.into_iter().rev().collect();
        format!("tunnel log ends: {}", lines.join(" / "))
    })
}

/// Tears a rig down; an error for each of its processes that exited on its own
/// (crashed) before the end, with the last lines of its log.
fn crashed(mut rig: Rig) -> Vec<String> {
    let mut errors = Vec::new();
    for (what, process) in [("tunnel", &mut rig.tunnel), ("server", &mut rig.server)] {
        let Some(process) = process else { continue };
        if let Ok(Some(status)) = process.try_wait() {
            let log = process.log().unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(3).collect();
            errors.push(format!(
                "{what} exited during the run ({status}): {}",
                tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
            ));
        }
    }
    errors
}
