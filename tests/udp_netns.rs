//! UDP through the tunnel, end to end (issue 6): the tunnel in `app` on a TUN made by
//! hand at MTU 1500 (attach mode) or one it creates, a SOCKS server in `proxy` (ours
//! or Dante), UDP echo and "cone" services in `target`. `app` has no other route to
//! `target`, so every datagram that comes back went through the tunnel and a SOCKS5
//! UDP association.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use tun2socks::metrics::Snapshot;
use tun2socks::require_or_skip;
use tun2socks::testbed::attach::{create_tun, open_fds, settled_fds, start_tunnel_attached};
use tun2socks::testbed::dante::Dante;
use tun2socks::testbed::tunnel::{proxy_addr, start_server, start_tunnel, stop_cleanly};
use tun2socks::testbed::udp::{UDP_ECHO_PORT, UdpServices};
use tun2socks::testbed::udp_client::{
    UdpFanout, max_udp_payload, udp_cone_check, udp_echo_check, udp_echo_windowed,
};
use tun2socks::testbed::{
    APP_V4, APP_V6, Namespace, Process, TARGET_V4, TARGET_V6, Topology, require_root,
};

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tun2socks"))
}

macro_rules! needs_root {
    ($test:literal) => {
        require_or_skip!(require_root($test), Ok(()));
    };
}

/// Services first, namespaces last (fields drop in order).
struct Net {
    tunnel: Option<Process>,
    server: Option<Process>,
    _dante: Option<Dante>,
    _udp: UdpServices,
    topo: Topology,
}

impl Net {
    fn new(tag: &str) -> Result<Net> {
        let topo = Topology::create(tag)?;
        let udp = UdpServices::start(topo.target())?;
        Ok(Net {
            tunnel: None,
            server: None,
            _dante: None,
            _udp: udp,
            topo,
        })
    }

    fn app(&self) -> &Namespace {
        self.topo.app()
    }

    fn server(&mut self, extra: &[&str]) -> Result<()> {
        self.server = Some(start_server(self.topo.proxy(), &binary(), extra)?);
        Ok(())
    }

    /// The tunnel on a TUN made by hand at MTU 1500.
    fn tunnel_attached(&mut self, url: &str, extra: &[&str]) -> Result<()> {
        create_tun(self.app(), "tun0", 1500)?;
        self.tunnel = Some(start_tunnel_attached(
            self.app(),
            &binary(),
            url,
            "tun0",
            extra,
        )?);
        Ok(())
    }

    /// The tunnel on a device it creates (default MTU and addresses).
    fn tunnel_created(&mut self, url: &str, extra: &[&str]) -> Result<()> {
        self.tunnel = Some(start_tunnel(self.app(), &binary(), url, extra)?);
        Ok(())
    }

    fn tunnel_pid(&self) -> u32 {
        self.tunnel.as_ref().unwrap().id()
    }

    /// Stops the tunnel with SIGTERM and returns its log (with the stats line).
    fn stop_tunnel(&mut self) -> Result<String> {
        Ok(stop_cleanly(self.tunnel.take().context("no tunnel")?)?)
    }
}

fn stat(log: &str, name: &str) -> u64 {
    Snapshot::final_stat(log, name)
}

fn echo_targets() -> [(SocketAddr, bool); 2] {
    [
        (SocketAddr::new(TARGET_V4.into(), UDP_ECHO_PORT), false),
        (SocketAddr::new(TARGET_V6.into(), UDP_ECHO_PORT), true),
    ]
}

