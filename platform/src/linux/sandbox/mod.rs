//! A program in a private network namespace whose only route is a TUN device that
//! the caller serves: the mechanics of `tun2socks exec`.
//!
//! [`Sandbox::spawn`] forks a setup process, which makes new network and mount
//! namespaces (and, for an ordinary user, a user namespace first), binds a resolver
//! file over `/etc/resolv.conf`, brings loopback up, creates and configures the TUN
//! device, adds default routes (IPv4 and IPv6) through it, and hands the device's
//! descriptor back over a socket pair (`SCM_RIGHTS`). The caller, still in the
//! original namespaces, serves the device, then calls [`Sandbox::start`]: the setup
//! process `exec`s the program. Nothing is created on the file system (no namespace
//! files): the namespaces live as long as a process uses them.
//!
//! This module must not serve the device, decide addresses or resolver contents
//! (the caller's [`SandboxSpec`] does), or run async code.

mod child;
mod route;
mod wire;

use std::ffi::OsString;
use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

use ipnet::IpNet;
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::{
    ForkResult, Pid, fork, getegid, geteuid, getgid, getpgrp, getpid, getuid, tcgetpgrp,
};

use super::tun::Tun;
use crate::SandboxError;

/// Exit status of the setup process when setup failed before the program ran.
const EXIT_SETUP_FAILED: i32 = 125;
/// Exit status when the program could not be executed (shell convention).
const EXIT_CANNOT_EXECUTE: i32 = 126;
/// Exit status when the program was not found (shell convention).
const EXIT_NOT_FOUND: i32 = 127;

/// What to run, and how to configure the TUN device inside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxSpec {
    /// The program (looked up in `PATH` when it has no `/`).
    pub program: OsString,
    /// Its arguments (without the program name).
    pub args: Vec<OsString>,
    /// The TUN device's name inside the namespace.
    pub device: String,
    /// The device's MTU.
    pub mtu: u32,
    /// The device's transmit queue length (packets).
    pub txqueuelen: u32,
    /// Addresses of the device (with prefix length).
    pub addresses: Vec<IpNet>,
    /// Whether the IPv6 ones among [`addresses`](Self::addresses) may be left out,
    /// with a warning, where the namespace refuses them: IPv6 disabled in it
    /// (`EACCES`), or a kernel booted with `ipv6.disable=1` (`EAFNOSUPPORT`). For
    /// default addresses; an address the user asked for still fails.
    pub ipv6_optional: bool,
    /// Contents of `/etc/resolv.conf` inside; `None` leaves the host's file visible.
    pub resolv_conf: Option<String>,
}

/// A signal the caller may pass on to the program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SandboxSignal {
    /// SIGINT.
    Interrupt,
    /// SIGTERM.
    Terminate,
    /// SIGHUP.
    Hangup,
    /// SIGQUIT.
    Quit,
    /// SIGUSR1.
    User1,
    /// SIGUSR2.
    User2,
    /// SIGKILL.
    Kill,
}

/// How the program ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProgramExit {
    /// It exited with this status.
    Code(i32),
    /// A signal (this number) killed it.
    Signal(i32),
}

impl ProgramExit {
    /// The status a shell reports: the exit code, or 128 + the signal number.
    pub fn shell_status(self) -> u8 {
        let status = match self {
            ProgramExit::Code(code) => code,
            ProgramExit::Signal(signal) => signal.saturating_add(128),
        };
        u8::try_from(status & 0xff).unwrap_or(u8::MAX)
    }
}

/// The sandboxed program (before [`Sandbox::start`]: its setup process, waiting).
///
/// Dropping it before the program was waited for kills the program and everything
/// else that still runs in its network namespace, and reaps it.
#[derive(Debug)]
pub struct Sandbox {
    pid: Pid,
    control: Mutex<Option<OwnedFd>>,
    /// `true` once the process has exited: its pid may then be reused, so no more
    /// signals go to it. Held while signalling, so a wait cannot reap in between.
    exited: Mutex<bool>,
    /// The namespace's identity, as `/proc/PID/ns/net` reads (`net:[INODE]`).
    netns: Option<String>,
}

