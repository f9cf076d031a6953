//! The run's figures as a Markdown table (rows: metrics; columns: paths, the kernel's
//! first) and as one JSON document.

use std::fmt::Write as _;

use tun2socks::testbed::bench::json_str;

use super::measure::PathResult;
use super::settings::{Group, Settings};

/// Which way a metric improves (how it is compared with the kernel path's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    /// Throughput, rates: shown as a percentage of the kernel's.
    Higher,
    /// Latency: shown as a multiple of the kernel's.
    Lower,
    /// Counts, memory: no comparison.
    Neither,
}

/// One row of the table.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    /// Key in the JSON.
    pub key: &'static str,
    /// The group that measures it.
    pub group: Group,
    /// Row label (`{flows}`, `{rate}`, `{workers}` are filled in).
    pub label: &'static str,
    /// Unit.
    pub unit: &'static str,
    /// Decimals shown.
    pub decimals: usize,
    /// Comparison with the kernel path.
    pub better: Better,
}

const fn m(
    key: &'static str,
    group: Group,
    label: &'static str,
    unit: &'static str,
    decimals: usize,
    better: Better,
) -> Metric {
    Metric {
        key,
        group,
        label,
        unit,
        decimals,
        better,
    }
}

/// Every row, in table order.
pub const METRICS: &[Metric] = &[
    m(
        "tcp1_up_gbps",
        Group::Tcp,
        "TCP 1 stream, upload",
        "Gbit/s",
        2,
        Better::Higher,
    ),
    m(
        "tcp1_down_gbps",
        Group::Tcp,
        "TCP 1 stream, download",
        "Gbit/s",
        2,
        Better::Higher,
    ),
    m(
        "tcp8_up_gbps",
        Group::Tcp,
        "TCP 8 streams, upload",
        "Gbit/s",
        2,
        Better::Higher,
    ),
    m(
        "tcp8_down_gbps",
        Group::Tcp,
        "TCP 8 streams, download",
        "Gbit/s",
        2,
        Better::Higher,
    ),
    m(
        "rr_p50_us",
        Group::Rr,
        "TCP request/response p50",
        "us",
        0,
        Better::Lower,
    ),
    m(
        "rr_p99_us",
        Group::Rr,
        "TCP request/response p99",
        "us",
        0,
        Better::Lower,
    ),
    m(
        "conn_per_s",
        Group::Conn,
        "connections/s ({workers} workers)",
        "1/s",
        0,
        Better::Higher,
    ),
    m(
        "conn_errors",
        Group::Conn,
        "  failed connections",
        "count",
        0,
        Better::Neither,
    ),
    m(
        "udp_p50_us",
        Group::Udp,
        "UDP echo p50",
        "us",
        0,
        Better::Lower,
    ),
    m(
        "udp_p99_us",
        Group::Udp,
        "UDP echo p99",
        "us",
        0,
        Better::Lower,
    ),
    m(
        "udp_sent_per_s",
        Group::Udp,
        "UDP {rate}/s offered: sent",
        "1/s",
        0,
        Better::Neither,
    ),
    m(
        "udp_rx_per_s",
        Group::Udp,
        "UDP {rate}/s offered: echoed",
        "1/s",
        0,
        Better::Higher,
    ),
    m(
        "udp_loss_pct",
        Group::Udp,
        "UDP {rate}/s offered: loss",
        "%",
        2,
        Better::Neither,
    ),
    m(
        "dns_qps",
        Group::Dns,
        "DNS queries/s (32 in flight)",
        "1/s",
        0,
        Better::Higher,
    ),
    m(
        "dns_lost",
        Group::Dns,
        "  DNS queries lost",
        "count",
        0,
        Better::Neither,
    ),
    m(
        "rss_idle_mib",
        Group::Rss,
        "tunnel RSS idle",
        "MiB",
        1,
        Better::Neither,
    ),
    m(
        "rss_held_mib",
        Group::Rss,
        "tunnel RSS, {flows} idle flows",
        "MiB",
        1,
        Better::Neither,
    ),
    m(
        "held_open",
        Group::Rss,
        "  flows still open",
        "count",
        0,
        Better::Neither,
    ),
    m(
        "rss_per_flow_kib",
        Group::Rss,
        "  RSS per flow above idle",
        "KiB",
        1,
        Better::Neither,
    ),
    m(
        "cpu_s_per_gb",
        Group::Cpu,
        "CPU per GB: tunnel + server",
        "s/GB",
        2,
        Better::Neither,
    ),
    m(
        "cpu_tunnel_s_per_gb",
        Group::Cpu,
        "  of which the tunnel",
        "s/GB",
        2,
        Better::Neither,
    ),
    m(
        "cpu_server_s_per_gb",
        Group::Cpu,
        "  of which the server",
        "s/GB",
        2,
        Better::Neither,
    ),
];

