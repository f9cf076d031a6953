//! The soak: mixed load through our tunnel and our SOCKS server for a long time,
//! watching both processes for leaks, errors and idle spinning (issue 8).
//!
//! [`run_soak`] builds the three namespaces, starts the target's services (TCP blob,
//! discard and echo servers, the UDP echo, dnsmasq), our server in the proxy and the
//! tunnel in the app, then runs four loads at once from the app, all through the TUN:
//!
//! | load | what | counted as error |
//! |---|---|---|
//! | bulk | back-to-back 32 MiB transfers at a fixed rate, alternating upload (byte count checked) and download (bytes checked) | failed connect, I/O error, wrong count or bytes, 15 s without progress |
//! | short | connections at a fixed rate: request of 16-4096 bytes to the echo, half-close, the same bytes back, close | failed connect, reset, altered echo, over 15 s |
//! | udp | datagrams of 8-1400 bytes to the echo at a fixed rate, one socket (association) per family | altered or unknown reply, socket error; no reply within 2 s is *loss* |
//! | dns | A/AAAA queries to dnsmasq at a fixed rate, a fresh socket (association) every second | a query unanswered after 3 tries (1 s apart), or a wrong answer; each retransmission is *loss* |
//!
//! Destinations alternate between IPv4 and IPv6. Every [`SoakConfig::sample_every`]
//! it reads RSS, descriptors and CPU time of the tunnel and the server from `/proc`,
//! and every [`SoakConfig::report_every`] prints a row of them with the counts so far.
//! After the load stops it waits [`SoakConfig::settle`] (the last UDP associations
//! time out and close: work the load caused), then leaves the tunnel idle for
//! [`SoakConfig::idle`] and measures its CPU time.
//!
//! The run fails ([`SoakReport::passed`] is false) when any load counted an error;
//! when UDP loss (or DNS retransmissions) exceeds [`SoakConfig::max_loss`] of what was
//! sent (loss on a quiet veth path should be nil, but a datagram may be dropped when a
//! queue overflows, which UDP allows); when the anonymous RSS (`RssAnon`: heap,
//! stacks, buffers; what a leak grows) or the descriptors of the tunnel or the server
//! grow past the warm-up by more than the [`DriftRule`] allows (the largest value of
//! the last third against the largest of the first third, for RSS; medians for
//! descriptors); the table shows the whole `VmRSS`, whose file-backed part (the
//! program's code) rises as later code paths run and is not judged; when the idle
//! tunnel used more than [`SoakConfig::max_idle_cpu`] of one core; or when the tunnel
//! exits, panics, or does not stop cleanly on SIGTERM.
//!
//! Used by `benches/soak.rs` (10 minutes by default) and `tests/soak_netns.rs` (one
//! minute in CI). Stage: none of the data path; it must not change anything outside
//! its namespaces, like the rest of [`testbed`](super).

mod counters;
mod datagrams;
mod kernel;
mod stats;
mod table;
mod tcp;
mod verdict;

use std::fmt;
use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use counters::{Counters, Kind, KindTotals};
pub use kernel::KernelCounters;
pub use stats::{Drift, DriftRule, Level, ProcStats, USER_HZ, cpu_ticks, load_average, proc_stats};
pub use table::{header, row};

use super::dnsmasq::{Dnsmasq, default_records};
use super::namespace::{Namespace, join};
use super::process::Process;
use super::services::{Services, blob};
use super::topology::Topology;
use super::tunnel::{TUN_NAME, panics_in, proxy_addr, start_server, start_tunnel, stop_cleanly};
use super::udp::UdpServices;

/// How many warning lines of each log the report keeps.
const LOG_EXCERPT: usize = 10;
/// The seed of the bulk body (served by the target, checked by the app).
const BODY_SEED: u64 = 0x50a4;

