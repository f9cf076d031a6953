//! The tunnel through shadowsocks-libev, as users run it in front of a shadowsocks
//! (v2ray, clash) client: `ss-server` in `proxy`, `ss-local -u` on 127.0.0.1:1080 in
//! `app`, the tunnel in `app` with `--proxy socks5://127.0.0.1:1080`, test services
//! (and dnsmasq) in `target`. `app` has no route to `target` but the TUN, and only
//! ss-server connects onward, so every byte that comes back went through the tunnel,
//! ss-local and ss-server.
//!
//! ss-local carries CONNECT and, with `-u`, UDP ASSOCIATE (it answers with its own
//! address, 127.0.0.1:1080, where its UDP relay listens too), so UDP and the
//! default `--dns udp` work, and names from `--dns fake-ip` reach ss-server, which
//! resolves them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tun2socks::metrics::Snapshot;
use tun2socks::require_or_skip;
use tun2socks::testbed::dnsmasq::{
    DigTransport, Dnsmasq, PROXY_ONLY_NAME, TARGET_NAME, default_records, dig, set_proxy_only_name,
};
use tun2socks::testbed::local_proxy::LocalProxyNet;
use tun2socks::testbed::namespace::join;
use tun2socks::testbed::services::{ECHO_PORT, HTTP_PORT, blob, sha256_hex};
use tun2socks::testbed::shadowsocks::{Shadowsocks, require_shadowsocks};
use tun2socks::testbed::udp::{CONE_REPLY_PORT, UDP_ECHO_PORT, UdpServices};
use tun2socks::testbed::udp_client::{
    MIN_PAYLOAD, connected_socket, udp_cone_check, udp_echo_check,
};
use tun2socks::testbed::udp_probes::udp_expect_unreachable_from;
use tun2socks::testbed::{
    Namespace, TARGET_V4, TARGET_V6, Topology, require_program, require_root,
};

/// The HTTP blob and the echo payload: 1 MiB each.
const BLOB: usize = 1024 * 1024;
const SEED: u64 = 23;
/// The largest datagram sent. ss-local sends each one to ss-server in one UDP
/// datagram, with DF, 55 bytes larger for an IPv4 target and 67 for an IPv6 one
/// (32 of salt, 16 of tag, the address), so over the 1500-byte link it relays at
/// most 1417 bytes to an IPv4 target and 1405 to an IPv6 one; a larger one fails in
/// ss-local (EMSGSIZE) and is lost.
const LARGEST_DATAGRAM: usize = 1400;
/// Datagrams per family in the echo check.
const DATAGRAMS: usize = 1000;

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tun2socks"))
}

macro_rules! needs {
    ($test:literal $(, $program:literal)*) => {
        require_or_skip!(require_root($test), Ok(()));
        require_or_skip!(require_shadowsocks($test), Ok(()));
        $(require_or_skip!(require_program($program, $test), Ok(()));)*
    };
}

type Net = LocalProxyNet<Shadowsocks>;

fn net(tag: &str) -> Result<Net> {
    net_with(tag, |_| Ok(()))
}

/// `prepare` runs before ss-server starts.
fn net_with(tag: &str, prepare: impl FnOnce(&Topology) -> io::Result<()>) -> Result<Net> {
    Ok(Net::start(
        tag,
        binary(),
        (BLOB, SEED),
        prepare,
        Shadowsocks::start,
    )?)
}

/// As [`net`], with ss-local started without `-u`.
fn net_without_local_udp(tag: &str) -> Result<Net> {
    let start = Shadowsocks::start_without_local_udp;
    Ok(Net::start(tag, binary(), (BLOB, SEED), |_| Ok(()), start)?)
}

