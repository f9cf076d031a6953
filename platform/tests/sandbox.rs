//! `Sandbox` against the real kernel, as root: the program sees only loopback and the
//! TUN device, its routes lead into the device whose descriptor we hold, the
//! resolver file is ours, exit codes and signals come back, setup failures are
//! reported, and nothing stays behind.
//!
//! No test harness (`harness = false` in Cargo.toml): `Sandbox::spawn` forks, which
//! it only does in a single-threaded process, and the harness runs tests on threads.
//! Each check runs in turn from `main`; a failing one panics, failing the test.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap (STYLE.md)

mod netns;

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tun2socks_platform::{ProgramExit, Sandbox, SandboxError, SandboxSignal, SandboxSpec};

const RESOLV: &str = "# test\nnameserver 198.18.0.2\n";

fn spec(script: &str) -> SandboxSpec {
    SandboxSpec {
        program: "sh".into(),
        args: vec![OsString::from("-c"), OsString::from(script)],
        device: "tun0".into(),
        mtu: 1500,
        txqueuelen: 1000,
        addresses: vec![
            "198.18.0.1/15".parse().unwrap(),
            "fd18::1/64".parse().unwrap(),
        ],
        ipv6_optional: false,
        resolv_conf: Some(RESOLV.to_owned()),
    }
}

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("t2s-sandbox-{}-{name}", std::process::id()))
}

/// The program reports what it sees into a file; it exits 7.
fn sees_only_the_tunnel_and_our_resolver() {
    let out = scratch("view");
    let script = format!(
        "{{ ip -o link; ip -o route; ip -6 -o route; cat /etc/resolv.conf; }} > {} 2>&1; exit 7",
        out.display()
    );
    let (sandbox, tun) = Sandbox::spawn(&spec(&script)).unwrap();
    assert_eq!(tun.name(), "tun0");
    sandbox.start().unwrap();
    assert_eq!(sandbox.wait().unwrap(), ProgramExit::Code(7));
    let view = std::fs::read_to_string(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    let links: Vec<&str> = view.lines().filter(|l| l.contains("link/")).collect();
    assert_eq!(links.len(), 2, "only lo and tun0:\n{view}");
    assert!(view.contains("default dev tun0"), "{view}");
    assert!(
        view.lines()
            .filter(|l| l.starts_with("default dev tun0"))
            .count()
            == 2,
        "v4 and v6:\n{view}"
    );
    assert!(view.contains("nameserver 198.18.0.2"), "{view}");
    // The host's resolver file is untouched, and ours is gone from the disk.
    assert!(
        !std::fs::read_to_string("/etc/resolv.conf")
            .unwrap_or_default()
            .contains("# test")
    );
    assert_eq!(sandbox.kill_leftovers(), 0);
}

/// A datagram the program sends to any address arrives at our descriptor.
fn its_packets_reach_our_descriptor() {
    let script = "python3 -c \"import socket,time\n\
                  for _ in range(50):\n\
                  \x20   socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'through-the-tun', ('203.0.113.9', 9)); time.sleep(0.1)\"";
    let (sandbox, tun) = Sandbox::spawn(&spec(script)).unwrap();
    sandbox.start().unwrap();
    let found = wait_for_packet(&tun, |packet| {
        packet[0] >> 4 == 4
            && packet[16..20] == [203, 0, 113, 9]
            && packet.windows(15).any(|w| w == b"through-the-tun")
    });
    sandbox.signal(SandboxSignal::Kill).unwrap();
    let _ = sandbox.wait();
    assert!(found, "no UDP packet to 203.0.113.9 came out of the TUN");
}

/// A name lookup inside asks the resolver of our file, and its query enters the TUN.
fn name_lookups_enter_the_tunnel() {
    let (sandbox, tun) = Sandbox::spawn(&spec("getent hosts t2s-probe.example; exit 0")).unwrap();
    sandbox.start().unwrap();
    let found = wait_for_packet(&tun, |packet| {
        let ihl = usize::from(packet[0] & 0x0f) * 4;
        packet[0] >> 4 == 4
            && packet[9] == 17
            && packet[16..20] == [198, 18, 0, 2]
            && packet.get(ihl + 2..ihl + 4) == Some(&53u16.to_be_bytes()[..])
            && packet.windows(9).any(|w| w == b"t2s-probe")
    });
    sandbox.signal(SandboxSignal::Kill).unwrap();
    let _ = sandbox.wait();
    assert!(found, "no DNS query to 198.18.0.2:53 came out of the TUN");
}

/// Reads the TUN for up to 5 s until a packet matches.
fn wait_for_packet(tun: &tun2socks_platform::Tun, matches: impl Fn(&[u8]) -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 2048];
    while Instant::now() < deadline {
        match tun.recv(&mut buf) {
            Ok(n) if n >= 20 && matches(&buf[..n]) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("recv: {e}"),
        }
    }
    false
}

