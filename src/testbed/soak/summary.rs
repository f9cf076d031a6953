//! The closing summary of a soak: per load the totals and rates, the drift of each
//! watched figure, the idle CPU and the verdict.

use std::fmt;

use super::{Kind, SoakReport};

/// Writes the summary of `report` (see [`SoakReport`]'s `Display`).
pub fn write(report: &SoakReport, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let load_secs = report
        .end
        .map_or(0.0, |end| end.elapsed.as_secs_f64())
        .max(1e-9);
    writeln!(
        f,
        "soak: {:.0} s of load (asked {} s)",
        load_secs,
        report.config.duration.as_secs()
    )?;
    writeln!(
        f,
        "{:<6} {:>10} {:>10} {:>7} {:>8} {:>10} {:>8}",
        "load", "ops", "ops/s", "errors", "lost", "sent", "lost %"
    )?;
    if let Some(end) = &report.end {
        for (kind, t) in Kind::ALL.iter().zip(end.load) {
            let (lost, sent, share) = if matches!(kind, Kind::Udp | Kind::Dns) {
                (
                    t.lost.to_string(),
                    t.sent.to_string(),
                    format!("{:.3}", 100.0 * t.lost as f64 / t.sent.max(1) as f64),
                )
            } else {
                ("-".into(), "-".into(), "-".into())
            };
            writeln!(
                f,
                "{:<6} {:>10} {:>10.1} {:>7} {:>8} {:>10} {:>8}",
                kind.name(),
                t.ops,
                t.ops as f64 / load_secs,
                t.errors,
                lost,
                sent,
                share
            )?;
        }
        let [bulk, ..] = end.load;
        writeln!(
            f,
            "bulk carried {} MiB ({:.0} Mbit/s)",
            bulk.bytes >> 20,
            bulk.bytes as f64 * 8.0 / 1e6 / load_secs
        )?;
    }
    for (what, d) in &report.drifts {
        writeln!(
            f,
            "{what}: warm-up max {}, last-third max {} ({:+.1}%, allowed +{}){}",
            d.reference,
            d.peak,
            d.percent(),
            d.allowed,
            if d.within() { "" } else { "  <- DRIFT" }
        )?;
    }
    if let Some((used, window)) = report.idle_cpu {
        writeln!(
            f,
            "idle tunnel CPU: {used:.2} s in {:.1} s ({:.2}% of one core)",
            window.as_secs_f64(),
            100.0 * used / window.as_secs_f64().max(1e-9)
        )?;
    }
    for message in &report.error_messages {
        writeln!(f, "error: {message}")?;
    }
    if report.passed() {
        write!(f, "verdict: PASS")
    } else {
        write!(f, "verdict: FAIL")?;
        for failure in &report.failures {
            write!(f, "\n  - {failure}")?;
        }
        Ok(())
    }
}
