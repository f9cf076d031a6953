//! The tunnel's observability end to end: `--metrics` serves the Prometheus text on
//! loopback in the app namespace and its counters move while a flow carries bytes; a
//! SOCKS refusal shows under its reply code (CONNECT 0x02, UDP ASSOCIATE 0x07); `--stats-interval` logs the summary
//! line; a bad `--metrics` address stops the start with exit 2 and one line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use tun2socks::metrics::Snapshot;
use tun2socks::require_or_skip;
use tun2socks::testbed::namespace::join;
use tun2socks::testbed::services::{ECHO_PORT, Services};
use tun2socks::testbed::topology::TARGET_V4;
use tun2socks::testbed::tunnel::{proxy_addr, start_server, start_tunnel, stop_cleanly};
use tun2socks::testbed::{Namespace, Topology, require_root};

const METRICS: &str = "127.0.0.1:9727";
/// In the target network, but denied by the server: CONNECT gets reply 0x02.
const DENIED: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 99);
const MIB: usize = 1024 * 1024;

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tun2socks"))
}

/// `GET path` on the metrics address from inside `ns`: (status, body).
fn scrape_path(ns: &Namespace, path: &str) -> Result<(u16, String)> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: t2s\r\nConnection: close\r\n\r\n");
    let response = ns.within(move || {
        let mut s = TcpStream::connect(METRICS)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(request.as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("no end of headers")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status")?;
    Ok((status, body.to_owned()))
}

fn scrape(ns: &Namespace) -> Result<String> {
    let (status, body) = scrape_path(ns, "/metrics")?;
    ensure!(status == 200, "status {status}: {body}");
    Ok(body)
}

/// The value of the sample `series` (name with labels, exactly as exposed).
fn sample(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

const TCP_UP: &str = "tun2socks_bytes_total{proto=\"tcp\",direction=\"up\"}";
const TCP_DOWN: &str = "tun2socks_bytes_total{proto=\"tcp\",direction=\"down\"}";
const ACTIVE: &str = "tun2socks_tcp_flows_active";
const OPENED: &str = "tun2socks_tcp_flows_opened_total";
const CONNECTED: &str = "tun2socks_tcp_flows_connected_total";
const FAILED: &str = "tun2socks_tcp_flows_failed_total";
const REFUSED_0X02: &str = "tun2socks_socks_errors_total{command=\"connect\",code=\"0x02\"}";
const REFUSED_UDP_0X07: &str =
    "tun2socks_socks_errors_total{command=\"udp-associate\",code=\"0x07\"}";

/// Scrapes until `done` holds for the text, or fails after 10 s with the last one.
fn scrape_until(ns: &Namespace, what: &str, done: impl Fn(&str) -> bool) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(ns)?;
        if done(&text) {
            return Ok(text);
        }
        ensure!(Instant::now() < deadline, "{what}; last scrape:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn metrics_move_while_a_flow_runs_and_a_refusal_shows_its_reply_code() -> Result<()> {
    require_or_skip!(
        require_root("metrics_move_while_a_flow_runs_and_a_refusal_shows_its_reply_code"),
        Ok(())
    );
    let topo = Topology::create("metrics")?;
    let _services = Services::start(topo.target(), MIB, 1)?;
    let deny = format!("{DENIED}/32");
    let mut server = start_server(topo.proxy(), &binary(), &["--deny", &deny, "--no-udp"])?;
    let url = format!("socks5://{}", proxy_addr());
    let args = ["--metrics", METRICS, "--stats-interval", "1"];
    let mut tunnel = start_tunnel(topo.app(), &binary(), &url, &args)?;
    let app = topo.app();

    let before = scrape(app)?;
    ensure!(sample(&before, OPENED) == 0, "{before}");
    ensure!(before.lines().last() == Some("# EOF"), "{before}");
    ensure!(scrape_path(app, "/")?.0 == 404, "/ is not the metrics path");

    // One echo flow: 4 MiB each way, then held open (not closed) while we scrape.
    let (release, held) = mpsc::channel::<()>();
    let echo = app.enter(move || {
        let mut s = TcpStream::connect(SocketAddr::new(TARGET_V4.into(), ECHO_PORT))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let chunk = vec![0x5au8; 64 * 1024];
        let mut back = vec![0u8; chunk.len()];
        for _ in 0..64 {
            s.write_all(&chunk)?;
            s.read_exact(&mut back)?;
        }
        let _ = held.recv_timeout(Duration::from_secs(30));
        Ok(())
    });
    let during = scrape_until(app, "bytes did not move while the flow was open", |t| {
        sample(t, TCP_UP) >= 4 * MIB as u64 && sample(t, TCP_DOWN) >= 4 * MIB as u64
    });
    let _ = release.send(());
    join(echo)?;
    let during = during?;
    ensure!(sample(&during, ACTIVE) == 1, "the flow is open:\n{during}");
    ensure!(sample(&during, OPENED) == 1, "{during}");
    ensure!(sample(&during, CONNECTED) == 1, "{during}");
    scrape_until(app, "the closed flow stayed active", |t| {
        sample(t, ACTIVE) == 0
    })?;

    // A destination the proxy denies: reply 0x02, the application gets ICMP
    // "administratively prohibited" for its SYN (then a reset).
    let refused = app.within(|| {
        let r = TcpStream::connect_timeout(
            &SocketAddr::new(DENIED.into(), 80),
            Duration::from_secs(10),
        );
        Ok(r.err().map(|e| e.kind()))
    })?;
    ensure!(
        refused == Some(std::io::ErrorKind::HostUnreachable),
        "a denied destination: {refused:?}"
    );
    let after = scrape_until(app, "the refusal was not counted", |t| {
        sample(t, REFUSED_0X02) == 1
    })?;
    ensure!(sample(&after, FAILED) == 1, "{after}");
    ensure!(sample(&after, CONNECTED) == 1, "{after}");
    ensure!(
        sample(
            &after,
            "tun2socks_socks_errors_total{command=\"connect\",code=\"0x05\"}"
        ) == 0,
        "{after}"
    );

    // UDP through a server without UDP: ASSOCIATE is refused with 0x07.
    app.within(|| {
        let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
        s.send_to(b"anyone there?", SocketAddr::new(TARGET_V4.into(), 9))?;
        Ok(())
    })?;
    let udp = scrape_until(app, "the refused association was not counted", |t| {
        sample(t, REFUSED_UDP_0X07) == 1
    })?;
    ensure!(
        sample(&udp, "tun2socks_udp_associations_opened_total") == 0,
        "{udp}"
    );

    // SIGUSR1 logs the line at once, each time, and so does SIGUSR2; the tunnel runs
    // on (their default action would have killed it).
    for signal in [
        nix::sys::signal::Signal::SIGUSR1,
        nix::sys::signal::Signal::SIGUSR1,
        nix::sys::signal::Signal::SIGUSR2,
    ] {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(tunnel.id() as i32), signal)?;
        std::thread::sleep(Duration::from_millis(200));
    }
    ensure!(
        tunnel.try_wait()?.is_none(),
        "SIGUSR1 or 2 stopped the tunnel"
    );
    // The periodic summary line, then the stop line with the same counters.
    std::thread::sleep(Duration::from_millis(1200));
    let log = stop_cleanly(tunnel)?;
    let periodic = log.lines().filter(|l| l.contains(" stats stats=")).count();
    ensure!(periodic >= 1, "no --stats-interval line:\n{log}");
    let on_signal = log
        .lines()
        .filter(|l| l.contains("stats (SIGUSR1)"))
        .count();
    ensure!(
        on_signal == 2,
        "{on_signal} lines on SIGUSR1, not 2:\n{log}"
    );
    ensure!(
        log.lines()
            .filter(|l| l.contains("stats (SIGUSR2)"))
            .count()
            == 1,
        "no line on SIGUSR2:\n{log}"
    );
    let stop = log
        .lines()
        .rev()
        .find(|l| l.contains("stopped stats="))
        .context("no stop line")?;
    let field = |name| Snapshot::parse_field(stop, name).unwrap_or(0);
    ensure!(field("flows_opened") == 2, "{stop}");
    ensure!(field("flows_failed") == 1, "{stop}");
    ensure!(field("bytes_up") >= 4 * MIB as u64, "{stop}");
    ensure!(field("socks.connect.0x02") == 1, "{stop}");
    ensure!(field("socks.udp-associate.0x07") == 1, "{stop}");
    ensure!(
        log.contains("metrics at http://127.0.0.1:9727/metrics"),
        "{log}"
    );
    server.terminate()?;
    Ok(())
}

/// Runs the binary with `args` and returns (exit code, stderr).
fn run(args: &[&str]) -> Result<(Option<i32>, String)> {
    let out = Command::new(binary()).args(args).output()?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn a_bad_metrics_address_stops_the_start_with_exit_2_and_one_line() -> Result<()> {
    // Not an address of this host: the bind fails before any device is touched.
    let proxy = "socks5://127.0.0.1:1080";
    let not_local = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)), 9727);
    let (code, err) = run(&[
        "--proxy",
        proxy,
        "--device",
        "t2snope0",
        "--metrics",
        &not_local.to_string(),
    ])?;
    ensure!(code == Some(2), "exit {code:?}: {err}");
    ensure!(err.lines().count() == 1, "{err}");
    ensure!(
        err.contains("cannot listen for metrics on 203.0.113.7:9727"),
        "{err}"
    );
    // Taken by someone else.
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?.to_string();
    let (code, err) = run(&["--proxy", proxy, "--device", "t2snope0", "--metrics", &addr])?;
    ensure!(code == Some(2), "exit {code:?}: {err}");
    ensure!(err.contains(&addr), "{err}");
    // Not an address at all: clap's usage error.
    let (code, err) = run(&["--proxy", proxy, "--metrics", "localhost"])?;
    ensure!(code == Some(2), "exit {code:?}: {err}");
    Ok(())
}