/// How often ss-server logged a connection to `to` (`HOST:PORT`, `[V6]:PORT`).
fn server_connects(net: &Net, to: &str) -> Result<usize> {
    let log = net.proxy.server().log()?;
    Ok(log.matches(&format!("connect to {to}\n")).count())
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

/// Sends `data` to the echo while reading, and returns as many bytes as were sent
/// once they are all back. No half-close: shadowsocks-libev has none (an EOF from
/// either side makes ss-local and ss-server close both directions, dropping what
/// was still on its way back), so `echo_round_trip`'s FIN would cut the echo short.
async fn echo_without_half_close(stream: &mut TcpStream, data: &[u8]) -> io::Result<Vec<u8>> {
    let (mut r, mut w) = stream.split();
    let mut back = vec![0u8; data.len()];
    let (sent, got) = tokio::join!(w.write_all(data), r.read_exact(&mut back));
    sent?;
    got?;
    Ok(back)
}

fn target(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

#[test]
fn tcp_through_shadowsocks_is_byte_exact_over_ipv4_and_ipv6() -> Result<()> {
    needs!(
        "tcp_through_shadowsocks_is_byte_exact_over_ipv4_and_ipv6",
        "curl"
    );
    let mut net = net("sstcp")?;
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
            echo_without_half_close(&mut stream, &sent).await
        }))
        .with_context(|| format!("echo {dst}\n{}", net.logs()))?;
        ensure!(back == data, "echo {dst}: the bytes differ");
    }
    // ss-server made each connection, once.
    for port in [HTTP_PORT, ECHO_PORT] {
        for to in [
            format!("{TARGET_V4}:{port}"),
            format!("[{TARGET_V6}]:{port}"),
        ] {
            let made = server_connects(&net, &to)?;
            ensure!(made == 1, "ss-server connected to {to} {made} times");
        }
    }
    let log = net.stop_tunnel()?;
    ensure!(stat(&log, "flows_connected") == 4, "{log}");
    ensure!(stat(&log, "bytes_down") >= 3 * BLOB as u64, "{log}");
    Ok(())
}

/// Datagrams of 1 to 7 bytes (shorter than the echo check's sequence number), one
/// at a time from one socket in `ns`, each echoed back unchanged.
/// Returns the probe socket's own address.
fn echo_tiny_datagrams(ns: &Namespace, dst: SocketAddr) -> Result<SocketAddr> {
    let socket = connected_socket(ns, dst)?;
    let local = socket.local_addr()?;
    socket.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
    let mut buf = [0u8; 64];
    for len in 1..MIN_PAYLOAD {
        let sent = blob(len, len as u64);
        socket.send(&sent)?;
        let n = socket
            .recv(&mut buf)
            .with_context(|| format!("{dst}: no echo of {len} bytes"))?;
        ensure!(
            buf.get(..n) == Some(&sent[..]),
            "{dst}: {len} bytes altered"
        );
    }
    Ok(local)
}

#[test]
fn udp_through_ss_local_is_intact_over_ipv4_and_ipv6_and_full_cone() -> Result<()> {
    needs!("udp_through_ss_local_is_intact_over_ipv4_and_ipv6_and_full_cone");
    let mut net = net("ssudp")?;
    net.udp = Some(UdpServices::start(net.topo.target())?);
    net.tunnel(&[])?;
    // The probe sockets' own endpoints: a socket may be given the port of an earlier,
    // closed one, and then rightly shares its association (endpoint-independent
    // mapping), so associations are counted per distinct endpoint.
    let mut endpoints = std::collections::HashSet::new();
    for ip in [IpAddr::from(TARGET_V4), IpAddr::from(TARGET_V6)] {
        let dst = target(ip, UDP_ECHO_PORT);
        let report = udp_echo_check(net.app(), dst, DATAGRAMS, MIN_PAYLOAD..=LARGEST_DATAGRAM)
            .with_context(|| format!("{dst}\n{}", net.logs()))?;
        ensure!(report.all_ok(), "{dst}: {report}\n{}", net.logs());
        endpoints.extend(report.local);
        let tiny = echo_tiny_datagrams(net.app(), dst)
            .with_context(|| format!("tiny datagrams to {dst}\n{}", net.logs()))?;
        endpoints.insert(tiny);
        // The cone service answers from CONE_REPLY_PORT, a port this socket never
        // sent to: ss-server relays it, and the tunnel delivers it with that source.
        let cone = udp_cone_check(net.app(), ip)
            .with_context(|| format!("cone via {ip}\n{}", net.logs()))?;
        ensure!(cone.from.port() == CONE_REPLY_PORT, "{cone:?}");
        endpoints.insert(cone.local);
    }
    let log = net.stop_tunnel()?;
    // Each datagram went up once and came back once: the echo check's, the tiny
    // ones and the cone request, in each family.
    let datagrams = 2 * (DATAGRAMS + (MIN_PAYLOAD - 1) + 1) as u64;
    ensure!(stat(&log, "udp_up") == datagrams, "{log}");
    ensure!(stat(&log, "udp_down") == datagrams, "{log}");
    // One association per app endpoint (echo, tiny, cone; v4 and v6: six sockets),
    // each granted by ss-local.
    let distinct = endpoints.len() as u64;
    ensure!(distinct == 6 || distinct == 5, "{endpoints:?}");
    ensure!(
        stat(&log, "udp_associations") == distinct,
        "{endpoints:?}\n{log}"
    );
    let local_log = net.proxy.local().log()?;
    let granted = local_log.matches("udp assc request accepted").count() as u64;
    ensure!(
        granted == distinct,
        "ss-local granted {granted} associations:\n{local_log}"
    );
    Ok(())
}

