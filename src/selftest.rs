//! `tun2socks selftest`: the whole path, proven on this machine in a minute.
//!
//! Builds the three-namespace topology ([`crate::testbed`]), starts test services in
//! `target`, then for each protocol variant (socks5, socks5 with a login and
//! `--socks-pipeline auto`, socks4, socks4a) starts our SOCKS server in `proxy` and
//! the tunnel in `app` (this very binary, as real processes; the tunnel with
//! `--setup`, so it makes itself the default gateway and must leave `app`'s routing
//! as it found it), and drives TCP
//! over IPv4 and IPv6 through them from `app`, which has no other way to reach
//! `target`. UDP too (`udp`): echo and full cone through SOCKS5 UDP associations, a
//! port unreachable at once through SOCKS4. Each variant's tunnel runs with one
//! `--dns` mode and answers the queries of its rows (`dns`; dnsmasq in `target`).
//! Ends with a throughput figure, then runs curl through `tun2socks exec`
//! (a private namespace whose only route is the tunnel) and checks that the
//! program's exit status comes back.
//! Everything is torn down afterwards, also on failure.
//!
//! Not part of the data path; it uses it from the outside like any application.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::dns::DnsMode;
use crate::testbed::dnsmasq::{Dnsmasq, default_records, set_proxy_only_name};
use crate::testbed::namespace::join;
use crate::testbed::services::{
    DISCARD_PORT, ECHO_PORT, HTTP_PORT, SOURCE_PORT, Services, UPLOAD_PORT, blob, echo_round_trip,
    sha256_hex, upload_sha256,
};
use crate::testbed::tunnel::{
    panics_in, proxy_addr, routing_snapshot, start_server, start_tunnel_setup,
};
use crate::testbed::udp::UdpServices;
use crate::testbed::{
    Namespace, Process, TARGET_V4, TARGET_V6, Topology, require_program, require_root,
};

mod dns;
mod udp;

/// A row before it is recorded: its name and what the check found.
type Row = (String, Result<String, String>);

/// Size of the blob downloaded and uploaded in each variant.
const BLOB: usize = 8 * 1024 * 1024;
const SEED: u64 = 8;
/// Every client operation gives up after this long: the selftest never hangs.
const OP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long each throughput direction is measured.
const THROUGHPUT_TIME: Duration = Duration::from_secs(3);

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// A measurement, or what went wrong.
    pub detail: String,
}

/// The selftest's findings.
#[derive(Debug, Default)]
pub struct Report {
    /// Every check, in the order run.
    pub checks: Vec<Check>,
}

impl Report {
    /// True when every check passed (and there was at least one).
    pub fn passed(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.ok)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(10);
        writeln!(f, "{:<width$}  result  detail", "check")?;
        writeln!(f, "{:-<width$}  ------  ------", "")?;
        for c in &self.checks {
            let result = if c.ok { "ok" } else { "FAIL" };
            writeln!(f, "{:<width$}  {result:<6}  {}", c.name, c.detail)?;
        }
        let failed = self.checks.iter().filter(|c| !c.ok).count();
        write!(
            f,
            "{} checks, {} passed, {failed} failed",
            self.checks.len(),
            self.checks.len().saturating_sub(failed)
        )
    }
}

/// A protocol variant: how the tunnel reaches the proxy.
struct Variant {
    name: &'static str,
    url: String,
    server_args: Vec<&'static str>,
    /// Can the protocol carry IPv6 destinations?
    ipv6: bool,
    /// Measure throughput with this one.
    throughput: bool,
    /// Can the protocol carry UDP (SOCKS5 UDP ASSOCIATE)?
    udp: bool,
    /// The tunnel's `--dns` mode.
    dns: DnsMode,
    /// The tunnel's `--threads` (queues and stacks).
    threads: &'static str,
    /// The tunnel's `--socks-pipeline`.
    pipeline: &'static str,
}

