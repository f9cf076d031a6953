//! The UDP and DNS test kit is what it claims, on the kernel path (the proxy namespace
//! forwarding) or through programs we did not write: UDP echo without loss, many
//! source ports, a full-cone reply from a second port, dnsmasq answering A, AAAA and
//! TXT over UDP and TCP, a name only the proxy resolves, and Dante relaying UDP for
//! an independent client (PySocks). Needs root, dnsmasq, dig, danted and PySocks
//! (skips outside CI without them, fails in CI).
//!
//! All traffic stays among the namespaces' own addresses.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tun2socks::config::ProxyUrl;
use tun2socks::require_or_skip;
use tun2socks::socks::Address;
use tun2socks::testbed::attach::{
    create_tun, has_carrier, refusal_reason, start_tunnel_attached, vm_rss_kib,
};
use tun2socks::testbed::dante::Dante;
use tun2socks::testbed::dns_client::{TYPE_A, TYPE_AAAA, TYPE_TXT, dns_query, dns_query_rate};
use tun2socks::testbed::dnsmasq::{
    BIG_TXT_NAME, DNS_PORT, DigTransport, Dnsmasq, PROXY_ONLY_NAME, TARGET_NAME, TXT_NAME,
    TXT_VALUE, big_txt_strings, default_records, dig, dig_raw, resolve_in, set_proxy_only_name,
};
use tun2socks::testbed::namespace::join;
use tun2socks::testbed::services::{ECHO_PORT, HTTP_PORT, Services};
use tun2socks::testbed::tunnel::{proxy_addr, start_server};
use tun2socks::testbed::udp::{
    CONE_PORT, CONE_REPLY_PORT, UDP_ECHO_PORT, UDP_SINK_PORT, UdpServices, cone_reply, cone_request,
};
use tun2socks::testbed::udp_client::{
    connected_socket, echo_payload, max_udp_payload, udp_echo_check, udp_echo_windowed,
    udp_latency, udp_rate,
};
use tun2socks::testbed::udp_probes::{
    udp_cone, udp_cone_check, udp_expect_unreachable, udp_many_ports, udp_send_broadcast,
};
use tun2socks::testbed::{PROXY_V4, TARGET_V4, TARGET_V6, Topology, require_program, require_root};
use tun2socks::upstream::{DialOptions, Upstream};

/// Every test starts here: root or skip/fail per the CI rule.
macro_rules! needs {
    ($test:literal $(, $program:literal)*) => {
        require_or_skip!(require_root($test), Ok(()));
        $(require_or_skip!(require_program($program, $test), Ok(()));)*
    };
}

/// The topology with the kernel path on and the UDP services in the target.
fn kernel_path(tag: &str) -> Result<(Topology, UdpServices)> {
    let topo = Topology::create(tag)?;
    topo.enable_kernel_path()?;
    let services = UdpServices::start(topo.target())?;
    Ok((topo, services))
}

fn targets() -> [(IpAddr, bool); 2] {
    [(TARGET_V4.into(), false), (TARGET_V6.into(), true)]
}

#[test]
fn echo_1000_datagrams_up_to_the_mtu_none_lost() -> Result<()> {
    needs!("echo_1000_datagrams_up_to_the_mtu_none_lost");
    let (topo, _services) = kernel_path("udpecho")?;
    for (ip, v6) in targets() {
        let target = SocketAddr::new(ip, UDP_ECHO_PORT);
        let max = max_udp_payload(1500, v6);
        let one_by_one = udp_echo_check(topo.app(), target, 1000, 8..=max)?;
        ensure!(one_by_one.all_ok(), "{target} one at a time: {one_by_one}");
        let windowed = udp_echo_windowed(topo.app(), target, 1000, 8..=max, 32)?;
        ensure!(windowed.all_ok(), "{target} 32 in flight: {windowed}");
        let latency = udp_latency(topo.app(), target, 200, 64)?;
        ensure!(latency.all_ok(), "{target} latency probe: {latency}");
        eprintln!("{target}: {one_by_one}; windowed: {windowed}");
    }
    Ok(())
}

