//! A SOCKS client in a few lines: fetch an HTTP page through a proxy.
//!
//! ```sh
//! cargo run --example socks_client -- socks5://127.0.0.1:1080 example.com:80
//! ```

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tun2socks::config::ProxyUrl;
use tun2socks::socks::Address;
use tun2socks::upstream::{DialOptions, Upstream};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let proxy: ProxyUrl = args
        .next()
        .context("usage: socks_client PROXY_URL HOST:PORT")?
        .parse()?;
    let target = args
        .next()
        .context("usage: socks_client PROXY_URL HOST:PORT")?;
    let (host, port) = target.rsplit_once(':').context("HOST:PORT")?;
    let port: u16 = port.parse()?;
    let address = match host.trim_matches(['[', ']']).parse() {
        Ok(ip) => Address::Ip(std::net::SocketAddr::new(ip, port)),
        Err(_) => Address::domain(host, port)?,
    };

    let upstream = Upstream::new(proxy, DialOptions::default());
    let connected = upstream.connect(address).await?;
    eprintln!(
        "connected; the proxy's outbound socket is {}",
        connected.bound
    );
    let mut stream = connected.stream;
    let request = format!("GET / HTTP/1.0\r\nHost: {host}\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = connected.leftover;
    stream.read_to_end(&mut response).await?;
    println!("{}", String::from_utf8_lossy(&response));
    Ok(())
}
