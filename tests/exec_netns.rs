//! `tun2socks exec` end to end, in the three-namespace topology: `tun2socks exec`
//! runs in `app` (so its upstream sockets reach the proxy at 198.19.1.2:1080), the
//! program runs in a private namespace of its own whose only route is the TUN, and
//! `app` itself has no route to `target`: whatever the program reaches there went
//! through the tunnel and the SOCKS server. As root, and as an ordinary user (uid
//! 65534) in a user namespace.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "exec_netns/support.rs"]
mod support;

#[path = "exec_netns/dns.rs"]
mod dns;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tun2socks::require_or_skip;
use tun2socks::testbed::dnsmasq::{Dnsmasq, default_records};
use tun2socks::testbed::services::{HTTP_PORT, Services, blob, sha256_hex};
use tun2socks::testbed::topology::{TARGET_V4, TARGET_V6};
use tun2socks::testbed::tunnel::{panics_in, proxy_addr, start_server};
use tun2socks::testbed::{Process, Topology, require_program, require_root, skip_allowed};

use support::{
    ExecutableCopy, TunModeGuard, netns_list, processes_with, user_namespaces_allowed,
    wait_for_line,
};

const BLOB: usize = 1024 * 1024;
const SEED: u64 = 17;
/// The unprivileged user the tests run `exec` as.
const NOBODY: u32 = 65534;

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tun2socks"))
}

/// Target services and our SOCKS server; the namespaces drop last.
/// A prefix that starts a command with SIGHUP and SIGQUIT at their default action.
const DEFAULT_SIGNALS: [&str; 2] = ["env", "--default-signal=HUP,QUIT"];

struct Net {
    server: Process,
    _services: Services,
    topo: Topology,
}

impl Net {
    fn new(tag: &str) -> Net {
        let topo = Topology::create(tag).unwrap();
        let services = Services::start(topo.target(), BLOB, SEED).unwrap();
        let server = start_server(topo.proxy(), &binary(), &[]).unwrap();
        // The proof that traffic went through SOCKS: app cannot reach the target.
        assert!(
            topo.app()
                .ip(["route", "get", &TARGET_V4.to_string()])
                .is_err(),
            "app must have no route to the target"
        );
        Net {
            server,
            _services: services,
            topo,
        }
    }

    /// `BINARY exec --proxy URL -- sh -c SCRIPT`, run in `app` by `prefix` (e.g.
    /// setpriv), as a command ready to run or spawn.
    fn exec_command(&self, binary: &Path, prefix: &[&str], script: &str) -> Command {
        let mut command = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = self.topo.app().command(first);
                c.args(rest).arg(binary);
                c
            }
            None => self.topo.app().command(binary),
        };
        command
            .args(["exec", "--proxy", &format!("socks5://{}", proxy_addr())])
            .args(["--", "sh", "-c", script]);
        command
    }

    fn assert_server_ok(&self) {
        let panics = panics_in(&self.server);
        assert!(panics.is_empty(), "server panicked: {panics:?}");
    }
}