#[test]
fn dns_over_ss_local_udp_and_fake_ip_names_that_only_ss_server_resolves() -> Result<()> {
    needs!(
        "dns_over_ss_local_udp_and_fake_ip_names_that_only_ss_server_resolves",
        "dnsmasq",
        "dig",
        "curl"
    );
    // The name resolves in the proxy namespace only: ss-server must resolve it.
    let mut net = net_with("ssdns", |topo| set_proxy_only_name(topo, &[]))?;
    net.dnsmasq = Some(Dnsmasq::start(net.topo.target(), &default_records())?);

    // The default `--dns udp`: queries ride ss-local's UDP relay.
    net.tunnel(&[])?;
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
    ensure!(stat(&log, "dns_via_udp") == 4, "{log}");
    ensure!(stat(&log, "dns_tcp_answers") == 0, "{log}");
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
    // The name went through ss-local to ss-server as a name, never to a resolver.
    let by_name = format!("{PROXY_ONLY_NAME}:{HTTP_PORT}");
    let made = server_connects(&net, &by_name)?;
    ensure!(
        made == 2,
        "ss-server got the name {made} times, not 2\n{}",
        net.logs()
    );
    let asked = net.dnsmasq.as_ref().unwrap().queries_for(PROXY_ONLY_NAME)?;
    ensure!(asked == 0, "the name left the machine: {asked} queries");
    Ok(())
}

/// ss-local without `-u` (a common mistake) grants UDP ASSOCIATE with nothing
/// listening at the relay it names: each datagram meets a port unreachable there.
/// The application must hear it as a port unreachable from its destination, at once
/// and each time, not lose its datagrams in silence; TCP is unaffected.
#[test]
fn udp_through_ss_local_without_u_is_answered_with_port_unreachable() -> Result<()> {
    needs!(
        "udp_through_ss_local_without_u_is_answered_with_port_unreachable",
        "curl"
    );
    let mut net = net_without_local_udp("ssnoudp")?;
    net.udp = Some(UdpServices::start(net.topo.target())?);
    net.tunnel(&[])?;
    let mut endpoints = std::collections::HashSet::new();
    for ip in [IpAddr::from(TARGET_V4), IpAddr::from(TARGET_V6)] {
        let dst = target(ip, UDP_ECHO_PORT);
        for attempt in 0..3 {
            let (took, local) =
                udp_expect_unreachable_from(net.app(), dst, std::time::Duration::from_secs(2))
                    .with_context(|| format!("{dst}, attempt {attempt}\n{}", net.logs()))?;
            endpoints.insert(local);
            ensure!(
                took < std::time::Duration::from_millis(500),
                "{dst}: port unreachable after {took:?}"
            );
        }
    }
    let expected = sha256_hex(&blob(BLOB, SEED));
    let got = curl_sha(net.app(), &TARGET_V4.to_string(), None)?;
    ensure!(
        got == expected,
        "TCP alongside: sha256 {got}, not {expected}"
    );
    let log = net.stop_tunnel()?;
    // Each probe socket had its one datagram answered, and each distinct endpoint
    // its association granted (a socket given a closed one's port shares its
    // association).
    ensure!(
        stat(&log, "udp_associations") == endpoints.len() as u64,
        "{endpoints:?}\n{log}"
    );
    ensure!(stat(&log, "udp_relay_unreachable") == 6, "{log}");
    ensure!(
        log.contains("port unreachable from the proxy's UDP relay"),
        "{log}"
    );
    Ok(())
}
