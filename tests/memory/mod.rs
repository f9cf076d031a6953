//! Shared by `tests/memory_netns.rs` and `benches/memory.rs`: a SYN storm from raw
//! packets, a proxy blackhole, a connection-holding server in its own process, and
//! the tunnel's resident memory.
#![allow(dead_code)]

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use etherparse::PacketBuilder;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tun2socks::testbed::attach::vm_rss_kib;
use tun2socks::testbed::topology::APP_V4;
use tun2socks::testbed::{Namespace, Process};

/// Sends `count` TCP SYNs from `ns` to pseudo-random destinations in 10.0.0.0/8
/// (ports 1-65535, sources 198.19.1.1 with pseudo-random ports), as raw IPv4 packets:
/// no socket, no state in the sender. Returns the number sent.
pub fn syn_storm(ns: &Namespace, count: usize, seed: u64) -> io::Result<usize> {
    ns.within(move || {
        let raw = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(255)))?;
        let mut state = seed | 1;
        let mut next = move || {
            // xorshift64
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut sent = 0;
        let mut packet = Vec::with_capacity(64);
        for _ in 0..count {
            let r = next();
            let dst = Ipv4Addr::new(10, (r >> 8) as u8, (r >> 16) as u8, (r >> 24) as u8 | 1);
            let dport = ((r >> 32) as u16).max(1);
            let sport = ((r >> 48) as u16) | 0x8000;
            packet.clear();
            PacketBuilder::ipv4(APP_V4.octets(), dst.octets(), 64)
                .tcp(sport, dport, r as u32, 64240)
                .syn()
                .write(&mut packet, &[])
                .map_err(io::Error::other)?;
            let to = SockAddr::from(SocketAddrV4::new(dst, 0));
            loop {
                match raw.send_to(&packet, &to) {
                    Ok(_) => break,
                    // The TUN's queue is full: give the tunnel a moment.
                    Err(e)
                        if e.raw_os_error() == Some(105)
                            || e.kind() == io::ErrorKind::WouldBlock =>
                    {
                        std::thread::sleep(Duration::from_millis(1))
                    }
                    Err(e) => return Err(e),
                }
            }
            sent += 1;
        }
        Ok(sent)
    })
}

/// Drops every TCP segment to `port` arriving in `ns` (nftables table `blackhole`).
pub fn blackhole(ns: &Namespace, port: u16) -> io::Result<()> {
    nft(ns, &["add", "table", "inet", "blackhole"])?;
    nft(
        ns,
        &[
            "add",
            "chain",
            "inet",
            "blackhole",
            "input",
            "{",
            "type",
            "filter",
            "hook",
            "input",
            "priority",
            "-10",
            ";",
            "}",
        ],
    )?;
    let port = port.to_string();
    nft(
        ns,
        &[
            "add",
            "rule",
            "inet",
            "blackhole",
            "input",
            "tcp",
            "dport",
            &port,
            "drop",
        ],
    )
}

/// Removes [`blackhole`]'s table.
pub fn lift_blackhole(ns: &Namespace) -> io::Result<()> {
    nft(ns, &["delete", "table", "inet", "blackhole"])
}

fn nft(ns: &Namespace, args: &[&str]) -> io::Result<()> {
    let out = ns.run("nft", args)?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "nft {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// Starts, in `ns`, a server in its own process (python3) that accepts connections
/// on `addr` and holds them open without reading; its open-files limit is raised to
/// the hard limit. Returns once it listens.
pub fn start_holder(ns: &Namespace, addr: SocketAddr) -> io::Result<Process> {
    let script = format!(
        "import resource, socket\n\
         soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n\
         resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))\n\
         s = socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('{}', {}))\n\
         s.listen(4096)\n\
         held = []\n\
         while True:\n\
         \x20   c, _ = s.accept()\n\
         \x20   held.append(c)\n",
        addr.ip(),
        addr.port()
    );
    let mut cmd = ns.command("python3");
    cmd.args(["-c", &script]);
    let process = ns.spawn(cmd)?;
    tun2socks::testbed::wait::wait_for_tcp(ns, addr, Duration::from_secs(10))?;
    Ok(process)
}

/// Raises this process's soft open-files limit to the hard one; returns the new one.
pub fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024));
    let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft)
}

/// The process's resident memory in MiB.
pub fn rss_mib(process: &Process) -> f64 {
    vm_rss_kib(process.id()).map_or(f64::NAN, |kib| kib as f64 / 1024.0)
}

/// The highest resident memory seen while sampling every 50 ms for `window`.
pub fn peak_rss_mib(process: &Process, window: Duration) -> f64 {
    let end = Instant::now() + window;
    let mut peak = rss_mib(process);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
        peak = peak.max(rss_mib(process));
    }
    peak
}
