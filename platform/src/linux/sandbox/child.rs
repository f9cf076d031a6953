//! The setup process of a sandbox, from `fork` to `exec`: new namespaces, the
//! resolver file, loopback and the TUN device with its routes; then the report to the
//! parent, the wait for its "go", and the program.
//!
//! Runs in the forked child of a process that had one thread, so it may allocate
//! and use any library; it never returns to the caller's code (every path ends in
//! `exec` or `_exit`). It must not log through `tracing` (the parent's subscriber
//! writes to the same stderr, and a message from here would look like the parent's);
//! what the user needs to know goes into the report or to stderr once.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use ipnet::IpNet;
use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::Signal;
use nix::unistd::{Pid, getegid, geteuid, getppid};

use super::super::tun::{Tun, open_tun};
use super::route::add_default_routes;
use super::wire::{self, GO, Report};
use super::{EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND, EXIT_SETUP_FAILED, SandboxSpec};
use crate::{Link, TunError};

/// The loopback interface of a new network namespace: the kernel always creates it
/// first, with index 1 (`LOOPBACK_IFINDEX`).
const LOOPBACK_IFINDEX: u32 = 1;

/// Where the resolver configuration is bound in the private mount namespace.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// The whole life of the child. `control` is its end of the socket pair; `parent` is
/// the pid that forked it; `resolv` the file to bind over `/etc/resolv.conf`.
pub(crate) fn run(spec: &SandboxSpec, control: OwnedFd, parent: Pid, resolv: Option<&Path>) -> ! {
    let tun = match set_up(spec, resolv) {
        Ok(tun) => tun,
        Err(text) => {
            let _ = wire::send(control.as_fd(), &Report::Failed(text), None);
            exit(EXIT_SETUP_FAILED);
        }
    };
    let report = Report::Ready {
        ifindex: tun.ifindex(),
        name: tun.name().to_owned(),
    };
    if wire::send(control.as_fd(), &report, Some(tun.as_fd())).is_err() {
        exit(EXIT_SETUP_FAILED);
    }
    // Our copy of the device goes now: from here on the parent's is the only one,
    // so the device vanishes when the parent closes it.
    drop(tun);
    // If the parent dies from here on, so do we (and, after `exec`, the program: a
    // program without its tunnel would only see a dead network).
    if nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).is_err() || getppid() != parent {
        exit(EXIT_SETUP_FAILED);
    }
    if !wait_for_go(control) {
        exit(EXIT_SETUP_FAILED);
    }
    exec(&spec.program, &spec.args)
}

/// Namespaces, resolver, loopback, TUN device, routes. The error is a sentence for
/// the user.
fn set_up(spec: &SandboxSpec, resolv: Option<&Path>) -> Result<Tun, String> {
    enter_namespaces()?;
    // Our mounts must not propagate back to the original mount namespace.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("make mounts private: {e}"))?;
    if let Some(resolv) = resolv {
        bind_resolv_conf(resolv)?;
    }
    Link::new(LOOPBACK_IFINDEX)
        .and_then(|lo| lo.set_up())
        .map(|guard| guard.forget())
        .map_err(|e| format!("bring loopback up: {e}"))?;
    let tun = open_tun(Some(&spec.device)).map_err(tun_error)?;
    configure(&tun, spec)?;
    add_default_routes(tun.ifindex()).map_err(|f| {
        format!(
            "add the {} default route via {}: {}",
            f.family,
            tun.name(),
            f.reason
        )
    })?;
    Ok(tun)
}

/// As root: new network and mount namespaces. Otherwise also a new user namespace
/// in which our own uid and gid map to themselves: we hold every capability there
/// until `exec`, and the program, not being uid 0, runs without any.
fn enter_namespaces() -> Result<(), String> {
    let (uid, gid) = (geteuid(), getegid());
    if uid.is_root() {
        return unshare(CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWNS)
            .map_err(|e| format!("create network and mount namespaces: {e}"));
    }
    unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWNS)
        .map_err(|e| {
            format!(
                "create a user namespace as uid {uid}: {e}; unprivileged user namespaces \
                 seem to be disabled here (see /proc/sys/user/max_user_namespaces, \
                 /proc/sys/kernel/unprivileged_userns_clone, and AppArmor's \
                 kernel.apparmor_restrict_unprivileged_userns), or run as root"
            )
        })?;
    // Writing gid_map unprivileged requires setgroups to be denied first.
    let writes = [
        ("/proc/self/setgroups", "deny".to_owned()),
        ("/proc/self/uid_map", format!("{uid} {uid} 1")),
        ("/proc/self/gid_map", format!("{gid} {gid} 1")),
    ];
    for (path, text) in writes {
        fs::write(path, text).map_err(|e| format!("write {path}: {e}"))?;
    }
    Ok(())
}

/// Binds `resolv` over `/etc/resolv.conf` (or over the file it links to).
fn bind_resolv_conf(resolv: &Path) -> Result<(), String> {
    if !Path::new(RESOLV_CONF).exists() {
        // Nothing to bind over (or a dangling link). Creating /etc/resolv.conf would
        // change the host; without it the resolver asks 127.0.0.1, which answers
        // nothing in here. Say so and go on: the program may not need names.
        eprintln!("tun2socks exec: {RESOLV_CONF} does not exist; names will not resolve inside");
        return Ok(());
    }
    mount(
        Some(resolv),
        RESOLV_CONF,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| format!("bind {} over {RESOLV_CONF}: {e}", resolv.display()))
}

