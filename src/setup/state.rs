//! The lock and the state file of `--setup`, one pair per network namespace under
//! [`DEFAULT_STATE_DIR`](super::DEFAULT_STATE_DIR) (the routing table and rule
//! priorities are fixed, so two `--setup` instances in one namespace would fight
//! over them):
//!
//! - `netINODE.lock`: held with `flock(2)` for the life of the run, so a second
//!   instance (on the same device, or another) is refused; the kernel drops the lock
//!   when the holder dies, even by `kill -9`. It holds the holder's pid and device,
//!   for the message. The holder deletes it on a clean exit, while still holding it;
//!   a locker that finds its file deleted or replaced after locking tries again.
//! - `netINODE.state`: one [`RoutingEntry`] per line in its text form (`route ...`,
//!   `rule ...`), written before each change is made and removed once everything is
//!   undone. A start that finds it removes those entries first (a crashed run's
//!   leftovers), newest first.
//!
//! INODE is the network namespace's (`stat -L /proc/self/ns/net`): `/run` is shared
//! by every network namespace of the host.
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

fn state_err(path: &Path) -> impl FnOnce(io::Error) -> SetupError {
    let path = path.to_owned();
    move |error| SetupError::StateFile { path, error }
}

/// Opens (creating) and locks `path`. `None` if the file was deleted or replaced
/// between opening and locking (its holder was exiting): try again.
fn try_lock(path: &Path) -> Result<Option<Flock<File>>, SetupError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(state_err(path))?;
    let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((mut file, Errno::EWOULDBLOCK)) => {
            let mut owner = String::new();
            let _ = file.read_to_string(&mut owner);
            let mut words = owner.split_whitespace();
            return Err(SetupError::Busy {
                pid: words.next().and_then(|pid| pid.parse().ok()),
                device: words.next().unwrap_or("?").to_owned(),
                lock: path.to_owned(),
            });
        }
        Err((_, errno)) => return Err(state_err(path)(errno.into())),
    };
    let ours = lock.metadata().map_err(state_err(path))?.ino();
    match fs::metadata(path) {
        Ok(meta) if meta.ino() == ours => Ok(Some(lock)),
        Ok(_) => Ok(None),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(state_err(path)(error)),
    }
}

/// The first line of every state file.
const HEADER: &str = "# tun2socks --setup: routes and rules this run made; a later start deletes what is listed here";

/// The exclusive right to run `--setup` in this network namespace, and its state
/// file.
#[derive(Debug)]
pub struct Lock {
    _lock: Flock<File>,
    lock_path: PathBuf,
    state: PathBuf,
}

/// Attempts at taking the lock when its file is replaced under us (an instance that
/// was exiting deleted it).
const LOCK_ATTEMPTS: usize = 3;

impl Lock {
    /// Takes the `--setup` lock of this network namespace in `dir` (created if
    /// missing) for `device`, or fails with [`SetupError::Busy`] naming the pid and
    /// device of the holder.
    pub fn acquire(dir: &Path, device: &str) -> Result<Lock, SetupError> {
        fs::create_dir_all(dir).map_err(state_err(dir))?;
        let namespace = fs::metadata("/proc/self/ns/net")
            .map_err(state_err(Path::new("/proc/self/ns/net")))?
            .ino();
        let lock_path = dir.join(format!("net{namespace}.lock"));
        let state = dir.join(format!("net{namespace}.state"));
        for _ in 0..LOCK_ATTEMPTS {
            let Some(mut lock) = try_lock(&lock_path)? else {
                continue;
            };
            let write_owner = |file: &mut File| -> io::Result<()> {
                file.set_len(0)?;
                file.rewind()?;
                writeln!(file, "{} {device}", std::process::id())
            };
            write_owner(&mut lock).map_err(state_err(&lock_path))?;
            return Ok(Lock {
                _lock: lock,
                lock_path,
                state,
            });
        }
        Err(SetupError::StateFile {
            path: lock_path,
            error: io::Error::other("the lock file keeps being replaced"),
        })
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

impl Drop for Lock {
    fn drop(&mut self) {
        // Still locked here: a waiting locker sees the file gone and starts over.
        if let Err(error) = fs::remove_file(&self.lock_path) {
            tracing::debug!(%error, path = %self.lock_path.display(), "lock file not removed");
        }
    }
}