/// What to run and how to judge it.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    /// How long the load runs.
    pub duration: Duration,
    /// How often a row is printed.
    pub report_every: Duration,
    /// How often the processes are read (the drift rule looks at every reading).
    pub sample_every: Duration,
    /// Rate of the bulk load, Mbit/s (both directions share it); 0: none.
    pub bulk_mbit: u64,
    /// Size of one bulk transfer, bytes.
    pub bulk_transfer: usize,
    /// Short connections per second; 0: none.
    pub short_per_sec: u64,
    /// UDP echo datagrams per second (half per family); 0: none.
    pub udp_per_sec: u64,
    /// DNS queries per second; 0: none.
    pub dns_per_sec: u64,
    /// How long after the load the idle measurement starts: the tunnel's UDP timeout
    /// and a second, so that the associations the load left have closed. Closing them
    /// is work (a debug build used up to 0.11 s of CPU in the first 4 s), not spinning.
    pub settle: Duration,
    /// How long the tunnel is left idle at the end.
    pub idle: Duration,
    /// The most CPU the idle tunnel may use, as a share of one core (0.01 = 1%).
    pub max_idle_cpu: f64,
    /// The most UDP datagrams (or DNS transmissions) that may go unanswered, as a
    /// share of those sent (0.001 = 0.1%).
    pub max_loss: f64,
    /// The rule for RSS (floor in KiB).
    pub rss_rule: DriftRule,
    /// The rule for open descriptors.
    pub fd_rule: DriftRule,
    /// Extra arguments of the tunnel.
    pub tunnel_args: Vec<String>,
}

/// The tunnel's `--udp-timeout` in the soak, seconds.
const UDP_TIMEOUT_SECS: u64 = 5;

impl SoakConfig {
    /// The benchmark's settings for a run of `duration`: rows every 30 s, bulk at
    /// 200 Mbit/s, 200 short connections/s, 1,000 datagrams/s, 100 queries/s; RSS and
    /// descriptors may grow 10% past the warm-up (at least 1 MiB / 4 descriptors);
    /// 0.1% loss; idle CPU under 1% of a core over 10 s. The tunnel closes idle UDP
    /// associations after 5 s (`--udp-timeout 5`), so the per-second DNS associations
    /// reach a steady number within the warm-up of even a one-minute run.
    pub fn new(duration: Duration) -> SoakConfig {
        SoakConfig {
            duration,
            report_every: Duration::from_secs(30),
            sample_every: Duration::from_secs(1),
            bulk_mbit: 200,
            bulk_transfer: 32 << 20,
            short_per_sec: 200,
            udp_per_sec: 1000,
            dns_per_sec: 100,
            settle: Duration::from_secs(UDP_TIMEOUT_SECS + 1),
            idle: Duration::from_secs(10),
            max_idle_cpu: 0.01,
            max_loss: 0.001,
            rss_rule: DriftRule {
                max_ratio: 0.10,
                floor: 1024,
                level: Level::Max,
            },
            fd_rule: DriftRule {
                max_ratio: 0.10,
                floor: 4,
                level: Level::Median,
            },
            tunnel_args: vec!["--udp-timeout".into(), UDP_TIMEOUT_SECS.to_string()],
        }
    }

    /// The CI test's settings: one minute, rows every 10 s, half the benchmark's rates
    /// (bulk 100 Mbit/s, 100 short connections/s, 500 datagrams/s, 50 queries/s):
    /// `cargo test` runs an unoptimised tunnel, which needs about 1.5 times the CPU of
    /// the release build, and CI machines are small. The rules are the same.
    pub fn ci() -> SoakConfig {
        SoakConfig {
            report_every: Duration::from_secs(10),
            bulk_mbit: 100,
            short_per_sec: 100,
            udp_per_sec: 500,
            dns_per_sec: 50,
            ..SoakConfig::new(Duration::from_secs(60))
        }
    }
}

/// One reading: both processes and the load counts, at `elapsed` since the load began.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Time since the load began.
    pub elapsed: Duration,
    /// The tunnel process.
    pub tunnel: ProcStats,
    /// The SOCKS server process.
    pub server: ProcStats,
    /// The counts so far, in [`Kind::ALL`] order.
    pub load: [KindTotals; 4],
    /// The machine's one-minute load average (`/proc/loadavg`): a busy machine starves
    /// the tunnel, which shows as loss and piled-up flows, not as a tunnel fault.
    pub machine_load: f64,
    /// How late the sampler thread woke for this reading: the machine's scheduling
    /// delay as the harness sees it (a printed row shows the worst since the last row).
    pub late: Duration,
}

/// What a soak saw and concluded.
#[derive(Debug, Clone)]
pub struct SoakReport {
    /// The settings it ran with.
    pub config: SoakConfig,
    /// Every reading taken during the load.
    pub samples: Vec<Sample>,
    /// The reading once the load had stopped and drained.
    pub end: Option<Sample>,
    /// Drift of tunnel RSS, tunnel fds, server RSS, server fds (where judged).
    pub drifts: Vec<(String, Drift)>,
    /// CPU seconds the tunnel used while idle, and over how long.
    pub idle_cpu: Option<(f64, Duration)>,
    /// Why it failed; empty when it passed.
    pub failures: Vec<String>,
    /// The first error messages of the loads.
    pub error_messages: Vec<String>,
    /// The tunnel's closing statistics line (its `stopped` log line), if it stopped.
    pub tunnel_stats: Option<String>,
    /// The last warnings and errors the tunnel and the server logged (up to 10 each).
    pub log_excerpts: Vec<String>,
    /// The kernel's drop counters over the load, per namespace (app with `tun0`).
    pub kernel: Vec<(String, KernelCounters)>,
}

