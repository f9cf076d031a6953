//! TCP load generators for latency and connection-rate measurements: an echo server
//! for the target namespace, a request/response (rr) client that times round trips of
//! a small message on one connection, and a connection-rate client (W workers, each
//! connect + 1-byte echo + close, for T seconds).
//!
//! They use ordinary kernel sockets with `TCP_NODELAY`, so they measure the kernel path
//! and the tunnel alike: run the client in the app namespace (the `*_in` functions, or
//! [`Namespace::enter`]) and the server in the target. Every function also works in the
//! calling thread's own namespace (loopback tests need none).
//!
//! The server is here; the two clients and their reports are `client.rs`.
//!
//! Stage: none of the data path; used by benchmarks, examples and tests. Timeouts bound
//! every wait, so a broken path is an error, not a hang.

mod client;

use std::io;
use std::net::{Ipv6Addr, SocketAddr};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

use super::context;
use super::namespace::{Namespace, join};

pub use client::{
    ConnRateReport, RrReport, prepare_client, tcp_conn_rate, tcp_conn_rate_in, tcp_rr, tcp_rr_in,
};

/// The port [`EchoServer::start_in`] listens on in a namespace (on `[::]`, v4 and v6).
pub const LOAD_ECHO_PORT: u16 = 7011;
/// How long a client waits for a connection, or for one reply, before it fails.
pub const LOAD_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest message [`tcp_rr`] sends.
pub const MAX_RR_MESSAGE: usize = 64 * 1024;
/// Worker threads of the echo server's runtime (the machine has 2 cores).
const SERVER_THREADS: usize = 2;

/// A TCP echo server on its own runtime: every byte read goes back at once
/// (`TCP_NODELAY`), and a client's FIN is answered with one. Stopped on drop.
#[derive(Debug)]
pub struct EchoServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl EchoServer {
    /// Starts the server in the calling thread's namespace on `addr` (port 0 picks one;
    /// see [`EchoServer::local_addr`]).
    pub fn start(addr: SocketAddr) -> io::Result<EchoServer> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel();
        let thread = std::thread::spawn(move || serve(addr, ready_tx, stopped));
        Self::started(ready_rx, stop, thread)
    }

    /// Starts the server inside `ns` on `[::]:`[`LOAD_ECHO_PORT`] (IPv4 and IPv6).
    pub fn start_in(ns: &Namespace) -> io::Result<EchoServer> {
        let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, LOAD_ECHO_PORT));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel();
        let thread = ns.enter(move || serve(addr, ready_tx, stopped));
        Self::started(ready_rx, stop, thread)
    }

    /// The address the server is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    fn started(
        ready: std::sync::mpsc::Receiver<io::Result<SocketAddr>>,
        stop: oneshot::Sender<()>,
        thread: JoinHandle<io::Result<()>>,
    ) -> io::Result<EchoServer> {
        match ready.recv() {
            Ok(Ok(addr)) => Ok(EchoServer {
                addr,
                stop: Some(stop),
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => join(thread).and(Err(io::Error::other("echo server ended early"))),
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The server thread: binds, reports the address (or the error), serves until stopped.
fn serve(
    addr: SocketAddr,
    ready: std::sync::mpsc::Sender<io::Result<SocketAddr>>,
    stopped: oneshot::Receiver<()>,
) -> io::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(SERVER_THREADS)
        .enable_all()
        .build()
        .map_err(context("tokio runtime"));
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = ready.send(Err(io::Error::new(e.kind(), e.to_string())));
            return Err(e);
        }
    };
    runtime.block_on(async move {
        let listener = match bind_listener(addr) {
            Ok(listener) => listener,
            Err(e) => {
                let _ = ready.send(Err(io::Error::new(e.kind(), e.to_string())));
                return Err(e);
            }
        };
        let local = listener.local_addr()?;
        let _ = ready.send(Ok(local));
        tokio::select! {
            _ = stopped => {}
            () = accept_loop(listener) => {}
        }
        Ok(())
    })
}

/// A listener on `addr` with a deep backlog; `[::]` also takes IPv4.
fn bind_listener(addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket
        .bind(addr)
        .map_err(context(format!("echo server: bind {addr}")))?;
    socket.listen(4096)
}

async fn accept_loop(listener: tokio::net::TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(echo(stream));
            }
            // Out of descriptors or an aborted handshake: the next accept may work.
            Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}

async fn echo(mut stream: tokio::net::TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0u8; MAX_RR_MESSAGE];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => {
                let _ = stream.shutdown().await;
                return;
            }
            Ok(n) => {
                let Some(chunk) = buf.get(..n) else { return };
                if stream.write_all(chunk).await.is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}
