//! Memory under a SYN storm (issue 8): 20,000 SYNs to random destinations while the
//! proxy is blackholed (its port drops every segment, so every CONNECT hangs). A
//! paused SYN has no buffers, so the tunnel's resident memory grows by less than
//! 32 MiB; and once the proxy is back, new connections work again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod memory;

use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tun2socks::require_or_skip;
use tun2socks::testbed::namespace::join;
use tun2socks::testbed::services::{ECHO_PORT, Services, echo_round_trip};
use tun2socks::testbed::topology::TARGET_V4;
use tun2socks::testbed::tunnel::{PROXY_PORT, panics_in, proxy_addr, start_server, start_tunnel};
use tun2socks::testbed::{Namespace, Topology, require_program, require_root};

const SYNS: usize = 20_000;
const GROWTH_LIMIT_MIB: f64 = 32.0;

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tun2socks"))
}

/// One echo through the tunnel, with a deadline.
fn echo(app: &Namespace) -> io::Result<()> {
    join(app.enter_async(|| async {
        let connect = TcpStream::connect((TARGET_V4, ECHO_PORT));
        let mut s = tokio::time::timeout(Duration::from_secs(5), connect)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect"))??;
        let back = tokio::time::timeout(
            Duration::from_secs(5),
            echo_round_trip(&mut s, b"after the storm"),
        )
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "echo"))??;
        if back != b"after the storm" {
            return Err(io::Error::other("echo corrupted"));
        }
        Ok(())
    }))
}

/// Retries [`echo`] until it works or `within` passes; returns how long it took.
fn echo_until_it_works(app: &Namespace, within: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < within {
        match echo(app) {
            Ok(()) => return Ok(started.elapsed()),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Err(last)
}

#[test]
fn a_syn_storm_against_a_blackholed_proxy_costs_little_memory_and_service_recovers() {
    let name = "a_syn_storm_against_a_blackholed_proxy_costs_little_memory_and_service_recovers";
    require_or_skip!(require_root(name));
    require_or_skip!(require_program("nft", name));
    let topo = Topology::create("mem").unwrap();
    let _services = Services::start(topo.target(), 1024, 8).unwrap();
    let server = start_server(topo.proxy(), &binary(), &[]).unwrap();
    let url = format!("socks5://{}", proxy_addr());
    let tunnel = start_tunnel(topo.app(), &binary(), &url, &[]).unwrap();
    echo_until_it_works(topo.app(), Duration::from_secs(10)).expect("no service before the storm");
    std::thread::sleep(Duration::from_millis(500));
    let before = memory::rss_mib(&tunnel);

    memory::blackhole(topo.proxy(), PROXY_PORT).unwrap();
    let sent = memory::syn_storm(topo.app(), SYNS, 0x5eed_1234_abcd_0001).unwrap();
    assert_eq!(sent, SYNS);
    let peak = memory::peak_rss_mib(&tunnel, Duration::from_secs(3));
    let growth = peak - before;
    eprintln!(
        "tunnel RSS: {before:.1} MiB before, {peak:.1} MiB peak after {SYNS} SYNs \
         (growth {growth:.1} MiB, {:.0} bytes per SYN)",
        growth * 1024.0 * 1024.0 / SYNS as f64
    );
    assert!(
        growth < GROWTH_LIMIT_MIB,
        "RSS grew by {growth:.1} MiB ({before:.1} -> {peak:.1}) under {SYNS} paused SYNs"
    );

    memory::lift_blackhole(topo.proxy()).unwrap();
    let took = echo_until_it_works(topo.app(), Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("no service 60 s after the proxy came back: {e}"));
    eprintln!("service back {took:.1?} after the proxy returned");
    for p in [&tunnel, &server] {
        let panics = panics_in(p);
        assert!(panics.is_empty(), "{}: {panics:?}", p.command_line());
    }
}
