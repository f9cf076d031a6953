//! The test topology is what it claims: who reaches whom, what is torn down, what
//! survives a crash. Needs root (skips outside CI without it, fails in CI).
//!
//! All traffic stays among the namespaces' own addresses (and their loopbacks).

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tun2socks::require_or_skip;
use tun2socks::testbed::{
    APP_NET_V4, APP_V4, APP_V6, Namespace, PROXY_OUT_V4, PROXY_V4, PROXY_V6, Process,
    TARGET_NET_V4, TARGET_V4, TARGET_V6, Topology, cleanup_stale, require_root, unique_id,
    wait_for_tcp,
};

const TIMEOUT: Duration = Duration::from_secs(5);

/// Every test starts here: root or skip/fail per the CI rule.
macro_rules! needs_root {
    ($test:literal) => {
        require_or_skip!(require_root($test), Ok(()))
    };
}

fn listen_in(namespace: &Namespace, ip: impl Into<IpAddr>) -> io::Result<TcpListener> {
    let addr = SocketAddr::new(ip.into(), 0);
    namespace.within(move || TcpListener::bind(addr))
}

fn connect_from(namespace: &Namespace, addr: SocketAddr) -> io::Result<TcpStream> {
    namespace.within(move || TcpStream::connect_timeout(&addr, TIMEOUT))
}

/// Connects from `namespace` to `listener`, says hello both ways, and returns the
/// source address the listener saw.
fn round_trip(namespace: &Namespace, listener: &TcpListener) -> Result<SocketAddr> {
    let addr = listener.local_addr()?;
    let mut client = connect_from(namespace, addr).with_context(|| format!("connect to {addr}"))?;
    let (mut server, peer) = listener.accept()?;
    client.set_read_timeout(Some(TIMEOUT))?;
    server.set_read_timeout(Some(TIMEOUT))?;
    client.write_all(b"ping")?;
    let mut buf = [0; 4];
    server.read_exact(&mut buf)?;
    ensure!(&buf == b"ping", "server read {buf:?}");
    server.write_all(b"pong")?;
    client.read_exact(&mut buf)?;
    ensure!(&buf == b"pong", "client read {buf:?}");
    Ok(peer)
}

