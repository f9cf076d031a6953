//! The lock and the state file of `--setup`, one pair per device and network
//! namespace under [`DEFAULT_STATE_DIR`](super::DEFAULT_STATE_DIR):
//!
//! - `DEVICE.netNSINODE.lock`: held with `flock(2)` for the life of the run, so a
//!   second instance on the same device is refused (the kernel drops the lock when
//!   the holder dies, even by `kill -9`). It holds the holder's pid, for the message.
//!   It is never deleted (deleting a lock file races with the next locker).
//! - `DEVICE.netNSINODE.state`: one [`RoutingEntry`] per line in its text form
//!   (`route ...`, `rule ...`), written before each change is made and removed once
//!   everything is undone. A start that finds it removes those entries first (a crashed
//!   run's leftovers), newest first.
//!
//! The namespace's inode (`/proc/self/ns/net`) is in the names because `/run` is
//! shared by every network namespace of the host, and `tun0` is a common name.
//!
//! Stage: beside the data path (start and exit only). It must not decide which
//! entries exist (that is `setup`), only record and replay them.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use tun2socks_platform::{Routing, RoutingEntry};

use super::SetupError;

/// The first line of every state file.
const HEADER: &str = "# tun2socks --setup: routes and rules this run made; a later start deletes what is listed here";

/// The exclusive right to set up one device in this network namespace, and its
/// state file.
#[derive(Debug)]
pub struct Lock {
    _lock: Flock<File>,
    state: PathBuf,
}

impl Lock {
    /// Takes the lock for `device` in `dir` (created if missing), or fails with
    /// [`SetupError::Busy`] naming the pid that holds it.
    pub fn acquire(dir: &Path, device: &str) -> Result<Lock, SetupError> {
        let state_err = |path: &Path| {
            let path = path.to_owned();
            move |error| SetupError::StateFile { path, error }
        };
        fs::create_dir_all(dir).map_err(state_err(dir))?;
        let namespace = fs::metadata("/proc/self/ns/net")
            .map_err(state_err(Path::new("/proc/self/ns/net")))?
            .ino();
        let lock_path = dir.join(format!("{device}.net{namespace}.lock"));
        let state = dir.join(format!("{device}.net{namespace}.state"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(state_err(&lock_path))?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, Errno::EWOULDBLOCK)) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                return Err(SetupError::Busy {
                    device: device.to_owned(),
                    pid: pid.trim().parse().ok(),
                    lock: lock_path,
                });
            }
            Err((_, errno)) => {
                return Err(SetupError::StateFile {
                    path: lock_path,
                    error: errno.into(),
                });
            }
        };
        let write_pid = |file: &mut File| -> io::Result<()> {
            file.set_len(0)?;
            file.rewind()?;
            writeln!(file, "{}", std::process::id())
        };
        write_pid(&mut lock).map_err(state_err(&lock_path))?;
        Ok(Lock { _lock: lock, state })
    }

    /// The state file's path.
    pub fn state_path(&self) -> &Path {
        &self.state
    }

    /// Deletes what a crashed run listed in the state file, newest first, then the
    /// file. Returns the entries that were still present. An unreadable line stops
    /// nothing: it is reported in the log and skipped.
    pub fn clean_leftovers(&self) -> Result<Vec<RoutingEntry>, SetupError> {
        let text = match fs::read_to_string(&self.state) {
            Ok(text) => text,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => {
                return Err(SetupError::StateFile {
                    path: self.state.clone(),
                    error,
                });
            }
        };
        let routing = Routing::new()?;
        let mut removed = Vec::new();
        for line in text.lines().rev() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line.parse::<RoutingEntry>() {
                Ok(entry) => {
                    if routing.remove(entry)? {
                        tracing::info!(%entry, "removed a leftover of an earlier run");
                        removed.push(entry);
                    }
                }
                Err(error) => tracing::warn!(%error, path = %self.state.display(), "skipped"),
            }
        }
        self.remove_state()?;
        Ok(removed)
    }

    /// Replaces the state file with `entries` (written to a temporary file, synced,
    /// renamed), so a crash leaves either the old list or the new one.
    pub fn record(&self, entries: &[RoutingEntry]) -> Result<(), SetupError> {
        let temporary = self.state.with_extension("state.new");
        let write = || -> io::Result<()> {
            let mut file = File::create(&temporary)?;
            let mut text = format!("{HEADER}\n# pid {}\n", std::process::id());
            for entry in entries {
                text.push_str(&entry.to_string());
                text.push('\n');
            }
            file.write_all(text.as_bytes())?;
            file.sync_data()?;
            fs::rename(&temporary, &self.state)
        };
        write().map_err(|error| SetupError::StateFile {
            path: self.state.clone(),
            error,
        })
    }

    /// Deletes the state file (nothing is left to undo).
    pub fn remove_state(&self) -> Result<(), SetupError> {
        match fs::remove_file(&self.state) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(SetupError::StateFile {
                path: self.state.clone(),
                error,
            }),
        }
    }
}