#[test]
fn echo_1000_datagrams_v4_v6_on_a_hand_made_tun_at_mtu_1500() -> Result<()> {
    needs_root!("echo_1000_datagrams_v4_v6_on_a_hand_made_tun_at_mtu_1500");
    let mut net = Net::new("udpecho")?;
    net.server(&[])?;
    net.tunnel_attached(&format!("socks5://{}", proxy_addr()), &[])?;
    for (target, v6) in echo_targets() {
        let max = max_udp_payload(1500, v6);
        let report = udp_echo_check(net.app(), target, 1000, 8..=max)?;
        ensure!(report.all_ok(), "{target}, one at a time: {report}");
        let windowed = udp_echo_windowed(net.app(), target, 1000, 8..=max, 16)?;
        ensure!(windowed.all_ok(), "{target}, 16 in flight: {windowed}");
        eprintln!("{target}: {report}; {windowed}");
    }
    let log = net.stop_tunnel()?;
    ensure!(stat(&log, "udp_up") >= 4000, "{log}");
    ensure!(stat(&log, "udp_down") >= 4000, "{log}");
    Ok(())
}

/// The largest payload an application can send through a SOCKS5 relay reached over
/// IPv4: the relay's datagram (SOCKS header and payload) must fit one IPv4 datagram.
fn largest_relayed(v6: bool) -> usize {
    let socks_header = if v6 { 4 + 16 + 2 } else { 4 + 4 + 2 };
    65_507 - socks_header
}

#[test]
fn datagrams_over_the_mtu_are_reassembled_and_fragmented() -> Result<()> {
    needs_root!("datagrams_over_the_mtu_are_reassembled_and_fragmented");
    let mut net = Net::new("udpfrag")?;
    net.server(&[])?;
    net.tunnel_attached(&format!("socks5://{}", proxy_addr()), &[])?;
    for (target, v6) in echo_targets() {
        // The application's kernel fragments each datagram on the way in; the tunnel
        // reassembles it, and fragments the echo on the way back.
        let sizes = max_udp_payload(1500, v6) + 1..=largest_relayed(v6);
        let report = udp_echo_check(net.app(), target, 200, sizes.clone())?;
        ensure!(report.all_ok(), "{target}, {sizes:?}: {report}");
        eprintln!("{target}, {sizes:?}: {report}");
    }
    let log = net.stop_tunnel()?;
    ensure!(stat(&log, "reassembled") >= 400, "{log}");
    ensure!(stat(&log, "fragmented") >= 400, "{log}");
    ensure!(stat(&log, "fragment") == 0, "fragments discarded: {log}");
    Ok(())
}

#[test]
fn full_cone_and_200_source_ports() -> Result<()> {
    needs_root!("full_cone_and_200_source_ports");
    let mut net = Net::new("udpcone")?;
    net.server(&[])?;
    net.tunnel_created(&format!("socks5://{}", proxy_addr()), &[])?;
    // Source endpoints the app used; the tunnel keys one association on each. A
    // fan-out socket may get the port of a closed cone socket, and rightly shares its
    // association (endpoint-independent mapping), so distinct endpoints are counted.
    let mut endpoints = std::collections::HashSet::new();
    for target in [IpAddr::from(TARGET_V4), IpAddr::from(TARGET_V6)] {
        // The reply comes from a port the app never sent to, and reaches the same
        // socket with that port as its source.
        let reply =
            udp_cone_check(net.app(), target).with_context(|| format!("cone via {target}"))?;
        endpoints.insert((target.is_ipv4(), reply.local.port()));
    }
    let target = SocketAddr::new(TARGET_V4.into(), UDP_ECHO_PORT);
    let fanout = UdpFanout::open(net.app(), target.ip(), 200)?;
    endpoints.extend(fanout.ports()?.into_iter().map(|port| (true, port)));
    let report = fanout.echo_once(target, 64, Duration::from_secs(10))?;
    ensure!(
        report.answered == 200 && report.wrong == 0,
        "200 ports: {report:?}"
    );
    drop(fanout);
    let log = net.stop_tunnel()?;
    // One association per source endpoint: 2 cone sockets + 200, less any port reused.
    ensure!(
        stat(&log, "udp_associations") == endpoints.len() as u64,
        "{} endpoints: {log}",
        endpoints.len()
    );
    Ok(())
}

