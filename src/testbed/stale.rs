//! Names that are unique per run, and the removal of what a crashed run left behind.
//!
//! Every name made here is `t2s-TAG-PID-N`: the prefix marks it as ours, `PID` is the
//! process that made it and `N` a counter of that process. A namespace whose `PID` is
//! no longer alive belongs to a run that crashed (or was killed before its guards
//! ran); [`cleanup_stale`] removes it. A namespace is never removed while its process
//! lives, so parallel runs leave each other alone.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use super::namespace::{NETNS_CONFIG_DIR, NETNS_RUN_DIR, delete_namespace};

/// The prefix of every name this module makes.
pub const PREFIX: &str = "t2s-";

/// The longest tag kept in a name; longer tags are cut.
const MAX_TAG_LEN: usize = 8;

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Names of the namespaces this process created and has not deleted yet. A
/// namespace that carries our own pid but is not in here was left by an earlier
/// process that had the same pid.
static OWN: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// A number never returned before by this process.
pub fn unique_id() -> u64 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// A name `t2s-TAG-PID-N`, unique among the runs that are alive. `tag` is cut to its
/// first 8 ASCII letters and digits (lowercased), so names stay short.
pub fn unique_name(tag: &str) -> String {
    let mut clean: String = tag
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .take(MAX_TAG_LEN)
        .collect();
    if clean.is_empty() {
        clean.push('x');
    }
    format!("{PREFIX}{clean}-{}-{}", std::process::id(), unique_id())
}

/// The pid embedded in a name made by [`unique_name`] (with or without a suffix such
/// as `-app`), or `None` for any other name.
pub fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let mut parts = rest.split('-');
    let _tag = parts.next()?;
    let pid = parts.next()?.parse().ok()?;
    let _counter: u64 = parts.next()?.parse().ok()?;
    Some(pid)
}

/// Removes every namespace (and `/etc/netns` directory) named `t2s-TAG-PID-N...`
/// whose process is gone, killing what still runs in it. Returns the names removed.
///
/// Namespaces of live processes, and names in any other format, are left alone. A
/// namespace that cannot be removed is logged and skipped, so one stuck leftover
/// does not stop the next run.
pub fn cleanup_stale() -> io::Result<Vec<String>> {
    let mut removed = Vec::new();
    for name in list_prefixed(Path::new(NETNS_RUN_DIR))? {
        if is_stale(&name) {
            match delete_namespace(&name) {
                Ok(()) => removed.push(name),
                Err(e) => tracing::warn!(namespace = %name, "stale namespace not removed: {e}"),
            }
        }
    }
    for name in list_prefixed(Path::new(NETNS_CONFIG_DIR))? {
        if is_stale(&name) && !removed.contains(&name) {
            let dir = Path::new(NETNS_CONFIG_DIR).join(&name);
            match fs::remove_dir_all(&dir) {
                Ok(()) => removed.push(name),
                Err(e) => tracing::warn!(dir = %dir.display(), "stale directory not removed: {e}"),
            }
        }
    }
    Ok(removed)
}

/// Deletes every namespace this process created and holds, killing what runs in
/// each, then exits with `code`; no namespace is created meanwhile (the record
/// stays locked to the end). For a run told to stop at an odd moment (`selftest` on
/// SIGINT or SIGTERM), whose guards would otherwise never run: the namespaces, and
/// the servers and tunnels in them, would stay until the next run.
pub fn remove_own_and_exit(code: i32) -> ! {
    let own = OWN.lock().unwrap_or_else(PoisonError::into_inner);
    for name in own.iter() {
        if let Err(e) = delete_namespace(name) {
            eprintln!("{name}: {e}");
        }
    }
    std::process::exit(code)
}

/// Records that this process is about to create `name`.
pub(crate) fn register(name: &str) {
    OWN.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(name.to_owned());
}

/// Records that this process deleted `name`.
pub(crate) fn unregister(name: &str) {
    OWN.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(name);
}

fn is_stale(name: &str) -> bool {
    let Some(pid) = owner_pid(name) else {
        return false;
    };
    if pid == std::process::id() {
        !OWN.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(name)
    } else {
        !Path::new("/proc").join(pid.to_string()).exists()
    }
}

/// The entries of `dir` that start with [`PREFIX`]; none if `dir` does not exist.
fn list_prefixed(dir: &Path) -> io::Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(super::context(dir.display()))?;
        if let Some(name) = entry.file_name().to_str()
            && name.starts_with(PREFIX)
        {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_differ_and_carry_our_pid() {
        let a = unique_name("Bench Mark!");
        let b = unique_name("Bench Mark!");
        assert_ne!(a, b);
        assert!(a.starts_with("t2s-benchmar-"), "{a}");
        assert_eq!(owner_pid(&a), Some(std::process::id()));
        assert_eq!(owner_pid(&format!("{a}-target")), Some(std::process::id()));
    }

    #[test]
    fn empty_tag_still_parses() {
        let name = unique_name("--");
        assert!(name.starts_with("t2s-x-"), "{name}");
        assert_eq!(owner_pid(&name), Some(std::process::id()));
    }

    #[test]
    fn foreign_names_have_no_owner() {
        for name in [
            "t2s",
            "t2s-",
            "t2s-a",
            "t2s-a-12",
            "t2s-a-b-1",
            "x-a-1-2",
            "t2s-a-1-x",
        ] {
            assert_eq!(owner_pid(name), None, "{name}");
        }
        assert_eq!(owner_pid("t2s-a-12-3"), Some(12));
        assert_eq!(owner_pid("t2s-a-12-3-app"), Some(12));
    }

    #[test]
    fn our_registered_names_are_not_stale() {
        let name = unique_name("own");
        assert!(is_stale(&name), "unregistered name with our pid");
        register(&name);
        assert!(!is_stale(&name));
        unregister(&name);
        assert!(!is_stale("t2s-a-1-0"), "pid 1 is alive");
        assert!(!is_stale("other-a-999999999-0"));
    }
}
