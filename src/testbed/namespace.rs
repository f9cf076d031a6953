//! One named network namespace (`ip netns`): commands, processes and threads inside
//! it, its `/etc/netns` files, and its removal on drop.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::process::Process;
use super::stale::{register, unique_id, unregister};
use super::{context, ip, run_checked};

/// Where `ip netns add` mounts the namespace files.
pub const NETNS_RUN_DIR: &str = "/run/netns";
/// Where `ip netns exec NAME` finds files to bind over `/etc` (`hosts`, `resolv.conf`).
pub const NETNS_CONFIG_DIR: &str = "/etc/netns";

/// `ip netns add` makes `/run/netns` a shared mount the first time; two of them
/// racing at that moment stack mounts. Creations in this process take turns.
static CREATE_LOCK: Mutex<()> = Mutex::new(());

/// A named network namespace that this process created, deleted on drop.
///
/// Drop kills every process still inside (`ip netns pids`), waits (up to 5 s) until
/// they have exited, deletes the namespace and removes `/etc/netns/NAME`; failures
/// there are logged, not raised. Use [`Namespace::delete`] to see them.
#[derive(Debug)]
pub struct Namespace {
    name: String,
    deleted: bool,
}

impl Namespace {
    /// Creates the namespace `name` (`ip netns add`), brings its loopback up and
    /// turns IPv6 duplicate address detection off, so addresses work at once.
    ///
    /// Fails if a namespace of that name exists. Use [`unique_name`](super::unique_name)
    /// for a name that [`cleanup_stale`](super::cleanup_stale) recognises after a crash.
    pub fn create(name: impl Into<String>) -> io::Result<Namespace> {
        let name = name.into();
        validate_name(&name)?;
        register(&name);
        let added = {
            let _turn = CREATE_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
            ip(["netns", "add", &name])
        };
        if let Err(e) = added {
            unregister(&name);
            return Err(e);
        }
        let namespace = Namespace {
            name,
            deleted: false,
        };
        namespace.ip(["link", "set", "lo", "up"])?;
        namespace.set_sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        namespace.set_sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        Ok(namespace)
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace file, `/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_RUN_DIR).join(&self.name)
    }

    /// `ip netns exec NAME PROGRAM`: add arguments, then run or spawn it. The program
    /// sees this namespace's `/etc/netns/NAME` files over `/etc`.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    /// Runs `program args` inside the namespace to completion; a non-zero exit is an
    /// error that carries the command line and its stderr.
    pub fn run<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> io::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = self.command(program);
        command.args(args);
        run_checked(command)
    }

    /// Runs `ip -n NAME args` (addresses, links, routes of this namespace).
    pub fn ip<I, S>(&self, args: I) -> io::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = Command::new("ip");
        command.args(["-n", &self.name]).args(args);
        run_checked(command)
    }

    /// Starts `command` (usually from [`Namespace::command`]) as a [`Process`] whose
    /// stdout and stderr go to a log file, and which is stopped when dropped.
    pub fn spawn(&self, command: Command) -> io::Result<Process> {
        let log = Process::log_dir().join(format!(
            "{}-{}-{}.log",
            self.name,
            program_name(&command),
            unique_id()
        ));
        Process::spawn(command, log)
    }

    /// Runs `f` on a new thread that first enters this namespace (`setns(2)`), so
    /// sockets it opens live here. Only that thread moves; threads it spawns start in
    /// the namespace too. `/etc/netns` files do not apply to it (they are a feature of
    /// `ip netns exec`).
    pub fn enter<F, T>(&self, f: F) -> JoinHandle<io::Result<T>>
    where
        F: FnOnce() -> io::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let path = self.path();
        std::thread::spawn(move || {
            enter_path(&path)?;
            f()
        })
    }

    /// Like [`Namespace::enter`], then drives the future that `f` returns on a
    /// current-thread tokio runtime built on that thread (I/O and time enabled).
    pub fn enter_async<F, Fut, T>(&self, f: F) -> JoinHandle<io::Result<T>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = io::Result<T>>,
        T: Send + 'static,
    {
        self.enter(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(context("tokio runtime"))?;
            runtime.block_on(f())
        })
    }

    /// Runs `f` inside the namespace (see [`Namespace::enter`]) and waits for it.
    pub fn within<F, T>(&self, f: F) -> io::Result<T>
    where
        F: FnOnce() -> io::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        join(self.enter(f))
    }

    /// Sets a sysctl of this namespace, e.g. `("net.ipv4.ip_forward", "1")`, by
    /// writing `/proc/sys/...` from a thread inside it (no `sysctl` binary needed).
    pub fn set_sysctl(&self, key: &str, value: &str) -> io::Result<()> {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        let value = value.to_owned();
        let name = self.name.clone();
        self.within(move || {
            fs::write(&path, value).map_err(context(format!("{name}: write {}", path.display())))
        })
    }

    /// Writes `/etc/netns/NAME/hosts`: localhost plus `entries`, so programs run with
    /// [`Namespace::command`] resolve these names here and nowhere else. Removed with
    /// the namespace.
    pub fn set_hosts(&self, entries: &[(&str, IpAddr)]) -> io::Result<()> {
        let mut text = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost\n");
        for (name, ip) in entries {
            text.push_str(&format!("{ip}\t{name}\n"));
        }
        self.write_config("hosts", &text)
    }

    /// Writes `/etc/netns/NAME/resolv.conf` naming `servers` (one try, one second
    /// each), so lookups here never go to the host's resolver. Removed with the
    /// namespace.
    pub fn set_resolv_conf(&self, servers: &[IpAddr]) -> io::Result<()> {
        let mut text = String::from("options timeout:1 attempts:1\n");
        for server in servers {
            text.push_str(&format!("nameserver {server}\n"));
        }
        self.write_config("resolv.conf", &text)
    }

    /// The processes whose network namespace is this one (`ip netns pids`).
    pub fn pids(&self) -> io::Result<Vec<u32>> {
        pids(&self.name)
    }

    /// Deletes the namespace now, reporting what failed (drop only logs it).
    pub fn delete(mut self) -> io::Result<()> {
        self.deleted = true;
        let result = delete_namespace(&self.name);
        unregister(&self.name);
        result
    }

    fn write_config(&self, file: &str, text: &str) -> io::Result<()> {
        let dir = Path::new(NETNS_CONFIG_DIR).join(&self.name);
        fs::create_dir_all(&dir).map_err(context(dir.display()))?;
        let path = dir.join(file);
        fs::write(&path, text).map_err(context(path.display()))
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if self.deleted {
            return;
        }
        if let Err(e) = delete_namespace(&self.name) {
            tracing::warn!(namespace = %self.name, "teardown: {e}");
        }
        unregister(&self.name);
    }
}

/// Waits for a thread from [`Namespace::enter`]; a panic in it becomes an error.
pub fn join<T>(handle: JoinHandle<io::Result<T>>) -> io::Result<T> {
    handle
        .join()
        .map_err(|_| io::Error::other("a thread inside a namespace panicked"))?
}

/// Moves the calling thread into the network namespace mounted at `path`.
fn enter_path(path: &Path) -> io::Result<()> {
    let file = File::open(path).map_err(context(path.display()))?;
    setns(&file, CloneFlags::CLONE_NEWNET)
        .map_err(io::Error::from)
        .map_err(context(format!("setns {}", path.display())))
}

/// Kills what runs in namespace `name`, deletes it and its `/etc/netns` directory.
/// A namespace that is already gone is not an error.
pub(crate) fn delete_namespace(name: &str) -> io::Result<()> {
    let mut first_error = None;
    if Path::new(NETNS_RUN_DIR).join(name).exists() {
        match pids(name) {
            Ok(pids) => {
                kill_all(&pids);
                wait_exited(&pids, EXIT_WAIT);
            }
            Err(e) => first_error = Some(e),
        }
        if let Err(e) = ip(["netns", "delete", name]) {
            first_error.get_or_insert(e);
        }
    }
    let dir = Path::new(NETNS_CONFIG_DIR).join(name);
    match fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            first_error.get_or_insert(context(dir.display())(e));
        }
        _ => {}
    }
    first_error.map_or(Ok(()), Err)
}

fn pids(name: &str) -> io::Result<Vec<u32>> {
    let output = ip(["netns", "pids", name])?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .collect())
}

/// How long [`delete_namespace`] waits for the processes it killed to finish exiting.
const EXIT_WAIT: Duration = Duration::from_secs(5);

/// Waits until each of `pids` has exited (gone, or a zombie left for its parent),
/// for at most `limit` in all. SIGKILL is delivered at once, but a process takes a
/// while to finish exiting: one holding 2 GiB took 60 ms here, so a caller that
/// exits or checks right after the kill would still see it running.
fn wait_exited(pids: &[u32], limit: Duration) {
    let deadline = Instant::now() + limit;
    let own = std::process::id();
    for &pid in pids.iter().filter(|&&pid| pid != own) {
        while !has_exited(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Whether `pid` is gone or a zombie (state `Z` or `X` in `/proc/PID/stat`).
pub fn has_exited(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    // The state follows the command name, which is in parentheses and may hold any
    // character, ")" too: take the text after the last ")".
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_none_or(|state| state == "Z" || state == "X")
}

/// SIGKILLs `pids`, never this process. Processes that are already gone are fine.
fn kill_all(pids: &[u32]) {
    let own = std::process::id();
    for &pid in pids.iter().filter(|&&pid| pid != own) {
        if let Ok(raw) = i32::try_from(pid) {
            let _gone_already = kill(Pid::from_raw(raw), Signal::SIGKILL);
        }
    }
}

fn validate_name(name: &str) -> io::Result<()> {
    let bad = name.is_empty()
        || name == "."
        || name == ".."
        || name.len() > 64
        || name.contains(['/', '\0'])
        || name.chars().any(char::is_whitespace);
    if bad {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid namespace name {name:?}"),
        ))
    } else {
        Ok(())
    }
}

/// A short name for a command's log: the program after `ip netns exec NAME`, or the
/// program itself.
fn program_name(command: &Command) -> String {
    let args: Vec<&OsStr> = command.get_args().collect();
    let program = match args.as_slice() {
        [netns, exec, _, program, ..] if *netns == "netns" && *exec == "exec" => *program,
        _ => command.get_program(),
    };
    Path::new(program)
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "process".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_process_has_not_exited_a_zombie_and_a_missing_one_have() {
        assert!(!has_exited(std::process::id()));
        // Beyond the kernel's largest pid (4,194,304).
        assert!(has_exited(u32::MAX));
        let mut child = Command::new("sh")
            .args(["-c", "exit 0"])
            .spawn()
            .expect("sh");
        // Not reaped yet: a zombie once it has exited.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !has_exited(child.id()) {
            assert!(Instant::now() < deadline, "sh never exited");
            std::thread::sleep(Duration::from_millis(5));
        }
        let stat = fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap_or_default();
        assert!(stat.contains(") Z "), "{stat}");
        assert!(child.wait().expect("wait").success());
        assert!(has_exited(child.id()));
    }
}
