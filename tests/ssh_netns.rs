//! The tunnel through OpenSSH's dynamic forward, as users run it: sshd in `proxy`,
//! `ssh -D 127.0.0.1:1080 -N` in `app`, the tunnel in `app` with
//! `--proxy socks5://127.0.0.1:1080`, test services (and dnsmasq) in `target`. `app`
//! has no route to `target` but the TUN, and only sshd connects onward, so every
//! byte that comes back went through the tunnel, the ssh client and sshd.
//!
//! `ssh -D` carries CONNECT only: UDP must be refused at once (port unreachable),
//! DNS works over TCP (`--dns tcp`) or by fake IPs that sshd resolves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tun2socks::metrics::Snapshot;
use tun2socks::require_or_skip;
use tun2socks::testbed::dnsmasq::{
    DigTransport, Dnsmasq, PROXY_ONLY_NAME, TARGET_NAME, default_records, dig, set_proxy_only_name,
};
use tun2socks::testbed::local_proxy::LocalProxyNet;
use tun2socks::testbed::namespace::join;
use tun2socks::testbed::services::{ECHO_PORT, HTTP_PORT, blob, echo_round_trip, sha256_hex};
use tun2socks::testbed::sshd::{SshProxy, require_openssh};
use tun2socks::testbed::udp::{UDP_ECHO_PORT, UdpServices};
use tun2socks::testbed::udp_probes::udp_expect_unreachable;
use tun2socks::testbed::{
    Namespace, TARGET_V4, TARGET_V6, Topology, require_program, require_root,
};

/// The HTTP blob and the echo payload: 1 MiB each.
const BLOB: usize = 1024 * 1024;
const SEED: u64 = 22;
/// A port of the target where nothing listens.
const CLOSED_PORT: u16 = 7999;

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tun2socks"))
}

macro_rules! needs {
    ($test:literal $(, $program:literal)*) => {
        require_or_skip!(require_root($test), Ok(()));
        require_or_skip!(require_openssh($test), Ok(()));
        $(require_or_skip!(require_program($program, $test), Ok(()));)*
    };
}

type Net = LocalProxyNet<SshProxy>;

fn net(tag: &str) -> Result<Net> {
    net_with(tag, |_| Ok(()))
}

/// `prepare` runs before sshd starts.
fn net_with(tag: &str, prepare: impl FnOnce(&Topology) -> io::Result<()>) -> Result<Net> {
    Ok(Net::start(
        tag,
        binary(),
        (BLOB, SEED),
        prepare,
        SshProxy::start,
    )?)
}

fn stat(log: &str, name: &str) -> u64 {
    Snapshot::final_stat(log, name)
}

/// `curl -sS --fail http://HOST:8080/blob` in `ns` (with curl's `family` flag, `-4`
/// or `-6`, if given): the SHA-256 of the body, or an error with curl's complaint.
fn curl_sha(ns: &Namespace, host: &str, family: Option<&str>) -> Result<String> {
    Ok(tun2socks::testbed::services::curl_blob_sha256(
        ns, host, family, 10,
    )?)
}