fn variants() -> Vec<Variant> {
    let proxy = proxy_addr();
    vec![
        Variant {
            name: "socks5",
            url: format!("socks5://{proxy}"),
            server_args: vec![],
            ipv6: true,
            throughput: true,
            udp: true,
            dns: DnsMode::Udp,
            threads: "2",
            pipeline: "off",
        },
        Variant {
            name: "socks5+login",
            url: format!("socks5://selftest:s%3Acret@{proxy}"),
            server_args: vec!["--user", "selftest:s:cret"],
            ipv6: true,
            throughput: false,
            udp: true,
            dns: DnsMode::Tcp,
            threads: "1",
            // Its rows run through the probe of `auto` (greeting, login and UDP
            // ASSOCIATE in one write) and then pipelined handshakes.
            pipeline: "auto",
        },
        Variant {
            name: "socks4",
            url: format!("socks4://selftest@{proxy}"),
            server_args: vec![],
            ipv6: false,
            throughput: false,
            udp: false,
            dns: DnsMode::Tcp,
            threads: "1",
            pipeline: "off",
        },
        Variant {
            name: "socks4a",
            url: format!("socks4a://{proxy}"),
            server_args: vec![],
            ipv6: false,
            throughput: false,
            udp: false,
            dns: DnsMode::FakeIp,
            threads: "2",
            pipeline: "off",
        },
    ]
}

/// Runs the selftest with `binary` (normally this executable) as server and tunnel.
/// `progress` sees each check as it completes. Errors are setup failures (not root,
/// `ip` missing, a process that would not start); failed checks are in the report.
pub fn run(binary: &Path, mut progress: impl FnMut(&Check)) -> io::Result<Report> {
    require_root("tun2socks selftest")
        .map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, e.to_string()))?;
    let topo = Topology::create("selftest")?;
    // Before any SOCKS server starts: they read the proxy's hosts file as they start.
    set_proxy_only_name(&topo, &[])?;
    let _services = Services::start(topo.target(), BLOB, SEED)?;
    let _udp_services = UdpServices::start(topo.target())?;
    let dnsmasq = match require_program("dnsmasq", "the DNS checks") {
        Ok(()) => Some(Dnsmasq::start(topo.target(), &default_records())?),
        Err(_) => None,
    };
    let mut report = Report::default();
    let mut record = |report: &mut Report, name: String, result: Result<String, String>| {
        let check = match result {
            Ok(detail) => Check {
                name,
                ok: true,
                detail,
            },
            Err(detail) => Check {
                name,
                ok: false,
                detail,
            },
        };
        progress(&check);
        report.checks.push(check);
    };
    for v in variants() {
        let server = start_server(topo.proxy(), binary, &v.server_args)?;
        let app = topo.app();
        let routing_before = routing_snapshot(app)?;
        let dns_mode = v.dns.to_string();
        let tunnel = start_tunnel_setup(
            app,
            binary,
            &v.url,
            &[
                "--dns",
                &dns_mode,
                "--threads",
                v.threads,
                "--socks-pipeline",
                v.pipeline,
            ],
        )?;
        for (family, ip) in [("IPv4", TARGET_V4.into()), ("IPv6", TARGET_V6.into())] {
            let at = |port| SocketAddr::new(ip, port);
            if !v.ipv6 && family == "IPv6" {
                let name = format!(
                    "{} TCP {family}: refused (the protocol has no IPv6)",
                    v.name
                );
                record(&mut report, name, client(app, refused(at(ECHO_PORT))));
                continue;
            }
            let name = format!("{} TCP {family}: echo 1 MiB", v.name);
            record(&mut report, name, client(app, echo(at(ECHO_PORT))));
            let name = format!("{} TCP {family}: HTTP GET 8 MiB, SHA-256", v.name);
            record(&mut report, name, client(app, download(at(HTTP_PORT))));
            let name = format!("{} TCP {family}: upload 8 MiB, half-close, SHA-256", v.name);
            record(&mut report, name, client(app, upload(at(UPLOAD_PORT))));
        }
        let udp_rows = if v.udp {
            udp::socks5_rows(app, v.name)
        } else {
            udp::socks4_rows(app, v.name)
        };
        let dns_rows = dns::rows(app, v.name, v.dns, v.ipv6, dnsmasq.as_ref());
        for (name, result) in udp_rows.into_iter().chain(dns_rows) {
            record(&mut report, name, result);
        }
        if v.throughput {
            let name = format!("{} throughput download (IPv4, 1 stream)", v.name);
            let down = SocketAddr::new(TARGET_V4.into(), SOURCE_PORT);
            record(&mut report, name, client(app, download_rate(down)));
            let name = format!("{} throughput upload (IPv4, 1 stream)", v.name);
            let up = SocketAddr::new(TARGET_V4.into(), DISCARD_PORT);
            record(&mut report, name, client(app, upload_rate(up)));
        }
        let name = format!(
            "{} clean exit on SIGTERM, no panic (--threads {})",
            v.name, v.threads
        );
        record(&mut report, name, stop_cleanly(tunnel, server));
        let name = format!("{} --setup: ip rule/route (v4, v6) restored", v.name);
        record(&mut report, name, routing_restored(app, &routing_before));
    }
    let server = start_server(topo.proxy(), binary, &[])?;
    let url = format!("socks5://{}", proxy_addr());
    let name = "exec: curl in a private namespace, HTTP GET 8 MiB IPv4 + IPv6, SHA-256";
    record(
        &mut report,
        name.into(),
        exec_fetch(topo.app(), binary, &url),
    );
    let name = "exec: the program's exit status comes back";
    record(
        &mut report,
        name.into(),
        exec_status(topo.app(), binary, &url),
    );
    drop(server);
    Ok(report)
}

