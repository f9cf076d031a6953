//! Test services for the target namespace, run in-process on a thread that entered
//! it: an HTTP server that answers every GET with a deterministic blob, an upload
//! sink that answers with the SHA-256 of everything it read (after the client's FIN),
//! and a TCP echo. All listen on `[::]` (IPv4 and IPv6) at fixed ports.
//!
//! Used by the namespace tests and by `tun2socks selftest`; never by the data path.

use std::io;
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::namespace::{Namespace, join};

/// Port of the HTTP blob server.
pub const HTTP_PORT: u16 = 8080;
/// Port of the SHA-256 upload sink.
pub const UPLOAD_PORT: u16 = 9000;
/// Port of the echo server.
pub const ECHO_PORT: u16 = 7007;
/// Port of the source: streams bytes until the client closes (download throughput).
pub const SOURCE_PORT: u16 = 9001;
/// Port of the discard sink: reads to EOF, then answers the byte count in decimal
/// (upload throughput).
pub const DISCARD_PORT: u16 = 9002;

/// Deterministic pseudo-random bytes: the blob the HTTP server serves, and what
/// upload tests send. The same `(len, seed)` always gives the same bytes.
pub fn blob(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `curl -sS --fail` of the blob at `http://HOST:8080/blob` from `ns` (with curl's
/// `family` flag, `-4` or `-6`, if given), within `max_time` seconds: the body's
/// SHA-256, or an error with curl's complaint.
pub fn curl_blob_sha256(
    ns: &Namespace,
    host: &str,
    family: Option<&str>,
    max_time: u32,
) -> io::Result<String> {
    let url = format!("http://{host}:{HTTP_PORT}/blob");
    let out = ns
        .command("curl")
        .args(family)
        .args(["-sS", "--fail", "--max-time", &max_time.to_string(), &url])
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "curl {url}: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(sha256_hex(&out.stdout))
}

/// Lower-case hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The client side of the upload sink: sends `data` to `dst`, half-closes, and
/// returns the SHA-256 (hex) that the target answered after the FIN.
pub async fn upload_sha256(dst: SocketAddr, data: &[u8]) -> io::Result<String> {
    let mut s = tokio::net::TcpStream::connect(dst).await?;
    s.write_all(data).await?;
    s.shutdown().await?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).await?;
    Ok(answer.trim().to_string())
}

/// The client side of the echo server, on a connected stream: sends `data` while
/// reading, half-closes, and returns everything that came back before the FIN.
pub async fn echo_round_trip(
    stream: &mut tokio::net::TcpStream,
    data: &[u8],
) -> io::Result<Vec<u8>> {
    let (mut r, mut w) = stream.split();
    let send = async {
        w.write_all(data).await?;
        w.shutdown().await
    };
    let mut back = Vec::new();
    let (sent, got) = tokio::join!(send, r.read_to_end(&mut back));
    sent?;
    got?;
    Ok(back)
}

/// The running services; stopped on drop.
#[derive(Debug)]
pub struct Services {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<io::Result<()>>>,
}

impl Services {
    /// Starts the services inside `ns`. The HTTP server serves `blob(blob_len, seed)`.
    pub fn start(ns: &Namespace, blob_len: usize, seed: u64) -> io::Result<Services> {
        let (stop, stopped) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<()>>();
        let thread = ns.enter_async(move || async move {
            let any = |port| SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
            let bound = async {
                Ok::<_, io::Error>((
                    TcpListener::bind(any(HTTP_PORT)).await?,
                    TcpListener::bind(any(UPLOAD_PORT)).await?,
                    TcpListener::bind(any(ECHO_PORT)).await?,
                    TcpListener::bind(any(SOURCE_PORT)).await?,
                    TcpListener::bind(any(DISCARD_PORT)).await?,
                ))
            }
            .await;
            let (http, upload, echo, source, discard) = match bound {
                Ok(listeners) => {
                    let _ = ready_tx.send(Ok(()));
                    listeners
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                    return Err(e);
                }
            };
            let body = Arc::new(blob(blob_len, seed));
            tokio::select! {
                _ = stopped => {}
                () = serve_http(http, body) => {}
                () = serve_upload(upload) => {}
                () = serve_echo(echo) => {}
                () = serve_source(source) => {}
                () = serve_discard(discard) => {}
            }
            Ok(())
        });
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Services {
                stop: Some(stop),
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => join(thread).and(Err(io::Error::other("services thread ended early"))),
        }
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve_http(listener: TcpListener, body: Arc<Vec<u8>>) {
    while let Ok((mut stream, _)) = listener.accept().await {
        let body = body.clone();
        tokio::spawn(async move {
            let mut request = Vec::new();
            let mut buf = [0u8; 2048];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(buf.get(..n).unwrap_or_default()),
                }
                if request.len() > 64 * 1024 {
                    return;
                }
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                body.len()
            );
            if stream.write_all(head.as_bytes()).await.is_ok()
                && stream.write_all(&body).await.is_ok()
            {
                let _ = stream.shutdown().await;
            }
        });
    }
}

async fn serve_upload(listener: TcpListener) {
    while let Ok((mut stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => hasher.update(buf.get(..n).unwrap_or_default()),
                    Err(_) => return,
                }
            }
            let answer = format!("{}\n", hex(&hasher.finalize()));
            let _ = stream.write_all(answer.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

async fn serve_echo(listener: TcpListener) {
    while let Ok((mut stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let (mut r, mut w) = stream.split();
            if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                let _ = w.shutdown().await;
            }
        });
    }
}

async fn serve_source(listener: TcpListener) {
    while let Ok((mut stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let chunk = blob(256 * 1024, 3);
            while stream.write_all(&chunk).await.is_ok() {}
        });
    }
}

async fn serve_discard(listener: TcpListener) {
    while let Ok((mut stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut buf = vec![0u8; 256 * 1024];
            let mut total: u64 = 0;
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => total = total.saturating_add(n as u64),
                    Err(_) => return,
                }
            }
            let _ = stream.write_all(format!("{total}\n").as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_is_deterministic_and_seeded() {
        assert_eq!(blob(1000, 1), blob(1000, 1));
        assert_ne!(blob(1000, 1), blob(1000, 2));
        assert_eq!(blob(13, 5).len(), 13);
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