/// SIGTERM reaches the program; the exit reports the signal.
fn signals_reach_the_program() {
    let (sandbox, _tun) = Sandbox::spawn(&spec("exec sleep 30")).unwrap();
    sandbox.start().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    sandbox.signal(SandboxSignal::Terminate).unwrap();
    assert_eq!(sandbox.wait().unwrap(), ProgramExit::Signal(15));
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(ProgramExit::Signal(15).shell_status(), 143);
    // After the exit, signals are no-ops, never errors.
    sandbox.signal(SandboxSignal::Terminate).unwrap();
}

/// A program that is not there: 127, like a shell.
fn a_missing_program_exits_127() {
    let mut spec = spec("");
    spec.program = "/nonexistent/t2s-no-such-program".into();
    spec.args.clear();
    let (sandbox, _tun) = Sandbox::spawn(&spec).unwrap();
    sandbox.start().unwrap();
    assert_eq!(sandbox.wait().unwrap(), ProgramExit::Code(127));
}

/// A setup step that fails is reported with its reason, and no process is left.
fn setup_failures_are_reported() {
    let mut spec = spec("exit 0");
    spec.device = "bad/name".into();
    match Sandbox::spawn(&spec) {
        Err(SandboxError::Setup { message }) => {
            assert!(message.contains("bad/name"), "{message}");
        }
        other => panic!("expected a setup failure, got {other:?}"),
    }
    assert!(no_children(), "the failed setup process was not reaped");
}

/// What the program leaves running in the background is killed by `kill_leftovers`
/// (and by dropping the sandbox).
fn leftovers_are_killed() {
    let (sandbox, _tun) = Sandbox::spawn(&spec("sleep 60 & exit 0")).unwrap();
    sandbox.start().unwrap();
    assert_eq!(sandbox.wait().unwrap(), ProgramExit::Code(0));
    // sh forked the sleep before it ran `exit`, so the sleep is there now.
    assert_eq!(sandbox.kill_leftovers(), 1);
    // SIGKILL takes effect asynchronously; then nothing is left in the namespace.
    let deadline = Instant::now() + Duration::from_secs(5);
    while sandbox.kill_leftovers() > 0 {
        assert!(
            Instant::now() < deadline,
            "killed, yet still in the namespace"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn no_children() -> bool {
    matches!(
        nix::sys::wait::waitpid(None, Some(nix::sys::wait::WaitPidFlag::WNOHANG)),
        Err(nix::errno::Errno::ECHILD)
    )
}

fn main() {
    if !netns::root_or_skip("sandbox") {
        return;
    }
    let checks: [(&str, fn()); 7] = [
        (
            "sees_only_the_tunnel_and_our_resolver",
            sees_only_the_tunnel_and_our_resolver,
        ),
        (
            "its_packets_reach_our_descriptor",
            its_packets_reach_our_descriptor,
        ),
        (
            "name_lookups_enter_the_tunnel",
            name_lookups_enter_the_tunnel,
        ),
        ("signals_reach_the_program", signals_reach_the_program),
        ("a_missing_program_exits_127", a_missing_program_exits_127),
        ("setup_failures_are_reported", setup_failures_are_reported),
        ("leftovers_are_killed", leftovers_are_killed),
    ];
    for (name, check) in checks {
        println!("test {name} ...");
        check();
        println!("test {name} ... ok");
    }
    assert!(no_children(), "a sandbox process was left unreaped");
    println!("test result: ok. {} passed", checks.len());
}
