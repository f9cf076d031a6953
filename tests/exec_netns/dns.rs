//! "DNS inside works" for `tun2socks exec`: the program's resolv.conf names
//! 198.18.0.2, inside the tunnel; the tunnel answers per `--dns` mode, sending queries
//! to `--dns-server`, to the host's first non-loopback nameserver, or answering A and
//! AAAA from the fake-IP pool. dnsmasq runs in `target`, which `app` cannot reach but
//! through the tunnel and the SOCKS server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;
use std::path::Path;
use std::process::Output;

use tun2socks::require_or_skip;
use tun2socks::testbed::dnsmasq::{
    Dnsmasq, PROXY_ONLY_NAME, TARGET_NAME, default_records, resolve_in, set_proxy_only_name,
};
use tun2socks::testbed::services::{HTTP_PORT, Services};
use tun2socks::testbed::topology::{TARGET_V4, TARGET_V6};
use tun2socks::testbed::tunnel::{panics_in, proxy_addr, start_server};
use tun2socks::testbed::{Namespace, Process, Topology, require_program, require_root};

use super::{binary, text};

/// dnsmasq (and, for fake-IP, the HTTP services) in `target`, our SOCKS server in
/// `proxy`; the namespaces drop last.
pub struct DnsNet {
    pub server: Process,
    pub dnsmasq: Dnsmasq,
    _services: Option<Services>,
    pub topo: Topology,
}

impl DnsNet {
    /// `proxy_only`: only the proxy namespace resolves [`PROXY_ONLY_NAME`] (its hosts
    /// file, written before the server starts), and `app`'s resolv.conf names the
    /// target.
    pub fn new(tag: &str, proxy_only: bool) -> DnsNet {
        let topo = Topology::create(tag).unwrap();
        if proxy_only {
            set_proxy_only_name(&topo, &[]).unwrap();
        }
        let dnsmasq = Dnsmasq::start(topo.target(), &default_records()).unwrap();
        let services = proxy_only.then(|| Services::start(topo.target(), 1024, 3).unwrap());
        let server = start_server(topo.proxy(), &binary(), &[]).unwrap();
        DnsNet {
            server,
            dnsmasq,
            _services: services,
            topo,
        }
    }

    fn app(&self) -> &Namespace {
        self.topo.app()
    }

    /// `tun2socks exec --proxy URL OPTIONS... -- PROGRAM...` in `app`, to completion.
    fn exec(&self, options: &[&str], program: &[&str]) -> Output {
        let mut command = self.app().command(binary());
        command
            .args(["exec", "--proxy", &format!("socks5://{}", proxy_addr())])
            .args(options)
            .arg("--")
            .args(program);
        command.output().unwrap()
    }

    fn assert_server_ok(&self) {
        let panics = panics_in(&self.server);
        assert!(panics.is_empty(), "server panicked: {panics:?}");
    }
}

/// The addresses that `getent hosts` / `getent ahosts` printed (first field of each
/// line; `ahosts` names `name` on the first line only), once each. Fails the test
/// unless `name` appears.
pub fn addresses_of(out: &Output, name: &str) -> Vec<IpAddr> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.split_whitespace().any(|w| w == name),
        "{name} not in {stdout}"
    );
    let mut found: Vec<IpAddr> = stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    found.sort();
    found.dedup();
    found
}

/// `getent hosts NAME` (one address, v6 first) and `getent ahosts NAME` (all of
/// them), as a shell script for `exec`.
pub fn getent_script(name: &str) -> String {
    format!("getent hosts {name} && getent ahosts {name}")
}

/// Runs `PREFIX... BINARY exec --proxy URL --dns-server TARGET_V4 -- sh -c GETENT`
/// in `app` (e.g. as an ordinary user with setpriv) and checks that both addresses of
/// [`TARGET_NAME`] come back. dnsmasq must run in the target.
pub fn assert_getent_inside(app: &Namespace, binary: &Path, prefix: &[&str]) {
    let mut command = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = app.command(first);
            c.args(rest).arg(binary);
            c
        }
        None => app.command(binary),
    };
    command
        .args(["exec", "--proxy", &format!("socks5://{}", proxy_addr())])
        .args(["--dns-server", &TARGET_V4.to_string()])
        .args(["--", "sh", "-c", &getent_script(TARGET_NAME)]);
    let out = command.output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let want = vec![IpAddr::from(TARGET_V4), IpAddr::from(TARGET_V6)];
    assert_eq!(addresses_of(&out, TARGET_NAME), want, "{}", text(&out));
}

