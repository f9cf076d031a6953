//! Keeps `benches/perf.rs` from rotting: runs its machinery once with tiny durations
//! on the kernel path, tun2socks attached to a hand-made MTU 1500 device, and a "peer"
//! whose binary exits at once, then checks that every row was produced on the paths
//! that could produce it, that the failed peer is reported and did not stop the run,
//! and that the JSON parses (python3's `json`). It checks no speed.
//!
//! Needs root, iperf3, dnsmasq and python3; in CI (`CI=1`) it never skips.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../benches/perfbench/mod.rs"]
mod perfbench;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use perfbench::report::{METRICS, json, table};
use perfbench::rig::{hev_config, tun2proxy_args};
use perfbench::settings::{Group, PathKind, Settings, parse_groups, parse_paths};
use tun2socks::testbed::{require_program, require_root};

/// Rows only a process can give (none on the kernel path).
const PROCESS_ONLY: [&str; 7] = [
    "rss_idle_mib",
    "rss_held_mib",
    "held_open",
    "rss_per_flow_kib",
    "cpu_s_per_gb",
    "cpu_tunnel_s_per_gb",
    "cpu_server_s_per_gb",
];

fn tiny_settings() -> Settings {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_tun2socks"));
    Settings {
        binary: built.clone(),
        server_binary: built,
        tunnel_args: Vec::new(),
        secs: 1,
        rounds: 1,
        groups: Group::ALL.to_vec(),
        paths: vec![
            PathKind::Kernel,
            PathKind::Attached,
            PathKind::Hev(PathBuf::from("/bin/false")),
        ],
        mtu: 1500,
        multi_queue: false,
        created_mtu: None,
        held_flows: 50,
        rr_round_trips: 200,
        conn_workers: 8,
        udp_probes: 100,
        udp_rate: 2000,
        udp_secs: 1,
        json_path: None,
    }
}

#[test]
fn perf_bench_produces_every_row_and_valid_json() {
    tun2socks::require_or_skip!(require_root("perf_bench"));
    for program in ["iperf3", "dnsmasq", "python3"] {
        tun2socks::require_or_skip!(require_program(program, "perf_bench"));
    }
    let s = tiny_settings();
    let started = std::time::Instant::now();
    let report = perfbench::run(&s);
    let text = table(&report, &s);
    println!("{text}\n({:.0} s)", started.elapsed().as_secs_f64());

    let [kernel, attached, peer] = report.paths.as_slice() else {
        panic!("three paths expected, got {}", report.paths.len());
    };
    assert_eq!(kernel.setup_error, None);
    assert_eq!(attached.setup_error, None);
    assert!(kernel.errors.is_empty(), "kernel: {:?}", kernel.errors);
    assert!(
        attached.errors.is_empty(),
        "attached: {:?}",
        attached.errors
    );
    let refusal = peer.setup_error.as_deref().unwrap_or_default();
    assert!(
        refusal.contains("exited"),
        "the peer that exits at once is reported: {refusal:?}"
    );
    for metric in METRICS {
        assert!(
            attached.value(metric.key).is_some(),
            "no {} on the attached path",
            metric.key
        );
        assert_eq!(
            kernel.value(metric.key).is_some(),
            !PROCESS_ONLY.contains(&metric.key),
            "{} on the kernel path",
            metric.key
        );
        assert_eq!(peer.value(metric.key), None);
    }
    assert_eq!(attached.value("held_open"), Some(50.0));
    assert!(text.contains("TCP 8 streams, download") && text.contains("not set up: hev"));
    let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(&format!("t2s-perfhev-{}-", std::process::id()))
        })
        .collect();
    assert!(
        leftovers.is_empty(),
        "hev config left behind: {leftovers:?}"
    );

    // The JSON parses, and carries the same figures.
    let document = json(&report, &s);
    let check = "import json, sys\n\
                 d = json.load(sys.stdin)\n\
                 paths = {p['key']: p for p in d['paths']}\n\
                 assert set(paths) == {'kernel', 'attached', 'hev'}, paths.keys()\n\
                 m = paths['attached']['metrics']\n\
                 assert all(isinstance(v, (int, float)) for v in m.values()), m\n\
                 assert len(m) == len(d['metrics']), (len(m), len(d['metrics']))\n\
                 assert paths['kernel']['metrics']['rss_idle_mib'] is None\n\
                 assert paths['hev']['setup_error']\n\
                 assert paths['attached']['samples']['conn_per_s'] == [m['conn_per_s']]\n\
                 print(m['tcp1_up_gbps'])\n";
    let mut python = Command::new("python3")
        .args(["-c", check])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    python
        .stdin
        .take()
        .unwrap()
        .write_all(document.as_bytes())
        .unwrap();
    let out = python.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python3 rejected the JSON: {}\n{document}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let ours = attached.value("tcp1_up_gbps").unwrap();
    assert!((printed - ours).abs() < 0.001, "{printed} != {ours}");
}

#[test]
fn settings_lists_parse_and_refuse_unknown_names() {
    assert_eq!(
        parse_groups("udp, tcp,udp").unwrap(),
        vec![Group::Tcp, Group::Udp]
    );
    assert!(parse_groups("tcp,bogus").unwrap_err().contains("bogus"));
    assert_eq!(
        parse_paths("kernel,attached").unwrap(),
        vec![PathKind::Kernel, PathKind::Attached]
    );
    assert!(
        parse_paths("hev").is_err(),
        "peers come from their own variables"
    );
}

#[test]
fn peer_configs_name_the_device_and_the_proxy() {
    let yaml = hev_config(
        "tunb",
        1500,
        false,
        std::net::Ipv4Addr::new(198, 19, 1, 2),
        1080,
    );
    for line in [
        "  name: tunb",
        "  mtu: 1500",
        "  multi-queue: false",
        "  address: 198.19.1.2",
        "  port: 1080",
    ] {
        assert!(yaml.lines().any(|l| l == line), "{line:?} in\n{yaml}");
    }
    let args = tun2proxy_args("tunb", "socks5://198.19.1.2:1080", 1500, 5000);
    assert_eq!(
        args[..4],
        ["--tun", "tunb", "--proxy", "socks5://198.19.1.2:1080"]
    );
    let after = |flag: &str| {
        let at = args.iter().position(|a| a == flag).unwrap();
        args[at + 1].clone()
    };
    assert_eq!(after("--mtu"), "1500");
    assert_eq!(after("--tcp-mss"), "1460");
    assert_eq!(after("--max-sessions"), "5000");
}
