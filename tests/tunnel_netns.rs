//! The tunnel end to end, in the three-namespace topology of DESIGN.md: the tunnel
//! in `app` (its TUN the default route), a SOCKS server in `proxy` (ours, or Dante),
//! test services in `target`. `app` has no other route to `target`, so every byte
//! that arrives went through the tunnel and the proxy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tun2socks::require_or_skip;
use tun2socks::testbed::namespace::join;
use tun2socks::testbed::services::{
    ECHO_PORT, Services, UPLOAD_PORT, blob, echo_round_trip, sha256_hex, upload_sha256,
};
use tun2socks::testbed::topology::{PROXY_OUT_V6, PROXY_V4, TARGET_V4, TARGET_V6};
use tun2socks::testbed::tunnel::{
    PROXY_PORT, TUN_NAME, link_is_up, panics_in, proxy_addr, start_server, start_tunnel,
};
use tun2socks::testbed::{Namespace, Process, Topology, require_program, require_root};

const MIB: usize = 1024 * 1024;
const BLOB: usize = 64 * MIB;
const SEED: u64 = 64;

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tun2socks"))
}

/// A topology with services in `target`, a proxy in `proxy` and the tunnel in `app`.
/// Fields drop in order: processes and services first, the namespaces last.
struct Net {
    tunnel: Option<Process>,
    server: Option<Process>,
    _services: Services,
    topo: Topology,
}

impl Net {
    /// Our server with `server_args`, the tunnel with `url` and `tunnel_args`.
    fn ours(tag: &str, server_args: &[&str], url: &str, tunnel_args: &[&str]) -> Net {
        let topo = Topology::create(tag).unwrap();
        let services = Services::start(topo.target(), BLOB, SEED).unwrap();
        let server = start_server(topo.proxy(), &binary(), server_args).unwrap();
        let tunnel = start_tunnel(topo.app(), &binary(), url, tunnel_args).unwrap();
        Net {
            tunnel: Some(tunnel),
            server: Some(server),
            _services: services,
            topo,
        }
    }

    fn app(&self) -> &Namespace {
        self.topo.app()
    }

    /// Fails the test if the tunnel or the server logged a panic.
    fn assert_no_panics(&self) {
        for p in self.tunnel.iter().chain(self.server.iter()) {
            let panics = panics_in(p);
            assert!(panics.is_empty(), "{}: {panics:?}", p.command_line());
        }
    }
}

fn socks5_url() -> String {
    format!("socks5://{}", proxy_addr())
}

/// Runs an async client inside `ns` and returns its result.
fn in_ns<F, Fut, T>(ns: &Namespace, f: F) -> io::Result<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = io::Result<T>>,
    T: Send + 'static,
{
    join(ns.enter_async(f))
}

/// curl (an unmodified application) fetches the blob; returns its SHA-256.
fn curl_sha(ns: &Namespace, host: &str) -> String {
    tun2socks::testbed::services::curl_blob_sha256(ns, host, None, 120).unwrap_or_default()
}

/// Uploads `len` bytes, half-closes, returns the SHA-256 the target answers.
async fn upload(dst: SocketAddr, len: usize) -> io::Result<String> {
    upload_sha256(dst, &blob(len, 99)).await
}

/// Connects through the tunnel; returns how it went and how long it took.
async fn try_connect(dst: SocketAddr) -> (io::Result<TcpStream>, Duration) {
    let started = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(dst))
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "no answer in 10 s")));
    (r, started.elapsed())
}

/// Echoes a short message through a connection, proving it carries data.
async fn echo_once(dst: SocketAddr) -> io::Result<()> {
    let mut s = TcpStream::connect(dst).await?;
    s.write_all(b"ping through the tunnel").await?;
    let mut back = [0u8; 23];
    s.read_exact(&mut back).await?;
    assert_eq!(&back, b"ping through the tunnel");
    Ok(())
}