#[test]
fn echo_through_dante() -> Result<()> {
    needs_root!("echo_through_dante");
    require_or_skip!(
        tun2socks::testbed::require_program("danted", "echo_through_dante"),
        Ok(())
    );
    let mut net = Net::new("udpdante")?;
    net._dante = Some(Dante::start(net.topo.proxy())?);
    net.tunnel_attached(&Dante::url(), &[])?;
    for (target, v6) in echo_targets() {
        let max = max_udp_payload(1500, v6);
        let report = udp_echo_check(net.app(), target, 1000, 8..=max)?;
        ensure!(report.all_ok(), "{target} through Dante: {report}");
        // Larger than the MTU: fragments both ways between the application and us.
        let report = udp_echo_check(net.app(), target, 50, max + 1..=16_000)?;
        ensure!(
            report.all_ok(),
            "{target} through Dante, over the MTU: {report}"
        );
    }
    udp_cone_check(net.app(), TARGET_V4.into()).context("cone through Dante")?;
    net.stop_tunnel()?;
    Ok(())
}

/// Dante with its default `udp.connectdst: yes` passes a destination's port
/// unreachable back from its relay port: the application hears it from that
/// destination, as on the kernel's own path, and its association goes on.
#[test]
fn a_port_unreachable_through_dante_reaches_the_application() -> Result<()> {
    needs_root!("a_port_unreachable_through_dante_reaches_the_application");
    require_or_skip!(
        tun2socks::testbed::require_program(
            "danted",
            "a_port_unreachable_through_dante_reaches_the_application"
        ),
        Ok(())
    );
    let mut net = Net::new("udpdanteicmp")?;
    net._dante = Some(Dante::start_connecting(net.topo.proxy())?);
    net.tunnel_attached(&Dante::url(), &[])?;
    for (target, _) in echo_targets() {
        let closed = SocketAddr::new(target.ip(), CLOSED_PORT);
        let took = time_to_refusal(net.app(), closed)?
            .with_context(|| format!("no port unreachable for {closed} through Dante"))?;
        ensure!(
            took < Duration::from_millis(500),
            "{closed}: after {took:?}"
        );
        // One unconnected socket: a datagram to the closed port, then the echo.
        let any: IpAddr = if target.is_ipv4() {
            Ipv4Addr::UNSPECIFIED.into()
        } else {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        };
        let socket = net
            .app()
            .within(move || UdpSocket::bind(SocketAddr::new(any, 0)))?;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut buf = [0u8; 64];
        for round in 0..3u8 {
            socket.send_to(&[b'x', round], closed)?;
            std::thread::sleep(Duration::from_millis(50));
            socket.send_to(&[b'e', round], target)?;
            let (n, from) = socket
                .recv_from(&mut buf)
                .with_context(|| format!("{target}: no echo after the port unreachable"))?;
            ensure!(
                (from, buf.get(..n)) == (target, Some(&[b'e', round][..])),
                "{target}: {from} sent {:?}",
                buf.get(..n)
            );
        }
    }
    let log = net.stop_tunnel()?;
    // The two probes' at least. (Dante passes on the first only of the unconnected
    // socket's three: once that association has sent elsewhere, its socket to the
    // closed port no longer hears the errors.)
    ensure!(stat(&log, "udp_relay_unreachable") >= 2, "{log}");
    Ok(())
}

