//! What a soak prints: the rows while it runs, and the closing summary (per load the
//! totals and rates, the drift of each watched figure, the idle CPU and the verdict).

use std::fmt;

use super::{Kind, Sample, SoakReport};

/// The column names of [`row`].
pub fn header() -> String {
    format!(
        "{:>6} | {:>7} {:>5} {:>7} | {:>7} {:>5} {:>7} | {:>8} {:>7} {:>8} {:>7} | {:>11} | {:>9} | {:>5} {:>6}",
        "time",
        "tun MiB",
        "fds",
        "CPU s",
        "srv MiB",
        "fds",
        "CPU s",
        "bulk MiB",
        "short",
        "udp",
        "dns",
        "errors",
        "lost u/d",
        "load",
        "lag ms"
    )
}

/// One printed row: time, tunnel and server RSS / fds / CPU, ops per kind (bulk in
/// MiB), errors per kind (bulk/short/udp/dns), UDP and DNS losses, and the machine's
/// load average and how late the sampler woke (the worst since the last row).
pub fn row(s: &Sample, label: Option<&str>) -> String {
    let mib = |kib: u64| kib as f64 / 1024.0;
    let [bulk, short, udp, dns] = s.load;
    let time = label.map_or_else(|| format!("{}s", s.elapsed.as_secs()), str::to_owned);
    format!(
        "{:>6} | {:>7.1} {:>5} {:>7.2} | {:>7.1} {:>5} {:>7.2} | {:>8} {:>7} {:>8} {:>7} | {:>11} | {:>9} | {:>5.1} {:>6}",
        time,
        mib(s.tunnel.rss_kib),
        s.tunnel.fds,
        s.tunnel.cpu_secs,
        mib(s.server.rss_kib),
        s.server.fds,
        s.server.cpu_secs,
        bulk.bytes >> 20,
        short.ops,
        udp.ops,
        dns.ops,
        format!(
            "{}/{}/{}/{}",
            bulk.errors, short.errors, udp.errors, dns.errors
        ),
        format!("{}/{}", udp.lost, dns.lost),
        s.machine_load,
        s.late.as_millis(),
    )
}

/// Writes the summary of `report` (see [`SoakReport`]'s `Display`).
pub fn summary(report: &SoakReport, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
            "{what}: warm-up {}, last third {} ({:+.1}%, allowed +{}){}",
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
    for (host, k) in &report.kernel {
        writeln!(
            f,
            "kernel {host}: udp rcvbuf errors {}, udp in errors {}, tcp retransmits {}{}",
            k.udp_rcvbuf_errors,
            k.udp_in_errors,
            k.tcp_retrans,
            if host == "app" {
                format!(", tun0 tx dropped {}", k.dev_tx_dropped)
            } else {
                String::new()
            }
        )?;
    }
    if let Some(stats) = &report.tunnel_stats {
        writeln!(f, "tunnel at exit: {}", stats.trim())?;
    }
    for line in &report.log_excerpts {
        writeln!(f, "log: {}", line.trim())?;
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
