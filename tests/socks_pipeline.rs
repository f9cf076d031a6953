//! The pipelined SOCKS5 handshake (`Upstream::pipelined`) on real sockets: through our
//! server (with and without a login), through Dante, against a server that refuses the
//! method, and against one that answers a byte at a time; and `auto` mode's probe
//! (`Upstream::probe_pipelining`): it turns pipelining on for our server and Dante and
//! leaves it off for microsocks, which drops a pipelined request.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tun2socks::config::ProxyUrl;
use tun2socks::require_or_skip;
use tun2socks::server::{ServerConfig, run as run_server};
use tun2socks::socks::{Address, Credentials, Error as SocksError, ServerPolicy, Users};
use tun2socks::testbed::dante::Dante;
use tun2socks::testbed::load::{EchoServer, LOAD_ECHO_PORT};
use tun2socks::testbed::{TARGET_V4, Topology, require_program, require_root};
use tun2socks::upstream::{DialOptions, Pipelining, ProbeOutcome, Upstream, UpstreamError};

fn upstream(url: &str) -> Upstream {
    upstream_with(url, Pipelining::On, Duration::from_secs(5))
}

fn upstream_with(url: &str, mode: Pipelining, handshake_timeout: Duration) -> Upstream {
    let proxy: ProxyUrl = url.parse().unwrap();
    let options = DialOptions {
        connect_timeout: Duration::from_secs(5),
        handshake_timeout,
        ..DialOptions::default()
    };
    Upstream::new(proxy, options).pipelining(mode)
}

/// Waits (up to 10 s) for `auto` mode's background probe to turn pipelining on.
async fn until_pipelined(up: &Upstream) -> bool {
    for _ in 0..1000 {
        if up.is_pipelined() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Our server on a loopback port, until the returned sender is dropped.
async fn our_server(policy: ServerPolicy) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = ServerConfig {
        policy,
        ..ServerConfig::default()
    };
    tokio::spawn(run_server(vec![listener], config, async {
        let _ = stopped.await;
    }));
    (addr, stop)
}

/// CONNECT through `up` to the echo at `target`, then one echo of `hello`.
async fn echo_through(up: &Upstream, target: SocketAddr) -> Result<(), UpstreamError> {
    let mut connected = up.connect(Address::Ip(target)).await?;
    assert!(connected.leftover.is_empty());
    connected.stream.write_all(b"hello").await.unwrap();
    let mut back = [0u8; 5];
    connected.stream.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"hello");
    Ok(())
}

#[tokio::test]
async fn pipelined_connect_through_our_server() {
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let (proxy, _stop) = our_server(ServerPolicy::default()).await;
    let up = upstream(&format!("socks5://{proxy}"));
    assert!(up.is_pipelined());
    for _ in 0..20 {
        echo_through(&up, echo.local_addr()).await.unwrap();
    }
    // Credentials offered to a server without accounts: refused cleanly.
    let with_login = upstream(&format!("socks5://user:pass@{proxy}"));
    let err = with_login
        .connect(Address::Ip(echo.local_addr()))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            UpstreamError::Protocol {
                source: SocksError::NoAcceptableMethod { .. },
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn pipelined_login_through_our_server() {
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let users = Users::new(vec![Credentials::new("user", "pass").unwrap()]);
    let policy = ServerPolicy {
        users: Arc::new(users),
        ..ServerPolicy::default()
    };
    let (proxy, _stop) = our_server(policy).await;
    echo_through(
        &upstream(&format!("socks5://user:pass@{proxy}")),
        echo.local_addr(),
    )
    .await
    .unwrap();
    let err = upstream(&format!("socks5://user:nope@{proxy}"))
        .connect(Address::Ip(echo.local_addr()))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            UpstreamError::Protocol {
                source: SocksError::AuthRejected { .. },
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn a_server_that_refuses_the_method_gives_a_clean_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut greeting = [0u8; 3];
        s.read_exact(&mut greeting).await.unwrap();
        s.write_all(&[5, 0xff]).await.unwrap();
        // RFC 1928: the client must close now.
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        greeting
    });
    let err = upstream(&format!("socks5://{proxy}"))
        .connect(Address::Ip("192.0.2.1:80".parse().unwrap()))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            UpstreamError::Protocol {
                source: SocksError::NoAcceptableMethod { .. },
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(server.await.unwrap(), [5, 1, 0]);
}

#[tokio::test]
async fn a_server_that_answers_in_pieces() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        // Greeting and request came in one write: read them before answering anything.
        let mut first = [0u8; 3 + 10];
        s.read_exact(&mut first).await.unwrap();
        let answer = [
            &[5u8, 0][..],
            &[5, 0, 0, 1, 10, 0, 0, 1, 0x1f, 0x90],
            b"from-target",
        ]
        .concat();
        for byte in answer {
            s.write_all(&[byte]).await.unwrap();
            s.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        first
    });
    let mut connected = upstream(&format!("socks5://{proxy}"))
        .connect(Address::Ip("192.0.2.1:80".parse().unwrap()))
        .await
        .unwrap();
    assert_eq!(
        connected.bound,
        Address::Ip("10.0.0.1:8080".parse().unwrap())
    );
    let mut rest = connected.leftover.clone();
    let mut buf = [0u8; 64];
    while rest.len() < b"from-target".len() {
        let n = connected.stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed early");
        rest.extend_from_slice(&buf[..n]);
    }
    assert_eq!(rest, b"from-target");
    let first = server.await.unwrap();
    assert_eq!(first, [5, 1, 0, 5, 1, 0, 1, 192, 0, 2, 1, 0, 80]);
}

