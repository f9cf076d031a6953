//! Our upstream client against Dante (`danted`), an independent SOCKS4/5 server started
//! by the test with a generated configuration on a random loopback port.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tun2socks::config::ProxyUrl;
use tun2socks::socks::{Address, ReplyCode};
use tun2socks::upstream::{DialOptions, Upstream, UpstreamError};

/// A running danted, killed (and its files removed) on drop.
struct Dante {
    addr: SocketAddr,
    dir: PathBuf,
    child: tokio::process::Child,
}

impl Drop for Dante {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Starts danted; `extra` rules go before the catch-all pass rules. None: skipped.
async fn dante(extra: &str) -> Option<Dante> {
    if !require_program("danted") {
        return None;
    }
    if !is_root() {
        assert!(!in_ci(), "danted tests need root (CI is set)");
        eprintln!("SKIP: danted needs root");
        return None;
    }
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = std::env::temp_dir().join(format!("t2s-dante-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = format!(
        "logoutput: {log}\n\
         internal: 127.0.0.1 port = {port}\n\
         external: 127.0.0.1\n\
         clientmethod: none\n\
         socksmethod: none\n\
         user.privileged: root\n\
         user.unprivileged: nobody\n\
         client pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 }}\n\
         {extra}\n\
         socks pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 command: connect udpassociate udpreply bind }}\n",
        log = dir.join("danted.log").display(),
    );
    std::fs::write(dir.join("danted.conf"), conf).unwrap();
    let child = tokio::process::Command::new("danted")
        .arg("-f")
        .arg(dir.join("danted.conf"))
        .arg("-p")
        .arg(dir.join("danted.pid"))
        .args(["-N", "1"])
        .kill_on_drop(true)
        .spawn()
        .expect("danted did not start");
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    for _ in 0..100 {
        if TcpStream::connect(addr).await.is_ok() {
            return Some(Dante { addr, dir, child });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = std::fs::read_to_string(dir.join("danted.log")).unwrap_or_default();
    panic!("danted did not listen on {addr}:\n{log}");
}

fn upstream(url: &str) -> Upstream {
    Upstream::new(url.parse::<ProxyUrl>().unwrap(), DialOptions::default())
}

async fn echo_through(up: &Upstream, echo: SocketAddr) {
    let connected = up.connect(Address::from(echo)).await.unwrap();
    assert!(connected.leftover.is_empty());
    let mut s = connected.stream;
    let data = pattern(200_000, 3);
    let (mut r, mut w) = s.split();
    let write = async {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut back = Vec::new();
    let read = r.read_to_end(&mut back);
    let ((), n) = tokio::join!(write, read);
    n.unwrap();
    assert!(back == data, "echo through danted differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_connect_through_dante() {
    let Some(d) = dante("").await else { return };
    let echo = tcp_echo("127.0.0.1").await;
    echo_through(&upstream(&format!("socks5://{}", d.addr)), echo).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks4_connect_through_dante() {
    let Some(d) = dante("").await else { return };
    let echo = tcp_echo("127.0.0.1").await;
    echo_through(&upstream(&format!("socks4://someone@{}", d.addr)), echo).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_associate_through_dante() {
    let Some(d) = dante("").await else { return };
    let echo = udp_echo("127.0.0.1").await;
    let assoc = upstream(&format!("socks5://{}", d.addr))
        .udp_associate()
        .await
        .unwrap();
    let mut buf = vec![0u8; 65536];
    for i in 0..10u64 {
        let payload = pattern(1000 + i as usize, i);
        assoc.send_to(&payload, &Address::from(echo)).await.unwrap();
        let (src, range) = tokio::time::timeout(Duration::from_secs(5), assoc.recv_from(&mut buf))
            .await
            .expect("no reply through danted")
            .unwrap();
        assert_eq!(src, Address::from(echo));
        assert_eq!(&buf[range], &payload[..]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dante_refusal_carries_its_reply_code() {
    let echo = tcp_echo("127.0.0.1").await;
    let rule = format!(
        "socks block {{ from: 0.0.0.0/0 to: 127.0.0.1/32 port = {} }}",
        echo.port()
    );
    let Some(d) = dante(&rule).await else { return };
    let err = upstream(&format!("socks5://{}", d.addr))
        .connect(Address::from(echo))
        .await
        .unwrap_err();
    assert_eq!(err.reply_code(), Some(ReplyCode::NOT_ALLOWED), "{err}");
    let err = upstream(&format!("socks4://{}", d.addr))
        .connect(Address::from(echo))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, UpstreamError::Protocol { source, .. } if source.to_string().contains("91")),
        "{err}"
    );
}
