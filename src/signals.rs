//! Which signals this process inherited as ignored.
//!
//! `nohup tun2socks ...` starts it with SIGHUP ignored so that it outlives the
//! terminal; a handler installed for SIGHUP would undo that choice (tokio's replaces
//! the ignored disposition), so the signal handling asks here first and leaves an
//! ignored signal ignored.

/// Whether `signal` (its number, e.g. 1 for SIGHUP) is ignored now, as the kernel
/// reports it (`SigIgn` in `/proc/self/status`). Unknown (no such file, no such
/// line) counts as not ignored.
pub fn ignored(signal: i32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| ignored_in(&status, signal))
        .unwrap_or(false)
}

/// A stream of `kind`, unless the process started with it ignored (`None`: leave it
/// so). Needs a tokio runtime.
pub fn unless_ignored(
    kind: tokio::signal::unix::SignalKind,
) -> std::io::Result<Option<tokio::signal::unix::Signal>> {
    if ignored(kind.as_raw_value()) {
        tracing::debug!(
            signal = kind.as_raw_value(),
            "ignored at start: it stays so"
        );
        return Ok(None);
    }
    tokio::signal::unix::signal(kind).map(Some)
}

/// The next delivery of `signal`; never, for `None` (an ignored signal).
pub async fn next(signal: Option<&mut tokio::signal::unix::Signal>) -> Option<()> {
    match signal {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

/// Whether `signal` is set in the `SigIgn:` mask of a `/proc/PID/status` text.
fn ignored_in(status: &str, signal: i32) -> Option<bool> {
    let mask = status
        .lines()
        .find_map(|line| line.strip_prefix("SigIgn:"))?
        .trim();
    let mask = u64::from_str_radix(mask, 16).ok()?;
    let bit = u32::try_from(signal).ok()?.checked_sub(1)?;
    Some(mask.checked_shr(bit)? & 1 == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mask_is_read_bit_by_signal_number() {
        let status = "Name:\tx\nSigBlk:\t0000000000000000\nSigIgn:\t0000000000001001\nSigCgt:\t0\n";
        assert_eq!(ignored_in(status, 1), Some(true)); // SIGHUP
        assert_eq!(ignored_in(status, 13), Some(true)); // SIGPIPE
        assert_eq!(ignored_in(status, 2), Some(false));
        assert_eq!(ignored_in(status, 64), Some(false));
        assert_eq!(ignored_in(status, 0), None);
        assert_eq!(ignored_in(status, 65), None);
        assert_eq!(ignored_in("SigIgn:\tzz\n", 1), None);
        assert_eq!(ignored_in("Name:\tx\n", 1), None);
    }

    #[test]
    fn this_process_is_read() {
        // The Rust runtime ignores SIGPIPE before `main`; SIGKILL cannot be ignored.
        assert!(ignored(13));
        assert!(!ignored(9));
    }
}