#[test]
fn pipelined_connect_through_dante() {
    require_or_skip!(require_root("pipelined_connect_through_dante"));
    require_or_skip!(require_program("danted", "pipelined_connect_through_dante"));
    let topology = Topology::create("pipe").unwrap();
    topology.route_app_via_proxy().unwrap();
    let _dante = Dante::start(topology.proxy()).unwrap();
    let _echo = EchoServer::start_in(topology.target()).unwrap();
    let target = SocketAddr::from((TARGET_V4, LOAD_ECHO_PORT));
    topology
        .app()
        .enter_async(move || async move {
            let up = upstream(&Dante::url());
            for _ in 0..5 {
                echo_through(&up, target)
                    .await
                    .map_err(std::io::Error::other)?;
            }
            // auto: the first connection goes unpipelined, then the probe finds
            // that Dante reads a pipelined handshake.
            let auto = upstream_with(&Dante::url(), Pipelining::Auto, Duration::from_secs(5));
            echo_through(&auto, target)
                .await
                .map_err(std::io::Error::other)?;
            assert!(
                until_pipelined(&auto).await,
                "the probe did not turn pipelining on"
            );
            for _ in 0..5 {
                echo_through(&auto, target)
                    .await
                    .map_err(std::io::Error::other)?;
            }
            Ok(())
        })
        .join()
        .unwrap()
        .unwrap();
}

/// Greeting and CONNECT request for `target` (IPv4) in one write, as raw bytes.
fn pipelined_connect_bytes(target: SocketAddr) -> Vec<u8> {
    let SocketAddr::V4(v4) = target else {
        panic!("IPv4 only")
    };
    let mut bytes = vec![5, 1, 0, 5, 1, 0, 1];
    bytes.extend_from_slice(&v4.ip().octets());
    bytes.extend_from_slice(&v4.port().to_be_bytes());
    bytes
}

#[tokio::test]
async fn our_server_answers_a_pipelined_request_in_one_write() {
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let (proxy, _stop) = our_server(ServerPolicy::default()).await;
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    s.write_all(&pipelined_connect_bytes(echo.local_addr()))
        .await
        .unwrap();
    // Method selection and reply arrive together: one segment, one read.
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).await.unwrap();
    assert_eq!(n, 2 + 10, "{:02x?}", &buf[..n]);
    assert_eq!(&buf[..4], &[5, 0, 5, 0]);
    s.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping");

    // A refused CONNECT: the method selection still comes first, then the failure.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let nobody = closed.local_addr().unwrap();
    drop(closed);
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    s.write_all(&pipelined_connect_bytes(nobody)).await.unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).await.unwrap();
    assert_eq!(all.len(), 2 + 10, "{all:02x?}");
    assert_eq!(
        &all[..4],
        &[5, 0, 5, 5],
        "method 00, then reply 05 (refused)"
    );
}

#[tokio::test]
async fn our_server_answers_the_greeting_at_once_without_pipelining() {
    let (proxy, _stop) = our_server(ServerPolicy::default()).await;
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    s.write_all(&[5, 1, 0]).await.unwrap();
    let mut selection = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut selection))
        .await
        .expect("the method selection must not wait for the request")
        .unwrap();
    assert_eq!(selection, [5, 0]);
}

