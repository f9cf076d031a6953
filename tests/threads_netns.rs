//! `--threads` end to end (issue 9): the tunnel in `app` on a multi-queue TUN with
//! one stack per queue (a device it creates, and one made by hand with
//! `multi_queue`), our SOCKS server in `proxy`, services in `target`. The kernel picks
//! a queue per packet by flow hash, so these tests send many flows and check, from
//! the tunnel's "queue stopped" log lines, that both queues carried packets; what
//! must be one for the whole tunnel (UDP associations, the fake-IP map) is checked
//! with traffic whose packets land on different queues.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tun2socks::metrics::Snapshot;
use tun2socks::require_or_skip;
use tun2socks::testbed::attach::{HAND_TUN_V4, HAND_TUN_V6, create_tun, start_tunnel_attached};
use tun2socks::testbed::dnsmasq::{PROXY_ONLY_NAME, set_proxy_only_name};
use tun2socks::testbed::namespace::join;
use tun2socks::testbed::services::{
    ECHO_PORT, HTTP_PORT, Services, UPLOAD_PORT, blob, echo_round_trip, sha256_hex, upload_sha256,
};
use tun2socks::testbed::tunnel::{panics_in, proxy_addr, start_server, start_tunnel, stop_cleanly};
use tun2socks::testbed::udp::{
    CONE_PORT, CONE_REPLY_PORT, UDP_ECHO_PORT, UdpServices, cone_request,
};
use tun2socks::testbed::{Namespace, Process, TARGET_V4, Topology, require_program, require_root};

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tun2socks"))
}

macro_rules! needs_root {
    ($test:literal) => {
        require_or_skip!(require_root($test), Ok(()));
    };
}

/// TCP flows at once.
const FLOWS: usize = 64;
/// UDP sockets, each talking to two target ports.
const UDP_SOCKETS: usize = 32;

/// Processes and services first, namespaces last (fields drop in order).
struct Net {
    tunnel: Option<Process>,
    server: Option<Process>,
    _udp: UdpServices,
    _services: Services,
    topo: Topology,
}

impl Net {
    /// `prepare` runs before the SOCKS server starts (it reads /etc/netns at start).
    fn new(tag: &str, prepare: impl FnOnce(&Topology) -> std::io::Result<()>) -> Result<Net> {
        let topo = Topology::create(tag)?;
        prepare(&topo)?;
        let services = Services::start(topo.target(), 1 << 20, 9)?;
        let udp = UdpServices::start(topo.target())?;
        let server = start_server(topo.proxy(), &binary(), &[])?;
        Ok(Net {
            tunnel: None,
            server: Some(server),
            _udp: udp,
            _services: services,
            topo,
        })
    }

    fn app(&self) -> &Namespace {
        self.topo.app()
    }

    fn created(&mut self, extra: &[&str]) -> Result<()> {
        let url = format!("socks5://{}", proxy_addr());
        self.tunnel = Some(start_tunnel(self.app(), &binary(), &url, extra)?);
        Ok(())
    }

    /// The tunnel on `tun0` made by hand at MTU 1500, with `multi_queue` or without.
    fn attached(&mut self, multi_queue: bool, extra: &[&str]) -> Result<()> {
        if multi_queue {
            create_multi_queue_tun(self.app(), "tun0", 1500)?;
        } else {
            create_tun(self.app(), "tun0", 1500)?;
        }
        let url = format!("socks5://{}", proxy_addr());
        let tunnel = start_tunnel_attached(self.app(), &binary(), &url, "tun0", extra)?;
        self.tunnel = Some(tunnel);
        Ok(())
    }

    /// Stops the tunnel (SIGTERM, exit 0 expected) and returns its log.
    fn stop(&mut self) -> Result<String> {
        let tunnel = self.tunnel.take().context("no tunnel")?;
        let panics = panics_in(&tunnel);
        ensure!(panics.is_empty(), "tunnel panicked: {panics:?}");
        if let Some(server) = &self.server {
            let panics = panics_in(server);
            ensure!(panics.is_empty(), "server panicked: {panics:?}");
        }
        Ok(stop_cleanly(tunnel)?)
    }
}

/// `ip tuntap add mode tun multi_queue`, MTU, the benchmark addresses, up.
fn create_multi_queue_tun(ns: &Namespace, name: &str, mtu: u32) -> std::io::Result<()> {
    ns.ip(["tuntap", "add", "dev", name, "mode", "tun", "multi_queue"])?;
    ns.ip(["link", "set", "dev", name, "mtu", &mtu.to_string()])?;
    ns.ip(["addr", "add", HAND_TUN_V4, "dev", name])?;
    ns.ip(["addr", "add", HAND_TUN_V6, "dev", name, "nodad"])?;
    ns.ip(["link", "set", "dev", name, "up"])?;
    Ok(())
}

fn stat(log: &str, name: &str) -> u64 {
    Snapshot::final_stat(log, name)
}

