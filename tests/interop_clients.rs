//! Independent SOCKS clients against our server on random loopback ports: curl for
//! SOCKS4, SOCKS4a, SOCKS5 (with and without remote names, with and without logins),
//! PySocks for SOCKS5 UDP ASSOCIATE and SOCKS4/5 CONNECT, ncat for socks4/socks5.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::process::Command;
use tun2socks::server::ServerConfig;
use tun2socks::socks::{Credentials, ServerPolicy, Users};

/// Runs curl through the proxy; returns (exit status code, body).
async fn curl(args: &[&str]) -> (i32, Vec<u8>) {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new("curl")
            .args(["-sS", "--max-time", "20", "--noproxy", ""])
            .args(args)
            .output(),
    )
    .await
    .expect("curl hung")
    .expect("curl did not start");
    if !out.status.success() {
        eprintln!("curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    (out.status.code().unwrap_or(-1), out.stdout)
}

fn logins() -> ServerConfig {
    ServerConfig {
        policy: ServerPolicy {
            users: Arc::new(Users::new(vec![
                Credentials::new("alice", "s3cret:with:colons").unwrap(),
            ])),
            ..ServerPolicy::default()
        },
        ..ServerConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_every_socks_variant() {
    if !require_program("curl") {
        return;
    }
    let server = TestServer::start(ServerConfig::default()).await;
    let body = pattern(3 * 1024 * 1024 + 7, 42);
    let web = http_server("127.0.0.1", body.clone()).await;
    let proxy = server.addr.to_string();
    for (flag, host) in [
        ("--socks4", "127.0.0.1"),
        ("--socks4a", "localhost"),
        ("--socks5", "127.0.0.1"),
        ("--socks5-hostname", "localhost"),
    ] {
        let url = format!("http://{host}:{}/file", web.port());
        let (code, got) = curl(&[flag, &proxy, &url]).await;
        assert_eq!(code, 0, "curl {flag}");
        assert!(
            got == body,
            "curl {flag}: body differs ({} bytes)",
            got.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_ipv6_destination_over_socks5() {
    if !require_program("curl") {
        return;
    }
    let server = TestServer::start(ServerConfig::default()).await;
    let body = pattern(100_000, 6);
    let web = http_server("::1", body.clone()).await;
    let url = format!("http://[::1]:{}/", web.port());
    let (code, got) = curl(&["--socks5", &server.addr.to_string(), &url]).await;
    assert_eq!(code, 0);
    assert!(got == body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_proxy_user_right_and_wrong_password() {
    if !require_program("curl") {
        return;
    }
    let server = TestServer::start(logins()).await;
    let body = pattern(10_000, 7);
    let web = http_server("127.0.0.1", body.clone()).await;
    let url = format!("http://127.0.0.1:{}/", web.port());
    let proxy = server.addr.to_string();

    let (code, got) = curl(&[
        "--socks5-hostname",
        &proxy,
        "--proxy-user",
        "alice:s3cret:with:colons",
        &url,
    ])
    .await;
    assert_eq!(code, 0);
    assert!(got == body);

    let (code, got) = curl(&["--socks5", &proxy, "--proxy-user", "alice:nope", &url]).await;
    assert_ne!(code, 0, "wrong password accepted");
    assert!(got.is_empty());

    // Without credentials curl offers no-auth only, which must be refused.
    let (code, _) = curl(&["--socks5", &proxy, &url]).await;
    assert_ne!(code, 0, "no-auth accepted although logins are required");

    // SOCKS4 cannot log in, so it is refused.
    let (code, _) = curl(&["--socks4", &proxy, &url]).await;
    assert_ne!(code, 0, "SOCKS4 accepted although logins are required");
}

/// Runs a Python snippet with Debian's python3 (which has PySocks).
async fn python(script: &str, args: &[String]) -> (bool, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(script)
            .args(args)
            .output(),
    )
    .await
    .expect("python hung")
    .expect("python did not start");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

const PYSOCKS_UDP: &str = r#"
import socket, socks, sys
proxy_host, proxy_port, dst_host, dst_port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
s = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
s.set_proxy(socks.SOCKS5, proxy_host, proxy_port)
s.settimeout(5)
for i in range(20):
    msg = ("datagram %d " % i).encode() * 50
    s.sendto(msg, (dst_host, dst_port))
    data, src = s.recvfrom(65535)
    assert data == msg, (i, len(data))
    assert src[1] == dst_port, src
print("ok", src)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pysocks_udp_associate() {
    if !require_pysocks() {
        return;
    }
    let server = TestServer::start(ServerConfig::default()).await;
    let echo = udp_echo("127.0.0.1").await;
    let args = vec![
        server.addr.ip().to_string(),
        server.addr.port().to_string(),
        echo.ip().to_string(),
        echo.port().to_string(),
    ];
    let (ok, out) = python(PYSOCKS_UDP, &args).await;
    assert!(ok, "PySocks UDP failed:\n{out}");
}

const PYSOCKS_TCP: &str = r#"
import socket, socks, sys
kind = {"4": socks.SOCKS4, "5": socks.SOCKS5}[sys.argv[1]]
proxy_host, proxy_port, dst_host, dst_port = sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
rdns = sys.argv[6] == "remote"
s = socks.socksocket()
s.set_proxy(kind, proxy_host, proxy_port, rdns=rdns)
s.settimeout(5)
s.connect((dst_host, dst_port))
s.sendall(b"pysocks says hi")
got = b""
while len(got) < 15:
    got += s.recv(100)
assert got == b"pysocks says hi", got
print("ok")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pysocks_connect_socks4_socks4a_socks5() {
    if !require_pysocks() {
        return;
    }
    let server = TestServer::start(ServerConfig::default()).await;
    let echo = tcp_echo("127.0.0.1").await;
    for (kind, host, rdns) in [
        ("4", "127.0.0.1", "local"),
        ("4", "localhost", "remote"), // SOCKS4a
        ("5", "127.0.0.1", "local"),
        ("5", "localhost", "remote"),
    ] {
        let args: Vec<String> = [
            kind,
            &server.addr.ip().to_string(),
            &server.addr.port().to_string(),
            host,
            &echo.port().to_string(),
            rdns,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (ok, out) = python(PYSOCKS_TCP, &args).await;
        assert!(ok, "PySocks socks{kind} {host} failed:\n{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ncat_socks4_and_socks5() {
    if !require_program("ncat") {
        return;
    }
    let server = TestServer::start(ServerConfig::default()).await;
    let echo = tcp_echo("127.0.0.1").await;
    for kind in ["socks4", "socks5"] {
        let out = tokio::time::timeout(
            Duration::from_secs(20),
            Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "printf 'ncat line\\n' | ncat --proxy {} --proxy-type {kind} -w 5 --idle-timeout 2 127.0.0.1 {}",
                    server.addr,
                    echo.port()
                ))
                .output(),
        )
        .await
        .expect("ncat hung")
        .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "ncat line\n",
            "ncat {kind}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