/// `binary exec --proxy URL -- sh -c SCRIPT` in `app`, to completion.
fn exec_sh(app: &Namespace, binary: &Path, url: &str, script: &str) -> Result<Output, String> {
    app.command(binary)
        .args(["exec", "--proxy", url, "--", "sh", "-c", script])
        .output()
        .map_err(|e| format!("cannot run `{} exec`: {e}", binary.display()))
}

/// curl inside `tun2socks exec` fetches the blob over IPv4 and IPv6.
fn exec_fetch(app: &Namespace, binary: &Path, url: &str) -> Result<String, String> {
    if require_program("curl", "the exec check").is_err() {
        return Ok("skipped: curl is not in PATH".into());
    }
    let started = Instant::now();
    let script = format!(
        "curl -sS --fail --max-time 20 http://{TARGET_V4}:{HTTP_PORT}/blob | sha256sum && \
         curl -sS --fail --max-time 20 -g 'http://[{TARGET_V6}]:{HTTP_PORT}/blob' | sha256sum"
    );
    let out = exec_sh(app, binary, url, &script)?;
    let want = sha256_hex(&blob(BLOB, SEED));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let whole = stdout.lines().filter(|l| l.starts_with(&want)).count();
    if out.status.success() && whole == 2 {
        Ok(ms(started.elapsed()))
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(format!(
            "{}; {whole} of 2 downloads whole; {}",
            out.status,
            stderr.trim()
        ))
    }
}

