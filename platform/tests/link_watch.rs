//! `LinkWatch` against the real kernel: the removal of the watched interface is
//! reported (deleted, or moved to another namespace), other links' changes are not,
//! and the descriptor is readable only when links change.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap (STYLE.md)

mod netns;

use std::time::Duration;

use netns::{Netns, root_or_skip};
use tun2socks_platform::{LinkWatch, open_tun};

const PATIENCE: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(200);

/// Waits until the watch is readable (or `wait` passes), then asks it.
async fn gone_after(
    watch: &mut tokio::io::unix::AsyncFd<LinkWatch>,
    wait: Duration,
) -> Option<bool> {
    let mut guard = tokio::time::timeout(wait, watch.readable_mut())
        .await
        .ok()?
        .expect("readable");
    let gone = guard.get_inner_mut().gone().expect("gone");
    guard.clear_ready();
    Some(gone)
}

/// Makes TUN device `dev` in `ns`, attaches to it and opens a watch for it there.
fn watched(ns: &Netns, dev: &str) -> (tun2socks_platform::Tun, LinkWatch) {
    ns.ip(&["tuntap", "add", "dev", dev, "mode", "tun"]);
    ns.run(|| {
        let tun = open_tun(Some(dev)).expect("attach");
        let watch = LinkWatch::new(tun.ifindex()).expect("watch");
        (tun, watch)
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn deleting_the_device_is_reported_and_other_links_are_not() {
    if !root_or_skip("deleting_the_device_is_reported_and_other_links_are_not") {
        return;
    }
    let ns = Netns::new("linkwatch-del");
    ns.ip(&["tuntap", "add", "dev", "t2sother", "mode", "tun"]);
    let (tun, watch) = watched(&ns, "t2swatch");
    let rt = runtime();
    rt.block_on(async {
        let mut watch = watch.into_async_fd().expect("register");
        // Nothing changed: the watch stays quiet.
        assert_eq!(gone_after(&mut watch, QUIET).await, None);

        // Another link changes and goes: reported as a change, not as our removal.
        ns.ip(&["link", "set", "t2sother", "up"]);
        ns.ip(&["link", "del", "t2sother"]);
        assert_eq!(gone_after(&mut watch, PATIENCE).await, Some(false));
        // Our link going down and up is not a removal either.
        ns.ip(&["link", "set", "t2swatch", "up"]);
        ns.ip(&["link", "set", "t2swatch", "down"]);
        assert_eq!(gone_after(&mut watch, PATIENCE).await, Some(false));

        ns.ip(&["link", "del", "t2swatch"]);
        assert_eq!(gone_after(&mut watch, PATIENCE).await, Some(true));
    });
    drop(tun);
}

#[test]
fn moving_the_device_to_another_namespace_is_reported() {
    if !root_or_skip("moving_the_device_to_another_namespace_is_reported") {
        return;
    }
    let ns = Netns::new("linkwatch-move");
    let elsewhere = Netns::new("linkwatch-dest");
    let (tun, watch) = watched(&ns, "t2smove");
    let rt = runtime();
    rt.block_on(async {
        let mut watch = watch.into_async_fd().expect("register");
        ns.ip(&["link", "set", "t2smove", "netns", elsewhere.name()]);
        assert_eq!(gone_after(&mut watch, PATIENCE).await, Some(true));
    });
    assert!(elsewhere.has_link("t2smove"));
    drop(tun);
}
