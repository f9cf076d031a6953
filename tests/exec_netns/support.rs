//! Helpers of `exec_netns.rs`: the /dev/net/tun mode guard, a copy of the binary that
//! an ordinary user may run, and looks at /proc and /run/netns.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use tun2socks::testbed::{Process, Skip};

use super::binary;

/// Unprivileged user namespaces are allowed on this kernel.
pub fn user_namespaces_allowed(test: &str) -> Result<(), Skip> {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .ok()
            .map(|s| s.trim().to_owned())
    };
    let max = read("/proc/sys/user/max_user_namespaces");
    let clone = read("/proc/sys/kernel/unprivileged_userns_clone");
    let apparmor = read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns");
    let allowed = max.as_deref() != Some("0")
        && clone.as_deref() != Some("0")
        && apparmor.as_deref() != Some("1");
    if allowed {
        Ok(())
    } else {
        Err(Skip {
            what: test.to_owned(),
            needs: format!(
                "unprivileged user namespaces (max_user_namespaces={max:?}, \
                 unprivileged_userns_clone={clone:?}, apparmor_restrict={apparmor:?})"
            ),
        })
    }
}

/// Sets the mode of /dev/net/tun and restores the old one on drop (even on panic).
/// Holds an exclusive lock meanwhile, so that two test processes (two worktrees, two
/// runs) never interleave: without it, the second one saves the first one's 0666 as
/// "old", the first restores 0600 under the second's feet, and the second leaves
/// 0666 behind.
pub struct TunModeGuard {
    pub old: u32,
    lock: Option<Flock<std::fs::File>>,
}

/// The lock of a [`TunModeGuard`] that restored the mode: held until dropped, so that
/// a test can check the restored mode before another process changes it.
pub struct TunModeLock {
    _lock: Option<Flock<std::fs::File>>,
}

impl TunModeGuard {
    pub const PATH: &str = "/dev/net/tun";
    const LOCK: &str = "/run/lock/tun2socks-tests-dev-net-tun.lock";

    pub fn set(mode: u32) -> TunModeGuard {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(Self::LOCK)
            .unwrap();
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .unwrap();
        let old = std::fs::metadata(Self::PATH).unwrap().permissions().mode() & 0o7777;
        std::fs::set_permissions(Self::PATH, std::fs::Permissions::from_mode(mode)).unwrap();
        TunModeGuard {
            old,
            lock: Some(lock),
        }
    }

    /// Restores the old mode now and keeps the lock until the result drops.
    pub fn restore(mut self) -> TunModeLock {
        let lock = self.lock.take();
        drop(self);
        TunModeLock { _lock: lock }
    }
}

impl Drop for TunModeGuard {
    fn drop(&mut self) {
        let restored =
            std::fs::set_permissions(Self::PATH, std::fs::Permissions::from_mode(self.old));
        if let Err(e) = restored {
            eprintln!("could not restore the mode of {}: {e}", Self::PATH);
        }
    }
}

/// A copy of the binary that uid 65534 may execute, wherever the checkout lives.
pub struct ExecutableCopy {
    dir: PathBuf,
    path: PathBuf,
}

impl ExecutableCopy {
    pub fn new() -> ExecutableCopy {
        let dir = std::env::temp_dir().join(format!("t2s-exec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.join("tun2socks");
        let copy = ExecutableCopy { dir, path };
        std::fs::copy(binary(), copy.path()).unwrap();
        std::fs::set_permissions(copy.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        copy
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ExecutableCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn wait_for_line(process: &Process, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if process.log().unwrap_or_default().lines().any(|l| l == line) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no {line:?} in {}", process.log().unwrap_or_default());
}

/// How many processes have `needle` in their command line.
pub fn processes_with(needle: &str) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|cmdline| String::from_utf8_lossy(cmdline).contains(needle))
        .count()
}

pub fn netns_list() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with("t2s-"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}
