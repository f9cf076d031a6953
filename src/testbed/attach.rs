//! A TUN device made by hand in the app namespace (`ip tuntap`, chosen MTU and
//! addresses), the tunnel started to attach to it, and the figures benchmarks read
//! from a running process (its resident memory).
//!
//! [`tunnel::start_tunnel`](super::tunnel::start_tunnel) waits for a device the
//! tunnel creates; a hand-made device is up before the tunnel starts, so here the
//! sign that the tunnel holds it is the carrier (`LOWER_UP`): a TUN device has one
//! exactly while a process has it open.

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use super::namespace::Namespace;
use super::process::Process;

/// The IPv4 address (and prefix) benchmarks give a hand-made device.
pub const HAND_TUN_V4: &str = "198.18.0.1/16";
/// The IPv6 address (and prefix) benchmarks give a hand-made device.
pub const HAND_TUN_V6: &str = "fd18::1/64";

/// How long the tunnel gets to attach.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);

/// Creates TUN device `name` in `ns` (`ip tuntap add mode tun`), sets its MTU, gives
/// it [`HAND_TUN_V4`] and [`HAND_TUN_V6`] and brings it up. It lives until the
/// namespace goes, or [`delete_tun`].
pub fn create_tun(ns: &Namespace, name: &str, mtu: u32) -> io::Result<()> {
    create_tun_with(ns, name, mtu, false)
}

/// [`create_tun`], with several queues (`IFF_MULTI_QUEUE`) when `multi_queue` is set:
/// only a program that opens it multi-queue can attach to such a device.
pub fn create_tun_with(ns: &Namespace, name: &str, mtu: u32, multi_queue: bool) -> io::Result<()> {
    let mut add = vec!["tuntap", "add", "dev", name, "mode", "tun"];
    if multi_queue {
        add.push("multi_queue");
    }
    ns.ip(add)?;
    ns.ip(["link", "set", "dev", name, "mtu", &mtu.to_string()])?;
    ns.ip(["addr", "add", HAND_TUN_V4, "dev", name])?;
    ns.ip(["addr", "add", HAND_TUN_V6, "dev", name, "nodad"])?;
    ns.ip(["link", "set", "dev", name, "up"])?;
    Ok(())
}

/// Deletes TUN device `name` in `ns`.
pub fn delete_tun(ns: &Namespace, name: &str) -> io::Result<()> {
    ns.ip(["tuntap", "del", "dev", name, "mode", "tun"])?;
    Ok(())
}

/// Whether `name` in `ns` has a carrier (`LOWER_UP`): for a TUN device, whether a
/// process holds it open.
pub fn has_carrier(ns: &Namespace, name: &str) -> bool {
    ns.ip(["-o", "link", "show", "dev", name])
        .map(|out| {
            let text = String::from_utf8_lossy(&out.stdout);
            text.split(['<', '>'])
                .nth(1)
                .is_some_and(|flags| flags.split(',').any(|f| f == "LOWER_UP"))
        })
        .unwrap_or(false)
}

/// Starts `binary --proxy URL --device NAME extra...` in `ns` to attach to the
/// existing device `name` (see [`create_tun`]), waits until it holds the device, then
/// routes everything (v4 and v6) into it (`ip route replace`, so a second tunnel on
/// the same device works too). If the tunnel exits first, the error carries its log:
/// that is how a benchmark learns that the tunnel refused its options.
pub fn start_tunnel_attached(
    ns: &Namespace,
    binary: &Path,
    proxy_url: &str,
    name: &str,
    extra: &[&str],
) -> io::Result<Process> {
    let mut command = ns.command(binary);
    command
        .args(["--proxy", proxy_url, "--device", name])
        .args(extra);
    route_when_attached(ns, ns.spawn(command)?, name)
}