fn target(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

macro_rules! root_test {
    ($name:literal) => {
        require_or_skip!(require_root($name));
        require_or_skip!(require_program("curl", $name));
    };
}

#[test]
fn http_download_64mib_over_ipv4_and_ipv6() {
    root_test!("http_download_64mib_over_ipv4_and_ipv6");
    let net = Net::ours("dl", &[], &socks5_url(), &[]);
    // A created device gets the documented defaults.
    let link = net
        .app()
        .ip(["-o", "link", "show", "dev", TUN_NAME])
        .unwrap();
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(
        link.contains("mtu 65000") && link.contains("qlen 10000"),
        "{link}"
    );
    let addrs = net
        .app()
        .ip(["-o", "addr", "show", "dev", TUN_NAME])
        .unwrap();
    let addrs = String::from_utf8_lossy(&addrs.stdout);
    assert!(
        addrs.contains("198.18.0.1/16") && addrs.contains("fd18::1/64"),
        "{addrs}"
    );
    let expected = sha256_hex(&blob(BLOB, SEED));
    assert_eq!(
        curl_sha(net.app(), &TARGET_V4.to_string()),
        expected,
        "IPv4"
    );
    assert_eq!(
        curl_sha(net.app(), &format!("[{TARGET_V6}]")),
        expected,
        "IPv6"
    );
    net.assert_no_panics();
}

#[test]
fn upload_64mib_answered_after_half_close() {
    root_test!("upload_64mib_answered_after_half_close");
    let net = Net::ours("ul", &[], &socks5_url(), &[]);
    let expected = sha256_hex(&blob(BLOB, 99));
    let v4 = in_ns(net.app(), || upload(target(TARGET_V4, UPLOAD_PORT), BLOB)).unwrap();
    assert_eq!(v4, expected, "IPv4 upload");
    let v6 = in_ns(net.app(), || {
        upload(target(TARGET_V6, UPLOAD_PORT), 8 * MIB)
    })
    .unwrap();
    assert_eq!(v6, sha256_hex(&blob(8 * MIB, 99)), "IPv6 upload");
    net.assert_no_panics();
}

#[test]
fn five_hundred_concurrent_flows() {
    root_test!("five_hundred_concurrent_flows");
    let net = Net::ours("many", &[], &socks5_url(), &[]);
    let done = in_ns(net.app(), || async {
        const FLOWS: usize = 500;
        // All connections are open before any data moves: 500 flows at once.
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(FLOWS));
        let mut tasks = Vec::new();
        for i in 0..FLOWS {
            let barrier = barrier.clone();
            let dst = if i % 2 == 0 {
                target(TARGET_V4, ECHO_PORT)
            } else {
                target(TARGET_V6, ECHO_PORT)
            };
            tasks.push(tokio::spawn(async move {
                let mut s = TcpStream::connect(dst).await?;
                barrier.wait().await;
                let data = blob(32 * 1024, i as u64);
                let back = echo_round_trip(&mut s, &data).await?;
                assert!(back == data, "flow {i}: echo differs");
                Ok::<_, io::Error>(())
            }));
        }
        let mut ok = 0;
        for t in tasks {
            t.await.map_err(io::Error::other)??;
            ok += 1;
        }
        Ok(ok)
    })
    .unwrap();
    assert_eq!(done, 500);
    net.assert_no_panics();
}

#[test]
fn socks5_username_password_upstream() {
    root_test!("socks5_username_password_upstream");
    let url = format!("socks5://alice:s%40cret@{}", proxy_addr());
    let net = Net::ours("auth", &["--user", "alice:s@cret"], &url, &[]);
    in_ns(net.app(), || echo_once(target(TARGET_V4, ECHO_PORT))).unwrap();
    in_ns(net.app(), || echo_once(target(TARGET_V6, ECHO_PORT))).unwrap();
    net.assert_no_panics();

    // The wrong password: every connection is refused, at once.
    let wrong = format!("socks5://alice:nope@{}", proxy_addr());
    let net = Net::ours("authbad", &["--user", "alice:s@cret"], &wrong, &[]);
    let (r, took) = in_ns(net.app(), || async {
        Ok(try_connect(target(TARGET_V4, ECHO_PORT)).await)
    })
    .unwrap();
    assert_eq!(r.unwrap_err().kind(), io::ErrorKind::ConnectionRefused);
    assert!(took < Duration::from_secs(1), "{took:?}");
}