/// A firewall in front of the proxy that rejects the relay's port with "administratively
/// prohibited" (firewalld answers `icmp-host-prohibited` the same way): each datagram
/// reaches the application as the same error the kernel's own path would give it
/// (`EHOSTUNREACH` over IPv4, `EACCES` over IPv6), at once, and not as silence; the
/// association stays (no handshake per datagram) and carries again once the firewall
/// is lifted.
#[test]
fn a_firewall_rejecting_the_relay_reaches_the_application_as_prohibited() -> Result<()> {
    needs_root!("a_firewall_rejecting_the_relay_reaches_the_application_as_prohibited");
    require_or_skip!(
        tun2socks::testbed::require_program(
            "nft",
            "a_firewall_rejecting_the_relay_reaches_the_application_as_prohibited"
        ),
        Ok(())
    );
    let mut net = Net::new("udpfw")?;
    net.server(&[])?;
    net.tunnel_attached(&format!("socks5://{}", proxy_addr()), &[])?;
    let mut sockets = Vec::new();
    for (target, _) in echo_targets() {
        let socket = net.app().within(move || {
            let any: SocketAddr = if target.is_ipv4() {
                (Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                "[::]:0".parse().unwrap()
            };
            let s = UdpSocket::bind(any)?;
            s.connect(target)?;
            Ok(s)
        })?;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        sockets.push((target, socket));
    }
    let echo = |socket: &UdpSocket, what: &[u8]| -> Result<()> {
        socket.send(what)?;
        let mut buf = [0u8; 64];
        let n = socket.recv(&mut buf).context("no echo")?;
        ensure!(buf.get(..n) == Some(what), "echoed {:?}", buf.get(..n));
        Ok(())
    };
    for (target, socket) in &sockets {
        echo(socket, b"before").with_context(|| format!("{target}, before the firewall"))?;
    }
    // Datagrams from the app's address to the proxy's namespace (the relay; the
    // control connection is TCP), rejected.
    let firewall = format!(
        "add table inet relayfw; \
         add chain inet relayfw input {{ type filter hook input priority 0; }}; \
         add rule inet relayfw input ip saddr {APP_V4} meta l4proto udp \
         reject with icmp type admin-prohibited; \
         add rule inet relayfw input ip6 saddr {APP_V6} meta l4proto udp \
         reject with icmpv6 type admin-prohibited"
    );
    net.topo.proxy().run("nft", [firewall.as_str()])?;
    for (target, socket) in &sockets {
        let expected = if target.is_ipv4() {
            std::io::ErrorKind::HostUnreachable
        } else {
            std::io::ErrorKind::PermissionDenied
        };
        for round in 0..3u8 {
            let start = Instant::now();
            socket.send(&[b'x', round])?;
            let mut buf = [0u8; 64];
            match socket.recv(&mut buf) {
                Err(e) if e.kind() == expected => {}
                other => {
                    anyhow::bail!("{target}, round {round}: expected {expected:?}, got {other:?}")
                }
            }
            let took = start.elapsed();
            ensure!(
                took < Duration::from_millis(500),
                "{target}, round {round}: the error came after {took:?}"
            );
        }
    }
    net.topo
        .proxy()
        .run("nft", ["delete", "table", "inet", "relayfw"])?;
    for (target, socket) in &sockets {
        echo(socket, b"after").with_context(|| format!("{target}, after the firewall"))?;
    }
    let log = net.stop_tunnel()?;
    ensure!(stat(&log, "udp_relay_unreachable") == 6, "{log}");
    // One association per socket all along: the error did not end it.
    ensure!(stat(&log, "udp_associations") == 2, "{log}");
    ensure!(log.contains("relay is unreachable or prohibited"), "{log}");
    Ok(())
}

/// A UDP port nothing listens on in the target namespace.
const CLOSED_PORT: u16 = 7099;

/// Sends one datagram from a connected socket in `ns` and returns how long it took
/// until the socket reported the port unreachable (ECONNREFUSED), if it did in 2 s.
fn time_to_refusal(ns: &Namespace, target: SocketAddr) -> Result<Option<Duration>> {
    let socket = ns.within(move || {
        let bind: SocketAddr = if target.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            "[::]:0".parse().unwrap()
        };
        let s = UdpSocket::bind(bind)?;
        s.connect(target)?;
        Ok(s)
    })?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    let start = Instant::now();
    socket.send(b"anyone?")?;
    let mut buf = [0u8; 64];
    match socket.recv(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(Some(start.elapsed())),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Ok(None),
        other => anyhow::bail!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn udp_through_socks4_gets_port_unreachable_at_once() -> Result<()> {
    needs_root!("udp_through_socks4_gets_port_unreachable_at_once");
    let mut net = Net::new("udpsocks4")?;
    net.server(&[])?;
    net.tunnel_created(&format!("socks4://{}", proxy_addr()), &[])?;
    for (target, _) in echo_targets() {
        for _ in 0..3 {
            let took = time_to_refusal(net.app(), target)?
                .with_context(|| format!("no port unreachable for {target}"))?;
            ensure!(
                took < Duration::from_millis(100),
                "{target}: refused after {took:?}"
            );
        }
    }
    let log = net.stop_tunnel()?;
    ensure!(stat(&log, "udp_refused") == 6, "{log}");
    ensure!(stat(&log, "udp_associations") == 0, "{log}");
    // Logged once per burst, not once per datagram.
    ensure!(log.matches("SOCKS4 has no UDP").count() == 1, "{log}");
    Ok(())
}

#[test]
fn a_server_without_udp_is_refused_once_then_remembered() -> Result<()> {
    needs_root!("a_server_without_udp_is_refused_once_then_remembered");
    let mut net = Net::new("udpnoudp")?;
    net.server(&["--no-udp"])?;
    net.tunnel_created(&format!("socks5://{}", proxy_addr()), &[])?;
    let target = SocketAddr::new(TARGET_V4.into(), UDP_ECHO_PORT);
    for _ in 0..5 {
        let took = time_to_refusal(net.app(), target)?.context("no port unreachable")?;
        ensure!(took < Duration::from_secs(1), "refused after {took:?}");
    }
    let server_log = net.server.as_ref().unwrap().log()?;
    let log = net.stop_tunnel()?;
    ensure!(stat(&log, "udp_refused") == 5, "{log}");
    ensure!(stat(&log, "udp_associations") == 0, "{log}");
    // Remembered: the proxy was asked once (its refusal ends the handshake), not
    // once per datagram.
    let asked = server_log.matches("handshake failed").count();
    ensure!(
        asked == 1,
        "the proxy was asked {asked} times:\n{server_log}"
    );
    Ok(())
}

#[test]
fn the_association_comes_back_after_the_proxy_restarts_and_idles_out() -> Result<()> {
    needs_root!("the_association_comes_back_after_the_proxy_restarts_and_idles_out");
    let mut net = Net::new("udpreassoc")?;
    net.server(&[])?;
    net.tunnel_created(
        &format!("socks5://{}", proxy_addr()),
        &["--udp-timeout", "2"],
    )?;
    let target = SocketAddr::new(TARGET_V4.into(), UDP_ECHO_PORT);
    let pid = net.tunnel_pid();
    // Past the tunnel's start-up (it opens a file for a moment 250 ms after start).
    let idle_fds = settled_fds(pid, Duration::from_millis(500))?;
    // One socket throughout: its association must survive the proxy's restart.
    let socket = net.app().within(move || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        s.connect(target)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(s)
    })?;
    let echo = |payload: &[u8]| -> Result<()> {
        // Datagrams may be lost while the association is re-made: retry a few times.
        let mut buf = [0u8; 64];
        for _ in 0..5 {
            socket.send(payload)?;
            if let Ok(n) = socket.recv(&mut buf) {
                ensure!(&buf[..n] == payload, "wrong echo");
                return Ok(());
            }
        }
        anyhow::bail!("no echo for {:?}", String::from_utf8_lossy(payload))
    };
    echo(b"before")?;
    let with_one = open_fds(pid)?;
    ensure!(
        with_one == idle_fds + 2,
        "an association holds two descriptors: {with_one} open, {idle_fds} idle"
    );
    net.server.take().unwrap().stop()?;
    std::thread::sleep(Duration::from_millis(200));
    net.server(&[])?;
    echo(b"after the restart")?;
    // Idle for longer than --udp-timeout: the association and its sockets are gone.
    let deadline = Instant::now() + Duration::from_secs(6);
    while open_fds(pid)? != idle_fds && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(
        open_fds(pid)? == idle_fds,
        "descriptors after the idle timeout: {} (idle: {idle_fds})",
        open_fds(pid)?
    );
    let log = net.stop_tunnel()?;
    ensure!(stat(&log, "udp_associations") == 2, "{log}");
    Ok(())
}

/// Raw IPv4 packets sent into the TUN from `ns` (the kernel routes them there).
fn send_raw(ns: &Namespace, packets: Vec<Vec<u8>>) -> Result<()> {
    ns.within(move || {
        use socket2::{Domain, Protocol, Socket, Type};
        let raw = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(255)))?;
        let to: SocketAddr = (TARGET_V4, 0).into();
        for p in &packets {
            raw.send_to(p, &to.into())?;
        }
        Ok(())
    })?;
    Ok(())
}