/// What a run produced.
#[derive(Debug)]
pub struct Report {
    /// One result per path, in the settings' order.
    pub paths: Vec<PathResult>,
    /// `/proc/loadavg` before and after.
    pub load_before: String,
    /// See `load_before`.
    pub load_after: String,
    /// CPUs of the machine.
    pub cpus: usize,
    /// Wall time of the whole run, seconds.
    pub elapsed_s: f64,
}

impl Report {
    /// The rows with a value on some path, in table order.
    fn rows(&self) -> impl Iterator<Item = &Metric> {
        METRICS
            .iter()
            .filter(|m| self.paths.iter().any(|p| p.value(m.key).is_some()))
    }

    /// The kernel path's result, if it was measured.
    fn kernel(&self) -> Option<&PathResult> {
        self.paths.iter().find(|p| p.key == "kernel")
    }
}

fn label(metric: &Metric, s: &Settings) -> String {
    metric
        .label
        .replace("{flows}", &s.held_flows.to_string())
        .replace("{rate}", &s.udp_rate.to_string())
        .replace("{workers}", &s.conn_workers.to_string())
}

fn cell(metric: &Metric, value: Option<f64>, kernel: Option<f64>, is_kernel: bool) -> String {
    let Some(v) = value else {
        return "-".into();
    };
    let mut text = format!("{v:.*}", metric.decimals);
    match (metric.better, kernel) {
        (Better::Higher, Some(k)) if !is_kernel && k > 0.0 => {
            let _ = write!(text, " ({:.0}%)", v / k * 100.0);
        }
        (Better::Lower, Some(k)) if !is_kernel && k > 0.0 => {
            let _ = write!(text, " ({:.1}x)", v / k);
        }
        _ => {}
    }
    text
}

/// The table, a heading line, and one line per error.
pub fn table(report: &Report, s: &Settings) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "perf benchmark: {} CPUs, load {} before / {} after, {} s per measurement \
         (UDP rate {} s), median of {} round(s), {:.0} s in all; \
         (%) of the kernel's rate, (x) times the kernel's latency",
        report.cpus,
        report.load_before,
        report.load_after,
        s.secs,
        s.udp_secs,
        s.rounds,
        report.elapsed_s
    );
    let width = 22;
    let _ = write!(out, "| {:<36} | {:<6} |", "row", "unit");
    for p in &report.paths {
        let _ = write!(out, " {:>width$} |", p.label);
    }
    let _ = write!(out, "\n|{:-<38}|{:-<8}|", "", "");
    for _ in &report.paths {
        let _ = write!(out, "{:->w$}|", ":", w = width + 2);
    }
    out.push('\n');
    let kernel = report.kernel();
    for metric in report.rows() {
        let k = kernel.and_then(|k| k.value(metric.key));
        let _ = write!(out, "| {:<36} | {:<6} |", label(metric, s), metric.unit);
        for p in &report.paths {
            let c = cell(metric, p.value(metric.key), k, p.key == "kernel");
            let _ = write!(out, " {c:>width$} |");
        }
        out.push('\n');
    }
    for p in &report.paths {
        if let Some(e) = &p.setup_error {
            let _ = writeln!(out, "not set up: {}: {}", p.label, setup_reason(e));
        }
        for e in &p.errors {
            let _ = writeln!(out, "error: {}: {}", p.label, first_line(e));
        }
    }
    out
}

