//! DNS through the tunnel, end to end (issue 6): dnsmasq in `target`, the tunnel in
//! `app` with each `--dns` mode, `dig` in `app`. Every query enters the TUN (the app
//! has no other route to the resolver), so an answer proves the mode's path: through
//! the UDP association, over TCP through SOCKS CONNECT, or from the fake-IP pool.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tun2socks::metrics::Snapshot;
use tun2socks::require_or_skip;
use tun2socks::testbed::dns_client::{TYPE_A, TYPE_AAAA, dns_query_tcp};
use tun2socks::testbed::dnsmasq::{
    BIG_TXT_NAME, DigTransport, Dnsmasq, HUGE_TXT_NAME, PROXY_ONLY_NAME, TARGET_NAME, TXT_NAME,
    TXT_VALUE, default_records, dig, dig_raw, huge_txt_strings, set_proxy_only_name,
};
use tun2socks::testbed::services::{HTTP_PORT, Services};
use tun2socks::testbed::tunnel::{proxy_addr, start_server, start_tunnel, stop_cleanly};
use tun2socks::testbed::{
    APP_V4, APP_V6, Namespace, Process, TARGET_V4, TARGET_V6, Topology, require_program,
    require_root,
};

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tun2socks"))
}

macro_rules! needs {
    ($test:literal) => {
        require_or_skip!(require_root($test), Ok(()));
        require_or_skip!(require_program("dnsmasq", $test), Ok(()));
        require_or_skip!(require_program("dig", $test), Ok(()));
    };
}

/// A counter of the tunnel's final stats line; 0 when absent.
fn stat(log: &str, name: &str) -> u64 {
    Snapshot::final_stat(log, name)
}

/// A resolver address that exists nowhere: only the tunnel's "any query to port 53"
/// rule (and `--dns-server`) makes queries to it work.
const NOWHERE: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 53));

struct Net {
    tunnel: Option<Process>,
    server: Option<Process>,
    dnsmasq: Dnsmasq,
    _services: Option<Services>,
    topo: Topology,
}

impl Net {
    fn new(tag: &str, server_args: &[&str]) -> Result<Net> {
        Self::new_with(tag, server_args, |_| Ok(()))
    }

    /// `prepare` runs before the SOCKS server starts (`ip netns exec` binds the
    /// namespace's /etc/netns files when a process starts).
    fn new_with(
        tag: &str,
        server_args: &[&str],
        prepare: impl FnOnce(&Topology) -> std::io::Result<()>,
    ) -> Result<Net> {
        let topo = Topology::create(tag)?;
        prepare(&topo)?;
        let dnsmasq = Dnsmasq::start_with(topo.target(), &default_records(), true)?;
        let server = start_server(topo.proxy(), &binary(), server_args)?;
        Ok(Net {
            tunnel: None,
            server: Some(server),
            dnsmasq,
            _services: None,
            topo,
        })
    }

    fn app(&self) -> &Namespace {
        self.topo.app()
    }

    fn tunnel(&mut self, url: &str, extra: &[&str]) -> Result<()> {
        self.tunnel = Some(start_tunnel(self.app(), &binary(), url, extra)?);
        Ok(())
    }

    fn stop(&mut self) -> Result<String> {
        Ok(stop_cleanly(self.tunnel.take().context("no tunnel")?)?)
    }
}

fn socks5() -> String {
    format!("socks5://{}", proxy_addr())
}

/// A, AAAA and TXT for the target's names, asked of `server` over `transport`.
fn check_real_answers(ns: &Namespace, server: IpAddr, transport: DigTransport) -> Result<()> {
    let a = dig(ns, server, TARGET_NAME, "A", transport)?;
    ensure!(a == [TARGET_V4.to_string()], "A via {server}: {a:?}");
    let aaaa = dig(ns, server, TARGET_NAME, "AAAA", transport)?;
    ensure!(
        aaaa == [TARGET_V6.to_string()],
        "AAAA via {server}: {aaaa:?}"
    );
    let txt = dig(ns, server, TXT_NAME, "TXT", transport)?;
    ensure!(
        txt == [format!("\"{TXT_VALUE}\"")],
        "TXT via {server}: {txt:?}"
    );
    Ok(())
}

