//! Faults, end to end (issue 8), in the three-namespace topology: the proxy killed
//! during a large transfer and restarted; the target blackholed with nftables; a slow
//! reader of an endless download; a UDP flood; malformed packets. Each scenario is
//! bounded in time (every wait has a limit) and asserts what a user relies on: the
//! application sees the end quickly, no descriptor of the tunnel stays behind, memory
//! stays bounded, the tunnel keeps serving, drops are counted, nothing panics.
//! Measurements are printed (`eprintln!`) for the report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tun2socks::require_or_skip;
use tun2socks::testbed::attach::{open_fds, vm_rss_kib};
use tun2socks::testbed::services::{ECHO_PORT, SOURCE_PORT, Services};
use tun2socks::testbed::tunnel::{panics_in, proxy_addr, start_server, start_tunnel, stop_cleanly};
use tun2socks::testbed::udp::{UDP_ECHO_PORT, UDP_SINK_PORT, UdpServices};
use tun2socks::testbed::udp_client::udp_echo_check;
use tun2socks::testbed::{
    Namespace, Process, TARGET_V4, TARGET_V6, Topology, require_program, require_root,
};

const MIB: u64 = 1024 * 1024;

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tun2socks"))
}

macro_rules! needs_root {
    ($test:literal) => {
        require_or_skip!(require_root($test), Ok(()));
    };
}

/// Processes and services first, namespaces last (fields drop in order).
struct Net {
    tunnel: Option<Process>,
    server: Option<Process>,
    udp: UdpServices,
    _services: Services,
    topo: Topology,
}

impl Net {
    fn new(tag: &str, server_args: &[&str], tunnel_args: &[&str]) -> Result<Net> {
        let topo = Topology::create(tag)?;
        let services = Services::start(topo.target(), 1024, 1)?;
        let udp = UdpServices::start(topo.target())?;
        let server = start_server(topo.proxy(), &binary(), server_args)?;
        let url = format!("socks5://{}", proxy_addr());
        let tunnel = start_tunnel(topo.app(), &binary(), &url, tunnel_args)?;
        Ok(Net {
            tunnel: Some(tunnel),
            server: Some(server),
            udp,
            _services: services,
            topo,
        })
    }

    fn app(&self) -> &Namespace {
        self.topo.app()
    }

    fn tunnel_pid(&self) -> u32 {
        self.tunnel.as_ref().unwrap().id()
    }

    fn server_pid(&self) -> u32 {
        self.server.as_ref().unwrap().id()
    }

    /// Stops the tunnel with SIGTERM (exit 0, no panic) and returns its log.
    fn stop_tunnel(&mut self) -> Result<String> {
        Ok(stop_cleanly(self.tunnel.take().context("no tunnel")?)?)
    }

    fn assert_no_panics(&self) -> Result<()> {
        for p in self.tunnel.iter().chain(self.server.iter()) {
            let panics = panics_in(p);
            ensure!(panics.is_empty(), "{}: {panics:?}", p.command_line());
        }
        Ok(())
    }
}

/// A counter of the tunnel's final stats line: `name: N` (a field) or `"name": N` (a
/// drop reason). The one place that knows the line's format.
fn stat(log: &str, name: &str) -> u64 {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("stopped stats="))
        .unwrap_or_default();
    for key in [format!("\"{name}\": "), format!(" {name}: ")] {
        if let Some(at) = line.find(&key) {
            let digits: String = line[at + key.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            return digits.parse().unwrap_or(0);
        }
    }
    0
}

fn tcp_target(port: u16) -> SocketAddr {
    SocketAddr::new(TARGET_V4.into(), port)
}

/// One short echo through the tunnel (from `ns`), all within 5 s.
fn echo_once(ns: &Namespace) -> Result<()> {
    ns.within(|| {
        let mut s = TcpStream::connect_timeout(&tcp_target(ECHO_PORT), Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"still serving")?;
        let mut back = [0u8; 13];
        s.read_exact(&mut back)?;
        if &back != b"still serving" {
            return Err(io::Error::other("echo differs"));
        }
        Ok(())
    })?;
    Ok(())
}

