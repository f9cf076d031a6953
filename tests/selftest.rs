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
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(summary.ends_with(" 0 failed"), "{summary}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
    // CI installs curl: the exec row must really run there.
    assert!(!stdout.contains("skipped"), "{stdout}");
}

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
