//! SOCKS server benchmark: our reference server against Dante and microsocks, beside
//! a direct loopback connection, in the same run. Prints a table; asserts nothing.
//!
//! - bulk: one TCP stream through SOCKS5 CONNECT to a sink, for a fixed time;
//!   Gbit/s counted at the sink.
//! - conn/s: 32 concurrent workers, each repeating connect, SOCKS5 handshake, CONNECT
//!   to an echo server, 1-byte echo, close.
//!
//! Run: `cargo bench --bench socks_server` (needs danted and microsocks for their rows;
//! missing programs are reported and skipped). `BENCH_SECS` sets each measurement's
//! duration (default 3), `BENCH_ROUNDS` the rounds per cell (default 3, median kept).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tun2socks::testbed::bench::{env_or, median};

const CONCURRENCY: usize = 32;

struct Proxy {
    name: &'static str,
    addr: Option<SocketAddr>,
    child: Option<Child>,
    _dir: Option<std::path::PathBuf>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(dir) = &self._dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn wait_listening(addr: SocketAddr) -> bool {
    for _ in 0..100 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn spawn(name: &'static str, mut cmd: Command, addr: SocketAddr) -> Proxy {
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(wait_listening(addr), "{name} does not listen on {addr}");
    Proxy {
        name,
        addr: Some(addr),
        child: Some(child),
        _dir: None,
    }
}

fn ours() -> Proxy {
    let port = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tun2socks"));
    cmd.args([
        "server",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--log-level",
        "warn",
        "--max-connections",
        "8192",
    ]);
    spawn("tun2socks", cmd, ([127, 0, 0, 1], port).into())
}

fn dante() -> Option<Proxy> {
    if !have("danted") {
        println!("(danted not installed: its row is skipped)");
        return None;
    }
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("t2s-bench-dante-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("danted.conf"),
        format!(
            "logoutput: /dev/null\ninternal: 127.0.0.1 port = {port}\nexternal: 127.0.0.1\n\
             clientmethod: none\nsocksmethod: none\nuser.privileged: root\n\
             user.unprivileged: nobody\nclient pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 }}\n\
             socks pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 }}\n"
        ),
    )
    .unwrap();
    let mut cmd = Command::new("danted");
    cmd.arg("-f")
        .arg(dir.join("danted.conf"))
        .arg("-p")
        .arg(dir.join("danted.pid"));
    let mut p = spawn("dante", cmd, ([127, 0, 0, 1], port).into());
    p._dir = Some(dir);
    Some(p)
}

fn microsocks() -> Option<Proxy> {
    if !have("microsocks") {
        println!("(microsocks not installed: its row is skipped)");
        return None;
    }
    let port = free_port();
    let mut cmd = Command::new("microsocks");
    cmd.args(["-i", "127.0.0.1", "-p", &port.to_string()]);
    Some(spawn("microsocks", cmd, ([127, 0, 0, 1], port).into()))
}

/// Opens a stream to `target`, through `proxy` (SOCKS5, no auth) when given.
async fn open(proxy: Option<SocketAddr>, target: SocketAddr) -> std::io::Result<TcpStream> {
    let Some(proxy) = proxy else {
        let s = TcpStream::connect(target).await?;
        s.set_nodelay(true)?;
        return Ok(s);
    };
    let mut s = TcpStream::connect(proxy).await?;
    s.set_nodelay(true)?;
    let SocketAddr::V4(t) = target else {
        unreachable!()
    };
    let mut hello = vec![5, 1, 0, 5, 1, 0, 1];
    hello.extend_from_slice(&t.ip().octets());
    hello.extend_from_slice(&t.port().to_be_bytes());
    // Greeting and request pipelined would not be fair to servers that read the
    // greeting alone; send them one after the other.
    s.write_all(&hello[..3]).await?;
    let mut m = [0u8; 2];
    s.read_exact(&mut m).await?;
    s.write_all(&hello[3..]).await?;
    let mut r = [0u8; 10];
    s.read_exact(&mut r).await?;
    if r[1] != 0 {
        return Err(std::io::Error::other(format!("reply {}", r[1])));
    }
    Ok(s)
}

async fn sink() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let c = c.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    c.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
        }
    });
    (addr, count)
}

