//! TUN offload end to end: a hand-made TUN device at MTU 1500 (`ip tuntap add`, as
//! users attach to), our server in the proxy namespace, 64 MiB each way with the
//! content checked (SHA-256; plus 16 MiB up and 64 MiB down over IPv6), with `--offload auto` and with `--offload off`. From
//! the tunnel's final stats line: with offload the device moved far fewer packets
//! than 1460-byte segments (super-segments both ways); without, at least one per
//! segment. A UDP super-packet (`UDP_SEGMENT`, cut by us under USO) comes back as
//! its three datagrams from the target's echo.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tun2socks::metrics::Snapshot;
use tun2socks::require_or_skip;
use tun2socks::testbed::attach::{create_tun, start_tunnel_attached};
use tun2socks::testbed::namespace::join;
use tun2socks::testbed::services::{
    HTTP_PORT, Services, UPLOAD_PORT, blob, sha256_hex, upload_sha256,
};
use tun2socks::testbed::tunnel::{panics_in, proxy_addr, start_server, stop_cleanly};
use tun2socks::testbed::udp::{UDP_ECHO_PORT, UdpServices};
use tun2socks::testbed::{TARGET_V4, TARGET_V6, Topology};

const MIB: usize = 1024 * 1024;
/// Bytes moved each way over IPv4.
const BULK: usize = 64 * MIB;
/// Bytes uploaded over IPv6 (TSO6 on the read side).
const BULK_V6: usize = 16 * MIB;
/// Segments of 1460 bytes the IPv4 bulk needs each way at MTU 1500.
const SEGMENTS: u64 = (BULK / 1460) as u64;

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tun2socks"))
}

/// What one run saw: the tunnel's log and its final packet counters.
struct Run {
    log: String,
    packets_in: u64,
    packets_out: u64,
}

/// Uploads and downloads through a tunnel attached to a hand-made MTU-1500 device
/// with `--offload mode`; checks every byte; returns the tunnel's counters.
fn bulk_through(tag: &str, mode: &str) -> Result<Run> {
    let topo = Topology::create(tag)?;
    let services = Services::start(topo.target(), BULK, 9)?;
    let udp = UdpServices::start(topo.target())?;
    let server = start_server(topo.proxy(), &binary(), &[])?;
    create_tun(topo.app(), "t2soffl0", 1500)?;
    let url = format!("socks5://{}", proxy_addr());
    let tunnel = start_tunnel_attached(
        topo.app(),
        &binary(),
        &url,
        "t2soffl0",
        &["--offload", mode],
    )?;

    let transfers = topo.app().enter_async(|| async {
        let up = blob(BULK, 7);
        let got = upload_sha256(SocketAddr::new(TARGET_V4.into(), UPLOAD_PORT), &up).await?;
        let up_ok = got == sha256_hex(&up);
        let up6 = blob(BULK_V6, 8);
        let got6 = upload_sha256(SocketAddr::new(TARGET_V6.into(), UPLOAD_PORT), &up6).await?;
        let up6_ok = got6 == sha256_hex(&up6);
        let expected = sha256_hex(&blob(BULK, 9));
        let down = download(TARGET_V4.into()).await?;
        let down6 = download(TARGET_V6.into()).await?;
        let down_ok = down.len() == BULK
            && sha256_hex(&down) == expected
            && down6.len() == BULK
            && sha256_hex(&down6) == expected;
        Ok((up_ok, up6_ok, down_ok, down.len().min(down6.len())))
    });
    let (up_ok, up6_ok, down_ok, down_len) = join(transfers)?;
    let echoes = udp_gso_echo(topo.app())?;
    let panics = panics_in(&tunnel);
    let log = stop_cleanly(tunnel)?;
    drop(server);
    drop(services);
    drop(udp);
    ensure!(panics.is_empty(), "tunnel panicked: {panics:?}");
    ensure!(up_ok, "the 64 MiB upload arrived changed");
    ensure!(up6_ok, "the 16 MiB IPv6 upload arrived changed");
    ensure!(
        down_ok,
        "a 64 MiB download (IPv4 or IPv6) arrived changed ({down_len} bytes)"
    );
    ensure!(
        echoes == "[1000, 1000, 1000]",
        "a 3000-byte UDP_SEGMENT send came back as {echoes}"
    );
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("stopped stats="))
        .context("no final stats line")?
        .to_owned();
    let field = |name| Snapshot::parse_field(&line, name).unwrap_or(0);
    Ok(Run {
        packets_in: field("packets_in"),
        packets_out: field("packets_out"),
        log,
    })
}