#[test]
fn echo_check_counts_what_is_lost() -> Result<()> {
    needs!("echo_check_counts_what_is_lost");
    // No services: every datagram is lost (ICMP port unreachable, so the client
    // sees errors or nothing); the check must say so, not pass.
    let topo = Topology::create("udplost")?;
    topo.enable_kernel_path()?;
    let target = SocketAddr::new(TARGET_V4.into(), UDP_ECHO_PORT);
    let report = udp_echo_check(topo.app(), target, 3, 8..=100);
    match report {
        Ok(report) => ensure!(!report.all_ok() && report.received == 0, "{report}"),
        Err(e) => ensure!(
            e.to_string().contains("refused"),
            "expected connection refused, got {e}"
        ),
    }
    Ok(())
}

#[test]
fn two_hundred_source_ports_each_get_their_echo() -> Result<()> {
    needs!("two_hundred_source_ports_each_get_their_echo");
    let (topo, _services) = kernel_path("udpports")?;
    for (ip, _) in targets() {
        let target = SocketAddr::new(ip, UDP_ECHO_PORT);
        let report = udp_many_ports(topo.app(), target, 200, Duration::from_secs(5))?;
        ensure!(
            report.sockets == 200 && report.answered == 200 && report.wrong == 0,
            "{target}: {report:?}"
        );
    }
    Ok(())
}

#[test]
fn cone_reply_comes_from_the_second_port() -> Result<()> {
    needs!("cone_reply_comes_from_the_second_port");
    let (topo, _services) = kernel_path("udpcone")?;
    for (ip, _) in targets() {
        let reply = udp_cone_check(topo.app(), ip)?;
        ensure!(
            reply.from == SocketAddr::new(ip, CONE_REPLY_PORT),
            "{reply:?}"
        );
        // Any port the client names: the reply comes from there.
        let other = udp_cone(topo.app(), ip, 40_123, Duration::from_secs(2))?;
        ensure!(
            other.from == SocketAddr::new(ip, 40_123) && other.payload_ok,
            "{other:?}"
        );
        ensure!(other.from.port() != CONE_PORT);
    }
    Ok(())
}

#[test]
fn rate_sender_counts_replies() -> Result<()> {
    needs!("rate_sender_counts_replies");
    let (topo, _services) = kernel_path("udprate")?;
    let target = SocketAddr::new(TARGET_V4.into(), UDP_ECHO_PORT);
    let report = udp_rate(topo.app(), target, 2_000, Duration::from_millis(500), 100)?;
    // 2,000/s for 0.5 s is about 1,000 datagrams; a quiet kernel path returns nearly all.
    ensure!(
        (800..=1_200).contains(&report.sent) && report.loss_percent() < 10.0,
        "{report:?}"
    );
    Ok(())
}

#[test]
fn port_unreachable_is_seen_and_timed() -> Result<()> {
    needs!("port_unreachable_is_seen_and_timed");
    let (topo, _services) = kernel_path("udpunreach")?;
    for (ip, _) in targets() {
        // No warm-up: the first packet across fresh links (IPv6 too) is not delayed.
        // Port 9: nothing listens there.
        let took =
            udp_expect_unreachable(topo.app(), SocketAddr::new(ip, 9), Duration::from_secs(2))?;
        ensure!(took < Duration::from_millis(500), "{ip}: {took:?}");
        // The echo answers instead: that is an error, not a pass.
        let echo = SocketAddr::new(ip, UDP_ECHO_PORT);
        let answered = udp_expect_unreachable(topo.app(), echo, Duration::from_secs(2));
        ensure!(answered.is_err(), "{echo}: {answered:?}");
    }
    Ok(())
}

#[test]
fn sink_counts_unicast_and_sees_no_broadcast_from_the_app() -> Result<()> {
    needs!("sink_counts_unicast_and_sees_no_broadcast_from_the_app");
    let (topo, services) = kernel_path("udpsink")?;
    // The app has no default route: give the limited broadcast a way out (as the
    // tunnel's default route would), onto the app's link.
    topo.app()
        .ip(["route", "add", "default", "via", &PROXY_V4.to_string()])?;
    udp_send_broadcast(topo.app(), UDP_SINK_PORT, 5)?;
    for (ip, _) in targets() {
        let sink = connected_socket(topo.app(), SocketAddr::new(ip, UDP_SINK_PORT))?;
        sink.send(b"counted")?;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while services.sink_received() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));
    // Two unicasts arrive; the broadcasts stay on the app's link (no router forwards them).
    ensure!(
        services.sink_received() == 2,
        "sink saw {}",
        services.sink_received()
    );
    Ok(())
}