#[test]
fn udp_mode_relays_queries_through_the_association() -> Result<()> {
    needs!("udp_mode_relays_queries_through_the_association");
    let mut net = Net::new("dnsudp", &[])?;
    net.tunnel(&socks5(), &["--dns", "udp"])?;
    check_real_answers(net.app(), TARGET_V4.into(), DigTransport::Udp)?;
    check_real_answers(net.app(), TARGET_V6.into(), DigTransport::Udp)?;
    let log = net.stop()?;
    ensure!(stat(&log, "dns_via_udp") == 6, "{log}");
    Ok(())
}

#[test]
fn any_query_to_port_53_goes_to_the_dns_server() -> Result<()> {
    needs!("any_query_to_port_53_goes_to_the_dns_server");
    for mode in ["udp", "tcp"] {
        let mut net = Net::new(&format!("dnsany{mode}"), &[])?;
        let server = TARGET_V4.to_string();
        net.tunnel(&socks5(), &["--dns", mode, "--dns-server", &server])?;
        // A resolver that does not exist, and dig over TCP (an ordinary TCP flow to
        // port 53): both reach dnsmasq.
        check_real_answers(net.app(), NOWHERE, DigTransport::Udp)
            .with_context(|| format!("--dns {mode}"))?;
        check_real_answers(net.app(), NOWHERE, DigTransport::Tcp)
            .with_context(|| format!("--dns {mode}, dig +tcp"))?;
        net.stop()?;
    }
    Ok(())
}

