//! The test topology: three hosts in Linux network namespaces, wired with veth pairs.
//!
//! ```text
//!   [app]  198.19.1.1 ---- 198.19.1.2 [proxy] 198.19.2.1 ---- 198.19.2.2 [target]
//!          fd19:1::1       fd19:1::2          fd19:2::1       fd19:2::2
//! ```
//!
//! Stage: none of the data path. This is the harness around it, used by the
//! integration tests and by the shipped `tun2socks selftest` command, so it lives in
//! the library: no test-only dependencies, no `unwrap`/`expect`, every failure is an
//! [`std::io::Error`] that says which command or file failed.
//!
//! What it must not do:
//! - touch the root namespace: veth pairs are created directly inside the namespaces,
//!   no address, route, sysctl or link of the host changes;
//! - send traffic anywhere but the addresses of its own namespaces: by default the app
//!   has no route to the target and the proxy does not forward, so a packet that
//!   reaches the target went through a proxy program;
//! - leave anything behind: every [`Namespace`] (and so every [`Topology`]) deletes
//!   itself on drop, killing what still runs inside, even while a test unwinds from a
//!   panic; a run that crashed is cleaned up by the next one ([`cleanup_stale`]);
//! - need more than `iproute2`: `ip` for namespaces, links and routes, `ss` to see
//!   listeners; sysctls are written through `/proc/sys` from a thread that entered the
//!   namespace, and there is no `unsafe` here (`setns(2)` comes from `nix`).
//!
//! Layout:
//! - [`namespace`]: [`Namespace`], one named namespace: commands, threads and files in it;
//! - [`process`]: [`Process`], a child that is stopped and reaped on drop, with its log;
//! - [`topology`]: [`Topology`], the three hosts, their addresses and links;
//! - [`stale`]: unique names per run and [`cleanup_stale`] for crashed runs;
//! - [`wait`]: [`wait_for_tcp`] and [`wait_for_udp`], polling for a listener;
//! - [`skip`]: [`require_root`] and the skip-only-outside-CI rule
//!   (`require_or_skip!`, with the `test-support` feature);
//! - [`services`]: target-side test servers (HTTP blob, SHA-256 upload sink, echo);
//! - [`tunnel`]: our server and tunnel started as processes in their namespaces;
//! - [`attach`]: a hand-made TUN device the tunnel attaches to; a process's RSS;
//! - [`load`]: TCP echo server, request/response latency and connection-rate clients;
//! - [`bench`]: what bench binaries share: env settings, medians, iperf3, CPU and
//!   RSS of a process, the open-files limit, many idle flows held open;
//! - [`udp`]: target-side UDP services (echo, full-cone reply from a second port);
//! - [`udp_client`]: app-side UDP clients (echo checks, latency, rate);
//! - [`udp_probes`]: many ports at once, full cone, port unreachable, broadcast;
//! - [`dnsmasq`]: a resolver in the target, `dig` in a namespace, a proxy-only name;
//! - [`dns_client`]: hand-built DNS queries and a query-rate client;
//! - [`dante`]: danted in the proxy namespace with CONNECT and UDP;
//! - [`sshd`], [`shadowsocks`]: a local SOCKS client in the app namespace in front of
//!   its server in the proxy namespace (`ssh -D` and sshd, ss-local and ss-server), and
//!   [`local_proxy`]: the topology the tests through them share;
//! - [`soak`]: mixed load for a long time, watching for leaks, errors and idle spinning.

pub mod attach;
pub mod bench;
pub mod dante;
pub mod dns_client;
pub mod dnsmasq;
pub mod load;
pub mod local_proxy;
pub mod namespace;
pub mod process;
pub mod services;
pub mod shadowsocks;
pub mod skip;
pub mod soak;
pub mod sshd;
pub mod stale;
pub mod topology;
pub mod tunnel;
pub mod udp;
pub mod udp_client;
pub mod udp_probes;
pub mod wait;

pub use namespace::Namespace;
pub use process::Process;
pub use skip::{Skip, require_program, require_root, skip_allowed};
pub use stale::{cleanup_stale, unique_id, unique_name};
pub use topology::*;
pub use wait::{wait_for_tcp, wait_for_udp};

use std::ffi::OsStr;
use std::io;
use std::process::{Command, Output, Stdio};

/// Runs `ip ARGS` in the root namespace (which `ip -n NS` then leaves for `NS`),
/// failing with its stderr when it exits non-zero.
pub(crate) fn ip<I, S>(args: I) -> io::Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut command = Command::new("ip");
    command.args(args);
    run_checked(command)
}

/// Runs `command` to completion with stdin closed, and turns a spawn failure or a
/// non-zero exit into an error that names the command line and carries its stderr.
pub(crate) fn run_checked(mut command: Command) -> io::Result<Output> {
    let line = command_line(&command);
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("`{line}`: {e}")))?;
    if output.status.success() {
        Ok(output)
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(io::Error::other(format!(
            "`{line}` failed ({}): {}",
            output.status,
            stderr.trim()
        )))
    }
}

/// The command as a shell-like line, for error messages.
pub(crate) fn command_line(command: &Command) -> String {
    let mut line = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Adds `what` in front of an error's message, keeping its kind.
pub(crate) fn context(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}