#[test]
fn dnsmasq_answers_a_aaaa_txt_over_udp_and_tcp() -> Result<()> {
    needs!(
        "dnsmasq_answers_a_aaaa_txt_over_udp_and_tcp",
        "dnsmasq",
        "dig"
    );
    let topo = Topology::create("dnsmasq")?;
    topo.enable_kernel_path()?;
    let dnsmasq = Dnsmasq::start(topo.target(), &default_records())?;
    let app = topo.app();
    for server in [IpAddr::from(TARGET_V4), IpAddr::from(TARGET_V6)] {
        for transport in [DigTransport::Udp, DigTransport::Tcp] {
            let a = dig(app, server, TARGET_NAME, "A", transport)?;
            ensure!(
                a == [TARGET_V4.to_string()],
                "{server} {transport:?} A: {a:?}"
            );
            let aaaa = dig(app, server, TARGET_NAME, "AAAA", transport)?;
            ensure!(
                aaaa == [TARGET_V6.to_string()],
                "{server} {transport:?}: {aaaa:?}"
            );
            let txt = dig(app, server, TXT_NAME, "TXT", transport)?;
            ensure!(
                txt == [format!("\"{TXT_VALUE}\"")],
                "{transport:?} TXT: {txt:?}"
            );
            let none = dig(app, server, "nothing.t2s.test", "A", transport)?;
            ensure!(none.is_empty(), "{transport:?} unknown name: {none:?}");
        }
    }
    ensure!(
        dnsmasq.queries_for(TARGET_NAME)? == 8,
        "{}",
        dnsmasq.process().log()?
    );

    // The big TXT record: whole over TCP, truncated over UDP without EDNS.
    let big = dig(
        app,
        TARGET_V4.into(),
        BIG_TXT_NAME,
        "TXT",
        DigTransport::Tcp,
    )?;
    let expected: Vec<String> = big_txt_strings()
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect();
    ensure!(big == [expected.join(" ")], "big TXT over TCP: {big:?}");
    let udp = dig_raw(
        app,
        TARGET_V4.into(),
        BIG_TXT_NAME,
        "TXT",
        &["+noedns", "+ignore"],
    )?;
    let flags = udp
        .lines()
        .find(|l| l.contains("flags:"))
        .context("no flags line")?;
    ensure!(
        flags.contains(" tc"),
        "big TXT over UDP not truncated:\n{udp}"
    );

    // The hand-built client agrees with dig.
    let server = SocketAddr::new(TARGET_V4.into(), DNS_PORT);
    let timeout = Duration::from_secs(2);
    let a = dns_query(app, server, TARGET_NAME, TYPE_A, timeout)?;
    ensure!(
        a.rcode == 0 && a.addresses() == [IpAddr::from(TARGET_V4)],
        "{a:?}"
    );
    let server6 = SocketAddr::new(TARGET_V6.into(), DNS_PORT);
    let aaaa = dns_query(app, server6, TARGET_NAME, TYPE_AAAA, timeout)?;
    ensure!(aaaa.addresses() == [IpAddr::from(TARGET_V6)], "{aaaa:?}");
    let txt = dns_query(app, server, TXT_NAME, TYPE_TXT, timeout)?;
    ensure!(
        txt.answers.len() == 1 && txt.addresses().is_empty(),
        "{txt:?}"
    );
    let nx = dns_query(app, server, "nothing.t2s.test", TYPE_A, timeout)?;
    ensure!(nx.rcode == 3 && nx.answers.is_empty(), "{nx:?}");
    let rate = dns_query_rate(
        app,
        server,
        &[TARGET_NAME],
        TYPE_A,
        8,
        Duration::from_millis(300),
    )?;
    ensure!(
        rate.answered > 50 && rate.failed == 0 && rate.lost == 0,
        "{rate:?}"
    );
    Ok(())
}