#[test]
fn tcp_mode_works_through_a_server_without_udp_and_through_socks4() -> Result<()> {
    needs!("tcp_mode_works_through_a_server_without_udp_and_through_socks4");
    let mut net = Net::new("dnstcp", &["--no-udp"])?;
    for url in [socks5(), format!("socks4://{}", proxy_addr())] {
        net.tunnel(&url, &["--dns", "tcp"])?;
        check_real_answers(net.app(), TARGET_V4.into(), DigTransport::Udp)
            .with_context(|| url.clone())?;
        // Concurrent queries share a few pipelined connections.
        let handles: Vec<_> = (0..20)
            .map(|_| {
                let mut cmd = net.app().command("dig");
                cmd.args([
                    &format!("@{TARGET_V4}"),
                    TARGET_NAME,
                    "A",
                    "+short",
                    "+time=3",
                    "+tries=1",
                ]);
                cmd.output()
            })
            .collect();
        for out in handles {
            let out = out?;
            ensure!(
                String::from_utf8_lossy(&out.stdout).trim() == TARGET_V4.to_string(),
                "{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        let log = net.stop()?;
        ensure!(stat(&log, "dns_tcp_answers") == 23, "{url}: {log}");
        ensure!(stat(&log, "udp_associations") == 0, "{url}: {log}");
        ensure!(log.contains("stopped stats="), "{url}: {log}");
    }
    Ok(())
}

#[test]
fn socks4_gets_dns_over_tcp_unless_udp_is_asked_for() -> Result<()> {
    needs!("socks4_gets_dns_over_tcp_unless_udp_is_asked_for");
    let mut net = Net::new("dnss4", &[])?;
    let url = format!("socks4://{}", proxy_addr());
    // No --dns: SOCKS4 has no UDP, so DNS goes over TCP (it used to get port
    // unreachable for every query: no name resolved through a SOCKS4 proxy).
    net.tunnel(&url, &[])?;
    check_real_answers(net.app(), TARGET_V4.into(), DigTransport::Udp)?;
    let log = net.stop()?;
    ensure!(log.contains("DNS goes over TCP (--dns tcp)"), "{log}");
    ensure!(stat(&log, "dns_tcp_answers") == 3, "{log}");
    ensure!(stat(&log, "udp_refused") == 0, "{log}");
    // --dns udp asked for is kept, with a warning: the query is refused at once.
    net.tunnel(&url, &["--dns", "udp"])?;
    let refused = dig(
        net.app(),
        TARGET_V4.into(),
        TARGET_NAME,
        "A",
        DigTransport::Udp,
    );
    ensure!(refused.is_err(), "{refused:?}");
    let log = net.stop()?;
    ensure!(
        log.contains("every DNS query will be answered port unreachable"),
        "{log}"
    );
    ensure!(stat(&log, "udp_refused") >= 1, "{log}");
    Ok(())
}

/// `dig @TARGET_V4 TARGET_NAME A +short EXTRA...`, with dig's own retries: the
/// target's address must be the answer in the end (a try that failed prints a `;;`
/// line, skipped here).
fn answered_after_retries(ns: &Namespace, extra: &[&str]) -> Result<()> {
    let mut dig = ns.command("dig");
    dig.args([&format!("@{TARGET_V4}"), TARGET_NAME, "A", "+short"])
        .args(extra);
    let out = String::from_utf8_lossy(&dig.output()?.stdout).into_owned();
    let answers: Vec<&str> = out.lines().filter(|l| !l.starts_with(";;")).collect();
    ensure!(answers == [TARGET_V4.to_string()], "{out}");
    Ok(())
}

#[test]
fn udp_mode_through_a_socks5_server_without_udp_falls_back_to_tcp() -> Result<()> {
    needs!("udp_mode_through_a_socks5_server_without_udp_falls_back_to_tcp");
    // Like microsocks or `ssh -D`: SOCKS5 without UDP ASSOCIATE (0x07). With the
    // default --dns udp, every query used to get port unreachable.
    let mut net = Net::new("dnsnoudp", &["--no-udp"])?;
    net.tunnel(&socks5(), &[])?;
    // The first query waits on the association the proxy refuses, and then goes
    // over TCP: answered on dig's one try.
    answered_after_retries(net.app(), &["+tries=1", "+time=3"])?;
    // From then on every query goes over TCP at once (one try each).
    check_real_answers(net.app(), TARGET_V4.into(), DigTransport::Udp)?;
    check_real_answers(net.app(), TARGET_V6.into(), DigTransport::Udp)?;
    let log = net.stop()?;
    ensure!(log.contains("DNS queries go over TCP from now on"), "{log}");
    ensure!(stat(&log, "dns_tcp_answers") == 7, "{log}");
    ensure!(stat(&log, "udp_associations") == 0, "{log}");
    ensure!(stat(&log, "udp_refused") == 0, "{log}");
    Ok(())
}

#[test]
fn udp_mode_through_a_relay_that_never_answers_falls_back_to_tcp() -> Result<()> {
    needs!("udp_mode_through_a_relay_that_never_answers_falls_back_to_tcp");
    require_or_skip!(
        require_program(
            "nft",
            "udp_mode_through_a_relay_that_never_answers_falls_back_to_tcp"
        ),
        Ok(())
    );
    // UDP ASSOCIATE succeeds, but a firewall in front of the proxy drops every
    // datagram to its relay without a word (or a NAT sends them nowhere): with the
    // default --dns udp, every query used to time out.
    let mut net = Net::new("dnssilent", &[])?;
    let firewall = format!(
        "add table inet silentfw; \
         add chain inet silentfw input {{ type filter hook input priority 0; }}; \
         add rule inet silentfw input ip saddr {APP_V4} meta l4proto udp drop; \
         add rule inet silentfw input ip6 saddr {APP_V6} meta l4proto udp drop"
    );
    net.topo.proxy().run("nft", [firewall.as_str()])?;
    net.tunnel(&socks5(), &[])?;
    // dig's first try goes to the relay and is lost; its second, 3 s later, goes
    // over TCP and is answered.
    answered_after_retries(net.app(), &["+time=3", "+tries=2"])?;
    check_real_answers(net.app(), TARGET_V4.into(), DigTransport::Udp)?;
    let log = net.stop()?;
    ensure!(
        log.contains("no DNS answer (no datagram at all) has come back"),
        "{log}"
    );
    ensure!(stat(&log, "dns_tcp_answers") >= 4, "{log}");
    Ok(())
}

#[test]
fn a_large_answer_is_truncated_for_udp_and_whole_over_tcp() -> Result<()> {
    needs!("a_large_answer_is_truncated_for_udp_and_whole_over_tcp");
    let mut net = Net::new("dnstrunc", &[])?;
    net.tunnel(&socks5(), &["--dns", "tcp"])?;
    let out = dig_raw(
        net.app(),
        TARGET_V4.into(),
        BIG_TXT_NAME,
        "TXT",
        &["+noedns", "+ignore"],
    )?;
    ensure!(
        out.contains(" tc"),
        "no TC flag over UDP without EDNS:\n{out}"
    );
    // dig retries over TCP by itself after TC: the whole answer arrives.
    let full = dig(
        net.app(),
        TARGET_V4.into(),
        BIG_TXT_NAME,
        "TXT",
        DigTransport::Udp,
    )?;
    ensure!(full.len() == 1 && full[0].len() > 800, "{full:?}");
    net.stop()?;
    Ok(())
}

#[test]
fn an_answer_larger_than_the_mtu_arrives_over_udp() -> Result<()> {
    needs!("an_answer_larger_than_the_mtu_arrives_over_udp");
    let mut net = Net::new("dnshuge", &[])?;
    // The default mode: DNS is UDP through the association; at MTU 1500 the 2.5 KB
    // answer comes back as IP fragments, and the resolver's EDNS0 size allows it.
    net.tunnel(&socks5(), &["--mtu", "1500"])?;
    let out = dig_raw(
        net.app(),
        TARGET_V4.into(),
        HUGE_TXT_NAME,
        "TXT",
        &["+bufsize=4096", "+ignore", "+notcp"],
    )?;
    ensure!(out.contains("status: NOERROR"), "{out}");
    ensure!(!out.contains(" tc"), "truncated:\n{out}");
    for part in huge_txt_strings() {
        ensure!(out.contains(&part), "a string is missing:\n{out}");
    }
    let log = net.stop()?;
    ensure!(stat(&log, "fragmented") >= 1, "{log}");
    ensure!(stat(&log, "dns_via_udp") >= 1, "{log}");
    Ok(())
}

#[test]
fn fake_ip_lets_the_proxy_resolve_names() -> Result<()> {
    needs!("fake_ip_lets_the_proxy_resolve_names");
    require_or_skip!(
        require_program("curl", "fake_ip_lets_the_proxy_resolve_names"),
        Ok(())
    );
    let mut net = Net::new_with("dnsfake", &[], |topo| set_proxy_only_name(topo, &[]))?;
    net._services = Some(Services::start(net.topo.target(), 1024, 7)?);
    net.tunnel(&socks5(), &["--dns", "fake-ip"])?;
    // A and AAAA come from the pool, at once, without asking anyone.
    let a = dig(
        net.app(),
        TARGET_V4.into(),
        PROXY_ONLY_NAME,
        "A",
        DigTransport::Udp,
    )?;
    let fake: IpAddr = a.first().context("no A answer")?.parse()?;
    ensure!(
        "198.18.128.0/17".parse::<ipnet::IpNet>()?.contains(&fake),
        "{fake}"
    );
    let aaaa = dig(
        net.app(),
        TARGET_V4.into(),
        PROXY_ONLY_NAME,
        "AAAA",
        DigTransport::Udp,
    )?;
    ensure!(
        aaaa.len() == 1 && aaaa[0].starts_with("fd18::8000:"),
        "{aaaa:?}"
    );
    // Over TCP (dig +tcp, any resolver address): answered in the tunnel the same
    // way, the same fake addresses.
    for (qtype, expected) in [("A", &a), ("AAAA", &aaaa)] {
        let over_tcp = dig(
            net.app(),
            NOWHERE,
            PROXY_ONLY_NAME,
            qtype,
            DigTransport::Tcp,
        )?;
        ensure!(&over_tcp == expected, "{qtype} over TCP: {over_tcp:?}");
    }
    // Two queries pipelined on one connection, answered in order.
    let answers = dns_query_tcp(
        net.app(),
        SocketAddr::new(NOWHERE, 53),
        &[(PROXY_ONLY_NAME, TYPE_A), (PROXY_ONLY_NAME, TYPE_AAAA)],
        Duration::from_secs(5),
    )?;
    ensure!(
        answers.len() == 2
            && answers[0].addresses() == [fake]
            && answers[1]
                .addresses()
                .iter()
                .map(ToString::to_string)
                .eq(aaaa.iter().cloned()),
        "{answers:?}"
    );
    ensure!(
        net.dnsmasq.queries()? == 0,
        "A/AAAA must not leave the machine"
    );
    // Other types go upstream (over TCP to the resolver), from UDP and from TCP.
    for transport in [DigTransport::Udp, DigTransport::Tcp] {
        let txt = dig(net.app(), TARGET_V4.into(), TXT_NAME, "TXT", transport)?;
        ensure!(txt == [format!("\"{TXT_VALUE}\"")], "{txt:?}");
    }
    // curl resolves the name through the app's resolv.conf (the target's address,
    // into the TUN), gets the fake address, and the proxy connects by name: only it
    // can resolve the name (its /etc/netns hosts file).
    for family in ["-4", "-6"] {
        let out = net
            .app()
            .command("curl")
            .args([
                family,
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-m",
                "10",
            ])
            .arg(format!("http://{PROXY_ONLY_NAME}:{HTTP_PORT}/"))
            .output()?;
        ensure!(
            String::from_utf8_lossy(&out.stdout) == "200",
            "curl {family}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A fake address no name holds is refused at once, never sent anywhere.
    let out = net
        .app()
        .command("curl")
        .args(["-sS", "-o", "/dev/null", "-m", "5"])
        .arg(format!("http://198.18.200.200:{HTTP_PORT}/"))
        .output()?;
    ensure!(
        out.status.code() == Some(7),
        "an unknown fake address must be refused (curl 7): {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let server_log = net.server.as_ref().unwrap().log()?;
    ensure!(
        !server_log.contains("198.18.200.200"),
        "the unknown fake address reached the proxy"
    );
    let log = net.stop()?;
    // dig's A and AAAA, and curl's own lookups: all answered from the pool.
    ensure!(stat(&log, "dns_answered_fake") > 0, "{log}");
    ensure!(stat(&log, "dns_fake_unknown") == 1, "{log}");
    Ok(())
}

#[test]
fn fake_ip_refuses_plain_socks4_at_start() -> Result<()> {
    require_or_skip!(
        require_root("fake_ip_refuses_plain_socks4_at_start"),
        Ok(())
    );
    let out = Command::new(binary())
        .args(["--proxy", "socks4://127.0.0.1:1080", "--dns", "fake-ip"])
        .output()?;
    ensure!(out.status.code() == Some(2), "{out:?}");
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("socks4a"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(binary())
        .args([
            "--proxy",
            "socks5://127.0.0.1:1080",
            "--dns",
            "fake-ip",
            "--fake-ip-pool",
            "198.18.0.0/24",
        ])
        .output()?;
    ensure!(
        out.status.code() == Some(2),
        "a pool holding the device's address: {out:?}"
    );
    Ok(())
}
