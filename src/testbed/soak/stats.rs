//! What the soak reads from a running process (`/proc/PID/...`), and the drift rule
//! it judges the readings by. Pure functions where possible, so the rule has tests.

use std::io;
use std::time::Duration;

use super::super::attach::{open_fds, rss_anon_kib, vm_rss_kib};
use super::super::context;

/// Clock ticks per second of the times in `/proc/PID/stat` (`USER_HZ`): 100 on every
/// Linux architecture we run on. (`sysconf(_SC_CLK_TCK)` says the same; reading it
/// would need a `nix` feature the crate does not enable.)
pub const USER_HZ: u64 = 100;

/// One reading of a process.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcStats {
    /// Resident memory, KiB (`VmRSS` of `/proc/PID/status`).
    pub rss_kib: u64,
    /// Anonymous resident memory, KiB (`RssAnon`): what a leak would grow. The rest
    /// of `rss_kib` is the program's own code and other file pages, which come and go
    /// with the code paths a load happens to run (the tunnel gives its start-up code
    /// back 250 ms after start, and the code it runs later is mapped again).
    pub anon_kib: u64,
    /// Open descriptors (entries of `/proc/PID/fd`).
    pub fds: u64,
    /// CPU time used so far, user + system, all threads, seconds
    /// (`utime + stime` of `/proc/PID/stat`).
    pub cpu_secs: f64,
}

/// Reads RSS, descriptors and CPU time of process `pid`.
pub fn proc_stats(pid: u32) -> io::Result<ProcStats> {
    Ok(ProcStats {
        rss_kib: vm_rss_kib(pid)?,
        anon_kib: rss_anon_kib(pid)?,
        fds: open_fds(pid)? as u64,
        cpu_secs: cpu_ticks(pid)? as f64 / USER_HZ as f64,
    })
}

/// `utime + stime` of process `pid`, in clock ticks ([`USER_HZ`]).
pub fn cpu_ticks(pid: u32) -> io::Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).map_err(context(&path))?;
    parse_cpu_ticks(&stat).ok_or_else(|| io::Error::other(format!("{path}: no utime/stime")))
}

/// `utime` (field 14) plus `stime` (field 15) of a `/proc/PID/stat` line. The command
/// name (field 2) is in parentheses and may hold spaces and parentheses itself, so
/// fields are counted from the last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // After the `)`: state is field 3, so field N is at index N - 3.
    let mut fields = rest.split_whitespace().skip(14 - 3);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
}

/// The machine's one-minute load average (the first field of `/proc/loadavg`).
pub fn load_average() -> io::Result<f64> {
    let path = "/proc/loadavg";
    let text = std::fs::read_to_string(path).map_err(context(path))?;
    text.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::other(format!("{path}: {text:?}")))
}

/// The drift rule: the level (see [`Level`]) of the last third of a run of `duration`
/// may exceed the warm-up reference (the same level of the first third) by at most
/// `max_ratio` of it, or by `floor`, whichever is larger (so that tiny numbers do
/// not trip it). Only growth counts: a shrinking process is not leaking.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DriftRule {
    /// Allowed growth as a share of the reference (0.10 = 10%).
    pub max_ratio: f64,
    /// Allowed growth in absolute units, when that is more than the share.
    pub floor: u64,
    /// Which level of each third is compared.
    pub level: Level,
}

/// The level of a third of the run that a [`DriftRule`] compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// The largest reading: for memory, which an allocator keeps once taken.
    Max,
    /// The median reading: for descriptors, where a leak raises the whole level but a
    /// moment of pile-up (connections waiting while the machine stalls, closed a
    /// second later) only raises a peak.
    Median,
}

impl Level {
    fn of(self, mut values: Vec<u64>) -> Option<u64> {
        values.sort_unstable();
        match self {
            Level::Max => values.last().copied(),
            Level::Median => values.get(values.len() / 2).copied(),
        }
    }
}

/// What [`DriftRule::judge`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drift {
    /// The largest value of the warm-up (first third).
    pub reference: u64,
    /// The largest value of the last third.
    pub peak: u64,
    /// How far `peak` may lie above `reference`.
    pub allowed: u64,
}

impl Drift {
    /// Whether the peak stayed within the allowed growth.
    pub fn within(&self) -> bool {
        self.peak <= self.reference.saturating_add(self.allowed)
    }