/// Polls `f` every 50 ms until it holds or `limit` passes; returns how long it took.
fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if f() {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// The tunnel's descriptors once they have settled back to `baseline` (within 3 s),
/// or the count it stayed at.
fn fds_settle(pid: u32, baseline: usize) -> (usize, Option<Duration>) {
    let took = wait_until(Duration::from_secs(3), || {
        open_fds(pid).is_ok_and(|n| n <= baseline)
    });
    (open_fds(pid).unwrap_or(usize::MAX), took)
}

#[test]
fn proxy_killed_mid_transfer_then_restarted() -> Result<()> {
    needs_root!("proxy_killed_mid_transfer_then_restarted");
    let mut net = Net::new("fkill", &[], &[])?;
    echo_once(net.app())?;
    let fds_before = open_fds(net.tunnel_pid())?;
    // An endless download; the reader tells when data flows, then reads to the end.
    let (flowing_tx, flowing_rx) = std::sync::mpsc::channel::<()>();
    let reader = net.app().enter(move || {
        let mut s = TcpStream::connect_timeout(&tcp_target(SOURCE_PORT), Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        let mut told = false;
        let end = loop {
            match s.read(&mut buf) {
                Ok(0) => break "eof",
                Ok(n) => total += n as u64,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break "read timeout (10 s)",
                Err(_) => break "reset",
            }
            if !told && total >= 16 * MIB {
                told = true;
                let _ = flowing_tx.send(());
            }
        };
        Ok((Instant::now(), end, total))
    });
    flowing_rx
        .recv_timeout(Duration::from_secs(10))
        .context("the download did not start")?;
    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(net.server_pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let (ended, how, total) = tun2socks::testbed::namespace::join(reader)?;
    let seen = ended.saturating_duration_since(killed);
    let _ = net.server.take().map(Process::stop);
    let (fds_after, settled) = fds_settle(net.tunnel_pid(), fds_before);
    eprintln!(
        "proxy killed after {} MiB: the application saw {how} {seen:?} later; tunnel fds \
         {fds_before} before, {fds_after} after (settled in {settled:?})",
        total / MIB
    );
    ensure!(
        how != "read timeout (10 s)",
        "the application never saw the end"
    );
    ensure!(
        seen < Duration::from_secs(1),
        "the application saw the end after {seen:?}"
    );
    ensure!(
        fds_after <= fds_before,
        "the tunnel kept descriptors: {fds_before} before, {fds_after} after"
    );

    // While the proxy is down: refused at once, not hung.
    let refused = net.app().within(|| {
        let started = Instant::now();
        let r = TcpStream::connect_timeout(&tcp_target(ECHO_PORT), Duration::from_secs(5));
        Ok((r.map(|_| ()).map_err(|e| e.kind()), started.elapsed()))
    })?;
    eprintln!("proxy down: connect -> {:?} in {:?}", refused.0, refused.1);
    ensure!(
        refused.0 == Err(io::ErrorKind::ConnectionRefused) && refused.1 < Duration::from_secs(1),
        "{refused:?}"
    );

    // The proxy comes back: new flows succeed with the same tunnel.
    net.server = Some(start_server(net.topo.proxy(), &binary(), &[])?);
    let back = Instant::now();
    echo_once(net.app())?;
    eprintln!(
        "proxy restarted: first echo through the same tunnel in {:?}",
        back.elapsed()
    );
    net.assert_no_panics()?;
    let log = net.stop_tunnel()?;
    ensure!(stat(&log, "flows_connected") >= 3, "{log}");
    Ok(())
}

#[test]
fn blackholed_target_fails_cleanly_after_the_timeout() -> Result<()> {
    needs_root!("blackholed_target_fails_cleanly_after_the_timeout");
    require_or_skip!(
        require_program("nft", "blackholed_target_fails_cleanly_after_the_timeout"),
        Ok(())
    );
    let mut net = Net::new("fhole", &["--connect-timeout", "2"], &[])?;
    echo_once(net.app())?;
    let fds_before = open_fds(net.tunnel_pid())?;
    // The target silently drops every SYN to the echo port (v4 and v6).
    net.topo.target().run(
        "nft",
        ["add table inet t2s_hole; \
             add chain inet t2s_hole input { type filter hook input priority 0; }; \
             add rule inet t2s_hole input tcp dport 7007 drop"],
    )?;
    const CONNECTS: usize = 20;
    let results = net.app().within(|| {
        let threads: Vec<_> = (0..CONNECTS)
            .map(|i| {
                std::thread::spawn(move || {
                    let dst = if i % 2 == 0 {
                        tcp_target(ECHO_PORT)
                    } else {
                        SocketAddr::new(TARGET_V6.into(), ECHO_PORT)
                    };
                    let started = Instant::now();
                    let r = TcpStream::connect_timeout(&dst, Duration::from_secs(15));
                    (r.map(|_| ()).map_err(|e| e.kind()), started.elapsed())
                })
            })
            .collect();
        Ok(threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect::<Vec<_>>())
    })?;
    let slowest = results.iter().map(|r| r.1).max().unwrap_or_default();
    let fastest = results.iter().map(|r| r.1).min().unwrap_or_default();
    eprintln!("blackholed target: {CONNECTS} connects failed in {fastest:?}..{slowest:?}");
    for (r, took) in &results {
        ensure!(
            *r == Err(io::ErrorKind::ConnectionRefused),
            "a connect to a blackholed target must be refused (RST), got {r:?} after {took:?}"
        );
        ensure!(
            *took >= Duration::from_millis(1500) && *took < Duration::from_secs(6),
            "refused after {took:?}; the proxy's connect timeout is 2 s"
        );
    }
    let (fds_after, settled) = fds_settle(net.tunnel_pid(), fds_before);
    eprintln!("tunnel fds {fds_before} before, {fds_after} after (settled in {settled:?})");
    ensure!(
        fds_after <= fds_before,
        "descriptors left behind: {fds_before} -> {fds_after}"
    );
    // Other destinations still work.
    net.topo
        .target()
        .run("nft", ["delete table inet t2s_hole"])?;
    echo_once(net.app())?;
    net.assert_no_panics()?;
    let log = net.stop_tunnel()?;
    ensure!(stat(&log, "flows_failed") >= CONNECTS as u64, "{log}");
    Ok(())
}

/// Samples the RSS (KiB) of `pids` every 200 ms while `work` runs; returns the
/// highest sample of each and `work`'s result.
fn peak_rss_during<T>(pids: &[u32], work: impl FnOnce() -> T) -> (Vec<u64>, T) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (stop, pids) = (stop.clone(), pids.to_vec());
        std::thread::spawn(move || {
            let mut peaks = vec![0u64; pids.len()];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (peak, pid) in peaks.iter_mut().zip(&pids) {
                    *peak = (*peak).max(vm_rss_kib(*pid).unwrap_or(0));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            peaks
        })
    };
    let out = work();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    (sampler.join().unwrap(), out)
}

#[test]
fn slow_readers_of_endless_downloads_keep_memory_bounded() -> Result<()> {
    needs_root!("slow_readers_of_endless_downloads_keep_memory_bounded");
    let net = Net::new("fslow", &[], &[])?;
    echo_once(net.app())?;
    let pids = [net.tunnel_pid(), net.server_pid()];
    let before: Vec<u64> = pids.iter().map(|p| vm_rss_kib(*p).unwrap()).collect();
    const READERS: usize = 4;
    let (peaks, read) = peak_rss_during(&pids, || {
        net.app().within(|| {
            let threads: Vec<_> = (0..READERS)
                .map(|_| {
                    std::thread::spawn(|| -> io::Result<u64> {
                        let mut s = TcpStream::connect_timeout(
                            &tcp_target(SOURCE_PORT),
                            Duration::from_secs(5),
                        )?;
                        s.set_read_timeout(Some(Duration::from_secs(5)))?;
                        // 16 KiB every 50 ms (320 KiB/s) for 6 s, against a source
                        // that writes as fast as it can.
                        let mut buf = vec![0u8; 16 * 1024];
                        let mut total = 0u64;
                        let started = Instant::now();
                        while started.elapsed() < Duration::from_secs(6) {
                            total += s.read(&mut buf)? as u64;
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        Ok(total)
                    })
                })
                .collect();
            let mut total = 0;
            for t in threads {
                total += t.join().unwrap()?;
            }
            Ok(total)
        })
    });
    let read = read?;
    let grew: Vec<u64> = peaks
        .iter()
        .zip(&before)
        .map(|(p, b)| p.saturating_sub(*b))
        .collect();
    eprintln!(
        "{READERS} slow readers, {} KiB read in 6 s: RSS tunnel {} -> peak {} KiB (+{}), \
         server {} -> peak {} KiB (+{})",
        read / 1024,
        before[0],
        peaks[0],
        grew[0],
        before[1],
        peaks[1],
        grew[1]
    );
    ensure!(
        read >= READERS as u64 * 1024 * 1024,
        "the readers got only {read} bytes"
    );
    // Per flow at most its two 512 KiB rings in the tunnel and the server's splice
    // pipe and copy buffer: 32 MiB is several times that for 4 flows, and far below
    // what an unbounded queue would hold after 6 s of an unthrottled source.
    ensure!(grew[0] < 32 * 1024, "tunnel RSS grew by {} KiB", grew[0]);
    ensure!(grew[1] < 32 * 1024, "server RSS grew by {} KiB", grew[1]);
    echo_once(net.app())?;
    net.assert_no_panics()?;
    Ok(())
}

#[test]
fn udp_flood_keeps_memory_bounded_and_service_going() -> Result<()> {
    needs_root!("udp_flood_keeps_memory_bounded_and_service_going");
    let net = Net::new("fflood", &[], &[])?;
    echo_once(net.app())?;
    let pids = [net.tunnel_pid(), net.server_pid()];
    let before: Vec<u64> = pids.iter().map(|p| vm_rss_kib(*p).unwrap()).collect();
    const RATE: u64 = 100_000;
    const SECS: u64 = 10;
    let (peaks, sent) = peak_rss_during(&pids, || {
        net.app().within(|| {
            // Paced: catch up to RATE × elapsed, then sleep 1 ms.
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            s.connect((TARGET_V4, UDP_SINK_PORT))?;
            let payload = [0x5au8; 200];
            let (mut sent, mut refused) = (0u64, 0u64);
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(SECS) {
                let due = (started.elapsed().as_micros() as u64) * RATE / 1_000_000;
                while sent + refused < due {
                    match s.send(&payload) {
                        Ok(_) => sent += 1,
                        Err(_) => refused += 1,
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok((sent, refused, started.elapsed()))
        })
    });
    let (sent, refused, took) = sent?;
    let grew: Vec<u64> = peaks
        .iter()
        .zip(&before)
        .map(|(p, b)| p.saturating_sub(*b))
        .collect();
    let sunk = net.udp.sink_received();
    eprintln!(
        "UDP flood: {sent} datagrams sent ({refused} refused by the app's kernel) in {took:?} \
         = {:.0}/s; {sunk} reached the target; RSS tunnel {} -> peak {} KiB (+{}), server {} -> \
         peak {} KiB (+{})",
        sent as f64 / took.as_secs_f64(),
        before[0],
        peaks[0],
        grew[0],
        before[1],
        peaks[1],
        grew[1]
    );
    ensure!(sunk > 0, "no datagram of the flood reached the target");
    // 1,000,000 datagrams of 200 bytes: held anywhere unbounded, that is 200+ MiB.
    ensure!(grew[0] < 48 * 1024, "tunnel RSS grew by {} KiB", grew[0]);
    ensure!(grew[1] < 48 * 1024, "server RSS grew by {} KiB", grew[1]);
    // Service continues: UDP (a fresh association) and TCP.
    let report = udp_echo_check(
        net.app(),
        SocketAddr::new(TARGET_V4.into(), UDP_ECHO_PORT),
        50,
        8..=512,
    )?;
    ensure!(report.all_ok(), "UDP echo after the flood: {report}");
    echo_once(net.app())?;
    net.assert_no_panics()?;
    Ok(())
}

/// Sends IP packets into the tunnel's TUN from `ns`: raw sockets with the header
/// included (`IPPROTO_RAW`), routed by the default route into the TUN. The IPv4
/// kernel fills in the header checksum and total length; everything else is ours.
/// Returns how many packets the kernel took.
fn inject(ns: &Namespace, packets: Vec<Vec<u8>>) -> Result<usize> {
    Ok(ns.within(move || {
        use socket2::{Domain, Protocol, Socket, Type};
        let v4 = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(255)))?;
        let v6 = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::from(255)))?;
        let mut taken = 0;
        for p in &packets {
            let sent = match p.first().map(|b| b >> 4) {
                Some(6) => v6.send_to(p, &SocketAddr::new(TARGET_V6.into(), 0).into()),
                _ => v4.send_to(p, &SocketAddr::new(TARGET_V4.into(), 0).into()),
            };
            if sent.is_ok() {
                taken += 1;
            }
        }
        Ok(taken)
    })?)
}

const APP_TUN_V4: [u8; 4] = [198, 18, 0, 1];
const APP_TUN_V6: Ipv6Addr = Ipv6Addr::new(0xfd18, 0, 0, 0, 0, 0, 0, 1);

fn udp_v4(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    etherparse::PacketBuilder::ipv4(APP_TUN_V4, TARGET_V4.octets(), 64)
        .udp(4242, UDP_SINK_PORT)
        .write(&mut out, payload)
        .unwrap();
    out
}

fn udp_v6(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    etherparse::PacketBuilder::ipv6(APP_TUN_V6.octets(), TARGET_V6.octets(), 64)
        .udp(4242, UDP_SINK_PORT)
        .write(&mut out, payload)
        .unwrap();
    out
}

/// An IPv4 header (20 bytes + `options`) over `payload`, protocol `proto`, with the
/// given flags/fragment-offset word; checksum and total length are the kernel's.
fn ipv4_raw(proto: u8, frag: u16, options: &[u8], payload: &[u8]) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0);
    let ihl = 5 + options.len() / 4;
    let total = (ihl * 4 + payload.len()) as u16;
    let mut p = vec![0x40 | ihl as u8, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0x12, 0x34]);
    p.extend_from_slice(&frag.to_be_bytes());
    p.extend_from_slice(&[64, proto, 0, 0]);
    p.extend_from_slice(&APP_TUN_V4);
    p.extend_from_slice(&TARGET_V4.octets());
    p.extend_from_slice(options);
    p.extend_from_slice(payload);
    p
}