/// Packets read per queue, from the "queue stopped queue=N packets_in=M" lines.
fn packets_per_queue(log: &str) -> BTreeMap<u64, u64> {
    let field = |line: &str, name: &str| {
        line.split_whitespace()
            .find_map(|word| word.strip_prefix(name)?.parse::<u64>().ok())
    };
    log.lines()
        .filter(|line| line.contains("queue stopped"))
        .filter_map(|line| Some((field(line, "queue=")?, field(line, "packets_in=")?)))
        .collect()
}

/// [`FLOWS`] concurrent TCP connections from `app`: half upload 256 KiB and compare
/// the target's SHA-256, half echo 64 KiB; every byte must come back intact.
fn many_tcp_flows(app: &Namespace) -> Result<()> {
    let results = join(app.enter_async(|| async {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..FLOWS {
            tasks.spawn(async move {
                if i % 2 == 0 {
                    let data = blob(256 * 1024, i as u64);
                    let dst = SocketAddr::new(TARGET_V4.into(), UPLOAD_PORT);
                    let got = upload_sha256(dst, &data).await?;
                    Ok::<bool, std::io::Error>(got == sha256_hex(&data))
                } else {
                    let data = blob(64 * 1024, i as u64);
                    let dst = SocketAddr::new(TARGET_V4.into(), ECHO_PORT);
                    let mut stream = tokio::net::TcpStream::connect(dst).await?;
                    let back = echo_round_trip(&mut stream, &data).await?;
                    Ok(back == data)
                }
            });
        }
        let mut intact = 0;
        while let Some(joined) = tasks.join_next().await {
            if joined.map_err(std::io::Error::other)?? {
                intact += 1;
            }
        }
        Ok(intact)
    }))?;
    ensure!(results == FLOWS, "{results} of {FLOWS} flows intact");
    Ok(())
}

/// [`UDP_SOCKETS`] sockets, each sending to the echo port and to the cone port (whose
/// reply comes from a third port): each must get both answers, the cone's from the
/// port it never sent to. The two datagrams of one socket take different queues for
/// about half of the sockets, so an association per queue would show as more
/// associations than sockets (checked by the caller).
fn udp_two_ports_per_socket(app: &Namespace) -> Result<()> {
    let target = IpAddr::from(TARGET_V4);
    let answered = join(app.enter(move || {
        let mut answered = 0;
        // Every socket stays open to the end: a closed one's port could be handed to
        // a later socket, which would then (rightly) reuse its association.
        let mut open = Vec::with_capacity(UDP_SOCKETS);
        for i in 0..UDP_SOCKETS {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.set_read_timeout(Some(Duration::from_secs(2)))?;
            let echo = format!("echo from socket {i}");
            let mut seen = (false, false);
            // The first datagrams wait for the association; retry a lost one.
            for _ in 0..3 {
                if !seen.0 {
                    socket.send_to(echo.as_bytes(), (target, UDP_ECHO_PORT))?;
                }
                if !seen.1 {
                    socket.send_to(&cone_request(CONE_REPLY_PORT), (target, CONE_PORT))?;
                }
                let mut buf = [0u8; 2048];
                while !(seen.0 && seen.1) {
                    let Ok((n, from)) = socket.recv_from(&mut buf) else {
                        break;
                    };
                    let payload = buf.get(..n).unwrap_or_default();
                    if from == SocketAddr::new(target, UDP_ECHO_PORT) && payload == echo.as_bytes()
                    {
                        seen.0 = true;
                    } else if from == SocketAddr::new(target, CONE_REPLY_PORT) {
                        seen.1 = true;
                    }
                }
                if seen.0 && seen.1 {
                    answered += 1;
                    break;
                }
            }
            open.push(socket);
        }
        Ok(answered)
    }))?;
    ensure!(
        answered == UDP_SOCKETS,
        "{answered} of {UDP_SOCKETS} sockets got both answers"
    );
    Ok(())
}

/// Checks that both queues read packets, and returns the per-queue counts.
fn both_queues_carried(log: &str) -> Result<BTreeMap<u64, u64>> {
    let queues = packets_per_queue(log);
    ensure!(
        queues.len() == 2 && queues.values().all(|&n| n > 0),
        "expected packets on queues 0 and 1: {queues:?}\n{log}"
    );
    Ok(queues)
}

#[test]
fn two_threads_on_a_created_device_carry_tcp_and_full_cone_udp() -> Result<()> {
    needs_root!("two_threads_on_a_created_device_carry_tcp_and_full_cone_udp");
    let mut net = Net::new("thr-created", |_| Ok(()))?;
    net.created(&["--threads", "2"])?;
    many_tcp_flows(net.app())?;
    udp_two_ports_per_socket(net.app())?;
    let log = net.stop()?;
    let queues = both_queues_carried(&log)?;
    eprintln!("packets per queue: {queues:?}");
    ensure!(log.contains("threads=2"), "{log}");
    ensure!(stat(&log, "flows_opened") >= FLOWS as u64, "{log}");
    // One association per socket, whichever queues its datagrams took.
    let associations = stat(&log, "udp_associations");
    ensure!(
        associations == UDP_SOCKETS as u64,
        "{associations} associations for {UDP_SOCKETS} sockets\n{log}"
    );
    Ok(())
}