fn target(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

#[test]
fn tcp_through_ssh_is_byte_exact_over_ipv4_and_ipv6() -> Result<()> {
    needs!("tcp_through_ssh_is_byte_exact_over_ipv4_and_ipv6", "curl");
    let mut net = net("sshtcp")?;
    net.tunnel(&[])?;
    let expected = sha256_hex(&blob(BLOB, SEED));
    for host in [TARGET_V4.to_string(), format!("[{TARGET_V6}]")] {
        let got = curl_sha(net.app(), &host, None)
            .with_context(|| format!("curl {host}\n{}", net.logs()))?;
        ensure!(
            got == expected,
            "HTTP from {host}: sha256 {got}, not {expected}"
        );
    }
    // Both directions at once, compared byte for byte.
    for ip in [IpAddr::from(TARGET_V4), IpAddr::from(TARGET_V6)] {
        let dst = target(ip, ECHO_PORT);
        let data = blob(BLOB, u64::from(ip.is_ipv6()));
        let sent = data.clone();
        let back = join(net.app().enter_async(move || async move {
            let mut stream = TcpStream::connect(dst).await?;
            echo_round_trip(&mut stream, &sent).await
        }))
        .with_context(|| format!("echo {dst}\n{}", net.logs()))?;
        ensure!(
            back.len() == data.len(),
            "echo {dst}: {} bytes back",
            back.len()
        );
        ensure!(back == data, "echo {dst}: the bytes differ");
    }
    // sshd made the connections (it logs each forwarded destination).
    let sshd_log = net.proxy.sshd().log()?;
    for to in [
        format!("target {TARGET_V4} port {HTTP_PORT}"),
        format!("target {TARGET_V6} port {HTTP_PORT}"),
        format!("target {TARGET_V4} port {ECHO_PORT}"),
        format!("target {TARGET_V6} port {ECHO_PORT}"),
    ] {
        ensure!(
            sshd_log.contains(&to),
            "sshd never forwarded to {to}:\n{sshd_log}"
        );
    }
    let log = net.stop_tunnel()?;
    ensure!(stat(&log, "flows_connected") == 4, "{log}");
    ensure!(stat(&log, "bytes_down") >= 3 * BLOB as u64, "{log}");
    Ok(())
}

/// What an application saw when it connected to `dst` and read.
#[derive(Debug)]
enum Outcome {
    /// `connect` failed (RST to the SYN), after this long.
    Refused(Duration),
    /// `connect` succeeded, then the connection was reset (no data) after this long.
    Reset(Duration),
    /// `connect` succeeded, then the connection closed (FIN, no data).
    Closed(Duration),
    /// This many bytes arrived: something listened after all.
    Data(usize),
    /// Nothing within the time: the application hangs.
    Hang,
    /// Another error.
    Other(io::Error),
}

/// Connects to `dst` from `ns` and waits up to `limit` for what happens.
fn connect_and_read(ns: &Namespace, dst: SocketAddr, limit: Duration) -> Result<Outcome> {
    let outcome = join(ns.enter_async(move || async move {
        let started = Instant::now();
        let attempt = async {
            let mut stream = match TcpStream::connect(dst).await {
                Ok(stream) => stream,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    return Outcome::Refused(started.elapsed());
                }
                Err(e) => return Outcome::Other(e),
            };
            let mut buf = [0u8; 64];
            match stream.read(&mut buf).await {
                Ok(0) => Outcome::Closed(started.elapsed()),
                Ok(n) => Outcome::Data(n),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    Outcome::Reset(started.elapsed())
                }
                Err(e) => Outcome::Other(e),
            }
        };
        Ok(tokio::time::timeout(limit, attempt)
            .await
            .unwrap_or(Outcome::Hang))
    }))?;
    Ok(outcome)
}

#[test]
fn a_closed_port_behind_ssh_ends_the_connection_at_once() -> Result<()> {
    needs!("a_closed_port_behind_ssh_ends_the_connection_at_once");
    let mut net = net("sshrefuse")?;
    net.tunnel(&[])?;
    for ip in [IpAddr::from(TARGET_V4), IpAddr::from(TARGET_V6)] {
        let dst = target(ip, CLOSED_PORT);
        let outcome = connect_and_read(net.app(), dst, Duration::from_secs(5))?;
        // The tunnel holds the SYN-ACK until the proxy answers: the application's
        // connect itself fails, as it would without the tunnel.
        match outcome {
            Outcome::Refused(took) => ensure!(
                took < Duration::from_secs(2),
                "{dst}: refused only after {took:?}"
            ),
            Outcome::Reset(took) => bail!("{dst}: connected, then reset after {took:?}"),
            Outcome::Closed(took) => bail!("{dst}: connected, then closed after {took:?}"),
            Outcome::Data(n) => bail!("{dst}: {n} bytes arrived from a closed port"),
            Outcome::Hang => bail!("{dst}: the application hangs\n{}", net.logs()),
            Outcome::Other(e) => bail!("{dst}: {e}\n{}", net.logs()),
        }
    }
    // sshd tried and failed: the refusal came from the target, not from the tunnel.
    let client_log = net.proxy.client().log()?;
    ensure!(
        client_log.matches("open failed").count() == 2,
        "the ssh client did not report both failed channels:\n{client_log}"
    );
    // A port that listens still works afterwards.
    let outcome = connect_and_read(
        net.app(),
        target(TARGET_V4, HTTP_PORT),
        Duration::from_millis(500),
    )?;
    ensure!(
        matches!(outcome, Outcome::Hang),
        "an open port must stay connected, waiting for a request: {outcome:?}"
    );
    let log = net.stop_tunnel()?;
    // ssh -D sends no SOCKS failure reply: it closes the connection.
    ensure!(stat(&log, "flows_failed") == 2, "{log}");
    ensure!(stat(&log, "socks.connect.other") == 2, "{log}");
    Ok(())
}