/// An IPv6 header with `next` and a payload length of `len` over `payload`.
fn ipv6_raw(next: u8, len: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&[next, 64]);
    p.extend_from_slice(&APP_TUN_V6.octets());
    p.extend_from_slice(&TARGET_V6.octets());
    p.extend_from_slice(payload);
    p
}

/// The malformed and unusual packets, by the drop counter each must raise.
fn malformed_packets() -> Vec<(&'static str, Vec<u8>)> {
    let good_v4 = udp_v4(b"corrupt me");
    let good_v6 = udp_v6(b"corrupt me");
    let udp_part = good_v4[20..].to_vec();
    let mut bad_sum_v4 = good_v4.clone();
    *bad_sum_v4.last_mut().unwrap() ^= 0xff;
    let mut bad_sum_v6 = good_v6.clone();
    *bad_sum_v6.last_mut().unwrap() ^= 0xff;
    // UDP length field longer than the datagram.
    let mut long_udp = good_v4.clone();
    long_udp[24..26].copy_from_slice(&500u16.to_be_bytes());
    // TCP data offset 15 (60 bytes) in a 20-byte segment; and a 10-byte TCP header.
    let mut tcp = Vec::new();
    etherparse::PacketBuilder::ipv4(APP_TUN_V4, TARGET_V4.octets(), 64)
        .tcp(4243, ECHO_PORT, 1, 1000)
        .syn()
        .write(&mut tcp, &[])
        .unwrap();
    let tcp_part = tcp[20..].to_vec();
    let mut bad_offset = tcp_part.clone();
    bad_offset[12] = 0xf0;
    // IPv6 hop-by-hop options (PadN) before a UDP datagram with a bad checksum.
    let mut hbh = vec![17, 0, 1, 4, 0, 0, 0, 0];
    let mut bad_udp6 = good_v6[40..].to_vec();
    *bad_udp6.last_mut().unwrap() ^= 0xff;
    hbh.extend_from_slice(&bad_udp6);
    // IPv6 destination options, then an unknown next header (253, experimental).
    let dest_unknown = [253, 0, 1, 4, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
    // IPv6 fragment header (offset 0, more fragments) over part of a UDP datagram.
    let mut frag6 = vec![17, 0, 0, 1, 0, 0, 0x12, 0x34];
    frag6.extend_from_slice(&good_v6[40..48]);
    vec![
        ("bad-checksum", bad_sum_v4),
        ("bad-checksum", bad_sum_v6),
        ("bad-checksum", ipv6_raw(0, hbh.len() as u16, &hbh)),
        ("malformed", ipv4_raw(17, 0, &[], &udp_part[..4])),
        ("malformed", long_udp),
        ("malformed", ipv4_raw(6, 0, &[], &tcp_part[..10])),
        ("malformed", ipv4_raw(6, 0, &[], &bad_offset)),
        ("malformed", ipv6_raw(17, 200, &good_v6[40..])),
        ("malformed", ipv6_raw(17, 4, &good_v6[40..44])),
        ("fragment", ipv4_raw(17, 0x2000, &[], &udp_part)),
        ("fragment", ipv4_raw(17, 0x0010, &[], &udp_part[8..])),
        ("fragment", ipv6_raw(44, frag6.len() as u16, &frag6)),
        (
            "other-protocol",
            ipv6_raw(60, dest_unknown.len() as u16, &dest_unknown),
        ),
        ("other-protocol", ipv4_raw(253, 0, &[], b"experimental")),
        // IPv4 options (NOP x3, EOL) on an otherwise good datagram with a bad checksum.
        ("bad-checksum", {
            let mut udp = udp_part.clone();
            *udp.last_mut().unwrap() ^= 0xff;
            ipv4_raw(17, 0, &[1, 1, 1, 0], &udp)
        }),
    ]
}

#[test]
fn malformed_packets_are_dropped_counted_and_survived() -> Result<()> {
    needs_root!("malformed_packets_are_dropped_counted_and_survived");
    let mut net = Net::new("fjunk", &[], &[])?;
    echo_once(net.app())?;
    let packets = malformed_packets();
    let mut expected: std::collections::BTreeMap<&str, u64> = Default::default();
    for (reason, _) in &packets {
        *expected.entry(reason).or_default() += 1;
    }
    // Each one 20 times, interleaved, so that no single lucky packet passes for all.
    let mut all = Vec::new();
    for _ in 0..20 {
        all.extend(packets.iter().map(|(_, p)| p.clone()));
    }
    let total = all.len();
    let taken = inject(net.app(), all)?;
    ensure!(
        taken == total,
        "the kernel refused {} of {total} packets",
        total - taken
    );
    // Still serving after the junk: TCP through the tunnel.
    echo_once(net.app())?;
    // A good IPv4 datagram with options must not be mistaken for junk.
    let sunk_before = net.udp.sink_received();
    inject(
        net.app(),
        vec![ipv4_raw(
            17,
            0,
            &[1, 1, 1, 0],
            &udp_v4(b"with options")[20..],
        )],
    )?;
    let arrived = wait_until(Duration::from_secs(3), || {
        net.udp.sink_received() > sunk_before
    });
    net.assert_no_panics()?;
    let log = net.stop_tunnel()?;
    eprintln!(
        "{}",
        log.lines()
            .rev()
            .find(|l| l.contains("stopped stats="))
            .unwrap_or("")
    );
    let mut wrong = Vec::new();
    for (reason, n) in &expected {
        let got = stat(&log, reason);
        eprintln!("{reason}: {got} counted (at least {} sent)", n * 20);
        if got < n * 20 {
            wrong.push(format!("{reason}: {got} < {}", n * 20));
        }
    }
    if !wrong.is_empty() {
        bail!("drops not counted: {wrong:?}\n{log}");
    }
    ensure!(
        stat(&log, "udp_associations") >= 1 && arrived.is_some(),
        "a datagram with IPv4 options was not relayed:\n{log}"
    );
    let _: IpAddr = TARGET_V4.into();
    Ok(())
}
