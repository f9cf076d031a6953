//! What every benchmark binary needs around a measurement: settings from the
//! environment, the median of rounds, iperf3 runs and their JSON, a process's CPU time
//! and resident memory, the open-files limit, the root check, and many idle TCP flows
//! held open while something is measured.
//!
//! Stage: none of the data path; the harness of `benches/` (and of the test that keeps
//! the `perf` bench from rotting). Like the rest of [`testbed`](super) it returns
//! [`io::Error`]s that say what failed and never panics; benches decide what a
//! failure means (a row shown as an error, usually).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use super::namespace::{Namespace, join};
use super::process::Process;
use super::wait::wait_for_tcp;

/// The port `iperf3 -s` listens on.
pub const IPERF_PORT: u16 = 5201;

/// Clock ticks per second of the times in `/proc/PID/stat` (`USER_HZ`, 100 on Linux).
const USER_HZ: f64 = 100.0;

/// How long an iperf3 client may overrun its test time before it is killed (a stalled
/// path must cost a row, not the whole run).
const IPERF_GRACE: Duration = Duration::from_secs(20);

/// The value of environment variable `name` parsed as `T`, or `default` when it is
/// unset or does not parse.
pub fn env_or<T: FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// The median of `values` (the upper one of an even count), NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Whether this process runs as root (effective UID 0): namespaces need it.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Raises this process's soft open-files limit to the hard one (children inherit it:
/// the server, the tunnel, thousands of client sockets); returns the new soft limit.
pub fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024));
    let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft)
}

/// The CPU time process `pid` used so far, all threads, user + system, in seconds
/// (`utime` + `stime` of `/proc/PID/stat`).
pub fn cpu_seconds(pid: u32) -> io::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).map_err(super::context(&path))?;
    parse_cpu_ticks(&stat)
        .map(|ticks| ticks as f64 / USER_HZ)
        .ok_or_else(|| io::Error::other(format!("{path}: no utime/stime")))
}

/// `utime + stime` in clock ticks from the text of `/proc/PID/stat`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses: fields resume after
    // the last ") "; utime and stime are fields 14 and 15, so 11 and 12 from there.
    let rest = stat.rsplit_once(") ")?.1;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
}

/// The resident memory of process `pid` in MiB.
pub fn rss_mib(pid: u32) -> io::Result<f64> {
    super::attach::vm_rss_kib(pid).map(|kib| kib as f64 / 1024.0)
}

/// Starts `iperf3 -s` in `ns` and returns once it listens on `addr`'s port.
pub fn start_iperf_server(ns: &Namespace, addr: IpAddr) -> io::Result<Process> {
    let mut command = ns.command("iperf3");
    command.args(["-s", "-B", &addr.to_string()]);
    let process = ns.spawn(command)?;
    wait_for_tcp(
        ns,
        SocketAddr::new(addr, IPERF_PORT),
        Duration::from_secs(10),
    )?;
    Ok(process)
}

/// What one iperf3 client run reports (`end.sum_received` of its JSON).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Iperf {
    /// Received throughput, Gbit/s.
    pub gbps: f64,
    /// Bytes received.
    pub bytes: u64,
}

/// One iperf3 client run from `ns` to `server` for `secs` seconds (the first second
/// omitted), with `streams` parallel streams (`-P`), `reverse` for download (`-R`).
/// The client is killed if it overruns by [`IPERF_GRACE`].
pub fn iperf(
    ns: &Namespace,
    server: IpAddr,
    secs: u64,
    streams: usize,
    reverse: bool,
) -> io::Result<Iperf> {
    let limit = (secs + 1 + IPERF_GRACE.as_secs()).to_string();
    let mut args = vec![
        "-k".to_owned(),
        "2".to_owned(),
        limit,
        "iperf3".to_owned(),
        "-c".to_owned(),
        server.to_string(),
        "-t".to_owned(),
        secs.to_string(),
        "-O".to_owned(),
        "1".to_owned(),
        "-P".to_owned(),
        streams.max(1).to_string(),
        "-J".to_owned(),
    ];
    if reverse {
        args.push("-R".to_owned());
    }
    let out = ns.run("timeout", &args)?;
    let json = String::from_utf8_lossy(&out.stdout);
    parse_iperf_json(&json).ok_or_else(|| {
        let snippet: String = json.chars().take(300).collect();
        io::Error::other(format!(
            "iperf3: no end.sum_received in its output: {snippet}"
        ))
    })
}