/// Waits until `process` (a tunnel of any make, started on the hand-made device
/// `name`) holds the device, then routes everything (v4 and v6) into it; fails with the
/// process's log if it exits first or does not attach within ten seconds.
pub fn route_when_attached(
    ns: &Namespace,
    mut process: Process,
    name: &str,
) -> io::Result<Process> {
    let deadline = Instant::now() + ATTACH_TIMEOUT;
    while !has_carrier(ns, name) {
        if let Some(status) = process.try_wait()? {
            return Err(io::Error::other(format!(
                "tunnel exited with {status} before it attached to {name}:\n{}",
                process.log().unwrap_or_default()
            )));
        }
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the tunnel did not attach to {name}:\n{}",
                    process.log().unwrap_or_default()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    ns.ip(["route", "replace", "default", "dev", name])?;
    ns.ip(["-6", "route", "replace", "default", "dev", name])?;
    Ok(process)
}

/// The resident memory of process `pid` in KiB (`VmRSS` of `/proc/PID/status`).
pub fn vm_rss_kib(pid: u32) -> io::Result<u64> {
    status_kib(pid, "VmRSS:")
}

/// The anonymous resident memory of process `pid` in KiB (`RssAnon`: heap, stacks,
/// buffers; not the program's code and other file pages, which the page cache can
/// drop and give back at any time).
pub fn rss_anon_kib(pid: u32) -> io::Result<u64> {
    status_kib(pid, "RssAnon:")
}

fn status_kib(pid: u32, field: &str) -> io::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(super::context(&path))?;
    parse_status_kib(&status, field)
        .ok_or_else(|| io::Error::other(format!("{path}: no {field} line")))
}

fn parse_status_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

/// The number of open descriptors of process `pid` (entries of `/proc/PID/fd`).
pub fn open_fds(pid: u32) -> io::Result<usize> {
    let path = format!("/proc/{pid}/fd");
    Ok(std::fs::read_dir(&path)
        .map_err(super::context(&path))?
        .count())
}

/// The open descriptors of `pid` once their count has held still for `quiet` (read
/// every 20 ms, for at most 5 s; then the last reading): a baseline that start-up
/// work opening a file for a moment cannot skew (the tunnel reads its own smaps once,
/// 250 ms after start, to release its start-up code).
pub fn settled_fds(pid: u32, quiet: Duration) -> io::Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut count = open_fds(pid)?;
    let mut since = Instant::now();
    while since.elapsed() < quiet && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        let now = open_fds(pid)?;
        if now != count {
            count = now;
            since = Instant::now();
        }
    }
    Ok(count)
}

/// The most telling line of a failed start's message (from [`start_tunnel_attached`]
/// or [`start_tunnel`](super::tunnel::start_tunnel)): the first line of the log that
/// says `error`, else the first line.
pub fn refusal_reason(message: &str) -> String {
    let line = message
        .lines()
        .skip(1)
        .find(|l| l.to_ascii_lowercase().contains("error"))
        .or_else(|| message.lines().next())
        .unwrap_or_default();
    line.trim().chars().take(160).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vm_rss() {
        let status = "Name:\ttun2socks\nVmPeak:\t  9000 kB\nVmRSS:\t   12345 kB\nRssAnon:\t  678 kB\nThreads:\t3\n";
        assert_eq!(parse_status_kib(status, "VmRSS:"), Some(12345));
        assert_eq!(parse_status_kib(status, "RssAnon:"), Some(678));
        assert_eq!(parse_status_kib("Name: x\n", "VmRSS:"), None);
        assert!(vm_rss_kib(std::process::id()).is_ok_and(|kib| kib > 0));
        let anon = rss_anon_kib(std::process::id()).unwrap();
        assert!(anon > 0 && anon <= vm_rss_kib(std::process::id()).unwrap());
    }

    #[test]
    fn picks_the_error_line() {
        let message = "tunnel exited with exit status: 2 before it attached to tun0:\n\
                       error: unexpected argument '--dns' found\n\n  tip: ...\n";
        assert_eq!(
            refusal_reason(message),
            "error: unexpected argument '--dns' found"
        );
        assert_eq!(refusal_reason("timed out"), "timed out");
    }
}
