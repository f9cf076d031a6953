//! Flows whose far side goes quiet: a proxy that vanishes without a word is found by
//! keep-alive (`--tcp-keepalive`), and idle flows are reset by the tunnel
//! (`--tcp-idle-timeout`) or by the server (`--idle-timeout`). In each case the
//! application learns of it as a reset, within the limit plus a margin, and the
//! tunnel keeps no descriptor for the flow. And the device itself going away (deleted
//! under the tunnel) stops the tunnel with an error at once.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use tun2socks::testbed::attach::open_fds;
use tun2socks::testbed::services::ECHO_PORT;

use crate::support::*;

/// Opens an echo connection from the app, echoes once, then waits (up to 15 s) for
/// the connection to end; returns how it ended and when, counted from `quiet()`
/// (called once the echo came back).
fn hold_until_end(net: &Net, quiet: impl FnOnce() -> Result<()>) -> Result<(String, Duration)> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let holder = net.app().enter(move || {
        let mut s = TcpStream::connect_timeout(&tcp_target(ECHO_PORT), Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(15)))?;
        s.write_all(b"hello")?;
        let mut back = [0u8; 5];
        s.read_exact(&mut back)?;
        let _ = ready_tx.send(());
        let _ = go_rx.recv_timeout(Duration::from_secs(10));
        let started = Instant::now();
        let how = match s.read(&mut back) {
            Ok(0) => "eof".to_owned(),
            Ok(n) => format!("{n} unexpected bytes"),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => "nothing in 15 s".to_owned(),
            Err(e) => format!("{:?}", e.kind()),
        };
        Ok((how, started.elapsed()))
    });
    ready_rx.recv_timeout(Duration::from_secs(10))?;
    quiet()?;
    let _ = go_tx.send(());
    Ok(tun2socks::testbed::namespace::join(holder)?)
}

#[test]
fn a_silently_vanished_proxy_is_found_by_keepalive() -> Result<()> {
    needs_root!("a_silently_vanished_proxy_is_found_by_keepalive");
    tun2socks::require_or_skip!(
        tun2socks::testbed::require_program(
            "nft",
            "a_silently_vanished_proxy_is_found_by_keepalive"
        ),
        Ok(())
    );
    // Keep-alive after 1 s of silence, then 3 probes 1 s apart: about 4 s.
    let net = Net::new("fgone", &[], &["--tcp-keepalive", "1"])?;
    echo_once(net.app())?;
    let fds_before = open_fds(net.tunnel_pid())?;
    // The proxy's host drops everything on the SOCKS port, both ways: no FIN, no RST.
    let (how, after) = hold_until_end(&net, || {
        net.topo.proxy().run(
            "nft",
            ["add table inet t2s_gone; \
                 add chain inet t2s_gone input { type filter hook input priority 0; }; \
                 add chain inet t2s_gone output { type filter hook output priority 0; }; \
                 add rule inet t2s_gone input tcp dport 1080 drop; \
                 add rule inet t2s_gone output tcp sport 1080 drop"],
        )?;
        Ok(())
    })?;
    let (fds_after, _) = fds_settle(net.tunnel_pid(), fds_before);
    eprintln!(
        "proxy vanished: the application saw {how} after {after:?}; tunnel fds {fds_before} \
         -> {fds_after}"
    );
    ensure!(
        how == "ConnectionReset",
        "the application saw {how} after {after:?}"
    );
    ensure!(
        after >= Duration::from_secs(2) && after < Duration::from_secs(9),
        "found after {after:?} (keep-alive 1 s, 3 probes)"
    );
    ensure!(
        fds_after <= fds_before,
        "descriptors left: {fds_before} -> {fds_after}"
    );
    net.assert_no_panics()?;
    Ok(())
}

#[test]
fn idle_flows_are_reset_by_the_tunnel_and_by_the_server() -> Result<()> {
    needs_root!("idle_flows_are_reset_by_the_tunnel_and_by_the_server");
    for (side, server, tunnel) in [
        ("tunnel", &[][..], &["--tcp-idle-timeout", "2"][..]),
        (
            "server",
            &["--idle-timeout", "2"][..],
            &["--tcp-idle-timeout", "0"][..],
        ),
    ] {
        let net = Net::new(&format!("fidle{side}"), server, tunnel)?;
        let fds_before = open_fds(net.tunnel_pid())?;
        let (how, after) = hold_until_end(&net, || Ok(()))?;
        let (fds_after, _) = fds_settle(net.tunnel_pid(), fds_before);
        eprintln!(
            "idle limit 2 s in the {side}: the application saw {how} after {after:?}; \
             tunnel fds {fds_before} -> {fds_after}"
        );
        ensure!(
            how == "ConnectionReset",
            "{side}: the application saw {how}"
        );
        ensure!(
            after >= Duration::from_millis(1500) && after < Duration::from_secs(4),
            "{side}: reset after {after:?} (limit 2 s)"
        );
        ensure!(
            fds_after <= fds_before,
            "{side}: descriptors left: {fds_before} -> {fds_after}"
        );
        echo_once(net.app())?;
        net.assert_no_panics()?;
    }
    Ok(())
}

/// Deletes the tunnel's device under it; the tunnel must notice at once and stop with
/// an error naming the device (a service manager can then restart it), instead of
/// waiting forever on a descriptor the kernel detached.
fn expect_stop_on_deletion(net: &mut Net, delete: &[&str], what: &str) -> Result<()> {
    echo_once(net.app())?;
    let deleted = Instant::now();
    net.app().ip(delete.iter().copied())?;
    let tunnel = net.tunnel.as_mut().expect("the tunnel runs");
    let status = tunnel.wait_timeout(Duration::from_secs(5))?;
    let after = deleted.elapsed();
    let log = tunnel.log()?;
    eprintln!("{what}: the tunnel ended with {status:?} {after:?} after the deletion");
    let Some(status) = status else {
        anyhow::bail!("{what}: the tunnel still runs 5 s after its device was deleted:\n{log}");
    };
    ensure!(
        !status.success(),
        "{what}: exit status {status} after the device went:\n{log}"
    );
    ensure!(
        log.contains("the TUN device tun0 was deleted"),
        "{what}: no reason given:\n{log}"
    );
    ensure!(
        after < Duration::from_secs(2),
        "{what}: noticed after {after:?}"
    );
    ensure!(
        tun2socks::testbed::tunnel::panics_in(tunnel).is_empty(),
        "{what}: panicked:\n{log}"
    );
    Ok(())
}

#[test]
fn a_deleted_device_stops_the_tunnel_with_an_error() -> Result<()> {
    needs_root!("a_deleted_device_stops_the_tunnel_with_an_error");
    // The device the tunnel made.
    let mut net = Net::new("fdevdel", &[], &[])?;
    expect_stop_on_deletion(&mut net, &["link", "del", "tun0"], "own device")?;
    // A device made by hand, which the tunnel attached to.
    let mut net = Net::attached("fdevdelh", 1500)?;
    // (`ip tuntap del` refuses a device in use; `ip link del` is what removes it.)
    expect_stop_on_deletion(&mut net, &["link", "del", "tun0"], "hand-made device")?;
    Ok(())
}