#[test]
fn socks4_and_socks4a_upstream() {
    root_test!("socks4_and_socks4a_upstream");
    let url = format!("socks4://someone@{}", proxy_addr());
    let net = Net::ours("s4", &[], &url, &[]);
    assert_eq!(
        curl_sha(net.app(), &TARGET_V4.to_string()),
        sha256_hex(&blob(BLOB, SEED))
    );
    // SOCKS4 cannot carry IPv6: reset, with the reason in the log.
    let (r, _) = in_ns(net.app(), || async {
        Ok(try_connect(target(TARGET_V6, ECHO_PORT)).await)
    })
    .unwrap();
    assert_eq!(r.unwrap_err().kind(), io::ErrorKind::ConnectionRefused);
    net.assert_no_panics();

    let url = format!("socks4a://{}", proxy_addr());
    let net = Net::ours("s4a", &[], &url, &[]);
    in_ns(net.app(), || echo_once(target(TARGET_V4, ECHO_PORT))).unwrap();
    net.assert_no_panics();
}

#[test]
fn proxy_down_means_connection_refused_within_a_second() {
    root_test!("proxy_down_means_connection_refused_within_a_second");
    // Nothing listens on the proxy's port 1081.
    let url = format!("socks5://{PROXY_V4}:{}", PROXY_PORT + 1);
    let net = Net::ours("down", &[], &url, &[]);
    for dst in [target(TARGET_V4, ECHO_PORT), target(TARGET_V6, ECHO_PORT)] {
        let (r, took) =
            in_ns(net.app(), move || async move { Ok(try_connect(dst).await) }).unwrap();
        assert_eq!(
            r.unwrap_err().kind(),
            io::ErrorKind::ConnectionRefused,
            "{dst}"
        );
        assert!(took < Duration::from_secs(1), "{dst}: {took:?}");
    }
    net.assert_no_panics();
}

/// A SOCKS5 error reply reaches the application as the kernel's own path would
/// report the same failure: an ICMP error for its SYN where the reply says why
/// (0x02 not allowed: "administratively prohibited"; 0x03: network unreachable;
/// 0x04: host unreachable), a reset where it does not (0x05, refused), each at once.
#[test]
fn socks_error_replies_reach_the_application_as_the_kernel_reports_them() {
    root_test!("socks_error_replies_reach_the_application_as_the_kernel_reports_them");
    // The v4 target, and the proxy's own v6 address on the target link.
    let deny = [format!("{TARGET_V4}/32"), format!("{PROXY_OUT_V6}/128")];
    let net = Net::ours(
        "deny",
        &["--deny", &deny[0], "--deny", &deny[1]],
        &socks5_url(),
        &[],
    );
    // Host unreachable at the proxy: an "unreachable" route answers its connect with
    // EHOSTUNREACH at once. Network unreachable: the proxy has no route at all.
    let proxy = net.topo.proxy();
    proxy
        .ip(["route", "add", "unreachable", "198.19.4.0/24"])
        .unwrap();
    proxy
        .ip(["-6", "route", "add", "unreachable", "fd19:4::/64"])
        .unwrap();
    let v6 = |s: &str| -> IpAddr { s.parse().unwrap() };
    let cases = [
        // 0x02: EHOSTUNREACH (ICMP 3/13) over IPv4, EACCES (ICMPv6 1/1) over IPv6.
        (target(TARGET_V4, ECHO_PORT), io::ErrorKind::HostUnreachable),
        (
            target(PROXY_OUT_V6, ECHO_PORT),
            io::ErrorKind::PermissionDenied,
        ),
        (
            target(v6("198.19.3.3"), 80),
            io::ErrorKind::NetworkUnreachable,
        ),
        (
            target(v6("fd19:3::3"), 80),
            io::ErrorKind::NetworkUnreachable,
        ),
        (target(v6("198.19.4.4"), 80), io::ErrorKind::HostUnreachable),
        (target(v6("fd19:4::4"), 80), io::ErrorKind::HostUnreachable),
    ];
    for (dst, expected) in cases {
        let (r, took) =
            in_ns(net.app(), move || async move { Ok(try_connect(dst).await) }).unwrap();
        assert_eq!(r.map(|_| ()).unwrap_err().kind(), expected, "{dst}");
        assert!(took < Duration::from_secs(1), "{dst}: {took:?}");
    }
    // 0x05: a reset, as the destination's own stack sends it (nothing listens on
    // port 9).
    let closed = target(TARGET_V6, 9);
    let (r, took) = in_ns(
        net.app(),
        move || async move { Ok(try_connect(closed).await) },
    )
    .unwrap();
    assert_eq!(
        r.map(|_| ()).unwrap_err().kind(),
        io::ErrorKind::ConnectionRefused
    );
    assert!(took < Duration::from_secs(1), "{took:?}");
    // Only the denied destinations are refused.
    in_ns(net.app(), || echo_once(target(TARGET_V6, ECHO_PORT))).unwrap();
    net.assert_no_panics();
}