#[test]
fn only_the_proxy_namespace_resolves_the_proxy_only_name() -> Result<()> {
    needs!(
        "only_the_proxy_namespace_resolves_the_proxy_only_name",
        "getent",
        "curl"
    );
    let topo = Topology::create("names")?;
    set_proxy_only_name(&topo, &[])?;
    let in_proxy = resolve_in(topo.proxy(), PROXY_ONLY_NAME)?;
    let mut both = vec![IpAddr::from(TARGET_V4), IpAddr::from(TARGET_V6)];
    both.sort();
    ensure!(in_proxy == both, "proxy resolves {in_proxy:?}");
    for ns in [topo.app(), topo.target()] {
        let found = resolve_in(ns, PROXY_ONLY_NAME)?;
        ensure!(found.is_empty(), "{} resolves {found:?}", ns.name());
    }

    // Our server, started in the proxy namespace, connects by that name (what a
    // fake-IP flow asks of it): curl in the app hands the name to the proxy.
    let _http = Services::start(topo.target(), 1000, 1)?;
    let binary = Path::new(env!("CARGO_BIN_EXE_tun2socks"));
    let _server = start_server(topo.proxy(), binary, &["--log-level", "warn"])?;
    let url = format!("http://{PROXY_ONLY_NAME}:{HTTP_PORT}/");
    let proxy = proxy_addr().to_string();
    let code = |flag: &str| -> Result<String> {
        let mut command = topo.app().command("curl");
        command.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "5"]);
        command.args([flag, &proxy, &url]);
        let out = command.output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let by_name = code("--socks5-hostname")?;
    ensure!(
        by_name == "200",
        "curl through the proxy by name: {by_name:?}"
    );
    // Resolving in the app (--socks5) must fail: the app does not know the name.
    let resolved_locally = code("--socks5")?;
    ensure!(
        resolved_locally != "200",
        "the app resolved {PROXY_ONLY_NAME}"
    );
    Ok(())
}

const PYSOCKS_UDP: &str = r#"
import socket, socks, sys
proxy_host, proxy_port = sys.argv[1], int(sys.argv[2])
target, echo_port, cone_port, reply_port = sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
s = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
s.set_proxy(socks.SOCKS5, proxy_host, proxy_port)
s.settimeout(5)
for i in range(50):
    msg = bytes((i * 7 + j) % 256 for j in range(8 + i * 29))
    s.sendto(msg, (target, echo_port))
    data, src = s.recvfrom(65535)
    if data != msg or src != (target, echo_port):
        sys.exit("echo %d: %d bytes from %r" % (i, len(data), src))
s.sendto(b"CONE %d" % reply_port, (target, cone_port))
data, src = s.recvfrom(65535)
if data != b"CONE-REPLY %d" % reply_port or src != (target, reply_port):
    sys.exit("cone: %r from %r" % (data, src))
print("ok")
"#;