#[test]
fn broadcast_multicast_and_malformed_udp_never_reach_the_proxy() -> Result<()> {
    needs_root!("broadcast_multicast_and_malformed_udp_never_reach_the_proxy");
    let mut net = Net::new("udpdrop")?;
    net.server(&[])?;
    net.tunnel_created(&format!("socks5://{}", proxy_addr()), &[])?;
    net.app()
        .ip(["route", "add", "224.0.0.0/4", "dev", "tun0"])?;
    net.app().within(|| {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        s.set_broadcast(true)?;
        s.send_to(b"dhcp", (Ipv4Addr::BROADCAST, 67))?;
        s.send_to(b"mdns", (Ipv4Addr::new(224, 0, 0, 251), 5353))?;
        s.send_to(b"ssdp", (Ipv4Addr::new(239, 255, 255, 250), 1900))?;
        s.send_to(b"directed", (Ipv4Addr::new(198, 18, 255, 255), 137))?;
        Ok(())
    })?;
    let good = {
        let mut out = Vec::new();
        etherparse::PacketBuilder::ipv4([198, 18, 0, 1], TARGET_V4.octets(), 64)
            .udp(4242, UDP_ECHO_PORT)
            .write(&mut out, b"corrupt me")
            .unwrap();
        out
    };
    let mut bad_sum = good.clone();
    *bad_sum.last_mut().unwrap() ^= 0xff;
    let mut bad_len = good.clone();
    bad_len[24..26].copy_from_slice(&4000u16.to_be_bytes());
    let truncated = good[..24].to_vec();
    send_raw(net.app(), vec![bad_sum, bad_len, truncated])?;
    std::thread::sleep(Duration::from_millis(300));
    let log = net.stop_tunnel()?;
    ensure!(
        stat(&log, "udp_associations") == 0,
        "nothing reached the proxy:\n{log}"
    );
    ensure!(stat(&log, "broadcast") >= 1, "{log}");
    ensure!(stat(&log, "multicast") >= 2, "{log}");
    ensure!(stat(&log, "bad-checksum") == 1, "{log}");
    ensure!(stat(&log, "malformed") >= 2, "{log}");
    ensure!(stat(&log, "udp_dropped") >= 1, "directed broadcast:\n{log}");
    Ok(())
}

