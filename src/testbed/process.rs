//! A child process that is stopped and reaped when its guard drops, with its output
//! in a log file that tests can read (and grep for "panicked").

use std::fs::{self, File};
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use nix::unistd::Pid;

use super::{command_line, context};

/// How often a wait polls the child.
const POLL: Duration = Duration::from_millis(10);

/// A running child in its own process group. Drop (or [`Process::stop`]) sends
/// SIGTERM to the group, SIGKILL after [`Process::GRACE`], and reaps the child.
///
/// Its stdout and stderr both go to one log file, which is removed on drop, except
/// while the thread panics: then it is kept and its path printed, for the post-mortem.
#[derive(Debug)]
pub struct Process {
    child: Child,
    line: String,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Process {
    /// How long a process may take to exit after SIGTERM before it gets SIGKILL.
    pub const GRACE: Duration = Duration::from_secs(2);

    /// The directory of the log files that [`Namespace::spawn`](super::Namespace::spawn)
    /// creates.
    pub fn log_dir() -> PathBuf {
        std::env::temp_dir().join("t2s-logs")
    }

    /// Starts `command` with stdin closed and stdout and stderr appended to `log`
    /// (created, or truncated), in a new process group.
    pub fn spawn(mut command: Command, log: PathBuf) -> io::Result<Process> {
        if let Some(dir) = log.parent() {
            fs::create_dir_all(dir).map_err(context(dir.display()))?;
        }
        let file = File::create(&log).map_err(context(log.display()))?;
        let stderr = file.try_clone().map_err(context(log.display()))?;
        let line = command_line(&command);
        let child = command
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(stderr)
            .process_group(0)
            .spawn()
            .map_err(context(format!("spawn `{line}`")))?;
        Ok(Process {
            child,
            line,
            log,
            status: None,
        })
    }

    /// The child's pid (with `ip netns exec`, the program's own: it execs in place).
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The command line it was started with.
    pub fn command_line(&self) -> &str {
        &self.line
    }

    /// The log file that holds its stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything it has written so far (stdout and stderr, interleaved; lossy UTF-8).
    pub fn log(&self) -> io::Result<String> {
        let bytes = fs::read(&self.log).map_err(context(self.log.display()))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Its exit status if it has exited, without blocking.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait().map_err(context(&self.line))?;
        }
        Ok(self.status)
    }

    /// Waits up to `timeout` for it to exit; `None` if it still runs.
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits up to `timeout` until `ready` holds (polled every few milliseconds);
    /// an error, with the log, if it exits first or the time runs out.
    pub fn wait_ready(
        &mut self,
        timeout: Duration,
        ready: impl Fn(&Process) -> bool,
    ) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if ready(self) {
                return Ok(());
            }
            if let Some(status) = self.try_wait()? {
                return Err(io::Error::other(format!(
                    "{} exited with {status} before it was ready:\n{}",
                    self.line,
                    self.log().unwrap_or_default()
                )));
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{} was not ready in {timeout:?}:\n{}",
                        self.line,
                        self.log().unwrap_or_default()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it (SIGTERM, then SIGKILL after [`Process::GRACE`]) and returns how it
    /// exited: a program that handles SIGTERM cleanly reports success here.
    pub fn stop(mut self) -> io::Result<ExitStatus> {
        self.terminate()
    }

    /// [`Process::stop`] without giving the process up: its log stays readable,
    /// including what it wrote while shutting down.
    pub fn terminate(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        self.signal_group(Signal::SIGTERM);
        let deadline = Instant::now() + Self::GRACE;
        while !self.has_exited()? && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
        // The child is not reaped yet, so its pid still names our group: this also
        // reaches whatever it left behind there.
        self.signal_group(Signal::SIGKILL);
        let status = self.child.wait().map_err(context(&self.line))?;
        self.status = Some(status);
        Ok(status)
    }

    /// Whether the child has exited, leaving it unreaped (`waitid` with `WNOWAIT`).
    fn has_exited(&self) -> io::Result<bool> {
        let pid = self.pid()?;
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        match waitid(Id::Pid(pid), flags) {
            Ok(WaitStatus::StillAlive) => Ok(false),
            Ok(_) => Ok(true),
            Err(e) => Err(context(format!("waitid {pid}"))(e.into())),
        }
    }

    fn pid(&self) -> io::Result<Pid> {
        i32::try_from(self.child.id())
            .map(Pid::from_raw)
            .map_err(|_| io::Error::other(format!("pid {} out of range", self.child.id())))
    }

    fn signal_group(&self, signal: Signal) {
        let Ok(pid) = self.pid() else {
            return;
        };
        match killpg(pid, signal) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => tracing::warn!(command = %self.line, "{signal}: {e}"),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Err(e) = self.terminate() {
            tracing::warn!(command = %self.line, "stop: {e}");
        }
        if std::thread::panicking() {
            eprintln!("log of `{}` kept: {}", self.line, self.log.display());
        } else {
            let _gone_already = fs::remove_file(&self.log);
        }
    }
}