/// `sh -c 'exit 7'` inside `tun2socks exec` makes it exit 7.
fn exec_status(app: &Namespace, binary: &Path, url: &str) -> Result<String, String> {
    let out = exec_sh(app, binary, url, "exit 7")?;
    match out.status.code() {
        Some(7) => Ok("sh -c 'exit 7' -> 7".into()),
        other => Err(format!(
            "expected 7, got {other:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// Runs an async check inside `ns` with a timeout.
fn client<F>(ns: &Namespace, check: F) -> Result<String, String>
where
    F: Future<Output = Result<String, String>> + Send + 'static,
{
    let handle = ns.enter_async(move || async move {
        Ok(tokio::time::timeout(OP_TIMEOUT, check)
            .await
            .unwrap_or_else(|_| Err(format!("no result within {OP_TIMEOUT:?}"))))
    });
    join(handle).unwrap_or_else(|e| Err(format!("could not run in the namespace: {e}")))
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

async fn echo(dst: SocketAddr) -> Result<String, String> {
    let started = Instant::now();
    let mut s = TcpStream::connect(dst)
        .await
        .map_err(|e| format!("connect {dst}: {e}"))?;
    let data = blob(1024 * 1024, 1);
    let back = echo_round_trip(&mut s, &data)
        .await
        .map_err(|e| format!("{dst}: {e}"))?;
    if back != data {
        return Err(format!(
            "echo differs ({} of {} bytes back)",
            back.len(),
            data.len()
        ));
    }
    Ok(ms(started.elapsed()))
}

async fn download(dst: SocketAddr) -> Result<String, String> {
    let started = Instant::now();
    let mut s = TcpStream::connect(dst)
        .await
        .map_err(|e| format!("connect {dst}: {e}"))?;
    let request = format!("GET /blob HTTP/1.1\r\nHost: {dst}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut all = Vec::with_capacity(BLOB + 256);
    s.read_to_end(&mut all).await.map_err(|e| e.to_string())?;
    let body_at = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no HTTP header")?
        .saturating_add(4);
    let body = all.get(body_at..).unwrap_or_default();
    let (got, want) = (sha256_hex(body), sha256_hex(&blob(BLOB, SEED)));
    if got != want {
        return Err(format!(
            "SHA-256 {got}, expected {want} ({} bytes)",
            body.len()
        ));
    }
    Ok(ms(started.elapsed()))
}

async fn upload(dst: SocketAddr) -> Result<String, String> {
    let started = Instant::now();
    let data = blob(BLOB, 2);
    let answer = upload_sha256(dst, &data)
        .await
        .map_err(|e| format!("{dst}: {e}"))?;
    let want = sha256_hex(&data);
    if answer != want {
        return Err(format!("target saw SHA-256 {answer:?}, expected {want}"));
    }
    Ok(ms(started.elapsed()))
}

async fn refused(dst: SocketAddr) -> Result<String, String> {
    let started = Instant::now();
    match TcpStream::connect(dst).await {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            Ok(format!("reset after {}", ms(started.elapsed())))
        }
        Err(e) => Err(format!("expected a reset, got {e}")),
        Ok(_) => Err("connected, but the protocol cannot carry IPv6".into()),
    }
}

fn gbits(bytes: u64, elapsed: Duration) -> String {
    format!(
        "{:.2} Gbit/s",
        bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e9
    )
}

async fn download_rate(dst: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect(dst)
        .await
        .map_err(|e| format!("connect {dst}: {e}"))?;
    let mut buf = vec![0u8; 256 * 1024];
    let started = Instant::now();
    let mut total: u64 = 0;
    while started.elapsed() < THROUGHPUT_TIME {
        match s.read(&mut buf).await {
            Ok(0) => return Err("source closed early".into()),
            Ok(n) => total = total.saturating_add(n as u64),
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(gbits(total, started.elapsed()))
}

async fn upload_rate(dst: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect(dst)
        .await
        .map_err(|e| format!("connect {dst}: {e}"))?;
    let chunk = blob(256 * 1024, 4);
    let started = Instant::now();
    while started.elapsed() < THROUGHPUT_TIME {
        s.write_all(&chunk).await.map_err(|e| e.to_string())?;
    }
    s.shutdown().await.map_err(|e| e.to_string())?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)
        .await
        .map_err(|e| e.to_string())?;
    // The sink's count, not ours: bytes still in buffers are not counted as moved.
    let total: u64 = answer
        .trim()
        .parse()
        .map_err(|_| format!("sink answered {answer:?}"))?;
    Ok(gbits(total, started.elapsed()))
}

/// SIGTERM to the tunnel and the server: both must exit 0, promptly, without panics.
/// Compares the routing of `ns` with `before` (waiting briefly: the kernel removes
/// the device's routes as the descriptor closes).
fn routing_restored(ns: &Namespace, before: &str) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let now = routing_snapshot(ns).map_err(|e| e.to_string())?;
        if now == before {
            return Ok(format!("{} lines identical", now.lines().count()));
        }
        if Instant::now() >= deadline {
            let extra: Vec<&str> = now.lines().filter(|l| !before.contains(*l)).collect();
            let missing: Vec<&str> = before.lines().filter(|l| !now.contains(*l)).collect();
            return Err(format!("left behind {extra:?}; missing {missing:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stop_cleanly(tunnel: Process, server: Process) -> Result<String, String> {
    let mut problems = Vec::new();
    let mut slowest = Duration::ZERO;
    for (what, mut process) in [("tunnel", tunnel), ("server", server)] {
        let started = Instant::now();
        match process.terminate() {
            Ok(status) if status.success() => {}
            Ok(status) => problems.push(format!("{what} exited with {status}")),
            Err(e) => problems.push(format!("{what}: {e}")),
        }
        slowest = slowest.max(started.elapsed());
        let panics = panics_in(&process);
        if !panics.is_empty() {
            problems.push(format!("{what} panicked: {panics:?}"));
        }
        if !problems.is_empty() {
            let log = process.log().unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(10).collect();
            problems.push(format!("{what} log tail: {tail:?}"));
        }
    }
    if problems.is_empty() {
        Ok(format!("stopped in {}", ms(slowest)))
    } else {
        Err(problems.join("; "))
    }
}