#[test]
fn the_tunnel_raises_its_open_files_limit() -> Result<()> {
    needs_root!("the_tunnel_raises_its_open_files_limit");
    let ns = Namespace::create(tun2socks::testbed::unique_name("nofile"))?;
    // Started the way most systems start processes: a soft limit of 1024.
    let mut cmd = ns.command("sh");
    cmd.arg("-c")
        .arg(r#"ulimit -S -n 1024 && exec "$0" --proxy socks5://127.0.0.1:1080 --device tun0"#)
        .arg(binary());
    let mut tunnel = ns.spawn(cmd)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let limits = loop {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", tunnel.id()))?;
        let log = tunnel.log()?;
        if log.contains("tunnel running") {
            break limits;
        }
        ensure!(
            Instant::now() < deadline,
            "the tunnel did not start:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no open-files line")?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (soft, hard) = (fields[3], fields[4]);
    // (Where the hard limit is 1024 itself there is nothing to raise.)
    ensure!(soft == hard, "soft {soft} not raised to hard {hard}");
    tunnel.terminate()?;
    Ok(())
}

/// A SOCKS5 server (no login) in `ns` at `listen` that grants every UDP ASSOCIATE
/// with `relay` as its relay and keeps the control connection open; it relays
/// nothing. Served by a thread of the test; returns how many it granted.
fn granting_server(
    ns: &Namespace,
    listen: SocketAddr,
    relay: SocketAddr,
) -> Result<std::sync::Arc<std::sync::atomic::AtomicUsize>> {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = ns.within(move || std::net::TcpListener::bind(listen))?;
    let granted = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = granted.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for control in listener.incoming() {
            let Ok(mut control) = control else { return };
            let mut head = [0u8; 2];
            let mut request = [0u8; 10];
            let ok = control.read_exact(&mut head).is_ok()
                && control
                    .read_exact(&mut vec![0u8; usize::from(head[1])])
                    .is_ok()
                && control.write_all(&[5, 0]).is_ok()
                && control.read_exact(&mut request).is_ok();
            let SocketAddr::V4(relay) = relay else { return };
            let mut reply = vec![5, 0, 0, 1];
            reply.extend(relay.ip().octets());
            reply.extend(relay.port().to_be_bytes());
            if ok && control.write_all(&reply).is_ok() {
                counter.fetch_add(1, Ordering::Relaxed);
                held.push(control);
            }
        }
    });
    Ok(granted)
}