#[test]
fn sigterm_stops_the_tunnel_within_a_second_and_removes_the_device() {
    root_test!("sigterm_stops_the_tunnel_within_a_second_and_removes_the_device");
    let mut net = Net::ours("term", &[], &socks5_url(), &[]);
    // An open connection must not hold the exit up.
    let (open_tx, open_rx) = std::sync::mpsc::channel::<()>();
    let (close_tx, close_rx) = tokio::sync::oneshot::channel::<()>();
    let holder = net.app().enter_async(move || async move {
        let _s = TcpStream::connect(target(TARGET_V4, ECHO_PORT)).await?;
        let _ = open_tx.send(());
        let _ = close_rx.await;
        Ok(())
    });
    open_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let tunnel = net.tunnel.take().unwrap();
    let pid = nix::unistd::Pid::from_raw(tunnel.id() as i32);
    let started = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let mut tunnel = tunnel;
    let status = tunnel.wait_timeout(Duration::from_secs(3)).unwrap();
    let took = started.elapsed();
    let log = tunnel.log().unwrap_or_default();
    assert_eq!(
        status.map(|s| s.code()),
        Some(Some(0)),
        "exit status; log:\n{log}"
    );
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert!(!log.contains("panicked"), "{log}");
    assert!(
        !link_is_up(net.app(), TUN_NAME),
        "device still up after exit"
    );
    let _ = close_tx.send(());
    let _ = join(holder);
}

#[test]
fn a_hangup_stops_the_tunnel_unless_started_under_nohup() {
    root_test!("a_hangup_stops_the_tunnel_unless_started_under_nohup");
    let net = Net::ours("hup", &[], &socks5_url(), &[]);
    let run = |nohup: bool, signal: nix::sys::signal::Signal| {
        let mut cmd = net.app().command(if nohup { "nohup" } else { "env" });
        if !nohup {
            // Plainly started means at the default action, whatever this test
            // inherited (it may itself run under nohup).
            cmd.arg("--default-signal=HUP,QUIT");
        }
        cmd.arg(binary())
            .args(["--proxy", &socks5_url(), "--device", "t2shup"]);
        let mut tunnel = net.app().spawn(cmd).unwrap();
        let started = Instant::now();
        while !tunnel.log().unwrap_or_default().contains("tunnel running") {
            assert!(started.elapsed() < Duration::from_secs(10), "never ran");
            std::thread::sleep(Duration::from_millis(20));
        }
        let pid = nix::unistd::Pid::from_raw(tunnel.id() as i32);
        nix::sys::signal::kill(pid, signal).unwrap();
        let status = tunnel.wait_timeout(Duration::from_millis(1500)).unwrap();
        (tunnel, status)
    };
    // Plainly started: a hang-up is a clean stop (exit 0, the device removed), and
    // so is SIGQUIT (Ctrl-\), whose default action dumps core.
    for signal in [
        nix::sys::signal::Signal::SIGHUP,
        nix::sys::signal::Signal::SIGQUIT,
    ] {
        let (tunnel, status) = run(false, signal);
        let log = tunnel.log().unwrap_or_default();
        assert_eq!(status.map(|s| s.code()), Some(Some(0)), "{signal}: {log}");
        assert!(log.contains(signal.as_str()), "{log}");
        assert!(
            !link_is_up(net.app(), "t2shup"),
            "device still up after exit"
        );
    }
    // Under nohup SIGHUP stays ignored: the tunnel runs on, and stops on SIGTERM.
    let (mut tunnel, status) = run(true, nix::sys::signal::Signal::SIGHUP);
    assert!(
        status.is_none(),
        "{status:?}: {}",
        tunnel.log().unwrap_or_default()
    );
    let status = tunnel.terminate().unwrap();
    assert!(
        status.success(),
        "{status}: {}",
        tunnel.log().unwrap_or_default()
    );
}