#[tokio::test]
async fn auto_probes_after_the_first_connection_then_pipelines() {
    // A server that records how each connection's first bytes arrived: it answers
    // nothing until 100 ms of quiet have passed, so a pipelined client's greeting and
    // request come in together, and an unpipelined one's greeting comes alone.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let mut firsts = Vec::new();
        for _ in 0..3 {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut first = Vec::new();
            let mut buf = [0u8; 64];
            while let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await
            {
                if n == 0 {
                    break;
                }
                first.extend_from_slice(&buf[..n]);
            }
            // Method selection; then, when the request is here or comes, the reply.
            s.write_all(&[5, 0]).await.unwrap();
            if first.len() == 3 {
                let mut request = [0u8; 10];
                s.read_exact(&mut request).await.unwrap();
            }
            s.write_all(&[5, 0, 0, 1, 127, 0, 0, 1, 0x1f, 0x90])
                .await
                .unwrap();
            firsts.push(first);
            // Keep the connection open while the client uses it.
            tokio::spawn(async move {
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink).await;
            });
        }
        firsts
    });
    let up = upstream_with(
        &format!("socks5://{proxy}"),
        Pipelining::Auto,
        Duration::from_secs(5),
    );
    assert!(!up.is_pipelined());
    let target = Address::Ip("192.0.2.1:80".parse().unwrap());
    let _first = up.connect(target.clone()).await.unwrap();
    assert!(
        until_pipelined(&up).await,
        "the probe did not turn pipelining on"
    );
    let _third = up.connect(target).await.unwrap();
    let firsts = server.await.unwrap();
    assert_eq!(
        firsts[0],
        [5, 1, 0],
        "the first connection is not pipelined"
    );
    assert_eq!(
        firsts[1],
        [5, 1, 0, 5, 3, 0, 1, 0, 0, 0, 0, 0, 0],
        "the probe: greeting and UDP ASSOCIATE 0.0.0.0:0 in one write"
    );
    assert_eq!(
        firsts[2],
        [5, 1, 0, 5, 1, 0, 1, 192, 0, 2, 1, 0, 80],
        "after the probe: greeting and CONNECT in one write"
    );
}

#[tokio::test]
async fn auto_finds_our_server_pipelines_and_an_unreachable_proxy_leaves_it_open() {
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let (proxy, _stop) = our_server(ServerPolicy::default()).await;
    let up = upstream_with(
        &format!("socks5://{proxy}"),
        Pipelining::Auto,
        Duration::from_secs(5),
    );
    assert_eq!(up.probe_pipelining().await, ProbeOutcome::Supported);
    assert!(up.is_pipelined());
    echo_through(&up, echo.local_addr()).await.unwrap();

    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let nobody = closed.local_addr().unwrap();
    drop(closed);
    let down = upstream_with(
        &format!("socks5://{nobody}"),
        Pipelining::Auto,
        Duration::from_secs(5),
    );
    assert_eq!(down.probe_pipelining().await, ProbeOutcome::Unreachable);
    assert!(!down.is_pipelined());
}

/// microsocks on a loopback port, killed on drop.
struct Microsocks(std::process::Child, SocketAddr);

impl Microsocks {
    fn start() -> Microsocks {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("microsocks")
            .args(["-i", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // From here on, Drop kills and reaps it, also when the wait below fails.
        let socks = Microsocks(child, SocketAddr::from(([127, 0, 0, 1], port)));
        for _ in 0..200 {
            if std::net::TcpStream::connect(socks.1).is_ok() {
                return socks;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("microsocks did not listen on {}", socks.1);
    }
}

impl Drop for Microsocks {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn auto_leaves_pipelining_off_for_microsocks() {
    require_or_skip!(require_program(
        "microsocks",
        "auto_leaves_pipelining_off_for_microsocks"
    ));
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let socks = Microsocks::start();
    let url = format!("socks5://{}", socks.1);
    // Forced on, microsocks drops the request: the handshake times out. (This is
    // what `auto` must find out without a user's connection paying for it.)
    let forced = upstream_with(&url, Pipelining::On, Duration::from_secs(1));
    let err = forced
        .connect(Address::Ip(echo.local_addr()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, UpstreamError::HandshakeTimeout { .. }),
        "{err}"
    );
    let auto = upstream_with(&url, Pipelining::Auto, Duration::from_secs(1));
    echo_through(&auto, echo.local_addr()).await.unwrap();
    assert_eq!(auto.probe_pipelining().await, ProbeOutcome::Unsupported);
    for _ in 0..5 {
        echo_through(&auto, echo.local_addr()).await.unwrap();
    }
    assert!(!auto.is_pipelined());
}

#[tokio::test]
async fn auto_never_probes_a_socks4_proxy() {
    // A SOCKS4 server that grants every request and counts connections.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                // VN CD DSTPORT DSTIP USERID NUL.
                let mut request = Vec::new();
                let mut byte = [0u8; 1];
                while request.len() < 8 || request.last() != Some(&0) {
                    if s.read_exact(&mut byte).await.is_err() {
                        return;
                    }
                    request.push(byte[0]);
                }
                s.write_all(&[0, 90, 0, 80, 192, 0, 2, 1]).await.unwrap();
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink).await;
            });
        }
    });
    let up = upstream_with(
        &format!("socks4://{proxy}"),
        Pipelining::Auto,
        Duration::from_secs(5),
    );
    let _held = up
        .connect(Address::Ip("192.0.2.1:80".parse().unwrap()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "a probe connection was made to a SOCKS4 proxy"
    );
    assert!(!up.is_pipelined());
}