/// Fetches the blob over IPv4 and IPv6 with curl, printing each SHA-256.
fn fetch_script() -> String {
    format!(
        "curl -sS --fail --max-time 30 http://{TARGET_V4}:{HTTP_PORT}/blob | sha256sum && \
         curl -sS --fail --max-time 30 -g 'http://[{TARGET_V6}]:{HTTP_PORT}/blob' | sha256sum"
    )
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Both fetches arrived whole (two lines with the blob's SHA-256).
fn assert_fetched(out: &Output) {
    let want = sha256_hex(&blob(BLOB, SEED));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let hashes = stdout.lines().filter(|l| l.starts_with(&want)).count();
    assert_eq!(
        hashes,
        2,
        "expected IPv4 and IPv6 downloads:\n{}",
        text(out)
    );
}

#[test]
fn exec_as_root_reaches_the_target_through_socks_over_ipv4_and_ipv6() {
    require_or_skip!(require_root("exec_as_root_reaches_the_target"));
    require_or_skip!(require_program("curl", "exec_as_root_reaches_the_target"));
    let net = Net::new("exec-root");
    let script = format!(
        "{} && cat /etc/resolv.conf && ip -o link | wc -l && id -u",
        fetch_script()
    );
    let out = net.exec_command(&binary(), &[], &script).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_fetched(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The resolver inside points into the tunnel; the namespace has lo and tun0 only.
    assert!(stdout.contains("nameserver 198.18.0.2"), "{}", text(&out));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[lines.len() - 2], "2", "{}", text(&out));
    assert_eq!(lines[lines.len() - 1], "0", "{}", text(&out));
    net.assert_server_ok();
}

#[test]
fn exec_returns_the_program_exit_status() {
    require_or_skip!(require_root("exec_returns_the_program_exit_status"));
    require_or_skip!(require_program(
        "curl",
        "exec_returns_the_program_exit_status"
    ));
    let net = Net::new("exec-codes");
    let cases = [
        ("exit 7".to_owned(), 7),
        ("exit 0".to_owned(), 0),
        ("kill -KILL $$".to_owned(), 128 + 9),
        // The proxy answers "connection refused" for a closed port: curl's 7.
        (
            format!("exec curl -sS --max-time 20 http://{TARGET_V4}:1/"),
            7,
        ),
        ("exec /nonexistent/t2s-no-such-program".to_owned(), 127),
    ];
    for (script, want) in cases {
        let out = net.exec_command(&binary(), &[], &script).output().unwrap();
        assert_eq!(out.status.code(), Some(want), "{script}: {}", text(&out));
    }
    // No program at all: a usage error.
    let mut command = net.topo.app().command(binary());
    command.args([
        "exec",
        "--proxy",
        &format!("socks5://{}", proxy_addr()),
        "--",
    ]);
    let out = command.output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    // --setup (host routes) has no meaning for exec: a usage error that says so, and
    // the program does not run.
    let mut command = net.topo.app().command(binary());
    command.args(["exec", "--proxy", &format!("socks5://{}", proxy_addr())]);
    command.args(["--setup", "--", "sh", "-c", "echo ran"]);
    let out = command.output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("--setup does not apply to exec"),
        "{}",
        text(&out)
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("ran"),
        "{}",
        text(&out)
    );
    // A program `exec` itself cannot start: 127, like a shell.
    let mut command = net.topo.app().command(binary());
    command.args(["exec", "--proxy", &format!("socks5://{}", proxy_addr())]);
    command.args(["--", "/nonexistent/t2s-no-such-program"]);
    let out = command.output().unwrap();
    assert_eq!(out.status.code(), Some(127), "{}", text(&out));
    net.assert_server_ok();
}

#[test]
fn sigterm_sigint_and_sighup_reach_the_program() {
    require_or_skip!(require_root("sigterm_sigint_and_sighup_reach_the_program"));
    let net = Net::new("exec-signals");
    // SIGHUP too: the program decides what a hang-up means (tun2socks used to die of
    // it, killing the program with it).
    for (signal, trap, code) in [
        (Signal::SIGTERM, "TERM", 42),
        (Signal::SIGINT, "INT", 43),
        (Signal::SIGHUP, "HUP", 44),
        // A JVM's thread dump, a server's "reopen your logs": the program's signals,
        // whose default action used to end tun2socks, and the program with it.
        (Signal::SIGQUIT, "QUIT", 45),
        (Signal::SIGUSR1, "USR1", 46),
        (Signal::SIGUSR2, "USR2", 47),
    ] {
        let script = format!("trap 'exit {code}' {trap}; echo ready; while :; do sleep 0.05; done");
        // Started with SIGHUP and SIGQUIT at their default action whatever this test
        // inherited (under `nohup`, or `&` without job control, they come ignored:
        // tun2socks then leaves them so, by design, and a shell cannot trap a signal
        // ignored on entry). `env` execs in place: the pid is still tun2socks's.
        let mut process = net
            .topo
            .app()
            .spawn(net.exec_command(&binary(), &DEFAULT_SIGNALS, &script))
            .unwrap();
        wait_for_line(&process, "ready");
        // To tun2socks only (`ip netns exec` execs in place: the pid is ours), not to
        // its process group: it must pass the signal on.
        kill(Pid::from_raw(process.id() as i32), signal).unwrap();
        let status = process.wait_timeout(Duration::from_secs(20)).unwrap();
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(code),
            "{signal}: {}",
            process.log().unwrap()
        );
        assert!(panics_in(&process).is_empty(), "{}", process.log().unwrap());
    }
}

