//! The tunnel embedded in another program: open a TUN device, run the stack until
//! Ctrl-C, print what it did. Needs CAP_NET_ADMIN; route traffic into the device
//! yourself (`ip route add 10.99.0.0/16 dev t2sdemo`, say).
//!
//! ```sh
//! sudo cargo run --example embedded_tunnel -- socks5://127.0.0.1:1080 t2sdemo
//! ```

use anyhow::Context;
use tun2socks::config::ProxyUrl;
use tun2socks::device::{Device, DeviceConfig};
use tun2socks::stack::{self, StackConfig};
use tun2socks::upstream::{DialOptions, Upstream};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let proxy: ProxyUrl = args
        .next()
        .context("usage: embedded_tunnel PROXY_URL [DEVICE]")?
        .parse()?;
    let device = Device::open(&DeviceConfig {
        name: Some(args.next().unwrap_or_else(|| "t2sdemo".into())),
        addresses: None, // 198.18.0.1/16 and fd18::1/64 on a device we create
        mtu: None,       // 9000 on a device we create
        txqueuelen: None,
        offload: Default::default(), // auto: checksum and segmentation offload
    })?;
    eprintln!("{} is up; relaying its TCP through {proxy}", device.name());
    let upstream = Upstream::new(proxy, DialOptions::default());
    let stats = stack::run(device, StackConfig::default(), upstream, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    eprintln!("{stats:#?}");
    Ok(())
}