/// A server that announces a UDP relay reached through the tunnel itself (here: an
/// address in the target network, which the app namespace routes into the TUN).
/// Each datagram to it would re-enter the TUN as a new datagram from the tunnel's own
/// socket, needing an association of its own: one datagram used to open thousands.
/// The association is refused instead, the application hears port unreachable at
/// once, and the log says why.
#[test]
fn a_relay_routed_through_the_tunnel_is_refused_not_looped() -> Result<()> {
    needs_root!("a_relay_routed_through_the_tunnel_is_refused_not_looped");
    let mut net = Net::new("udprloop")?;
    let listen = SocketAddr::new(proxy_addr().ip(), 1099);
    let looping_relay = SocketAddr::new(TARGET_V4.into(), 1091);
    let granted = granting_server(net.topo.proxy(), listen, looping_relay)?;
    net.tunnel_attached(&format!("socks5://{listen}"), &[])?;
    let target = SocketAddr::new(TARGET_V4.into(), UDP_ECHO_PORT);
    for attempt in 0..3 {
        let took = time_to_refusal(net.app(), target)?
            .with_context(|| format!("no port unreachable, attempt {attempt}"))?;
        ensure!(took < Duration::from_millis(500), "refused after {took:?}");
    }
    std::thread::sleep(Duration::from_millis(300));
    let log = net.stop_tunnel()?;
    let granted = granted.load(std::sync::atomic::Ordering::Relaxed);
    ensure!(
        granted == 1,
        "the proxy granted {granted} associations\n{log}"
    );
    ensure!(stat(&log, "udp_associations") == 0, "{log}");
    ensure!(stat(&log, "udp_up") == 0, "{log}");
    ensure!(stat(&log, "udp_refused") == 3, "{log}");
    ensure!(
        log.contains("routing loop: the proxy's UDP relay 198.19.2.2:1091"),
        "{log}"
    );
    Ok(())
}