/// A setup error in one line: its first line, and the log line that tells why (the
/// first that says "error", else the last).
fn setup_reason(message: &str) -> String {
    let mut lines = message.lines().map(str::trim).filter(|l| !l.is_empty());
    let head = lines.next().unwrap_or_default();
    let rest: Vec<&str> = lines.collect();
    let why = rest
        .iter()
        .find(|l| l.to_ascii_lowercase().contains("error"))
        .or(rest.last());
    match why {
        Some(why) => format!("{head} {}", why.chars().take(200).collect::<String>()),
        None => head.to_owned(),
    }
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

fn json_num(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.3}")
    } else {
        "null".into()
    }
}

fn json_list<I: IntoIterator<Item = String>>(items: I) -> String {
    format!("[{}]", items.into_iter().collect::<Vec<_>>().join(","))
}

/// The whole run as one JSON object: `machine`, `settings`, `metrics` (the row
/// definitions) and `paths` (each with `key`, `label`, `setup_error`, `metrics`
/// (key -> median, null when not measured), `samples` (key -> one value per round)
/// and `errors`).
pub fn json(report: &Report, s: &Settings) -> String {
    let machine = format!(
        "{{\"cpus\":{},\"load_before\":{},\"load_after\":{},\"elapsed_s\":{}}}",
        report.cpus,
        json_str(&report.load_before),
        json_str(&report.load_after),
        json_num(report.elapsed_s)
    );
    let settings = format!(
        "{{\"binary\":{},\"server_binary\":{},\"tunnel_args\":{},\"secs\":{},\"rounds\":{},\
         \"groups\":{},\"mtu\":{},\"multi_queue\":{},\"created_mtu\":{},\"held_flows\":{},\"rr_round_trips\":{},\
         \"conn_workers\":{},\"udp_probes\":{},\"udp_rate\":{},\"udp_secs\":{}}}",
        json_str(&s.binary.to_string_lossy()),
        json_str(&s.server_binary.to_string_lossy()),
        json_list(s.tunnel_args.iter().map(|a| json_str(a))),
        s.secs,
        s.rounds,
        json_list(s.groups.iter().map(|g| json_str(g.name()))),
        s.mtu,
        s.multi_queue,
        s.created_mtu.map_or("null".into(), |m| m.to_string()),
        s.held_flows,
        s.rr_round_trips,
        s.conn_workers,
        s.udp_probes,
        s.udp_rate,
        s.udp_secs
    );
    let metrics = json_list(METRICS.iter().map(|m| {
        format!(
            "{{\"key\":{},\"group\":{},\"label\":{},\"unit\":{}}}",
            json_str(m.key),
            json_str(m.group.name()),
            json_str(&label(m, s)),
            json_str(m.unit)
        )
    }));
    let paths = json_list(report.paths.iter().map(|p| {
        let values = METRICS
            .iter()
            .filter(|m| s.wants(m.group) || p.value(m.key).is_some())
            .map(|m| {
                let v = p.value(m.key).map_or("null".into(), json_num);
                format!("{}:{v}", json_str(m.key))
            })
            .collect::<Vec<_>>()
            .join(",");
        let samples = METRICS
            .iter()
            .filter(|m| !p.samples(m.key).is_empty())
            .map(|m| {
                let list = json_list(p.samples(m.key).iter().map(|v| json_num(*v)));
                format!("{}:{list}", json_str(m.key))
            })
            .collect::<Vec<_>>()
            .join(",");
        format!(
            "{{\"key\":{},\"label\":{},\"setup_error\":{},\"metrics\":{{{values}}},\
             \"samples\":{{{samples}}},\"errors\":{}}}",
            json_str(p.key),
            json_str(&p.label),
            p.setup_error.as_deref().map_or("null".into(), json_str),
            json_list(p.errors.iter().map(|e| json_str(e)))
        )
    }));
    format!(
        "{{\"bench\":\"perf\",\"machine\":{machine},\"settings\":{settings},\
         \"metrics\":{metrics},\"paths\":{paths}}}"
    )
}