impl SoakReport {
    /// Whether nothing failed.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Runs the soak with the tunnel and server `binary` (see the module docs), printing
/// a header and a row every [`SoakConfig::report_every`] to `out`. Setup failures are
/// errors; what the soak finds is in the report.
pub fn run_soak(binary: &Path, config: &SoakConfig, out: &mut dyn Write) -> io::Result<SoakReport> {
    let topo = Topology::create("soak")?;
    let body = Arc::new(blob(config.bulk_transfer, BODY_SEED));
    let _services = Services::start(topo.target(), config.bulk_transfer, BODY_SEED)?;
    let _udp = UdpServices::start(topo.target())?;
    let _dns = Dnsmasq::start_with(topo.target(), &default_records(), false)?;
    let server = start_server(topo.proxy(), binary, &[])?;
    let url = format!("socks5://{}", proxy_addr());
    let args: Vec<&str> = config.tunnel_args.iter().map(String::as_str).collect();
    let tunnel = start_tunnel(topo.app(), binary, &url, &args)?;

    let mut report = SoakReport {
        config: config.clone(),
        samples: Vec::new(),
        end: None,
        drifts: Vec::new(),
        idle_cpu: None,
        failures: Vec::new(),
        error_messages: Vec::new(),
        tunnel_stats: None,
        log_excerpts: Vec::new(),
        kernel: Vec::new(),
    };
    let counters = Arc::new(Counters::default());
    let hosts = [
        ("app", topo.app(), Some(TUN_NAME)),
        ("proxy", topo.proxy(), None),
        ("target", topo.target(), None),
    ];
    let before = hosts
        .iter()
        .map(|(_, ns, dev)| kernel::read(ns, *dev))
        .collect::<io::Result<Vec<_>>>()?;
    writeln!(out, "{}", table::header())?;
    let mut tunnel = run_load(
        topo.app(),
        config,
        body,
        &counters,
        tunnel,
        &server,
        &mut report,
        out,
    )?;
    for ((name, ns, dev), earlier) in hosts.iter().zip(&before) {
        let now = kernel::read(ns, *dev)?;
        report.kernel.push(((*name).to_owned(), now.since(earlier)));
    }
    report.error_messages = counters.messages();

    if let Some(process) = tunnel.as_mut() {
        idle_check(process, config, &mut report, out)?;
    }
    verdict::judge(&mut report);
    if let Some(process) = tunnel {
        match stop_cleanly(process) {
            Ok(log) => {
                report.tunnel_stats = log
                    .lines()
                    .rfind(|l| l.contains("stopped"))
                    .map(str::to_owned);
                report.log_excerpts.extend(warnings("tunnel", &log));
            }
            Err(e) => report
                .failures
                .push(format!("tunnel did not stop cleanly: {e}")),
        }
    }
    if !panics_in(&server).is_empty() {
        report
            .failures
            .push(format!("server panicked: {:?}", panics_in(&server)));
    }
    report
        .log_excerpts
        .extend(warnings("server", &server.log().unwrap_or_default()));
    Ok(report)
}

/// The last [`LOG_EXCERPT`] lines of `log` that are warnings or errors, prefixed with `who`.
fn warnings(who: &str, log: &str) -> Vec<String> {
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    lines
        .iter()
        .skip(lines.len().saturating_sub(LOG_EXCERPT))
        .map(|l| format!("{who}: {l}"))
        .collect()
}

/// Starts the loads, samples until the duration is over (or the tunnel exits), stops
/// the loads and takes the end sample. Returns the tunnel unless it exited.
#[allow(clippy::too_many_arguments)]
fn run_load(
    app: &Namespace,
    config: &SoakConfig,
    body: Arc<Vec<u8>>,
    counters: &Arc<Counters>,
    mut tunnel: Process,
    server: &Process,
    report: &mut SoakReport,
    out: &mut dyn Write,
) -> io::Result<Option<Process>> {
    let stop = Arc::new(AtomicBool::new(false));
    let threads = start_loads(app, config, body, counters, &stop);
    let start = Instant::now();
    let mut next_row = config.report_every;
    let mut tick: u32 = 0;
    let mut exited = None;
    let mut worst_late = Duration::ZERO;
    while start.elapsed() < config.duration {
        tick += 1;
        let at = config.sample_every * tick;
        std::thread::sleep(at.saturating_sub(start.elapsed()));
        let late = start.elapsed().saturating_sub(at);
        if let Some(status) = tunnel.try_wait()? {
            exited = Some(status);
            break;
        }
        let mut sample = read_sample(start.elapsed(), &tunnel, server, counters)?;
        sample.late = late;
        report.samples.push(sample);
        worst_late = worst_late.max(late);
        if sample.elapsed >= next_row {
            // The row shows how late the sampler woke at worst since the last row.
            sample.late = std::mem::take(&mut worst_late);
            writeln!(out, "{}", table::row(&sample, None))?;
            next_row += config.report_every;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        if let Err(e) = join(thread) {
            report.failures.push(format!("a load thread failed: {e}"));
        }
    }
    if let Some(status) = exited {
        report.failures.push(format!(
            "tunnel exited during the load with {status}:\n{}",
            tunnel.log().unwrap_or_default()
        ));
        return Ok(None);
    }
    let end = read_sample(start.elapsed(), &tunnel, server, counters)?;
    writeln!(out, "{}", table::row(&end, Some("end")))?;
    report.end = Some(end);
    Ok(Some(tunnel))
}

/// One thread per load with a non-zero rate, each inside `app` on its own runtime.
fn start_loads(
    app: &Namespace,
    config: &SoakConfig,
    body: Arc<Vec<u8>>,
    counters: &Arc<Counters>,
    stop: &Arc<AtomicBool>,
) -> Vec<JoinHandle<io::Result<()>>> {
    let mut threads = Vec::new();
    let (c, s) = (counters.clone(), stop.clone());
    if config.bulk_mbit > 0 {
        let rate = config.bulk_mbit * 1_000_000 / 8;
        threads.push(app.enter_async(move || async move {
            tcp::bulk(c, s, rate, body).await;
            Ok(())
        }));
    }
    let (c, s, rate) = (counters.clone(), stop.clone(), config.short_per_sec);
    if rate > 0 {
        threads.push(app.enter_async(move || async move {
            tcp::short(c, s, rate).await;
            Ok(())
        }));
    }
    let (c, s, rate) = (counters.clone(), stop.clone(), config.udp_per_sec);
    if rate > 0 {
        threads.push(app.enter_async(move || async move {
            datagrams::udp_echo(c, s, rate).await;
            Ok(())
        }));
    }
    let (c, s, rate) = (counters.clone(), stop.clone(), config.dns_per_sec);
    if rate > 0 {
        threads.push(app.enter_async(move || async move {
            datagrams::dns(c, s, rate).await;
            Ok(())
        }));
    }
    threads
}

fn read_sample(
    elapsed: Duration,
    tunnel: &Process,
    server: &Process,
    counters: &Counters,
) -> io::Result<Sample> {
    Ok(Sample {
        elapsed,
        tunnel: proc_stats(tunnel.id())?,
        server: proc_stats(server.id())?,
        load: counters.all(),
        machine_load: load_average().unwrap_or(f64::NAN),
        late: Duration::ZERO,
    })
}

/// Waits `config.settle`, then leaves the tunnel idle for `config.idle` and records
/// its CPU time meanwhile.
fn idle_check(
    tunnel: &Process,
    config: &SoakConfig,
    report: &mut SoakReport,
    out: &mut dyn Write,
) -> io::Result<()> {
    std::thread::sleep(config.settle);
    let before = cpu_ticks(tunnel.id())?;
    let start = Instant::now();
    std::thread::sleep(config.idle);
    let used = cpu_ticks(tunnel.id())?.saturating_sub(before) as f64 / USER_HZ as f64;
    let window = start.elapsed();
    writeln!(
        out,
        "idle: the tunnel used {used:.2} s of CPU in {:.1} s ({:.2}% of one core)",
        window.as_secs_f64(),
        100.0 * used / window.as_secs_f64()
    )?;
    report.idle_cpu = Some((used, window));
    Ok(())
}

impl fmt::Display for SoakReport {
    /// The summary: totals and rates per load, drifts, idle CPU, verdict.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        table::summary(self, f)
    }
}