/// Runs the binary with `args` in `ns` to its exit and returns its exit code and
/// stderr (killed after 10 s, exit 124: a tunnel that started where it should have
/// refused fails the test instead of hanging it).
fn run_binary(ns: &Namespace, args: &[&str]) -> (Option<i32>, String) {
    let out = ns
        .command("timeout")
        .arg("10")
        .arg(binary())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn clear_errors_with_distinct_exit_codes() {
    root_test!("clear_errors_with_distinct_exit_codes");
    let net = Net::ours("exits", &[], &socks5_url(), &[]);
    let ns = net.app();

    let (code, err) = run_binary(ns, &["--proxy", "http://127.0.0.1:1", "--device", "t2sx"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("unknown scheme"), "{err}");

    // A zero timeout or limit, first buffers larger than the largest, and the device
    // itself as the DNS server are usage errors (they used to be bent to 1 s, 1 flow,
    // the largest buffer, silently; the DNS server, to queries that time out).
    let proxy = socks5_url();
    for (extra, says) in [
        (&["--connect-timeout", "0"][..], "--connect-timeout"),
        (&["--max-flows", "0"], "--max-flows"),
        (
            &["--tcp-buffer-initial", "1024"],
            "--tcp-buffer-initial 1024 KiB is larger",
        ),
        (
            &["--tcp-buffer", "64", "--tcp-buffer-initial", "128"],
            "larger than --tcp-buffer 64 KiB",
        ),
        (
            &["--dns-server", "198.18.0.1"],
            "198.18.0.1 is an address of the TUN device itself",
        ),
    ] {
        let mut args = vec!["--proxy", proxy.as_str(), "--device", "t2sx"];
        args.extend_from_slice(extra);
        let (code, err) = run_binary(ns, &args);
        assert_eq!(code, Some(2), "{extra:?}: {err}");
        assert!(err.contains(says), "{extra:?}: {err}");
    }
    // A log level that is no level used to log nothing at all (the filter syntax
    // took it for a module name); tunnel options beside a subcommand are refused,
    // while the global --log-level before a subcommand is taken.
    for (args, says) in [
        (
            &["--proxy", proxy.as_str(), "--log-level", "verbose"][..],
            "\"verbose\" is not a log level",
        ),
        (
            &[
                "--proxy",
                proxy.as_str(),
                "server",
                "--listen",
                "127.0.0.1:1",
            ],
            "the subcommand 'server' cannot be used with '--proxy'",
        ),
        (
            &["--setup", "exec", "--proxy", proxy.as_str(), "--", "true"],
            "the subcommand 'exec' cannot be used with '--setup'",
        ),
    ] {
        let (code, err) = run_binary(ns, args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let (code, out) = run_binary(ns, &["--log-level", "debug", "server", "--help"]);
    assert_eq!(code, Some(0), "{out}");
    for option in [
        "--handshake-timeout",
        "--connect-timeout",
        "--bind-timeout",
        "--udp-timeout",
    ] {
        let (code, err) = run_binary(ns, &["server", "--listen", "127.0.0.1:1", option, "0"]);
        assert_eq!(code, Some(2), "server {option} 0: {err}");
        assert!(err.contains(option), "server {option} 0: {err}");
    }
    // A BIND address the host does not have: refused at start, not at the first BIND.
    let (code, err) = run_binary(
        ns,
        &[
            "server",
            "--listen",
            "127.0.0.1:1",
            "--bind-external",
            "203.0.113.9",
        ],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("--bind-external 203.0.113.9: cannot listen there"),
        "{err}"
    );
    // No TUN driver to open (a container without /dev/net/tun): said, with the fix.
    let out = ns
        .command("unshare")
        .args(["-m", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs none /dev/net && exec {} --proxy {proxy} --device t2sx",
            binary().display()
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("the TUN driver is not available") && err.contains("modprobe tun"),
        "{err}"
    );
    // An --interface that does not exist is allowed (it may come up later), but said
    // at start, by name.
    let out = ns
        .command("timeout")
        .args(["-s", "TERM", "2"])
        .arg(binary())
        .args([
            "--proxy",
            &proxy,
            "--device",
            "t2sy",
            "--interface",
            "nosuchif0",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("WARN")
            && err.contains("--interface names no interface")
            && err.contains("nosuchif0"),
        "{err}"
    );
    assert!(err.contains("tunnel running"), "{err}");
    // None of them made a device.
    let links = ns.command("ip").args(["-o", "link"]).output().unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(!links.contains("t2sx"), "{links}");

    // tun0 is held by the running tunnel.
    let (code, err) = run_binary(ns, &["--proxy", &socks5_url(), "--device", TUN_NAME]);
    assert_eq!(code, Some(4), "{err}");
    assert!(err.contains("busy") || err.contains("in use"), "{err}");

    // Without CAP_NET_ADMIN the TUN cannot be opened.
    if Path::new("/usr/bin/setpriv").exists() {
        let out = ns
            .command("setpriv")
            .args(["--bounding-set=-net_admin", "--inh-caps=-net_admin"])
            .arg(binary())
            .args(["--proxy", &socks5_url(), "--device", "t2sperm"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{err}");
        assert!(err.contains("CAP_NET_ADMIN"), "{err}");
    }
    net.assert_no_panics();
}

/// Dante in the proxy namespace, started with a generated configuration.
fn start_dante(ns: &Namespace) -> Process {
    let dir = std::env::temp_dir().join(format!("t2s-dante-{}", ns.name()));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("danted.conf");
    std::fs::write(
        &conf,
        format!(
            "logoutput: stderr\n\
             internal: {PROXY_V4} port = {PROXY_PORT}\n\
             external: to-target\n\
             clientmethod: none\nsocksmethod: none\n\
             user.privileged: root\nuser.unprivileged: nobody\n\
             client pass {{ from: 198.19.1.0/24 to: 0.0.0.0/0 }}\n\
             socks pass {{ from: 198.19.1.0/24 to: 0.0.0.0/0 }}\n"
        ),
    )
    .unwrap();
    let mut cmd = ns.command("danted");
    cmd.arg("-f")
        .arg(&conf)
        .arg("-p")
        .arg(dir.join("danted.pid"));
    let p = ns.spawn(cmd).unwrap();
    tun2socks::testbed::wait_for_tcp(ns, proxy_addr(), Duration::from_secs(10)).unwrap();
    p
}

#[test]
fn dante_as_the_upstream_server() {
    root_test!("dante_as_the_upstream_server");
    require_or_skip!(require_program("danted", "dante_as_the_upstream_server"));
    let topo = Topology::create("dante").unwrap();
    let _services = Services::start(topo.target(), BLOB, SEED).unwrap();
    let dante = start_dante(topo.proxy());
    let tunnel = start_tunnel(topo.app(), &binary(), &socks5_url(), &[]).unwrap();
    assert_eq!(
        curl_sha(topo.app(), &TARGET_V4.to_string()),
        sha256_hex(&blob(BLOB, SEED))
    );
    let v4 = in_ns(topo.app(), || {
        upload(target(TARGET_V4, UPLOAD_PORT), 16 * MIB)
    })
    .unwrap();
    assert_eq!(v4, sha256_hex(&blob(16 * MIB, 99)));
    assert!(panics_in(&tunnel).is_empty());
    drop(tunnel);
    drop(dante);
}

/// The classic way to run a TUN program without privilege: root makes a persistent
/// device owned by the user (`ip tuntap add ... user`), brings it up with its
/// addresses and routes, and the user attaches to it. The tunnel runs as uid 65534
/// with no capability at all (it used to fail setting the queue length, which needs
/// CAP_NET_ADMIN) and carries TCP both ways; with the device down it exits with the
/// no-permission code and says what to do.
#[test]
fn an_unprivileged_owner_runs_the_tunnel_on_its_own_device() {
    root_test!("an_unprivileged_owner_runs_the_tunnel_on_its_own_device");
    require_or_skip!(require_program("setpriv", "an unprivileged owner"));
    require_or_skip!(require_program("unshare", "an unprivileged owner"));
    use tun2socks::testbed::topology::{TARGET_NET_V4, TARGET_NET_V6};
    let topo = Topology::create("own-dev").unwrap();
    let _services = Services::start(topo.target(), MIB, SEED).unwrap();
    let _server = start_server(topo.proxy(), &binary(), &[]).unwrap();
    let dev = "t2sown";
    let ip = |args: &[&str]| {
        let out = topo.app().ip(args).unwrap();
        assert!(out.status.success(), "ip {args:?}: {out:?}");
    };
    ip(&["tuntap", "add", "dev", dev, "mode", "tun", "user", "65534"]);
    ip(&["addr", "add", "198.18.0.1/24", "dev", dev]);
    ip(&["addr", "add", "fd18::1/64", "dev", dev, "nodad"]);
    // In a private mount namespace, a TUN node anyone may open over /dev/net/tun
    // (0600 on this machine), then no capability at all.
    let dir = std::env::temp_dir().join(format!("t2s-owner-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let node = dir.join("tun");
    let script = format!(
        "rm -f {node} && mknod {node} c 10 200 && chmod 0666 {node} && \
         mount --bind {node} /dev/net/tun && \
         exec ip netns exec {ns} setpriv --reuid=65534 --regid=65534 --clear-groups \
         --inh-caps=-all --bounding-set=-all {binary} --proxy {url} --device {dev}",
        node = node.display(),
        ns = topo.app().name(),
        binary = binary().display(),
        url = socks5_url(),
    );
    let run = |tag: &str| {
        let mut cmd = std::process::Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .env("RUST_LOG", "info");
        Process::spawn(
            cmd,
            Process::log_dir().join(format!("{}-{tag}.log", topo.app().name())),
        )
        .unwrap()
    };
    // Down: refused with the no-permission code (3) and advice.
    let mut down = run("owner-down");
    let status = down.wait_timeout(Duration::from_secs(10)).unwrap();
    let log = down.log().unwrap_or_default();
    assert_eq!(status.and_then(|s| s.code()), Some(3), "{log}");
    assert!(
        log.contains("ip tuntap add") && log.contains("already up"),
        "{log}"
    );

    ip(&["link", "set", dev, "up"]);
    ip(&["route", "add", &TARGET_NET_V4.to_string(), "dev", dev]);
    ip(&["-6", "route", "add", &TARGET_NET_V6.to_string(), "dev", dev]);
    let mut tunnel = run("owner");
    tunnel
        .wait_ready(Duration::from_secs(10), |p| {
            p.log().is_ok_and(|log| log.contains("tunnel running"))
        })
        .unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/status", tunnel.id())).unwrap();
    assert!(status.contains("Uid:\t65534"), "{status}");
    assert!(status.contains("CapEff:\t0000000000000000"), "{status}");
    for dst in [target(TARGET_V4, ECHO_PORT), target(TARGET_V6, ECHO_PORT)] {
        in_ns(topo.app(), move || echo_once(dst))
            .unwrap_or_else(|e| panic!("echo to {dst} through the owner's tunnel: {e}"));
    }
    assert!(panics_in(&tunnel).is_empty());
    let exit = tunnel.terminate().unwrap();
    assert!(
        exit.success(),
        "{exit}: {}",
        tunnel.log().unwrap_or_default()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