#[test]
fn dante_relays_udp_for_pysocks_full_cone() -> Result<()> {
    needs!(
        "dante_relays_udp_for_pysocks_full_cone",
        "danted",
        "/usr/bin/python3"
    );
    let pysocks = std::process::Command::new("/usr/bin/python3")
        .args(["-c", "import socks"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !pysocks {
        ensure!(
            tun2socks::testbed::skip_allowed(),
            "PySocks (python3-socks) is missing; CI is set"
        );
        eprintln!("SKIPPED: PySocks (python3-socks) is missing");
        return Ok(());
    }
    // No kernel path: the proxy reaches both sides directly, the app only the proxy.
    let topo = Topology::create("danteudp")?;
    let _services = UdpServices::start(topo.target())?;
    let dante = Dante::start(topo.proxy())?;
    let out = topo
        .app()
        .command("/usr/bin/python3")
        .args(["-c", PYSOCKS_UDP])
        .arg(Dante::addr().ip().to_string())
        .arg(Dante::addr().port().to_string())
        .arg(TARGET_V4.to_string())
        .arg(UDP_ECHO_PORT.to_string())
        .arg(CONE_PORT.to_string())
        .arg(CONE_REPLY_PORT.to_string())
        .output()?;
    ensure!(
        out.status.success() && out.stdout.starts_with(b"ok"),
        "PySocks UDP through danted failed: {}{}\ndanted log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        dante.process().log()?
    );
    Ok(())
}

/// Through the association of `url` (from the app namespace): 20 echoes to each target
/// family, then a cone request whose reply must come back from the second port.
async fn relay_check(url: String) -> std::io::Result<()> {
    use std::io::Error;
    let proxy = url.parse::<ProxyUrl>().map_err(Error::other)?;
    let upstream = Upstream::new(proxy, DialOptions::default());
    let assoc = upstream.udp_associate().await.map_err(Error::other)?;
    let mut buf = vec![0u8; 65_536];
    let wait = Duration::from_secs(5);
    for ip in [IpAddr::from(TARGET_V4), IpAddr::from(TARGET_V6)] {
        let echo = SocketAddr::new(ip, UDP_ECHO_PORT);
        for i in 0..20u64 {
            let payload = echo_payload(i, 100 + 60 * i as usize);
            assoc.send_to(&payload, &Address::from(echo)).await?;
            let (from, range) = tokio::time::timeout(wait, assoc.recv_from(&mut buf))
                .await
                .map_err(|_| Error::other(format!("{url}: no echo from {echo} for {i}")))??;
            if from != Address::from(echo) || buf.get(range) != Some(payload.as_slice()) {
                return Err(Error::other(format!(
                    "{url}: echo {i} from {from:?} differs"
                )));
            }
        }
        let cone = SocketAddr::new(ip, CONE_PORT);
        assoc
            .send_to(&cone_request(CONE_REPLY_PORT), &Address::from(cone))
            .await?;
        let (from, range) = tokio::time::timeout(wait, assoc.recv_from(&mut buf))
            .await
            .map_err(|_| Error::other(format!("{url}: no cone reply for {ip}")))??;
        let expected = Address::from(SocketAddr::new(ip, CONE_REPLY_PORT));
        if from != expected || buf.get(range) != Some(cone_reply(CONE_REPLY_PORT).as_slice()) {
            return Err(Error::other(format!(
                "{url}: cone reply from {from:?}, expected {expected:?}"
            )));
        }
    }
    Ok(())
}

#[test]
fn our_socks_client_relays_udp_and_cone_through_dante_and_our_server() -> Result<()> {
    needs!(
        "our_socks_client_relays_udp_and_cone_through_dante_and_our_server",
        "danted"
    );
    let topo = Topology::create("relayudp")?;
    let _services = UdpServices::start(topo.target())?;
    let dante = Dante::start(topo.proxy())?;
    let binary = Path::new(env!("CARGO_BIN_EXE_tun2socks"));
    let _server = start_server(topo.proxy(), binary, &["--log-level", "warn"])?;
    for url in [Dante::url(), format!("socks5://{}", proxy_addr())] {
        let check = url.clone();
        join(topo.app().enter_async(move || relay_check(check))).with_context(|| {
            format!(
                "UDP through {url}; danted log:\n{}",
                dante.process().log().unwrap_or_default()
            )
        })?;
    }
    Ok(())
}

#[test]
fn tunnel_attaches_to_a_hand_made_device_or_reports_why_not() -> Result<()> {
    use std::io::{Read, Write};
    needs!("tunnel_attaches_to_a_hand_made_device_or_reports_why_not");
    let topo = Topology::create("attach")?;
    let _tcp = Services::start(topo.target(), 1000, 1)?;
    let binary = Path::new(env!("CARGO_BIN_EXE_tun2socks"));
    let _server = start_server(topo.proxy(), binary, &["--log-level", "warn"])?;
    create_tun(topo.app(), "tunb", 1500)?;
    ensure!(
        !has_carrier(topo.app(), "tunb"),
        "carrier before any tunnel"
    );
    let url = format!("socks5://{}", proxy_addr());

    // Options the tunnel does not know: the start fails with its own words.
    let refused = start_tunnel_attached(topo.app(), binary, &url, "tunb", &["--no-such-option"])
        .err()
        .context("a tunnel with an unknown option started")?;
    let reason = refusal_reason(&refused.to_string());
    ensure!(reason.contains("--no-such-option"), "reason: {reason:?}");

    let tunnel = start_tunnel_attached(topo.app(), binary, &url, "tunb", &["--log-level", "warn"])?;
    ensure!(has_carrier(topo.app(), "tunb"));
    ensure!(vm_rss_kib(tunnel.id())? > 0);
    // TCP through the hand-made device and our server: the app has no other way out.
    let echo = SocketAddr::new(TARGET_V4.into(), ECHO_PORT);
    let mut stream = topo
        .app()
        .within(move || std::net::TcpStream::connect_timeout(&echo, Duration::from_secs(5)))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"through tunb")?;
    let mut back = [0u8; 12];
    stream.read_exact(&mut back)?;
    ensure!(&back == b"through tunb", "{back:?}");
    let mtu = topo.app().ip(["-o", "link", "show", "dev", "tunb"])?;
    ensure!(
        String::from_utf8_lossy(&mtu.stdout).contains("mtu 1500"),
        "{mtu:?}"
    );
    Ok(())
}