#[test]
fn two_threads_on_a_hand_made_multi_queue_device() -> Result<()> {
    needs_root!("two_threads_on_a_hand_made_multi_queue_device");
    let mut net = Net::new("thr-attach", |_| Ok(()))?;
    net.attached(true, &["--threads", "2"])?;
    many_tcp_flows(net.app())?;
    udp_two_ports_per_socket(net.app())?;
    let log = net.stop()?;
    let queues = both_queues_carried(&log)?;
    eprintln!("packets per queue: {queues:?}");
    let associations = stat(&log, "udp_associations");
    ensure!(
        associations == UDP_SOCKETS as u64,
        "{associations} associations for {UDP_SOCKETS} sockets\n{log}"
    );
    ensure!(
        net.app()
            .ip(["-d", "link", "show", "dev", "tun0"])
            .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("multi_queue")),
        "the hand-made device outlives the tunnel"
    );
    Ok(())
}

#[test]
fn fake_ip_answers_on_one_queue_serve_flows_on_the_other() -> Result<()> {
    needs_root!("fake_ip_answers_on_one_queue_serve_flows_on_the_other");
    require_or_skip!(
        require_program(
            "curl",
            "fake_ip_answers_on_one_queue_serve_flows_on_the_other"
        ),
        Ok(())
    );
    let mut net = Net::new("thr-fake", |topo| set_proxy_only_name(topo, &[]))?;
    net.created(&["--threads", "2", "--dns", "fake-ip"])?;
    // Each curl asks the name (UDP, a fresh source port) and connects (TCP): the
    // query and the SYN hash to queues independently, so with one fake-IP map per
    // queue about half of these would be refused.
    for round in 0..24 {
        let out = net
            .app()
            .command("curl")
            .args([
                "-4",
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
            "round {round}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let log = net.stop()?;
    both_queues_carried(&log)?;
    ensure!(stat(&log, "dns_answered_fake") >= 24, "{log}");
    ensure!(stat(&log, "dns_fake_unknown") == 0, "{log}");
    Ok(())
}

#[test]
fn a_single_queue_hand_made_device_falls_back_to_one_thread() -> Result<()> {
    needs_root!("a_single_queue_hand_made_device_falls_back_to_one_thread");
    let mut net = Net::new("thr-single", |_| Ok(()))?;
    net.attached(false, &["--threads", "2"])?;
    many_tcp_flows(net.app())?;
    udp_two_ports_per_socket(net.app())?;
    let log = net.stop()?;
    ensure!(log.contains("without multi_queue"), "{log}");
    let queues = packets_per_queue(&log);
    ensure!(
        queues.len() == 1 && queues.get(&0).is_some_and(|&n| n > 0),
        "{queues:?}\n{log}"
    );
    Ok(())
}

#[test]
fn one_thread_serves_everything_on_one_queue() -> Result<()> {
    needs_root!("one_thread_serves_everything_on_one_queue");
    let mut net = Net::new("thr-one", |_| Ok(()))?;
    net.created(&["--threads", "1"])?;
    many_tcp_flows(net.app())?;
    udp_two_ports_per_socket(net.app())?;
    let log = net.stop()?;
    ensure!(log.contains("threads=1"), "{log}");
    let queues = packets_per_queue(&log);
    ensure!(
        queues.len() == 1 && queues.get(&0).is_some_and(|&n| n > 0),
        "{queues:?}\n{log}"
    );
    ensure!(
        !net.app()
            .ip(["-d", "link", "show"])
            .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("multi_queue")),
        "one thread opens the device single-queue"
    );
    Ok(())
}

#[test]
fn the_flow_limit_holds_for_all_queues_together() -> Result<()> {
    needs_root!("the_flow_limit_holds_for_all_queues_together");
    let mut net = Net::new("thr-limit", |_| Ok(()))?;
    net.created(&["--threads", "2", "--max-flows", "8"])?;
    // 24 connections held at once: with a limit per queue, up to 16 would be served.
    let served = join(net.app().enter_async(|| async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dst = SocketAddr::new(TARGET_V4.into(), ECHO_PORT);
        let mut held = Vec::new();
        for _ in 0..24 {
            let connect = tokio::net::TcpStream::connect(dst);
            let Ok(Ok(mut stream)) = tokio::time::timeout(Duration::from_secs(5), connect).await
            else {
                continue;
            };
            let mut byte = [0u8; 1];
            let echoed = async {
                stream.write_all(b"x").await?;
                stream.read_exact(&mut byte).await
            };
            if tokio::time::timeout(Duration::from_secs(5), echoed)
                .await
                .is_ok_and(|r| r.is_ok())
            {
                held.push(stream);
            }
        }
        Ok(held.len())
    }))?;
    let log = net.stop()?;
    both_queues_carried(&log)?;
    ensure!(
        served == 8,
        "{served} connections served with --max-flows 8\n{log}"
    );
    ensure!(stat(&log, "flows_over_limit") >= 16, "{log}");
    Ok(())
}