async fn echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut b = [0u8; 1];
                if let Ok(1) = s.read(&mut b).await {
                    let _ = s.write_all(&b).await;
                }
            });
        }
    });
    addr
}

/// Gbit/s of one stream for `secs`.
async fn bulk(proxy: Option<SocketAddr>, secs: f64) -> f64 {
    let (target, count) = sink().await;
    let mut s = open(proxy, target).await.unwrap();
    let buf = vec![0x5au8; 256 * 1024];
    // Warm up (window growth), then measure at the sink.
    let warm = Instant::now();
    while warm.elapsed() < Duration::from_millis(300) {
        s.write_all(&buf).await.unwrap();
    }
    let start_bytes = count.load(Ordering::Relaxed);
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs {
        s.write_all(&buf).await.unwrap();
    }
    let bytes = count.load(Ordering::Relaxed) - start_bytes;
    let elapsed = start.elapsed().as_secs_f64();
    drop(s);
    bytes as f64 * 8.0 / elapsed / 1e9
}

/// Connections per second with CONCURRENCY workers for `secs`.
async fn conn_rate(proxy: Option<SocketAddr>, secs: f64) -> (f64, u64) {
    let target = echo().await;
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    let start = Instant::now();
    for _ in 0..CONCURRENCY {
        let (done, failed, stop) = (done.clone(), failed.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let one = async {
                    let mut s = open(proxy, target).await?;
                    s.write_all(b"x").await?;
                    let mut b = [0u8; 1];
                    s.read_exact(&mut b).await?;
                    Ok::<_, std::io::Error>(())
                };
                match tokio::time::timeout(Duration::from_secs(5), one).await {
                    Ok(Ok(())) => done.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let n = done.load(Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    for w in workers {
        let _ = w.await;
    }
    (n as f64 / elapsed, failed.load(Ordering::Relaxed))
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let secs: f64 = env_or("BENCH_SECS", 3.0);
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut proxies = vec![
        Proxy {
            name: "direct",
            addr: None,
            child: None,
            _dir: None,
        },
        ours(),
    ];
    proxies.extend(dante());
    proxies.extend(microsocks());

    let mut rows = Vec::new();
    for p in &proxies {
        let mut gbps = Vec::new();
        let mut rate = Vec::new();
        let mut failures = 0;
        for _ in 0..rounds {
            gbps.push(rt.block_on(bulk(p.addr, secs)));
            let (r, f) = rt.block_on(conn_rate(p.addr, secs));
            rate.push(r);
            failures += f;
        }
        let row = (p.name, median(&gbps), median(&rate), failures);
        eprintln!("{:<12} {:>8.2} Gbit/s {:>9.0} conn/s", row.0, row.1, row.2);
        rows.push(row);
    }
    let (_, direct_gbps, direct_rate, _) = rows[0];
    println!();
    println!(
        "SOCKS server benchmark: loopback, {} CPUs, {secs} s per cell, median of {rounds}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "| {:<10} | {:>11} | {:>9} | {:>20} | {:>9} | {:>8} |",
        "server", "bulk Gbit/s", "vs direct", "conn/s (32 parallel)", "vs direct", "failures"
    );
    println!(
        "|{:-<12}|{:->13}|{:->11}|{:->22}|{:->11}|{:->10}|",
        "", "", "", "", "", ""
    );
    for (name, gbps, rate, failures) in rows {
        println!(
            "| {:<10} | {:>11.2} | {:>8.0}% | {:>20.0} | {:>8.0}% | {:>8} |",
            name,
            gbps,
            gbps / direct_gbps * 100.0,
            rate,
            rate / direct_rate * 100.0,
            failures
        );
    }
}
