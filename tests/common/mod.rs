//! Helpers shared by the integration tests: our server on a random loopback port,
//! small target servers (TCP echo, HTTP, UDP echo), both sides of a SOCKS5 exchange in
//! hand-written bytes, and the rule for tests that need an external program (fail in
//! CI, skip with a message elsewhere).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod memdev;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tun2socks::server::{self, ServerConfig};

/// True when running in CI, where every prerequisite must be present.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some()
}

/// Is `program` on PATH (or an existing absolute path)? In CI a missing program is a
/// failure; elsewhere the test is skipped with a message.
pub fn require_program(program: &str) -> bool {
    let found = if program.starts_with('/') {
        Path::new(program).exists()
    } else {
        std::env::var_os("PATH")
            .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
            .unwrap_or(false)
    };
    if !found {
        assert!(
            !in_ci(),
            "{program} is required (CI is set); scripts/test.sh installs it"
        );
        eprintln!("SKIP: {program} is not installed (run scripts/test.sh to install it)");
    }
    found
}

/// True when `/usr/bin/python3 -c 'import socks'` works (Debian's python3-socks).
pub fn require_pysocks() -> bool {
    let ok = std::process::Command::new("/usr/bin/python3")
        .args(["-c", "import socks"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        assert!(!in_ci(), "python3-socks is required (CI is set)");
        eprintln!("SKIP: /usr/bin/python3 with PySocks (python3-socks) is not available");
    }
    ok
}

/// Our SOCKS server, running in this process until dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    pub task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    /// Starts a server with `config` on a random port of `ip` (127.0.0.1 or ::1).
    pub async fn start_on(ip: &str, config: ServerConfig) -> TestServer {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(vec![listener], config, async {
            let _ = stopped.await;
        }));
        TestServer {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn start(config: ServerConfig) -> TestServer {
        Self::start_on("127.0.0.1", config).await
    }

    /// Asks the server to stop and waits for `run` to return.
    pub async fn stop(mut self) -> std::io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take().unwrap().await.unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A TCP echo server on `ip`, port chosen by the kernel.
pub async fn tcp_echo(ip: &str) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A minimal HTTP/1.0 server that answers every request with `body`.
pub async fn http_server(ip: &str, body: Vec<u8>) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let body = std::sync::Arc::new(body);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let head = format!(
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(&body).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

/// A UDP echo server on `ip`.
pub async fn udp_echo(ip: &str) -> SocketAddr {
    let socket = UdpSocket::bind((ip, 0)).await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], from).await;
        }
    });
    addr
}

/// Reads exactly `n` bytes or panics with context after `secs` seconds.
pub async fn read_exact_timeout(stream: &mut TcpStream, n: usize, secs: u64) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(secs), stream.read_exact(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("timed out reading {n} bytes"))
        .unwrap_or_else(|e| panic!("reading {n} bytes: {e}"));
    buf
}

/// Waits for the peer to close: true on EOF or reset, false if data arrives or the
/// time runs out.
pub async fn closed_within(stream: &mut TcpStream, secs: u64) -> bool {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(secs), stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) | Err(_) => false,
    }
}

/// Deterministic pseudo-random bytes (no RNG dependency needed).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// SOCKS5 request bytes for an IPv4 destination.
pub fn v5_request(cmd: u8, addr: SocketAddr) -> Vec<u8> {
    let SocketAddr::V4(a) = addr else {
        panic!("{addr}")
    };
    let mut out = vec![5, cmd, 0, 1];
    out.extend_from_slice(&a.ip().octets());
    out.extend_from_slice(&a.port().to_be_bytes());
    out
}

/// Connects and completes the no-auth method negotiation.
pub async fn v5_session(server: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(server).await.unwrap();
    s.write_all(&[5, 1, 0]).await.unwrap();
    assert_eq!(read_exact_timeout(&mut s, 2, 5).await, [5, 0]);
    s
}

/// Reads a SOCKS5 reply with an IPv4 address: (REP, address).
pub async fn v5_reply_v4(s: &mut TcpStream) -> (u8, SocketAddr) {
    let r = read_exact_timeout(s, 10, 5).await;
    assert_eq!((r[0], r[2], r[3]), (5, 0, 1), "reply {r:02x?}");
    let ip = Ipv4Addr::new(r[4], r[5], r[6], r[7]);
    (
        r[1],
        SocketAddr::from((ip, u16::from_be_bytes([r[8], r[9]]))),
    )
}

/// The proxy side of a SOCKS5 CONNECT without authentication, IPv4 request: reads the
/// 3-byte greeting and the 10-byte request and answers both with success. For the
/// in-memory stack tests' small hand-made proxies.
pub async fn accept_socks5_connect(s: &mut TcpStream) -> std::io::Result<()> {
    let mut greeting = [0u8; 3];
    s.read_exact(&mut greeting).await?;
    s.write_all(&[5, 0]).await?;
    let mut request = [0u8; 10];
    s.read_exact(&mut request).await?;
    s.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0]).await
}