impl Sandbox {
    /// Forks the setup process and waits for it to report; returns the sandbox and
    /// the configured TUN device (its descriptor now ours, the interface inside the
    /// sandbox's namespace).
    ///
    /// Must be called while this process has a single thread (before any async
    /// runtime or thread pool starts): otherwise it fails with
    /// [`SandboxError::Threads`] rather than fork a copy of a multi-threaded process.
    /// A set-user-ID or set-group-ID process is refused: the program would inherit
    /// the owner's identity.
    pub fn spawn(spec: &SandboxSpec) -> Result<(Sandbox, Tun), SandboxError> {
        let threads = thread_count().map_err(|error| SandboxError::Io {
            op: "count this process's threads (/proc/self/task)",
            error,
        })?;
        if threads != 1 {
            return Err(SandboxError::Threads { threads });
        }
        if getuid() != geteuid() || getgid() != getegid() {
            // Installed set-user-ID (or set-group-ID): the program would run with the
            // owner's identity instead of the caller's.
            return Err(SandboxError::Setup {
                message: "refusing to run a program from a set-user-ID or set-group-ID \
                          tun2socks: it would run with the owner's privileges; use the \
                          user namespace (no privileges needed) or file capabilities"
                    .to_owned(),
            });
        }
        let resolv = spec
            .resolv_conf
            .as_deref()
            .map(ResolvFile::create)
            .transpose()?;
        let (parent_end, child_end) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| SandboxError::Io {
            op: "create a socket pair",
            error: e.into(),
        })?;
        let parent = getpid();
        // SAFETY: this process has exactly one thread (checked above, and this
        // function starts none), so the child is a complete copy in which every lock
        // is free and any code may run; it never returns into the caller's code
        // (`child::run` ends in `exec` or `_exit`).
        let forked = unsafe { fork() }.map_err(|e| SandboxError::Io {
            op: "fork",
            error: e.into(),
        })?;
        let pid = match forked {
            ForkResult::Child => {
                drop(parent_end);
                child::run(
                    spec,
                    child_end,
                    parent,
                    resolv.as_ref().map(|r| r.path.as_path()),
                )
            }
            ForkResult::Parent { child } => child,
        };
        drop(child_end);
        let mut sandbox = Sandbox {
            pid,
            control: Mutex::new(Some(parent_end)),
            exited: Mutex::new(false),
            netns: None,
        };
        // The child has bound the file (or failed) once it reports: the file can go.
        let report = sandbox.receive_report();
        drop(resolv);
        let (ifindex, name, fd) = report?;
        sandbox.netns = fs::read_link(format!("/proc/{pid}/ns/net"))
            .ok()
            .map(|link| link.to_string_lossy().into_owned());
        Ok((sandbox, Tun::from_parts(fd, name, ifindex, true)))
    }

    fn receive_report(&self) -> Result<(u32, String, OwnedFd), SandboxError> {
        let received = {
            let control = self.control.lock().unwrap_or_else(PoisonError::into_inner);
            match control.as_ref() {
                Some(socket) => wire::receive(socket.as_fd()),
                None => Ok(None),
            }
        };
        let failed = |message: String| {
            self.reap_after_failure();
            Err(SandboxError::Setup { message })
        };
        match received {
            Ok(Some((wire::Report::Ready { ifindex, name }, Some(fd)))) => Ok((ifindex, name, fd)),
            Ok(Some((wire::Report::Ready { .. }, None))) => {
                failed("the setup process sent no TUN descriptor".to_owned())
            }
            Ok(Some((wire::Report::Failed(message), _))) => failed(message),
            Ok(None) => failed("the setup process exited without a report".to_owned()),
            Err(e) => failed(format!("reading the setup process's report: {e}")),
        }
    }

    /// The setup process's pid (the program's, once started: it `exec`s in place).
    pub fn id(&self) -> u32 {
        self.pid.as_raw().unsigned_abs()
    }

    /// Lets the program run: the setup process `exec`s it now.
    pub fn start(&self) -> Result<(), SandboxError> {
        let socket = self
            .control
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(socket) = socket else {
            return Err(SandboxError::Io {
                op: "start the program",
                error: io::Error::new(io::ErrorKind::AlreadyExists, "already started"),
            });
        };
        let mut socket = fs::File::from(socket);
        socket
            .write_all(&[wire::GO])
            .map_err(|error| SandboxError::Io {
                op: "tell the setup process to start the program",
                error,
            })
    }

    /// Blocks until the program exits and returns how. May run on another thread
    /// than [`Sandbox::signal`] (the sandbox is `Sync`).
    pub fn wait(&self) -> Result<ProgramExit, SandboxError> {
        let io = |error: Errno| SandboxError::Io {
            op: "wait for the program",
            error: error.into(),
        };
        // Wait without reaping: until we mark it exited, the pid stays reserved
        // (a zombie), so a concurrent signal cannot hit another process.
        loop {
            match waitid(
                Id::Pid(self.pid),
                WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
            ) {
                Ok(_) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(io(e)),
            }
        }
        let mut exited = self.exited.lock().unwrap_or_else(PoisonError::into_inner);
        *exited = true;
        loop {
            match waitpid(self.pid, None) {
                Ok(WaitStatus::Exited(_, code)) => return Ok(ProgramExit::Code(code)),
                Ok(WaitStatus::Signaled(_, signal, _)) => {
                    return Ok(ProgramExit::Signal(signal as i32));
                }
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => return Err(io(e)),
            }
        }
    }

    /// Sends `signal` to the program; does nothing once it has exited.
    pub fn signal(&self, signal: SandboxSignal) -> Result<(), SandboxError> {
        let exited = self.exited.lock().unwrap_or_else(PoisonError::into_inner);
        if *exited {
            return Ok(());
        }
        let signal = match signal {
            SandboxSignal::Interrupt => Signal::SIGINT,
            SandboxSignal::Hangup => Signal::SIGHUP,
            SandboxSignal::Terminate => Signal::SIGTERM,
            SandboxSignal::Quit => Signal::SIGQUIT,
            SandboxSignal::User1 => Signal::SIGUSR1,
            SandboxSignal::User2 => Signal::SIGUSR2,
            SandboxSignal::Kill => Signal::SIGKILL,
        };
        match kill(self.pid, signal) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(e) => Err(SandboxError::Io {
                op: "signal the program",
                error: e.into(),
            }),
        }
    }

    /// Whether a Ctrl-C at the terminal reaches the program without our help: this
    /// process's group is the foreground group of the terminal on stdin, and the
    /// program, which never leaves our group on its own, is in it too. A SIGINT then
    /// most likely came from the terminal, and passing it on would deliver it twice.
    pub fn shares_terminal(&self) -> bool {
        tcgetpgrp(io::stdin()).is_ok_and(|foreground| foreground == getpgrp())
    }

    /// SIGKILLs every process still in the sandbox's network namespace (what the
    /// program left running in the background) and returns how many there were.
    /// The namespace then disappears with the last of them.
    pub fn kill_leftovers(&self) -> usize {
        let Some(netns) = self.netns.as_deref() else {
            return 0;
        };
        let own = getpid();
        let Ok(entries) = fs::read_dir("/proc") else {
            return 0;
        };
        let mut killed = 0;
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            let pid = Pid::from_raw(pid);
            if pid == own {
                continue;
            }
            let inside = fs::read_link(entry.path().join("ns/net"))
                .is_ok_and(|link| link.as_os_str() == netns);
            if inside && kill(pid, Signal::SIGKILL).is_ok() {
                killed += 1;
            }
        }
        killed
    }

    /// Kills and reaps a setup process that failed or could not report.
    fn reap_after_failure(&self) {
        let _ = self.signal(SandboxSignal::Kill);
        let _ = self.wait();
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let exited = *self.exited.lock().unwrap_or_else(PoisonError::into_inner);
        if !exited {
            let _ = self.signal(SandboxSignal::Kill);
            let _ = self.wait();
        }
        self.kill_leftovers();
    }
}

