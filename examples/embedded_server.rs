//! The reference SOCKS server embedded in another program: serve on a port of your
//! choosing with a login, until Ctrl-C.
//!
//! ```sh
//! cargo run --example embedded_server -- 127.0.0.1:1080 alice:secret
//! ```

use std::sync::Arc;

use anyhow::Context;
use tun2socks::server::{self, ServerConfig};
use tun2socks::socks::{Credentials, ServerPolicy, Users};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:1080".into());
    let mut users = Vec::new();
    if let Some(account) = args.next() {
        let (name, pass) = account.split_once(':').context("login as NAME:PASS")?;
        users.push(Credentials::new(name, pass)?);
    }
    let config = ServerConfig {
        policy: ServerPolicy {
            users: Arc::new(Users::new(users)),
            ..ServerPolicy::default()
        },
        ..ServerConfig::default()
    };
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    eprintln!("SOCKS4/4a/5 on {}", listener.local_addr()?);
    server::run(vec![listener], config, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
