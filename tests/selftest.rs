//! `tun2socks selftest`, the README's first command, run as a user would run it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use tun2socks::require_or_skip;
use tun2socks::testbed::require_root;

#[test]
fn selftest_passes_and_prints_its_table() {
    require_or_skip!(require_root("selftest_passes_and_prints_its_table"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tun2socks"))
        .arg("selftest")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "selftest failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("Gbit/s"), "no throughput figure:\n{stdout}");
    for variant in ["socks5 ", "socks5+login ", "socks4 ", "socks4a ", "exec: "] {
        assert!(stdout.contains(variant), "no {variant} rows:\n{stdout}");
    }
    for row in REQUIRED_ROWS {
        let line = stdout.lines().find(|l| l.starts_with(row));
        let line = line.unwrap_or_else(|| panic!("no row {row:?}:\n{stdout}"));
        assert!(line.contains("  ok  "), "{line}");
        if row.contains(" UDP IPv") {
            assert!(line.contains("p50 ") && line.contains(" µs"), "{line}");
        }
    }
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(summary.ends_with(" 0 failed"), "{summary}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
    // CI installs curl and dnsmasq: the exec and DNS rows must really run there.
    if tun2socks::testbed::skip_allowed() && stdout.contains("skipped") {
        eprintln!("some rows skipped (CI is unset, so they may):\n{stdout}");
    } else {
        assert!(!stdout.contains("skipped"), "{stdout}");
    }
}

/// Rows the selftest must print (the start of each name), all "ok".
const REQUIRED_ROWS: &[&str] = &[
    "socks5 UDP IPv4: echo 200 datagrams",
    "socks5 UDP IPv6: echo 200 datagrams",
    "socks5 UDP: full cone",
    "socks5 DNS udp: A + AAAA",
    "socks5+login UDP IPv4: echo 200 datagrams",
    "socks5+login UDP IPv6: echo 200 datagrams",
    "socks5+login UDP: full cone",
    "socks5+login DNS tcp: A + AAAA",
    "socks4 UDP: port unreachable",
    "socks4 DNS tcp: A + AAAA",
    "socks4a UDP: port unreachable",
    "socks4a DNS fake-ip: A + AAAA from the pool",
    "socks4a DNS fake-ip: TXT relayed over TCP",
    "socks4a DNS fake-ip: HTTP GET 8 MiB by a name only the proxy resolves",
    "exec: curl in a private namespace",
    "exec: the program's exit status comes back",
];

#[test]
fn selftest_without_root_says_why() {
    // Run as nobody: it must refuse with exit code 3 and say root is needed.
    require_or_skip!(require_root("selftest_without_root_says_why"));
    // A copy nobody can execute, wherever the checkout lives (e.g. under /root).
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("t2s-selftest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let copy = dir.join("tun2socks");
    std::fs::copy(env!("CARGO_BIN_EXE_tun2socks"), &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&copy)
        .arg("selftest")
        .current_dir(&dir)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("root"), "{stderr}");
}

#[test]
fn a_selftest_stopped_by_a_signal_leaves_nothing_behind() {
    require_or_skip!(require_root(
        "a_selftest_stopped_by_a_signal_leaves_nothing_behind"
    ));
    use std::time::{Duration, Instant};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tun2socks"))
        .arg("selftest")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let marker = format!("-{}-", child.id());
    let ours = || -> Vec<String> {
        std::fs::read_dir("/run/netns")
            .map(|dir| {
                dir.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|name| name.starts_with("t2s-selftest") && name.contains(&marker))
                    .collect()
            })
            .unwrap_or_default()
    };
    // Once something runs in its namespaces (server, resolver, tunnel), stop it
    // the way `timeout` or systemd would.
    let started = Instant::now();
    let running = loop {
        let pids: Vec<String> = ours()
            .iter()
            .filter_map(|ns| {
                let out = std::process::Command::new("ip")
                    .args(["netns", "pids", ns])
                    .output()
                    .ok()?;
                Some(String::from_utf8_lossy(&out.stdout).into_owned())
            })
            .flat_map(|text| {
                text.split_whitespace()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            // Not the selftest's own threads that entered a namespace.
            .filter(|pid| *pid != child.id().to_string())
            .collect();
        let comm = |pid: &String| std::fs::read_to_string(format!("/proc/{pid}/comm"));
        // The reference server (or a tunnel) is up: a process of this binary.
        if pids
            .iter()
            .any(|pid| comm(pid).is_ok_and(|c| c.trim() == "tun2socks"))
        {
            break pids;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "nothing ran in {:?}",
            ours()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("selftest still running 10 s after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(128 + 15), "{status}");
    assert_eq!(ours(), Vec::<String>::new(), "namespaces left behind");
    // What ran in them is gone (or a zombie waiting for init to reap it).
    for pid in running {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = state.rsplit(") ").next().unwrap_or_default();
        assert!(
            state.is_empty() || state.starts_with('Z'),
            "process {pid} still runs: {state}"
        );
    }
}