#[test]
fn udp_through_ssh_gets_port_unreachable_at_once() -> Result<()> {
    needs!("udp_through_ssh_gets_port_unreachable_at_once");
    let mut net = net("sshudp")?;
    // An echo is there: if a datagram got through, it would be answered.
    net.udp = Some(UdpServices::start(net.topo.target())?);
    net.tunnel(&[])?;
    for _ in 0..3 {
        for ip in [IpAddr::from(TARGET_V4), IpAddr::from(TARGET_V6)] {
            let dst = target(ip, UDP_ECHO_PORT);
            let took = udp_expect_unreachable(net.app(), dst, Duration::from_secs(2))
                .with_context(|| format!("{dst}\n{}", net.logs()))?;
            ensure!(
                took < Duration::from_secs(1),
                "{dst}: refused after {took:?}"
            );
        }
    }
    let log = net.stop_tunnel()?;
    ensure!(stat(&log, "udp_refused") == 6, "{log}");
    ensure!(stat(&log, "udp_associations") == 0, "{log}");
    ensure!(stat(&log, "udp_up") == 0, "{log}");
    // ssh -D was asked once (it closes the connection on UDP ASSOCIATE, without a
    // reply), then the refusal was remembered, and logged once.
    let asked = stat(&log, "socks_errors");
    ensure!(asked == 1, "UDP ASSOCIATE was tried {asked} times:\n{log}");
    ensure!(stat(&log, "socks.udp-associate.other") == 1, "{log}");
    ensure!(log.matches("UDP association failed").count() == 1, "{log}");
    Ok(())
}

#[test]
fn dns_over_tcp_and_fake_ip_names_that_only_sshd_resolves() -> Result<()> {
    needs!(
        "dns_over_tcp_and_fake_ip_names_that_only_sshd_resolves",
        "dnsmasq",
        "dig",
        "curl"
    );
    // The name resolves in the proxy namespace only: sshd must resolve it.
    let mut net = net_with("sshdns", |topo| set_proxy_only_name(topo, &[]))?;
    net.dnsmasq = Some(Dnsmasq::start(net.topo.target(), &default_records())?);

    net.tunnel(&["--dns", "tcp"])?;
    for server in [IpAddr::from(TARGET_V4), IpAddr::from(TARGET_V6)] {
        let a = dig(net.app(), server, TARGET_NAME, "A", DigTransport::Udp)
            .with_context(|| format!("A via {server}\n{}", net.logs()))?;
        ensure!(a == [TARGET_V4.to_string()], "A via {server}: {a:?}");
        let aaaa = dig(net.app(), server, TARGET_NAME, "AAAA", DigTransport::Udp)
            .with_context(|| format!("AAAA via {server}\n{}", net.logs()))?;
        ensure!(
            aaaa == [TARGET_V6.to_string()],
            "AAAA via {server}: {aaaa:?}"
        );
    }
    let log = net.stop_tunnel()?;
    ensure!(stat(&log, "dns_tcp_answers") == 4, "{log}");
    ensure!(stat(&log, "udp_associations") == 0, "{log}");
    let asked = net.dnsmasq.as_ref().unwrap().queries_for(TARGET_NAME)?;
    ensure!(asked == 4, "{asked} queries reached dnsmasq, not 4");

    net.tunnel(&["--dns", "fake-ip"])?;
    let expected = sha256_hex(&blob(BLOB, SEED));
    for family in ["-4", "-6"] {
        let got = curl_sha(net.app(), PROXY_ONLY_NAME, Some(family))
            .with_context(|| format!("curl {family} {PROXY_ONLY_NAME}\n{}", net.logs()))?;
        ensure!(
            got == expected,
            "curl {family}: sha256 {got}, not {expected}"
        );
    }
    let log = net.stop_tunnel()?;
    ensure!(stat(&log, "dns_answered_fake") >= 2, "{log}");
    // The name went to sshd as a name (SOCKS5 ATYP 3), never to a resolver.
    let sshd_log = net.proxy.sshd().log()?;
    let by_name = format!("target {PROXY_ONLY_NAME} port {HTTP_PORT}");
    ensure!(
        sshd_log.matches(&by_name).count() == 2,
        "sshd did not get the name twice:\n{sshd_log}"
    );
    let asked = net.dnsmasq.as_ref().unwrap().queries_for(PROXY_ONLY_NAME)?;
    ensure!(asked == 0, "the name left the machine: {asked} queries");
    Ok(())
}