/// MTU, queue length, up, addresses; every guard forgotten (the namespace and the
/// device are ours and vanish whole).
fn configure(tun: &Tun, spec: &SandboxSpec) -> Result<(), String> {
    let fail = |e: crate::LinkError| format!("configure {}: {e}", tun.name());
    let link = Link::new(tun.ifindex()).map_err(fail)?;
    link.set_mtu(spec.mtu).map_err(fail)?.forget();
    link.set_txqueuelen(spec.txqueuelen).map_err(fail)?.forget();
    link.set_up().map_err(fail)?.forget();
    for &address in &spec.addresses {
        match link.add_address(address) {
            Ok(guard) => guard.forget(),
            Err(error) if ipv6_refused(spec, address, &error) => {
                eprintln!(
                    "tun2socks exec: IPv6 is disabled here ({error}); {address} left out, \
                     the program gets IPv4 only"
                );
            }
            Err(error) => return Err(fail(error)),
        }
    }
    Ok(())
}

/// Whether `error`, adding `address`, is IPv6 being off in this namespace or kernel
/// (`EACCES`: `disable_ipv6`; `EAFNOSUPPORT`: booted with `ipv6.disable=1`), for an
/// address the spec lets go.
fn ipv6_refused(spec: &SandboxSpec, address: IpNet, error: &crate::LinkError) -> bool {
    spec.ipv6_optional
        && address.addr().is_ipv6()
        && matches!(error.errno(), Some(libc::EACCES | libc::EAFNOSUPPORT))
}

/// The TUN error, with the usual cause spelled out for an ordinary user.
fn tun_error(error: TunError) -> String {
    let hint = match &error {
        TunError::PermissionDenied { .. } if !geteuid().is_root() => {
            let mode = fs::metadata("/dev/net/tun")
                .map(|m| format!("{:o}", m.permissions().mode() & 0o777))
                .unwrap_or_else(|_| "unknown".to_owned());
            format!(
                "; as an ordinary user, /dev/net/tun must be readable and writable by \
                 everyone (mode 0666, as most distributions ship it; here it is {mode})"
            )
        }
        _ => String::new(),
    };
    format!("open the TUN device: {error}{hint}")
}

/// Blocks until the parent says go (`true`) or closes the socket (`false`).
fn wait_for_go(control: OwnedFd) -> bool {
    let mut socket = fs::File::from(control);
    let mut byte = [0u8; 1];
    loop {
        match socket.read(&mut byte) {
            Ok(1) => return byte[0] == GO,
            Ok(_) => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
}

/// Replaces this process with the program (found through `PATH`). Only returns on
/// failure: then it says why and exits 127 (not found) or 126, as shells do.
fn exec(program: &OsString, args: &[OsString]) -> ! {
    let error = Command::new(program).args(args).exec();
    eprintln!(
        "tun2socks exec: cannot run {}: {error}",
        program.to_string_lossy()
    );
    exit(if error.kind() == io::ErrorKind::NotFound {
        EXIT_NOT_FOUND
    } else {
        EXIT_CANNOT_EXECUTE
    })
}

/// Ends the child at once: no destructors, no atexit handlers, no flushing of stdio
/// buffers that were copied from the parent.
fn exit(code: i32) -> ! {
    // SAFETY: `_exit` only ends the calling process; it touches no memory of ours
    // and is async-signal-safe, so it is sound at any point after `fork`.
    unsafe { libc::_exit(code) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LinkError, LinkOp};

    fn spec(ipv6_optional: bool) -> SandboxSpec {
        SandboxSpec {
            ipv6_optional,
            ..SandboxSpec::minimal()
        }
    }

    fn refused(address: IpNet, errno: i32) -> LinkError {
        LinkError::Refused {
            op: LinkOp::AddAddress(address),
            ifindex: 3,
            errno,
            message: None,
        }
    }

    /// The sandbox's namespace is new, so IPv6 cannot be turned off in it from
    /// outside: the whole path only runs on a kernel booted with `ipv6.disable=1`,
    /// which this machine is not. The decision is checked here.
    #[test]
    fn only_a_default_ipv6_address_refused_for_ipv6_being_off_is_left_out() {
        let v6: IpNet = "fd18::1/64".parse().unwrap();
        let v4: IpNet = "198.18.0.1/16".parse().unwrap();
        for errno in [libc::EACCES, libc::EAFNOSUPPORT] {
            assert!(ipv6_refused(&spec(true), v6, &refused(v6, errno)));
            assert!(!ipv6_refused(&spec(false), v6, &refused(v6, errno)));
            assert!(!ipv6_refused(&spec(true), v4, &refused(v4, errno)));
        }
        for errno in [libc::EEXIST, libc::EPERM, libc::EINVAL] {
            assert!(!ipv6_refused(&spec(true), v6, &refused(v6, errno)));
        }
    }
}