#[test]
fn getent_inside_exec_resolves_through_the_tunnel_in_udp_and_tcp_mode() {
    const TEST: &str = "getent_inside_exec_resolves_through_the_tunnel";
    require_or_skip!(require_root(TEST));
    require_or_skip!(require_program("dnsmasq", TEST));
    let net = DnsNet::new("exec-dns", false);
    let server = TARGET_V4.to_string();
    let want = vec![IpAddr::from(TARGET_V4), IpAddr::from(TARGET_V6)];
    for mode in ["udp", "tcp"] {
        let before = net.dnsmasq.queries_for(TARGET_NAME).unwrap();
        let options = ["--dns", mode, "--dns-server", &server];
        let out = net.exec(&options, &["getent", "hosts", TARGET_NAME]);
        assert_eq!(out.status.code(), Some(0), "--dns {mode}: {}", text(&out));
        let got = addresses_of(&out, TARGET_NAME);
        assert!(
            got.len() == 1 && want.contains(&got[0]),
            "--dns {mode}: {}",
            text(&out)
        );
        let out = net.exec(&options, &["sh", "-c", &getent_script(TARGET_NAME)]);
        assert_eq!(out.status.code(), Some(0), "--dns {mode}: {}", text(&out));
        assert_eq!(addresses_of(&out, TARGET_NAME), want, "{}", text(&out));
        // The answers came from dnsmasq, through the proxy (app has no route there).
        let after = net.dnsmasq.queries_for(TARGET_NAME).unwrap();
        assert!(after > before, "--dns {mode}: no query reached dnsmasq");
    }
    // Without --dns-server: the host's first non-loopback nameserver (here app's
    // resolv.conf, which `ip netns exec` puts over /etc/resolv.conf).
    let local_stub: IpAddr = "127.0.0.53".parse().unwrap();
    net.app()
        .set_resolv_conf(&[local_stub, TARGET_V4.into()])
        .unwrap();
    let out = net.exec(&[], &["sh", "-c", &getent_script(TARGET_NAME)]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(addresses_of(&out, TARGET_NAME), want, "{}", text(&out));
    net.assert_server_ok();
}

#[test]
fn curl_inside_exec_with_fake_ip_reaches_a_name_only_the_proxy_resolves() {
    const TEST: &str = "curl_inside_exec_with_fake_ip";
    require_or_skip!(require_root(TEST));
    require_or_skip!(require_program("dnsmasq", TEST));
    require_or_skip!(require_program("curl", TEST));
    let net = DnsNet::new("exec-fake", true);
    // Neither app nor the resolver knows the name: only the proxy does.
    assert!(resolve_in(net.app(), PROXY_ONLY_NAME).unwrap().is_empty());
    assert_eq!(
        resolve_in(net.topo.proxy(), PROXY_ONLY_NAME).unwrap().len(),
        2
    );
    let url = format!("http://{PROXY_ONLY_NAME}:{HTTP_PORT}/");
    let script = format!(
        "curl -4 -sS -o /dev/null -w '%{{http_code}}\\n' --max-time 20 {url} && \
         curl -6 -sS -o /dev/null -w '%{{http_code}}\\n' --max-time 20 {url}"
    );
    let out = net.exec(&["--dns", "fake-ip"], &["sh", "-c", &script]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let codes: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(codes, ["200", "200"], "{}", text(&out));
    assert_eq!(
        net.dnsmasq.queries_for(PROXY_ONLY_NAME).unwrap(),
        0,
        "A/AAAA must come from the pool"
    );
    // The proxy was asked by name (twice), never for a fake address.
    let log = net.server.log().unwrap();
    let by_name = format!("target={PROXY_ONLY_NAME}:{HTTP_PORT}");
    assert_eq!(log.matches(&by_name).count(), 2, "{log}");
    assert!(!log.contains("198.18.") && !log.contains("fd18:"), "{log}");
    net.assert_server_ok();
}