/// The number of threads of this process.
fn thread_count() -> io::Result<usize> {
    Ok(fs::read_dir("/proc/self/task")?.count())
}

/// The resolver file the setup process binds over `/etc/resolv.conf`; removed on
/// drop (the bind mount keeps its contents alive inside).
struct ResolvFile {
    path: PathBuf,
}

impl ResolvFile {
    fn create(contents: &str) -> Result<ResolvFile, SandboxError> {
        let path = std::env::temp_dir().join(format!("tun2socks-exec-{}.resolv.conf", getpid()));
        let io = |error| SandboxError::Io {
            op: "write the sandbox's resolv.conf",
            error,
        };
        // A leftover of a crashed run with our pid: ours to replace.
        let _ = fs::remove_file(&path);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&path)
            .map_err(io)?;
        let file_guard = ResolvFile { path };
        file.write_all(contents.as_bytes()).map_err(io)?;
        Ok(file_guard)
    }
}

impl Drop for ResolvFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// `true`, with a device and nothing else, for unit tests.
#[cfg(test)]
impl SandboxSpec {
    pub(crate) fn minimal() -> SandboxSpec {
        SandboxSpec {
            program: "true".into(),
            args: vec![],
            device: "tun0".into(),
            mtu: 1500,
            txqueuelen: 1000,
            addresses: vec![],
            ipv6_optional: false,
            resolv_conf: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_status_follows_the_shell_convention() {
        assert_eq!(ProgramExit::Code(0).shell_status(), 0);
        assert_eq!(ProgramExit::Code(7).shell_status(), 7);
        assert_eq!(ProgramExit::Signal(15).shell_status(), 143);
        assert_eq!(ProgramExit::Signal(9).shell_status(), 137);
        assert_eq!(ProgramExit::Code(256 + 3).shell_status(), 3);
    }

    #[test]
    fn a_multi_threaded_process_is_refused() {
        // The test harness runs tests on threads: this process has more than one.
        let _other = std::thread::spawn(|| std::thread::sleep(std::time::Duration::from_secs(1)));
        match Sandbox::spawn(&SandboxSpec::minimal()) {
            Err(SandboxError::Threads { threads }) => assert!(threads > 1),
            other => panic!("expected Threads, got {other:?}"),
        }
    }

    #[test]
    fn the_resolver_file_is_removed_with_its_guard() {
        let file = ResolvFile::create("nameserver 198.18.0.2\n").unwrap();
        let path = file.path.clone();
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            "nameserver 198.18.0.2\n"
        );
        drop(file);
        assert!(!path.exists());
    }
}