    /// The growth in percent of the reference (negative when it shrank).
    pub fn percent(&self) -> f64 {
        if self.reference == 0 {
            return 0.0;
        }
        100.0 * (self.peak as f64 - self.reference as f64) / self.reference as f64
    }
}

impl DriftRule {
    /// Judges `samples` of `(elapsed, value)` from a run of `duration`; `None` when
    /// the first or the last third holds no sample (a run too short to judge).
    pub fn judge(&self, samples: &[(Duration, u64)], duration: Duration) -> Option<Drift> {
        let warm_end = duration / 3;
        let last_start = duration.saturating_sub(duration / 3);
        let reference = self.level.of(samples
            .iter()
            .filter(|(at, _)| *at <= warm_end)
            .map(|&(_, v)| v)
            .collect())?;
        let peak = self.level.of(samples
            .iter()
            .filter(|(at, _)| *at >= last_start)
            .map(|&(_, v)| v)
            .collect())?;
        let share = (reference as f64 * self.max_ratio).ceil() as u64;
        Some(Drift {
            reference,
            peak,
            allowed: share.max(self.floor),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_utime_and_stime_after_the_last_parenthesis() {
        let stat = "4242 (tun (2) socks) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    37 5 0 0 20 0 3 0 12345 1000000 250 18446744073709551615";
        assert_eq!(parse_cpu_ticks(stat), Some(42));
        assert_eq!(parse_cpu_ticks("1 (x) S 1 2 3"), None);
        assert_eq!(parse_cpu_ticks("no parenthesis"), None);
        // Our own process has a readable line.
        assert!(cpu_ticks(std::process::id()).is_ok());
        let own = proc_stats(std::process::id()).unwrap();
        assert!(own.rss_kib > 0 && own.fds > 0, "{own:?}");
        assert!(load_average().unwrap() >= 0.0);
    }

    fn series(values: &[u64]) -> Vec<(Duration, u64)> {
        values
            .iter()
            .enumerate()
            .map(|(i, &v)| (Duration::from_secs(i as u64 + 1), v))
            .collect()
    }

    #[test]
    fn drift_compares_the_last_third_with_the_warm_up() {
        let rule = DriftRule {
            max_ratio: 0.10,
            floor: 4,
            level: Level::Max,
        };
        let run = Duration::from_secs(9);
        // Warm-up (1..=3 s) peaks at 100; the last third (6..=9 s) at 110: just within.
        let ok = rule
            .judge(&series(&[80, 100, 90, 150, 150, 105, 110, 100, 99]), run)
            .unwrap();
        assert_eq!((ok.reference, ok.peak, ok.allowed), (100, 110, 10));
        assert!(ok.within());
        // 111 is over.
        let over = rule
            .judge(&series(&[80, 100, 90, 100, 100, 105, 111, 100, 99]), run)
            .unwrap();
        assert!(!over.within(), "{over:?}");
        assert!((over.percent() - 11.0).abs() < 1e-9);
        // Small numbers: the floor (4) rather than 10% of 10.
        let small = rule
            .judge(&series(&[10, 10, 10, 10, 10, 10, 14, 10, 10]), run)
            .unwrap();
        assert!(small.within());
        let small_over = rule
            .judge(&series(&[10, 10, 10, 10, 10, 10, 15, 10, 10]), run)
            .unwrap();
        assert!(!small_over.within());
        // Shrinking is fine.
        assert!(
            rule.judge(&series(&[500, 500, 500, 10, 10, 10, 10, 10, 10]), run)
                .unwrap()
                .within()
        );
        // No sample in a third: nothing to judge.
        assert_eq!(rule.judge(&series(&[1]), run), None);
    }

    #[test]
    fn median_drift_ignores_a_moment_of_pile_up_but_not_a_leak() {
        let rule = DriftRule {
            max_ratio: 0.10,
            floor: 4,
            level: Level::Median,
        };
        let run = Duration::from_secs(9);
        // One second at 41 descriptors in the last third, back to 29 after.
        let stall = rule
            .judge(&series(&[29, 30, 29, 30, 29, 29, 41, 29, 30]), run)
            .unwrap();
        assert!(stall.within(), "{stall:?}");
        // A leak: the whole last third sits higher.
        let leak = rule
            .judge(&series(&[29, 30, 29, 32, 34, 36, 38, 40, 42]), run)
            .unwrap();
        assert!(!leak.within(), "{leak:?}");
    }
}
