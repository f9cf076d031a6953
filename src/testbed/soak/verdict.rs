//! The verdict of a soak: which figures drifted, which loads failed, whether the idle
//! tunnel spun (the rules are in the docs of [`soak`](super)).

use std::time::Duration;

use super::{DriftRule, Kind, Sample, SoakConfig, SoakReport};

/// A watched figure: its name, its rule, its readings `(elapsed, value)`.
type Watched<'a> = (&'a str, DriftRule, Vec<(Duration, u64)>);

/// Fills `report.drifts` and `report.failures` from the samples and counts.
pub fn judge(report: &mut SoakReport) {
    let config = &report.config;
    let series = |f: fn(&Sample) -> u64| -> Vec<(Duration, u64)> {
        report.samples.iter().map(|s| (s.elapsed, f(s))).collect()
    };
    let checks: [Watched<'_>; 4] = [
        (
            "tunnel anonymous RSS KiB (max)",
            config.rss_rule,
            series(|s| s.tunnel.anon_kib),
        ),
        (
            "tunnel fds (median)",
            config.fd_rule,
            series(|s| s.tunnel.fds),
        ),
        (
            "server anonymous RSS KiB (max)",
            config.rss_rule,
            series(|s| s.server.anon_kib),
        ),
        (
            "server fds (median)",
            config.fd_rule,
            series(|s| s.server.fds),
        ),
    ];
    let mut failures = Vec::new();
    for (what, rule, samples) in checks {
        match rule.judge(&samples, config.duration) {
            Some(drift) => {
                if !drift.within() {
                    failures.push(format!(
                        "{what} grew from {} (warm-up) to {} (last third), {:+.1}%, more than {} allowed",
                        drift.reference,
                        drift.peak,
                        drift.percent(),
                        drift.allowed
                    ));
                }
                report.drifts.push((what.to_owned(), drift));
            }
            None => failures.push(format!("{what}: too few samples to judge drift")),
        }
    }
    if let Some(end) = &report.end {
        for (kind, totals) in Kind::ALL.iter().zip(end.load) {
            if totals.errors > 0 {
                failures.push(format!("{}: {} errors", kind.name(), totals.errors));
            }
            if rate_enabled(config, *kind) && totals.ops == 0 {
                failures.push(format!("{}: no operation completed", kind.name()));
            }
            let lost = totals.lost as f64;
            if totals.sent > 0 && lost > config.max_loss * totals.sent as f64 {
                failures.push(format!(
                    "{}: {} of {} lost ({:.3}%), more than {:.3}%",
                    kind.name(),
                    totals.lost,
                    totals.sent,
                    100.0 * lost / totals.sent.max(1) as f64,
                    100.0 * config.max_loss
                ));
            }
        }
    }
    if let Some((used, window)) = report.idle_cpu {
        if used > config.max_idle_cpu * window.as_secs_f64() {
            failures.push(format!(
                "idle tunnel used {used:.2} s of CPU in {:.1} s (over {:.1}% of one core)",
                window.as_secs_f64(),
                100.0 * config.max_idle_cpu
            ));
        }
    }
    report.failures.extend(failures);
}

fn rate_enabled(config: &SoakConfig, kind: Kind) -> bool {
    match kind {
        Kind::Bulk => config.bulk_mbit > 0,
        Kind::Short => config.short_per_sec > 0,
        Kind::Udp => config.udp_per_sec > 0,
        Kind::Dns => config.dns_per_sec > 0,
    }
}