#[test]
fn ctrl_c_at_a_terminal_reaches_the_program_once() {
    use std::io::{BufRead, BufReader, Read, Write};
    const TEST: &str = "ctrl_c_at_a_terminal_reaches_the_program_once";
    require_or_skip!(require_root(TEST));
    require_or_skip!(require_program("script", TEST));
    require_or_skip!(require_program("python3", TEST));
    let net = Net::new("exec-tty");
    // In a pseudo-terminal (util-linux `script`), tun2socks exec and the program share
    // the foreground process group: the terminal's Ctrl-C reaches both. The program
    // counts the SIGINTs it takes (blocked, and picked up one by one with
    // sigtimedwait, so that two arriving a moment apart count as two) in three seconds.
    let counter = std::env::temp_dir().join(format!("t2s-exec-count-{}.py", std::process::id()));
    std::fs::write(
        &counter,
        "import signal, time\n\
         signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})\n\
         print('ready', flush=True)\n\
         n = 0\n\
         end = time.time() + 3\n\
         while time.time() < end:\n\
         \x20   if signal.sigtimedwait({signal.SIGINT}, max(0.0, end - time.time())):\n\
         \x20       n += 1\n\
         print('ints=%d' % n, flush=True)\n",
    )
    .unwrap();
    let inner = format!(
        "{} exec --proxy socks5://{} -- python3 {}",
        binary().display(),
        proxy_addr(),
        counter.display()
    );
    let mut child = net
        .topo
        .app()
        .command("script")
        .args(["-qec", &inner, "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("ready") {
        let mut line = String::new();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "no ready: {seen}");
        seen.push_str(&line);
    }
    stdin.write_all(b"\x03").unwrap();
    stdin.flush().unwrap();
    stdout.read_to_string(&mut seen).unwrap();
    drop(stdin);
    let status = child.wait().unwrap();
    let _ = std::fs::remove_file(&counter);
    assert!(seen.contains("ints=1"), "{status}: {seen}");
}