/// The names `ip netns list` shows.
fn netns_list() -> Result<Vec<String>> {
    let output = Command::new("ip").args(["netns", "list"]).output()?;
    ensure!(output.status.success(), "ip netns list: {output:?}");
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

fn names(topology: &Topology) -> Vec<String> {
    [topology.app(), topology.proxy(), topology.target()]
        .iter()
        .map(|ns| ns.name().to_owned())
        .collect()
}

fn assert_gone(names: &[String]) -> Result<()> {
    let listed = netns_list()?;
    for name in names {
        ensure!(!listed.contains(name), "{name} still in `ip netns list`");
        ensure!(
            !Path::new("/run/netns").join(name).exists(),
            "/run/netns/{name}"
        );
        ensure!(
            !Path::new("/etc/netns").join(name).exists(),
            "/etc/netns/{name}"
        );
    }
    Ok(())
}

/// Waits until `pid` runs inside `namespace`: `ip netns exec` enters the namespace,
/// then execs the program in place.
fn wait_until_inside(namespace: &Namespace, pid: u32) -> Result<()> {
    let deadline = Instant::now() + TIMEOUT;
    while !namespace.pids()?.contains(&pid) {
        ensure!(
            Instant::now() < deadline,
            "{pid} never entered {}",
            namespace.name()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Whether `pid` exists and is not a zombie.
fn is_alive(pid: u32) -> bool {
    !tun2socks::testbed::namespace::has_exited(pid)
}

#[test]
fn app_reaches_proxy_over_tcp_v4_and_v6() -> Result<()> {
    needs_root!("app_reaches_proxy_over_tcp_v4_and_v6");
    let topology = Topology::create("reach")?;
    for (proxy, app) in [
        (IpAddr::from(PROXY_V4), IpAddr::from(APP_V4)),
        (PROXY_V6.into(), APP_V6.into()),
    ] {
        let listener = listen_in(topology.proxy(), proxy)?;
        let peer = round_trip(topology.app(), &listener)?;
        ensure!(peer.ip() == app, "proxy saw {peer}, expected {app}");
    }
    Ok(())
}

#[test]
fn app_cannot_reach_target_by_default() -> Result<()> {
    needs_root!("app_cannot_reach_target_by_default");
    let topology = Topology::create("noroute")?;
    for target in [IpAddr::from(TARGET_V4), TARGET_V6.into()] {
        let listener = listen_in(topology.target(), target)?;
        let addr = listener.local_addr()?;
        match connect_from(topology.app(), addr) {
            Err(e) if e.kind() == io::ErrorKind::NetworkUnreachable => {}
            other => bail!("app -> {addr}: expected network unreachable, got {other:?}"),
        }
        // The target listens and its link works: the proxy reaches it directly.
        round_trip(topology.proxy(), &listener)?;
    }
    Ok(())
}

#[test]
fn proxy_does_not_forward_even_with_a_route() -> Result<()> {
    needs_root!("proxy_does_not_forward_even_with_a_route");
    let topology = Topology::create("nofwd")?;
    let (target_net, proxy) = (TARGET_NET_V4.to_string(), PROXY_V4.to_string());
    let (app_net, proxy_out) = (APP_NET_V4.to_string(), PROXY_OUT_V4.to_string());
    topology
        .app()
        .ip(["route", "add", &target_net, "via", &proxy])?;
    topology
        .target()
        .ip(["route", "add", &app_net, "via", &proxy_out])?;
    let listener = listen_in(topology.target(), TARGET_V4)?;
    let addr = listener.local_addr()?;
    let attempt = topology
        .app()
        .within(move || TcpStream::connect_timeout(&addr, Duration::from_millis(500)));
    ensure!(
        attempt.is_err(),
        "app reached {addr} through a non-forwarding proxy"
    );
    Ok(())
}

#[test]
fn kernel_path_reaches_target_v4_and_v6() -> Result<()> {
    needs_root!("kernel_path_reaches_target_v4_and_v6");
    let topology = Topology::create("kernel")?;
    topology.enable_kernel_path()?;
    for (target, app) in [
        (IpAddr::from(TARGET_V4), IpAddr::from(APP_V4)),
        (TARGET_V6.into(), APP_V6.into()),
    ] {
        let listener = listen_in(topology.target(), target)?;
        let peer = round_trip(topology.app(), &listener)?;
        ensure!(
            peer.ip() == app,
            "target saw {peer}: routed, not proxied, expected {app}"
        );
    }
    Ok(())
}

#[test]
fn topologies_side_by_side_are_isolated() -> Result<()> {
    needs_root!("topologies_side_by_side_are_isolated");
    let one = Topology::create("iso")?;
    let two = Topology::create("iso")?;
    let all: Vec<String> = names(&one).into_iter().chain(names(&two)).collect();
    let mut unique = all.clone();
    unique.sort();
    unique.dedup();
    ensure!(unique.len() == 6, "names collide: {all:?}");
    let listener = listen_in(one.proxy(), PROXY_V4)?;
    let addr = listener.local_addr()?;
    match connect_from(two.app(), addr) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
        other => bail!("second app -> first proxy's {addr}: expected refused, got {other:?}"),
    }
    round_trip(one.app(), &listener)?;
    Ok(())
}

#[test]
fn dropped_topology_removes_its_namespaces() -> Result<()> {
    needs_root!("dropped_topology_removes_its_namespaces");
    let topology = Topology::create("drop")?;
    topology
        .target()
        .set_hosts(&[("t2s-drop.test", TARGET_V4.into())])?;
    let names = names(&topology);
    let listed = netns_list()?;
    for name in &names {
        ensure!(listed.contains(name), "{name} missing from {listed:?}");
    }
    ensure!(Path::new("/etc/netns").join(&names[2]).exists());
    drop(topology);
    assert_gone(&names)
}

#[test]
fn drop_kills_processes_left_inside() -> Result<()> {
    needs_root!("drop_kills_processes_left_inside");
    let topology = Topology::create("leftover")?;
    // Not a Process guard: something a test forgot about.
    let mut child = topology.target().command("sleep").arg("1000").spawn()?;
    wait_until_inside(topology.target(), child.id())?;
    let names = names(&topology);
    drop(topology);
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            child.kill()?;
            child.wait()?;
            bail!("sleep survived the namespace's deletion");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    ensure!(status.signal() == Some(9), "sleep ended with {status}");
    assert_gone(&names)
}

#[test]
fn panic_in_test_body_still_removes_namespaces() -> Result<()> {
    needs_root!("panic_in_test_body_still_removes_namespaces");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let inside = Arc::clone(&seen);
    let outcome = std::panic::catch_unwind(move || {
        let topology = Topology::create("panic").unwrap_or_else(|e| panic!("create: {e}"));
        if let Ok(mut seen) = inside.lock() {
            *seen = names(&topology);
        }
        panic!("a failing test body");
    });
    ensure!(outcome.is_err(), "the body did not panic");
    let names = seen
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    ensure!(names.len() == 3, "topology never created: {names:?}");
    assert_gone(&names)
}

#[test]
fn cleanup_stale_removes_dead_runs_only() -> Result<()> {
    needs_root!("cleanup_stale_removes_dead_runs_only");
    // A crashed run's leftovers, made by hand: the pid is above any pid_max (at most
    // 2^22), so never alive. The tag holds our pid, so parallel runs fake different
    // names; another run's cleanup may remove ours first, which is fine.
    let tag = format!("fake{}", std::process::id());
    let dead = format!("t2s-{tag}-999999999-{}-app", unique_id());
    let added = Command::new("ip").args(["netns", "add", &dead]).status()?;
    ensure!(added.success(), "ip netns add {dead}: {added}");
    std::fs::create_dir_all(Path::new("/etc/netns").join(&dead))?;
    let holder = Process::spawn(
        {
            let mut sleep = Command::new("sleep");
            sleep.arg("1000");
            sleep
        },
        Process::log_dir().join(format!("stale-holder-{}.log", unique_id())),
    )?;
    let live = Namespace::create(format!("t2s-{tag}-{}-{}-app", holder.id(), unique_id()))?;
    let removed = cleanup_stale()?;
    ensure!(
        !removed.contains(&live.name().to_owned()),
        "removed {removed:?}"
    );
    let listed = netns_list()?;
    ensure!(
        listed.contains(&live.name().to_owned()),
        "live run's namespace removed"
    );
    assert_gone(&[dead])?;
    // Once its process is gone, the same namespace is stale.
    holder.stop()?;
    cleanup_stale()?;
    assert_gone(&[live.name().to_owned()])
}

#[test]
fn process_guard_kills_its_child_on_drop() -> Result<()> {
    needs_root!("process_guard_kills_its_child_on_drop");
    let topology = Topology::create("proc")?;
    let app = topology.app();
    let mut command = app.command("sleep");
    command.arg("1000");
    let process = app.spawn(command)?;
    let pid = process.id();
    ensure!(is_alive(pid), "sleep did not start");
    wait_until_inside(app, pid)?;
    ensure!(
        !topology.proxy().pids()?.contains(&pid),
        "sleep is inside the proxy ns"
    );
    drop(process);
    ensure!(!is_alive(pid), "sleep {pid} survived its guard");
    Ok(())
}

#[test]
fn process_log_captures_stdout_and_stderr() -> Result<()> {
    needs_root!("process_log_captures_stdout_and_stderr");
    let topology = Topology::create("log")?;
    let mut command = topology.proxy().command("sh");
    command.args(["-c", "echo to-stdout; echo to-stderr >&2; exec sleep 1000"]);
    let process = topology.proxy().spawn(command)?;
    let deadline = Instant::now() + TIMEOUT;
    let log = loop {
        let log = process.log()?;
        if log.contains("to-stdout") && log.contains("to-stderr") || Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    ensure!(
        log.contains("to-stdout") && log.contains("to-stderr"),
        "log: {log:?}"
    );
    let path = process.log_path().to_owned();
    let status = process.stop()?;
    ensure!(
        status.signal() == Some(15),
        "sleep ended with {status}, not SIGTERM"
    );
    ensure!(!path.exists(), "log {} left behind", path.display());
    Ok(())
}

#[test]
fn process_that_ignores_sigterm_gets_sigkill() -> Result<()> {
    needs_root!("process_that_ignores_sigterm_gets_sigkill");
    let topology = Topology::create("stubborn")?;
    let mut command = topology.app().command("sh");
    command.args([
        "-c",
        "trap '' TERM; echo ready; while :; do sleep 0.05; done",
    ]);
    let process = topology.app().spawn(command)?;
    let deadline = Instant::now() + TIMEOUT;
    while !process.log()?.contains("ready") {
        ensure!(Instant::now() < deadline, "shell never got ready");
        std::thread::sleep(Duration::from_millis(10));
    }
    let status = process.stop()?;
    ensure!(
        status.signal() == Some(9),
        "shell ended with {status}, not SIGKILL"
    );
    Ok(())
}

#[test]
fn hosts_resolve_in_one_namespace_only() -> Result<()> {
    needs_root!("hosts_resolve_in_one_namespace_only");
    let topology = Topology::create("hosts")?;
    let name = "t2s-only-in-target.test";
    let loopback = [IpAddr::from(Ipv4Addr::LOCALHOST)];
    // Lookups that miss the hosts file stay on each namespace's own loopback.
    for ns in [topology.app(), topology.proxy(), topology.target()] {
        ns.set_resolv_conf(&loopback)?;
    }
    topology.target().set_hosts(&[(name, TARGET_V4.into())])?;
    let found = topology.target().run("getent", ["hosts", name])?;
    let found = String::from_utf8_lossy(&found.stdout);
    ensure!(
        found.contains("198.19.2.2"),
        "target resolved {name} to {found:?}"
    );
    for ns in [topology.app(), topology.proxy()] {
        let output = ns.command("getent").args(["hosts", name]).output()?;
        ensure!(
            !output.status.success(),
            "{} resolved {name}: {}",
            ns.name(),
            String::from_utf8_lossy(&output.stdout)
        );
    }
    let root = Command::new("getent")
        .args(["ahostsv4", "localhost"])
        .output()?;
    ensure!(root.status.success(), "the root namespace lost localhost");
    Ok(())
}

#[test]
fn wait_for_tcp_sees_async_server_in_its_namespace_only() -> Result<()> {
    needs_root!("wait_for_tcp_sees_async_server_in_its_namespace_only");
    let topology = Topology::create("wait")?;
    let addr = SocketAddr::new(TARGET_V6.into(), 7001);
    let server = topology.target().enter_async(move || async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let (mut stream, _) = listener.accept().await?;
        tokio::io::AsyncWriteExt::write_all(&mut stream, b"hi").await?;
        Ok(())
    });
    wait_for_tcp(topology.target(), addr, TIMEOUT)?;
    match wait_for_tcp(topology.proxy(), addr, Duration::from_millis(200)) {
        Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
        other => bail!("proxy namespace saw the target's listener: {other:?}"),
    }
    let mut client = connect_from(topology.proxy(), addr)?;
    let mut buf = [0; 2];
    client.set_read_timeout(Some(TIMEOUT))?;
    client.read_exact(&mut buf)?;
    ensure!(&buf == b"hi");
    server
        .join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    Ok(())
}

#[test]
fn set_mtu_reaches_every_veth_end() -> Result<()> {
    needs_root!("set_mtu_reaches_every_veth_end");
    let topology = Topology::create("mtu")?;
    topology.set_mtu(9000)?;
    for ns in [topology.app(), topology.proxy(), topology.target()] {
        let links = ns.ip(["-o", "link", "show", "type", "veth"])?;
        let links = String::from_utf8_lossy(&links.stdout);
        ensure!(!links.is_empty(), "{} has no veth", ns.name());
        for line in links.lines() {
            ensure!(line.contains("mtu 9000"), "{}: {line}", ns.name());
        }
    }
    let listener = listen_in(topology.proxy(), PROXY_V4)?;
    round_trip(topology.app(), &listener)?;
    Ok(())
}

#[test]
fn sysctls_stay_inside_their_namespace() -> Result<()> {
    needs_root!("sysctls_stay_inside_their_namespace");
    let read = |ns: &Namespace, key: &str| -> Result<String> {
        let output = ns.run("cat", [format!("/proc/sys/{key}")])?;
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    };
    let root_before = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")?;
    let topology = Topology::create("sysctl")?;
    for ns in [topology.app(), topology.proxy(), topology.target()] {
        for key in ["all", "default"] {
            let key = format!("net/ipv6/conf/{key}/accept_dad");
            ensure!(read(ns, &key)? == "0", "{}: {key} is not 0", ns.name());
        }
    }
    ensure!(read(topology.proxy(), "net/ipv4/ip_forward")? == "0");
    topology.enable_kernel_path()?;
    ensure!(read(topology.proxy(), "net/ipv4/ip_forward")? == "1");
    ensure!(read(topology.proxy(), "net/ipv6/conf/all/forwarding")? == "1");
    ensure!(read(topology.app(), "net/ipv4/ip_forward")? == "0");
    let root_after = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")?;
    ensure!(
        root_before == root_after,
        "the root namespace's ip_forward changed"
    );
    Ok(())
}

/// Set by [`crashed_run_is_cleaned_by_the_next`] for the child run it crashes.
const CRASH_ENV: &str = "T2S_TESTBED_CRASH_HELPER";

/// Does nothing unless run as the crashing child of
/// [`crashed_run_is_cleaned_by_the_next`]: then it builds a topology, leaves a process
/// in it, prints their names and aborts, so no guard runs.
#[test]
fn crash_helper() {
    if std::env::var_os(CRASH_ENV).is_none() {
        return;
    }
    let outcome = Topology::create("crash").and_then(|topology| {
        let sleep = topology.target().command("sleep").arg("1000").spawn()?;
        wait_until_inside(topology.target(), sleep.id()).map_err(io::Error::other)?;
        // The harness printed "test crash_helper ... " without a newline.
        println!("\npid {}", sleep.id());
        for name in names(&topology) {
            println!("namespace {name}");
        }
        Ok(())
    });
    println!("outcome {outcome:?}");
    std::process::abort();
}

#[test]
fn crashed_run_is_cleaned_by_the_next() -> Result<()> {
    needs_root!("crashed_run_is_cleaned_by_the_next");
    let output = Command::new(std::env::current_exe()?)
        .args(["--exact", "crash_helper", "--nocapture", "--test-threads=1"])
        .env(CRASH_ENV, "1")
        .output()?;
    ensure!(!output.status.success(), "the helper did not crash");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let names: Vec<String> = stdout
        .lines()
        .filter_map(|line| line.strip_prefix("namespace "))
        .map(str::to_owned)
        .collect();
    let pid: u32 = stdout
        .lines()
        .find_map(|line| line.strip_prefix("pid "))
        .context(format!("no pid from the helper: {stdout}"))?
        .parse()?;
    ensure!(names.len() == 3, "helper output: {stdout}");
    // Another run's cleanup may already have removed some; none may be missing
    // after ours.
    cleanup_stale()?;
    assert_gone(&names)?;
    let deadline = Instant::now() + TIMEOUT;
    while is_alive(pid) {
        ensure!(
            Instant::now() < deadline,
            "the crashed run's sleep {pid} survived"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

const BIG_EXIT_ENV: &str = "T2S_TESTBED_BIG_EXIT_HELPER";

/// Does nothing unless run as the child of
/// [`a_deleted_namespace_waits_for_its_processes_to_finish_exiting`]: then it holds
/// 2 GiB of written memory (which takes tens of milliseconds to free once killed),
/// says so and sleeps.
#[test]
fn big_exit_helper() {
    if std::env::var_os(BIG_EXIT_ENV).is_none() {
        return;
    }
    let memory = vec![1u8; 2 << 30];
    // The harness printed "test big_exit_helper ... " without a newline.
    println!("\nready {}", memory.len());
    std::thread::sleep(Duration::from_secs(1000));
}

/// A namespace's deletion returns only once what it killed has finished exiting, so
/// whoever deletes it (a selftest stopped by a signal, a test's guard) leaves
/// nothing running behind it. A process holding 2 GiB took 60 ms to exit after
/// SIGKILL here; deleting the namespace takes a few.
#[test]
fn a_deleted_namespace_waits_for_its_processes_to_finish_exiting() -> Result<()> {
    needs_root!("a_deleted_namespace_waits_for_its_processes_to_finish_exiting");
    let namespace = Namespace::create("bigexit")?;
    let mut child = namespace
        .command(std::env::current_exe()?)
        .args([
            "--exact",
            "big_exit_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(BIG_EXIT_ENV, "1")
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let mut stdout = child.stdout.take().context("stdout")?;
    let mut seen = String::new();
    let mut buf = [0u8; 256];
    while !seen.contains("ready") {
        let n = stdout.read(&mut buf)?;
        ensure!(n > 0, "helper ended before it was ready: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    namespace.delete()?;
    let exited = !is_alive(pid);
    let status = child.wait()?;
    ensure!(
        exited,
        "the helper was still exiting when the deletion returned"
    );
    ensure!(status.signal() == Some(9), "helper ended with {status}");
    Ok(())
}
