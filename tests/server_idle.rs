//! The reference server's CONNECT relay over time: `--idle-timeout` resets an idle
//! relay on both sides (before and after the switch to the splice path) and spares an
//! active one; `--tcp-keepalive` arms kernel keep-alive on both of its sockets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tun2socks::server::ServerConfig;
use tun2socks::server::relay::SPLICE_AFTER;

/// How one end of a relayed connection ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Eof,
    Reset,
    /// Still open when the test stopped waiting.
    Open,
}

/// Reads (and with `echo`, echoes) until the connection ends.
async fn drain(s: &mut TcpStream, echo: bool) -> End {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => return End::Eof,
            Ok(n) => {
                if echo && s.write_all(&buf[..n]).await.is_err() {
                    return End::Reset;
                }
            }
            Err(_) => return End::Reset,
        }
    }
}

/// An echo target that reports how each of its connections ended.
async fn target() -> (SocketAddr, mpsc::UnboundedReceiver<End>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(drain(&mut s, true).await);
            });
        }
    });
    (addr, rx)
}

/// A SOCKS5 CONNECT through `server` to `dst` (IPv4, no auth).
async fn connect(server: SocketAddr, dst: SocketAddr) -> TcpStream {
    let SocketAddr::V4(d) = dst else { panic!() };
    let mut s = TcpStream::connect(server).await.unwrap();
    s.write_all(&[5, 1, 0]).await.unwrap();
    assert_eq!(read_exact_timeout(&mut s, 2, 5).await, [5, 0]);
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&d.ip().octets());
    req.extend_from_slice(&d.port().to_be_bytes());
    s.write_all(&req).await.unwrap();
    let reply = read_exact_timeout(&mut s, 10, 5).await;
    assert_eq!(reply[1], 0, "{reply:?}");
    s
}

/// Moves `n` bytes each way through the echo (enough to switch both directions to
/// splice when `n` >= SPLICE_AFTER).
async fn bulk(s: &mut TcpStream, n: usize) {
    let (mut r, mut w) = s.split();
    let send = async {
        let chunk = vec![7u8; 32 * 1024];
        let mut left = n;
        while left > 0 {
            let k = left.min(chunk.len());
            w.write_all(&chunk[..k]).await.unwrap();
            left -= k;
        }
    };
    let recv = async {
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0;
        while got < n {
            got += r.read(&mut buf).await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(send, recv) })
        .await
        .expect("bulk transfer stalled");
}

async fn idle_relay_is_reset(bulk_first: usize) {
    let limit = Duration::from_millis(1500);
    let server = TestServer::start(ServerConfig {
        idle_timeout: Some(limit),
        ..ServerConfig::default()
    })
    .await;
    let (dst, mut target_ends) = target().await;
    let mut idle = connect(server.addr, dst).await;
    let mut busy = connect(server.addr, dst).await;
    bulk(&mut idle, bulk_first).await;
    bulk(&mut busy, bulk_first).await;
    let quiet_since = Instant::now();
    let idle_end = tokio::spawn(async move {
        let end = tokio::time::timeout(Duration::from_secs(10), drain(&mut idle, false)).await;
        (end.unwrap_or(End::Open), Instant::now())
    });
    // The busy relay talks every 300 ms for 3.5 s (over twice the limit).
    while quiet_since.elapsed() < Duration::from_millis(3500) {
        busy.write_all(b"ping").await.unwrap();
        assert_eq!(read_exact_timeout(&mut busy, 4, 2).await, b"ping");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (end, at) = idle_end.await.unwrap();
    let after = at - quiet_since;
    assert_eq!(end, End::Reset, "the idle client must see a reset");
    assert!(
        after >= limit - Duration::from_millis(100) && after < limit + Duration::from_secs(1),
        "idle relay reset after {after:?} (limit {limit:?})"
    );
    let target_end = tokio::time::timeout(Duration::from_secs(1), target_ends.recv())
        .await
        .expect("the target side stayed open")
        .unwrap();
    assert_eq!(target_end, End::Reset, "the target must see a reset");
    assert!(target_ends.try_recv().is_err(), "the busy relay ended");
}

#[tokio::test]
async fn idle_relay_is_reset_both_ways_and_an_active_one_is_not() {
    idle_relay_is_reset(1000).await;
}

#[tokio::test]
async fn idle_limit_holds_on_the_splice_path() {
    idle_relay_is_reset(SPLICE_AFTER as usize * 2).await;
}

#[tokio::test]
async fn no_idle_limit_keeps_a_quiet_relay() {
    let server = TestServer::start(ServerConfig {
        idle_timeout: None,
        ..ServerConfig::default()
    })
    .await;
    let (dst, mut target_ends) = target().await;
    let mut s = connect(server.addr, dst).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    s.write_all(b"still here").await.unwrap();
    assert_eq!(read_exact_timeout(&mut s, 10, 2).await, b"still here");
    assert!(target_ends.try_recv().is_err());
}

/// `ss -tnoH state established FILTER`: one line per socket, with its timer. A socket
/// with unacknowledged data shows its retransmit timer instead: ask until the line
/// has settled (up to 2 s) on something other than `timer:(on`.
async fn ss(filter: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let out = ss_once(filter);
        if !out.is_empty() && !out.contains("timer:(on") || Instant::now() > deadline {
            return out;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ss_once(filter: &str) -> String {
    let out = std::process::Command::new("ss")
        .args(["-tnoH", "state", "established", filter])
        .output()
        .expect("ss (iproute2) is required");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn keepalive_is_armed_on_both_relay_sockets() {
    if !require_program("ss") {
        return;
    }
    let server = TestServer::start(ServerConfig {
        keepalive: Some(Duration::from_secs(30)),
        ..ServerConfig::default()
    })
    .await;
    let (dst, _ends) = target().await;
    let _s = connect(server.addr, dst).await;
    // The server's accepted socket (local port = the server's) and its outbound one
    // (remote port = the target's).
    let client_side = ss(&format!("sport = :{}", server.addr.port())).await;
    let target_side = ss(&format!("dport = :{}", dst.port())).await;
    assert!(client_side.contains("keepalive"), "{client_side}");
    assert!(target_side.contains("keepalive"), "{target_side}");

    let off = TestServer::start(ServerConfig {
        keepalive: None,
        ..ServerConfig::default()
    })
    .await;
    let (dst, _ends) = target().await;
    let _t = connect(off.addr, dst).await;
    let client_side = ss(&format!("sport = :{}", off.addr.port())).await;
    let target_side = ss(&format!("dport = :{}", dst.port())).await;
    assert!(
        !client_side.is_empty() && !client_side.contains("keepalive"),
        "{client_side}"
    );
    assert!(
        !target_side.is_empty() && !target_side.contains("keepalive"),
        "{target_side}"
    );
}