/// `end.sum_received` (bits per second and bytes) from iperf3's `-J` output.
pub fn parse_iperf_json(json: &str) -> Option<Iperf> {
    let at = json.find("\"sum_received\"")?;
    let object = json.get(at..)?;
    let object = object.get(..object.find('}')?)?;
    let bps = json_number(object, "bits_per_second")?;
    let bytes = json_number(object, "bytes")?;
    Some(Iperf {
        gbps: bps / 1e9,
        bytes: bytes as u64,
    })
}

/// The number after `"key":` in `text` (the first occurrence).
fn json_number(text: &str, key: &str) -> Option<f64> {
    let quoted = format!("\"{key}\"");
    let at = text.find(&quoted)?;
    let rest = text.get(at + quoted.len()..)?.trim_start();
    let rest = rest.strip_prefix(':')?.trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-')))
        .unwrap_or(rest.len());
    rest.get(..end)?.parse().ok()
}

/// What [`hold_flows`] saw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeldFlows<T> {
    /// Connections established.
    pub established: usize,
    /// Of those, still open (no EOF, no reset) after the hold.
    pub open: usize,
    /// What the probe returned while they were held.
    pub probe: T,
}

/// How many connects [`hold_flows`] keeps in flight.
const HOLD_CONCURRENCY: usize = 256;

/// Opens `n` TCP connections from `ns` to `dst` (256 connects in flight, 20 s each),
/// keeps them idle for `hold`, runs `probe` (a resident-memory reading, say) while they
/// are still open, then closes them all.
pub fn hold_flows<T, P>(
    ns: &Namespace,
    dst: SocketAddr,
    n: usize,
    hold: Duration,
    probe: P,
) -> io::Result<HeldFlows<T>>
where
    T: Send + 'static,
    P: FnOnce() -> T + Send + 'static,
{
    join(ns.enter_async(move || async move {
        let gate = Arc::new(tokio::sync::Semaphore::new(HOLD_CONCURRENCY));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..n {
            let gate = gate.clone();
            tasks.spawn(async move {
                let _permit = gate.acquire().await.ok()?;
                let connect = tokio::net::TcpStream::connect(dst);
                tokio::time::timeout(Duration::from_secs(20), connect)
                    .await
                    .ok()?
                    .ok()
            });
        }
        let mut held = Vec::with_capacity(n);
        while let Some(joined) = tasks.join_next().await {
            if let Ok(Some(stream)) = joined {
                held.push(stream);
            }
        }
        tokio::time::sleep(hold).await;
        let probe = probe();
        let mut buf = [0u8; 1];
        let open = held
            .iter()
            .filter(
                |s| matches!(s.try_read(&mut buf), Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            )
            .count();
        Ok(HeldFlows {
            established: held.len(),
            open,
            probe,
        })
    }))
}

/// `text` as a JSON string literal (quotes, backslashes and control characters
/// escaped): the benches write their JSON by hand.
pub fn json_str(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The load average line of the machine (`/proc/loadavg`'s first three fields), to
/// print beside figures measured on a shared machine.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The number of CPUs this process may run on.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 3.0);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn reads_cpu_ticks_past_a_name_with_spaces() {
        let stat = "1234 (tun2 socks) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
        assert_eq!(parse_cpu_ticks("1234 (x) S 1"), None);
        assert!(cpu_seconds(std::process::id()).is_ok());
    }

    #[test]
    fn parses_iperf_sum_received() {
        let json = r#"{"start":{},"intervals":[{"sum":{"bytes":5,"bits_per_second":1}}],
            "end":{"sum_sent":{"bytes":1300,"bits_per_second":2.5e9},
            "sum_received":{"start":0,"end":5.0,"seconds":5.0,"bytes":1250000000,
            "bits_per_second":2000000000.0,"sender":true}}}"#;
        assert_eq!(
            parse_iperf_json(json),
            Some(Iperf {
                gbps: 2.0,
                bytes: 1_250_000_000
            })
        );
        assert_eq!(parse_iperf_json(r#"{"error":"unable to connect"}"#), None);
    }

    #[test]
    fn escapes_json_strings() {
        assert_eq!(json_str("a\"b\\c\nd\u{1}"), "\"a\\\"b\\\\c\\nd\\u0001\"");
    }

    #[test]
    fn env_or_falls_back() {
        assert_eq!(env_or("T2S_NO_SUCH_VARIABLE_FOR_TEST", 7u64), 7);
    }
}
