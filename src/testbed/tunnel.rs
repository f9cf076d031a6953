//! Starting the pieces of an end-to-end run as real processes: our SOCKS server in
//! the proxy namespace, the tunnel in the app namespace with the default routes (v4
//! and v6) pointing into its TUN, added by hand ([`start_tunnel`]) or by the tunnel's
//! own `--setup` ([`start_tunnel_setup`]). The binary is passed in: the tests use cargo's
//! build of it, `selftest` uses itself.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::namespace::Namespace;
use super::process::Process;
use super::topology::{APP_NET_V4, APP_NET_V6, PROXY_V4, PROXY_V6};
use super::wait::wait_for_tcp;
use crate::setup;

/// The TUN device the tunnel creates in the app namespace.
pub const TUN_NAME: &str = "tun0";
/// The port our SOCKS server listens on in the proxy namespace.
pub const PROXY_PORT: u16 = 1080;

/// How long a process gets to come up.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The proxy's address, for URLs (`198.19.1.2:1080`).
pub fn proxy_addr() -> SocketAddr {
    (PROXY_V4, PROXY_PORT).into()
}

/// Starts `binary server` in `ns` on the proxy's addresses (v4 and v6), allowing the
/// app network, with `extra` arguments; returns once it listens.
pub fn start_server(ns: &Namespace, binary: &Path, extra: &[&str]) -> io::Result<Process> {
    let mut cmd = ns.command(binary);
    cmd.arg("server")
        .args(["--listen", &proxy_addr().to_string()])
        .args([
            "--listen",
            &SocketAddr::from((PROXY_V6, PROXY_PORT)).to_string(),
        ])
        .args(["--allow", &APP_NET_V4.to_string()])
        .args(["--allow", &APP_NET_V6.to_string()])
        .args(extra);
    let mut process = ns.spawn(cmd)?;
    if let Err(e) = wait_for_tcp(ns, proxy_addr(), START_TIMEOUT) {
        let log = process.log().unwrap_or_default();
        let _ = process.try_wait();
        return Err(io::Error::new(
            e.kind(),
            format!("SOCKS server did not listen: {e}\n{log}"),
        ));
    }
    Ok(process)
}

/// Starts `binary --proxy URL --device tun0 extra...` in `ns`, waits for the TUN to
/// be up, then routes everything (v4 and v6) into it. Traffic to the proxy still
/// leaves by the veth: its network is directly connected, a more specific route.
pub fn start_tunnel(
    ns: &Namespace,
    binary: &Path,
    proxy_url: &str,
    extra: &[&str],
) -> io::Result<Process> {
    let process = spawn_until(ns, binary, proxy_url, extra, None, |_| {
        link_is_up(ns, TUN_NAME)
    })?;
    ns.ip(["route", "add", "default", "dev", TUN_NAME])?;
    ns.ip(["-6", "route", "add", "default", "dev", TUN_NAME])?;
    Ok(process)
}

/// Starts `binary --proxy URL --device tun0 --setup extra...` in `ns`: the tunnel
/// routes everything into its TUN itself (policy rules, `tun2socks::setup`). Returns
/// once it logged "routing set up" (at the info level, so `extra` must not lower the
/// log level) and its last rule (IPv6, priority [`setup::DEFAULT_PRIORITY`]) is in
/// place. (The rule alone may be a crashed run's leftover.)
pub fn start_tunnel_setup(
    ns: &Namespace,
    binary: &Path,
    proxy_url: &str,
    extra: &[&str],
) -> io::Result<Process> {
    let mut args = vec!["--setup"];
    args.extend_from_slice(extra);
    let priority = setup::DEFAULT_PRIORITY.to_string();
    // The readiness line is logged at info: keep a more verbose RUST_LOG, else info.
    let level = std::env::var("RUST_LOG")
        .ok()
        .filter(|l| l.contains("debug") || l.contains("trace"))
        .unwrap_or_else(|| "info".to_owned());
    spawn_until(ns, binary, proxy_url, &args, Some(&level), |process| {
        process
            .log()
            .is_ok_and(|log| log.contains("routing set up"))
            && ns
                .ip(["-6", "rule", "list", "pref", &priority])
                .is_ok_and(|out| !out.stdout.is_empty())
    })
}

/// Spawns the tunnel (with `RUST_LOG` if given) and polls `ready` until it holds, failing if the process exits
/// first or [`START_TIMEOUT`] passes.
fn spawn_until(
    ns: &Namespace,
    binary: &Path,
    proxy_url: &str,
    extra: &[&str],
    rust_log: Option<&str>,
    ready: impl Fn(&Process) -> bool,
) -> io::Result<Process> {
    let mut cmd = ns.command(binary);
    cmd.args(["--proxy", proxy_url, "--device", TUN_NAME])
        .args(extra);
    if let Some(level) = rust_log {
        cmd.env("RUST_LOG", level);
    }
    let mut process = ns.spawn(cmd)?;
    process.wait_ready(START_TIMEOUT, ready)?;
    Ok(process)
}

/// The routing state of `ns` as `ip` prints it: `ip rule`, `ip -6 rule`,
/// `ip route show table all` and `ip -6 route show table all`, separated by `--`
/// lines. Equal before and after a `--setup` run means everything was restored.
pub fn routing_snapshot(ns: &Namespace) -> io::Result<String> {
    let commands: [&[&str]; 4] = [
        &["rule"],
        &["-6", "rule"],
        &["route", "show", "table", "all"],
        &["-6", "route", "show", "table", "all"],
    ];
    let mut text = String::new();
    for args in commands {
        text.push_str(&String::from_utf8_lossy(&ns.ip(args)?.stdout));
        text.push_str("--\n");
    }
    Ok(text)
}

/// Is the interface present and administratively up?
pub fn link_is_up(ns: &Namespace, name: &str) -> bool {
    ns.ip(["-o", "link", "show", "dev", name])
        .map(|out| {
            let text = String::from_utf8_lossy(&out.stdout);
            text.split(['<', '>'])
                .nth(1)
                .is_some_and(|flags| flags.split(',').any(|f| f == "UP"))
        })
        .unwrap_or(false)
}

/// The lines of a process log that show a panic (empty when there is none).
pub fn panics_in(process: &Process) -> Vec<String> {
    process
        .log()
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("panicked"))
        .map(str::to_owned)
        .collect()
}

/// Stops a tunnel with SIGTERM and returns its log (with the final stats line);
/// fails unless it exited 0 without a panic.
pub fn stop_cleanly(mut tunnel: Process) -> io::Result<String> {
    let status = tunnel.terminate()?;
    let log = tunnel.log()?;
    if !status.success() {
        return Err(io::Error::other(format!(
            "tunnel exited with {status}:\n{log}"
        )));
    }
    if !panics_in(&tunnel).is_empty() {
        return Err(io::Error::other(format!("tunnel panicked:\n{log}")));
    }
    Ok(log)
}