/// Sends 3000 bytes with `UDP_SEGMENT` 1000 (one super-packet for the TUN) to the
/// target's UDP echo from `app`; returns the sizes of the echoes, as `[a, b, c]`.
fn udp_gso_echo(app: &tun2socks::testbed::Namespace) -> Result<String> {
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.setsockopt(17, 103, 1000)  # SOL_UDP, UDP_SEGMENT\n\
         s.settimeout(5)\n\
         s.sendto(bytes(range(250)) * 12, ('{TARGET_V4}', {UDP_ECHO_PORT}))\n\
         print(sorted(len(s.recv(4096)) for _ in range(3)))\n"
    );
    let out = app.run("python3", ["-c", &script])?;
    ensure!(
        out.status.success(),
        "python3: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// `GET /` from the target's HTTP server; returns the body.
async fn download(ip: IpAddr) -> std::io::Result<Vec<u8>> {
    let mut s = tokio::net::TcpStream::connect(SocketAddr::new(ip, HTTP_PORT)).await?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await?;
    let mut all = Vec::with_capacity(BULK + 1024);
    s.read_to_end(&mut all).await?;
    let body = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(0, |at| at + 4);
    Ok(all.split_off(body))
}

#[test]
fn offload_moves_64_mib_each_way_in_super_segments() -> Result<()> {
    require_or_skip!(
        tun2socks::testbed::require_root("offload_moves_64_mib_each_way_in_super_segments"),
        Ok(())
    );
    let run = bulk_through("offl-on", "auto")?;
    eprintln!(
        "offload auto: packets in {}, out {} (IPv4 segments each way: {SEGMENTS})",
        run.packets_in, run.packets_out
    );
    ensure!(
        run.log.contains("offload=csum,tso"),
        "offload not granted:\n{}",
        run.log
    );
    // Without offload each direction alone needs SEGMENTS data packets (plus the
    // other side's ACKs); with it, a super-segment carries up to 44 of them. How many
    // depends on the sender's rate (the kernel sizes its super-segments to about a
    // millisecond of data): about 4,000 packets each way on an idle machine, 12,400
    // in while the other test of this file ran beside it. Half of SEGMENTS still
    // fails without offload.
    ensure!(
        run.packets_in < SEGMENTS / 2,
        "{} packets in: no super-segments read",
        run.packets_in
    );
    ensure!(
        run.packets_out < SEGMENTS / 2,
        "{} packets out: no super-segments written",
        run.packets_out
    );
    Ok(())
}

#[test]
fn offload_off_moves_the_same_bytes_in_plain_packets() -> Result<()> {
    require_or_skip!(
        tun2socks::testbed::require_root("offload_off_moves_the_same_bytes_in_plain_packets"),
        Ok(())
    );
    let run = bulk_through("offl-off", "off")?;
    eprintln!(
        "offload off: packets in {}, out {} (IPv4 segments each way: {SEGMENTS})",
        run.packets_in, run.packets_out
    );
    ensure!(run.log.contains("offload=off"), "{}", run.log);
    ensure!(
        run.packets_in >= SEGMENTS && run.packets_out >= SEGMENTS,
        "plain packets cannot carry 64 MiB in fewer than {SEGMENTS}: in {}, out {}",
        run.packets_in,
        run.packets_out
    );
    Ok(())
}