#[test]
fn nothing_is_left_behind() {
    require_or_skip!(require_root("nothing_is_left_behind"));
    let net = Net::new("exec-leftovers");
    let namespaces_before = netns_list();
    let resolv_before = std::fs::read("/etc/resolv.conf").ok();
    let marker = "1234.567";
    // The program leaves a process running in the background and exits.
    let script = format!("sleep {marker} & echo started");
    let child = net
        .exec_command(&binary(), &[], &script)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // `ip netns exec` execs in place: this is the pid of tun2socks itself.
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("started"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while processes_with(marker) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(processes_with(marker), 0, "the background sleep survived");
    assert_eq!(netns_list(), namespaces_before, "a namespace file appeared");
    assert_eq!(std::fs::read("/etc/resolv.conf").ok(), resolv_before);
    let resolver = std::env::temp_dir().join(format!("tun2socks-exec-{pid}.resolv.conf"));
    assert!(!resolver.exists(), "{} left behind", resolver.display());

    // If tun2socks itself is killed (no chance to clean up), the program dies too.
    let marker = "3456.789";
    let script = format!("echo ready; exec sleep {marker}");
    let mut process = net
        .topo
        .app()
        .spawn(net.exec_command(&binary(), &[], &script))
        .unwrap();
    wait_for_line(&process, "ready");
    let deadline = Instant::now() + Duration::from_secs(5);
    while processes_with(marker) == 0 {
        assert!(Instant::now() < deadline, "the program did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    kill(Pid::from_raw(process.id() as i32), Signal::SIGKILL).unwrap();
    let _ = process.wait_timeout(Duration::from_secs(5)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while processes_with(marker) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(processes_with(marker), 0, "the program outlived tun2socks");
}

#[test]
fn exec_as_an_ordinary_user_reaches_the_target_and_returns_its_status() {
    const TEST: &str = "exec_as_an_ordinary_user";
    require_or_skip!(require_root(TEST));
    require_or_skip!(require_program("setpriv", TEST));
    require_or_skip!(require_program("curl", TEST));
    require_or_skip!(user_namespaces_allowed(TEST));
    let net = Net::new("exec-user");
    let mode = TunModeGuard::set(0o666);
    let copy = ExecutableCopy::new();
    let setpriv = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ];
    let script = format!("{} && id -u && exit 5", fetch_script());
    let out = net
        .exec_command(copy.path(), &setpriv, &script)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    assert_fetched(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The program runs as the same ordinary user, not as root of its namespace.
    assert_eq!(
        stdout.lines().last(),
        Some(NOBODY.to_string().as_str()),
        "{}",
        text(&out)
    );

    // DNS inside works for an ordinary user too (dnsmasq in target, --dns-server).
    match require_program("dnsmasq", TEST) {
        Err(skip) if skip_allowed() => eprintln!("SKIPPED the DNS part: {skip}"),
        _ => {
            let _dnsmasq = Dnsmasq::start(net.topo.target(), &default_records()).unwrap();
            dns::assert_getent_inside(net.topo.app(), copy.path(), &setpriv);
        }
    }

    // Installed set-user-ID root, exec must never run the program as root.
    let suid = copy.path().with_file_name("tun2socks-suid");
    std::fs::copy(copy.path(), &suid).unwrap();
    std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).unwrap();
    // (`id` itself, not through sh, which drops a set-user-ID identity on its own.)
    let mut command = net.topo.app().command(setpriv[0]);
    command.args(&setpriv[1..]).arg(&suid);
    command.args(["exec", "--proxy", &format!("socks5://{}", proxy_addr())]);
    let out = command.args(["--", "id", "-u"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.lines().any(|l| l == "0"),
        "ran as root: {}",
        text(&out)
    );
    if out.status.code() == Some(125) {
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("set-user-ID"),
            "{}",
            text(&out)
        );
    }

    // What the program leaves running is killed here too (its processes are ours).
    let marker = "2345.678";
    let script = format!("sleep {marker} & exit 0");
    let out = net
        .exec_command(copy.path(), &setpriv, &script)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let deadline = Instant::now() + Duration::from_secs(5);
    while processes_with(marker) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(processes_with(marker), 0, "the background sleep survived");

    // SIGTERM reaches the program here too.
    let script = "trap 'exit 42' TERM; echo ready; while :; do sleep 0.05; done";
    let mut process = net
        .topo
        .app()
        .spawn(net.exec_command(copy.path(), &setpriv, script))
        .unwrap();
    wait_for_line(&process, "ready");
    kill(Pid::from_raw(process.id() as i32), Signal::SIGTERM).unwrap();
    let status = process.wait_timeout(Duration::from_secs(20)).unwrap();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(42),
        "{}",
        process.log().unwrap()
    );
    net.assert_server_ok();
    let old = mode.old;
    // Restored, but still locked: no other test process changes it while we look.
    let _locked = mode.restore();
    let mode = std::fs::metadata(TunModeGuard::PATH)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(mode, old, "the mode of /dev/net/tun was not restored");

    // Where an ordinary user may not open /dev/net/tun, exec says so and exits 125.
    if mode & 0o006 != 0o006 {
        let out = net
            .exec_command(copy.path(), &setpriv, "exit 0")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(125), "{}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("/dev/net/tun") && stderr.contains("0666"),
            "{stderr}"
        );
    }
}
