//! What the fault tests share: the topology with our server and tunnel, the stats
//! line parser, a liveness echo, polling, descriptor and RSS measurements.
#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use tun2socks::testbed::attach::{create_tun, open_fds, start_tunnel_attached, vm_rss_kib};
use tun2socks::testbed::services::{ECHO_PORT, Services};
use tun2socks::testbed::tunnel::{
    TUN_NAME, panics_in, proxy_addr, start_server, start_tunnel, stop_cleanly,
};
use tun2socks::testbed::udp::UdpServices;
use tun2socks::testbed::{Namespace, Process, TARGET_V4, Topology};

pub const MIB: u64 = 1024 * 1024;

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tun2socks"))
}

/// Processes and services first, namespaces last (fields drop in order).
pub struct Net {
    pub tunnel: Option<Process>,
    pub server: Option<Process>,
    pub udp: UdpServices,
    _services: Services,
    pub topo: Topology,
}

impl Net {
    pub fn new(tag: &str, server_args: &[&str], tunnel_args: &[&str]) -> Result<Net> {
        Net::with(tag, server_args, |app, url| {
            Ok(start_tunnel(app, &binary(), url, tunnel_args)?)
        })
    }

    /// [`Net::new`] with the tunnel attached to a TUN device made by hand (`tun0`,
    /// MTU `mtu`) before it starts.
    pub fn attached(tag: &str, mtu: u32) -> Result<Net> {
        Net::with(tag, &[], |app, url| {
            create_tun(app, TUN_NAME, mtu)?;
            Ok(start_tunnel_attached(app, &binary(), url, TUN_NAME, &[])?)
        })
    }

    /// The topology, services and server; the tunnel from `tunnel(app, proxy URL)`.
    fn with(
        tag: &str,
        server_args: &[&str],
        tunnel: impl FnOnce(&Namespace, &str) -> Result<Process>,
    ) -> Result<Net> {
        let topo = Topology::create(tag)?;
        let services = Services::start(topo.target(), 1024, 1)?;
        let udp = UdpServices::start(topo.target())?;
        let server = start_server(topo.proxy(), &binary(), server_args)?;
        let url = format!("socks5://{}", proxy_addr());
        let tunnel = tunnel(topo.app(), &url)?;
        Ok(Net {
            tunnel: Some(tunnel),
            server: Some(server),
            udp,
            _services: services,
            topo,
        })
    }

    pub fn app(&self) -> &Namespace {
        self.topo.app()
    }

    pub fn tunnel_pid(&self) -> u32 {
        self.tunnel.as_ref().unwrap().id()
    }

    pub fn server_pid(&self) -> u32 {
        self.server.as_ref().unwrap().id()
    }

    /// Stops the tunnel with SIGTERM (exit 0, no panic) and returns its log.
    pub fn stop_tunnel(&mut self) -> Result<String> {
        Ok(stop_cleanly(self.tunnel.take().context("no tunnel")?)?)
    }

    pub fn assert_no_panics(&self) -> Result<()> {
        for p in self.tunnel.iter().chain(self.server.iter()) {
            let panics = panics_in(p);
            ensure!(panics.is_empty(), "{}: {panics:?}", p.command_line());
        }
        Ok(())
    }
}

/// A counter of the tunnel's final stats line (a field, or a drop reason).
pub fn stat(log: &str, name: &str) -> u64 {
    tun2socks::metrics::Snapshot::final_stat(log, name)
}

pub fn tcp_target(port: u16) -> SocketAddr {
    SocketAddr::new(TARGET_V4.into(), port)
}

/// One short echo through the tunnel (from `ns`), all within 5 s.
pub fn echo_once(ns: &Namespace) -> Result<()> {
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
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
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
pub fn fds_settle(pid: u32, baseline: usize) -> (usize, Option<Duration>) {
    let took = wait_until(Duration::from_secs(3), || {
        open_fds(pid).is_ok_and(|n| n <= baseline)
    });
    (open_fds(pid).unwrap_or(usize::MAX), took)
}

/// Samples the RSS (KiB) of `pids` every 200 ms while `work` runs; returns the
/// highest sample of each and `work`'s result.
pub fn peak_rss_during<T>(pids: &[u32], work: impl FnOnce() -> T) -> (Vec<u64>, T) {
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
