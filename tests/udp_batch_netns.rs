//! Bursts of UDP through the tunnel and our server (issue 9): the server relays a
//! burst with one recvmmsg/sendmmsg each way, and the tunnel writes a burst of equal
//! replies to the TUN as UDP super-packets (USO) where the kernel takes them. Each
//! datagram of every burst must come back whole, in both families; with USO granted,
//! the device must have taken fewer packets than it delivered datagrams (the kernel
//! cut the super-packets), and the tunnel must not have fallen back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use tun2socks::metrics::Snapshot;
use tun2socks::require_or_skip;
use tun2socks::testbed::attach::{create_tun, start_tunnel_attached};
use tun2socks::testbed::tunnel::{proxy_addr, start_server, stop_cleanly};
use tun2socks::testbed::udp::{UDP_ECHO_PORT, UdpServices};
use tun2socks::testbed::udp_client::connected_socket;
use tun2socks::testbed::{Namespace, TARGET_V4, TARGET_V6, Topology, require_root};

const BURSTS: usize = 30;
const BURST: usize = 48;
const SIZE: usize = 600;

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tun2socks"))
}

/// Datagram `seq` of burst `burst`: its numbers, then a pattern of them.
fn payload(burst: usize, seq: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(SIZE);
    p.extend_from_slice(&(burst as u32).to_le_bytes());
    p.extend_from_slice(&(seq as u32).to_le_bytes());
    while p.len() < SIZE {
        p.push((p.len() as u8) ^ (burst as u8) ^ (seq as u8).rotate_left(3));
    }
    p
}

/// Packets the device has taken from the tunnel (its RX count).
fn tun_rx_packets(ns: &Namespace) -> Result<u64> {
    let out = ns.ip(["-s", "-o", "link", "show", "tun0"])?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    // "... RX:  bytes packets errors ... \    N M ..." (one line with -o).
    let rx = text.split("RX:").nth(1).context("no RX stats")?;
    let numbers: Vec<u64> = rx
        .split(|c: char| c.is_whitespace() || c == '\\')
        .filter_map(|w| w.parse().ok())
        .collect();
    numbers.get(1).copied().context("no RX packet count")
}

/// Sends bursts to the echo service and checks every reply; returns how many came
/// back whole.
fn bursts(socket: &UdpSocket) -> Result<usize> {
    socket.set_read_timeout(Some(Duration::from_millis(300)))?;
    let mut whole = 0;
    let mut buf = vec![0u8; 2048];
    for burst in 0..BURSTS {
        for seq in 0..BURST {
            socket.send(&payload(burst, seq))?;
        }
        let mut seen = [false; BURST];
        let deadline = Instant::now() + Duration::from_secs(3);
        while seen.iter().any(|s| !s) && Instant::now() < deadline {
            let Ok(n) = socket.recv(&mut buf) else { break };
            let got = &buf[..n];
            ensure!(n == SIZE, "a reply of {n} bytes, not {SIZE}");
            let b = u32::from_le_bytes(got[..4].try_into()?) as usize;
            let s = u32::from_le_bytes(got[4..8].try_into()?) as usize;
            if b != burst {
                continue; // a late reply of an earlier burst
            }
            ensure!(s < BURST && got == payload(b, s), "reply {b}/{s} corrupted");
            if !seen[s] {
                seen[s] = true;
                whole += 1;
            }
        }
    }
    Ok(whole)
}

#[test]
fn bursts_of_equal_datagrams_come_back_whole_v4_and_v6() -> Result<()> {
    require_or_skip!(
        require_root("bursts_of_equal_datagrams_come_back_whole_v4_and_v6"),
        Ok(())
    );
    let topo = Topology::create("udpburst")?;
    let _udp = UdpServices::start(topo.target())?;
    let _server = start_server(topo.proxy(), &binary(), &[])?;
    create_tun(topo.app(), "tun0", 1500)?;
    let tunnel = start_tunnel_attached(
        topo.app(),
        &binary(),
        &format!("socks5://{}", proxy_addr()),
        "tun0",
        &["--log-level", "info"],
    )?;
    let rx_before = tun_rx_packets(topo.app())?;
    let mut total = 0;
    for ip in [TARGET_V4.into(), TARGET_V6.into()] {
        let target = SocketAddr::new(ip, UDP_ECHO_PORT);
        let socket = connected_socket(topo.app(), target)?;
        let whole = bursts(&socket)?;
        // Generous: a loaded machine may drop a few at a full queue, never most.
        ensure!(
            whole * 10 >= BURSTS * BURST * 9,
            "{target}: {whole} of {} came back whole",
            BURSTS * BURST
        );
        total += whole;
    }
    let rx = tun_rx_packets(topo.app())? - rx_before;
    let log = stop_cleanly(tunnel)?;
    ensure!(
        !log.contains("refused a UDP super-packet"),
        "the device refused USO:\n{log}"
    );
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("stopped stats="))
        .unwrap_or_default();
    let down = Snapshot::parse_field(line, "udp_down").unwrap_or(0);
    ensure!(
        down as usize >= total,
        "udp_down={down} < {total} received:\n{log}"
    );
    let uso = log
        .lines()
        .any(|l| l.contains("TUN device ready") && l.contains("uso"));
    if uso {
        ensure!(
            rx * 2 < down,
            "USO granted, yet the device took {rx} packets for {down} datagrams"
        );
    } else {
        eprintln!("the kernel did not grant USO: datagrams went one per packet ({rx} packets)");
    }
    eprintln!("{total} datagrams back whole; the device took {rx} packets for {down} datagrams");
    Ok(())
}
