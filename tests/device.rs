//! The TUN adapter against the real kernel. Each test runs in its own network
//! namespace (entered by one thread, which runs a current-thread tokio runtime);
//! traffic goes only between a socket in that namespace and the device.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap (STYLE.md)

#[path = "../platform/tests/netns/mod.rs"]
mod netns;

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use ipnet::IpNet;
use netns::{Netns, find, root_or_skip};
use tokio::net::UdpSocket;
use tokio::time::timeout;
use tun2socks::device::{DEFAULT_TXQUEUELEN, Device, DeviceConfig, DeviceError};
use tun2socks_platform::{LinkError, LinkOp, TunError};

const PATIENCE: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(300);

/// Runs the future made by `make` inside `ns` on a current-thread runtime.
fn block_on<F: Future>(ns: &Netns, make: impl FnOnce() -> F + Send) -> F::Output
where
    F::Output: Send,
{
    ns.run(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(make())
    })
}

fn config(name: &str, addresses: &[&str], mtu: u16, txqueuelen: Option<u32>) -> DeviceConfig {
    DeviceConfig {
        name: Some(name.to_owned()),
        addresses: Some(
            addresses
                .iter()
                .map(|a| a.parse::<IpNet>().unwrap())
                .collect(),
        ),
        mtu: Some(mtu),
        txqueuelen,
        offload: Default::default(),
    }
}

/// A UDP datagram as seen in a raw IP packet.
#[derive(Debug, PartialEq, Eq)]
struct Udp {
    src: SocketAddr,
    dst: SocketAddr,
    payload: Vec<u8>,
}

/// Parses a raw IPv4/IPv6 packet; `None` unless it is UDP.
fn parse_udp(packet: &[u8]) -> Option<Udp> {
    let sliced = SlicedPacket::from_ip(packet).ok()?;
    let (src, dst): (IpAddr, IpAddr) = match sliced.net? {
        NetSlice::Ipv4(ip) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        NetSlice::Ipv6(ip) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        _ => return None,
    };
    let TransportSlice::Udp(udp) = sliced.transport? else {
        return None;
    };
    Some(Udp {
        src: SocketAddr::new(src, udp.source_port()),
        dst: SocketAddr::new(dst, udp.destination_port()),
        payload: udp.payload().to_vec(),
    })
}

/// Builds a raw IP/UDP packet from `src` to `dst` (same family).
fn build_udp(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let builder = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 64),
        _ => panic!("mixed families"),
    };
    let mut packet = Vec::new();
    builder
        .udp(src.port(), dst.port())
        .write(&mut packet, payload)
        .unwrap();
    packet
}

/// Reads packets from the device until one is UDP to `dst`; other packets (IPv6
/// router solicitations, MLD reports) are skipped.
async fn recv_udp_to(device: &Device, dst: SocketAddr) -> Udp {
    let mut buf = vec![0u8; usize::from(device.mtu())];
    let wait = async {
        loop {
            match device.try_recv(&mut buf) {
                Ok(n) => match parse_udp(&buf[..n]) {
                    Some(udp) if udp.dst == dst => return udp,
                    _ => continue,
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    device.readable().await.unwrap();
                }
                Err(e) => panic!("try_recv: {e}"),
            }
        }
    };
    timeout(PATIENCE, wait)
        .await
        .unwrap_or_else(|_| panic!("no UDP packet to {dst} within {PATIENCE:?}"))
}

/// Writes a packet, waiting for writability if the device says so.
async fn send(device: &Device, packet: &[u8]) {
    loop {
        match device.try_send(packet) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                timeout(PATIENCE, device.writable())
                    .await
                    .expect("writable in time")
                    .unwrap();
            }
            Err(e) => panic!("try_send: {e}"),
        }
    }
}

#[test]
fn create_applies_addresses_mtu_txqueuelen_and_up() {
    if !root_or_skip("create_applies_addresses_mtu_txqueuelen_and_up") {
        return;
    }
    let ns = Netns::new("dev-create");
    block_on(&ns, || async {
        let cfg = config("t2sdev", &["10.9.0.1/24", "fd09::1/64"], 1400, Some(7777));
        let device = Device::open(&cfg).expect("open");
        assert!(device.created());
        assert_eq!((device.name(), device.mtu()), ("t2sdev", 1400));

        let link = ns.link("t2sdev");
        assert_eq!(link.ifindex, device.ifindex());
        assert_eq!(
            (link.mtu, link.qlen, link.up()),
            (1400, 7777, true),
            "{link:?}"
        );
        let addrs = ns.addresses("t2sdev");
        assert_eq!(find(&addrs, "10.9.0.1/24").expect("v4").family, "inet");
        assert!(
            find(&addrs, "fd09::1/64").expect("v6").usable(),
            "{addrs:?}"
        );
        drop(device);
        assert!(
            !ns.has_link("t2sdev"),
            "our device vanishes with the Device"
        );
    });
}

#[test]
fn defaults_are_the_documented_addresses_and_a_long_queue() {
    if !root_or_skip("defaults_are_the_documented_addresses_and_a_long_queue") {
        return;
    }
    let ns = Netns::new("dev-default");
    block_on(&ns, || async {
        let cfg = DeviceConfig {
            name: Some("t2sdefault".into()),
            ..DeviceConfig::new(1500)
        };
        let device = Device::open(&cfg).expect("open");
        assert_eq!(ns.link("t2sdefault").qlen, DEFAULT_TXQUEUELEN);
        assert_eq!(DEFAULT_TXQUEUELEN, 10_000);
        let addrs = ns.addresses("t2sdefault");
        assert!(find(&addrs, "198.18.0.1/16").is_some(), "{addrs:?}");
        assert!(find(&addrs, "fd18::1/64").is_some(), "{addrs:?}");
        drop(device);
    });
}

/// A datagram from a socket in the namespace, routed into the TUN, arrives as one
/// raw packet; and a crafted packet written to the device reaches a socket.
fn udp_round_trip(tag: &str, local: &str, remote: &str) {
    let ns = Netns::new(tag);
    let local: IpAddr = local.parse().unwrap();
    let remote: IpAddr = remote.parse().unwrap();
    block_on(&ns, || async {
        let cfg = config("t2sudp", &["10.9.0.1/24", "fd09::1/64"], 1500, None);
        let device = Device::open(&cfg).expect("open");

        // Namespace -> device.
        let socket = UdpSocket::bind(SocketAddr::new(local, 0)).await.unwrap();
        let to = SocketAddr::new(remote, 5555);
        socket.send_to(b"out through the tun", to).await.unwrap();
        let udp = recv_udp_to(&device, to).await;
        assert_eq!(udp.src, socket.local_addr().unwrap());
        assert_eq!(udp.payload, b"out through the tun");

        // Device -> namespace.
        let from = SocketAddr::new(remote, 4000);
        let packet = build_udp(from, socket.local_addr().unwrap(), b"in from the tun");
        send(&device, &packet).await;
        let mut buf = [0u8; 64];
        let (n, peer) = timeout(PATIENCE, socket.recv_from(&mut buf))
            .await
            .expect("datagram in time")
            .unwrap();
        assert_eq!((&buf[..n], peer), (&b"in from the tun"[..], from));
    });
}

#[test]
fn udp_v4_passes_both_ways() {
    if !root_or_skip("udp_v4_passes_both_ways") {
        return;
    }
    udp_round_trip("dev-udp4", "10.9.0.1", "10.9.0.2");
}

#[test]
fn udp_v6_passes_both_ways() {
    if !root_or_skip("udp_v6_passes_both_ways") {
        return;
    }
    udp_round_trip("dev-udp6", "fd09::1", "fd09::2");
}

#[test]
fn readiness_clears_on_wouldblock_and_wakes_on_traffic() {
    if !root_or_skip("readiness_clears_on_wouldblock_and_wakes_on_traffic") {
        return;
    }
    let ns = Netns::new("dev-ready");
    // No IPv6 on new devices: nothing but our datagrams will reach the device.
    ns.exec(&["sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1"]);
    block_on(&ns, || async {
        let cfg = config("t2sready", &["10.2.0.1/24"], 1500, None);
        let device = Device::open(&cfg).expect("open");
        let mut buf = vec![0u8; 1500];
        let err = device.try_recv(&mut buf).expect_err("empty");
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(
            timeout(QUIET, device.readable()).await.is_err(),
            "readable() must wait while the device is empty"
        );

        let socket = UdpSocket::bind("10.2.0.1:0").await.unwrap();
        for round in 0..3u8 {
            socket.send_to(&[round], "10.2.0.2:7").await.unwrap();
            if round == 2 {
                // The poll-style entry point, as a hand-written loop would use it.
                timeout(
                    PATIENCE,
                    std::future::poll_fn(|cx| device.poll_recv_ready(cx)),
                )
                .await
                .expect("woken by the datagram")
                .unwrap();
            } else {
                timeout(PATIENCE, device.readable())
                    .await
                    .expect("woken by the datagram")
                    .unwrap();
            }
            let n = device.try_recv(&mut buf).expect("a packet is there");
            assert_eq!(parse_udp(&buf[..n]).expect("udp").payload, [round]);
            let err = device.try_recv(&mut buf).expect_err("drained");
            assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
            assert!(
                timeout(QUIET, device.readable()).await.is_err(),
                "round {round}: WouldBlock must clear readiness, or a poll loop spins"
            );
        }
        timeout(
            PATIENCE,
            std::future::poll_fn(|cx| device.poll_send_ready(cx)),
        )
        .await
        .expect("a TUN device is writable")
        .unwrap();
    });
}

#[test]
fn kernel_errors_on_send_are_returned_and_the_device_keeps_working() {
    if !root_or_skip("kernel_errors_on_send_are_returned_and_the_device_keeps_working") {
        return;
    }
    let ns = Netns::new("dev-senderr");
    block_on(&ns, || async {
        let cfg = config("t2ssenderr", &["10.9.0.1/24"], 1500, None);
        let device = Device::open(&cfg).expect("open");
        // First nibble 0: neither IPv4 nor IPv6, the kernel answers EINVAL.
        let err = device.try_send(&[0u8; 28]).expect_err("garbage is refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");

        let socket = UdpSocket::bind("10.9.0.1:0").await.unwrap();
        let from: SocketAddr = "10.9.0.2:4000".parse().unwrap();
        send(
            &device,
            &build_udp(from, socket.local_addr().unwrap(), b"ok"),
        )
        .await;
        let mut buf = [0u8; 8];
        let (n, _) = timeout(PATIENCE, socket.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], b"ok");
    });
}

#[test]
fn attaching_restores_the_previous_settings_on_drop() {
    if !root_or_skip("attaching_restores_the_previous_settings_on_drop") {
        return;
    }
    let ns = Netns::new("dev-attach");
    ns.ip(&["tuntap", "add", "dev", "t2sattach", "mode", "tun"]);
    // Someone else's address, which we also ask for: it must survive us.
    ns.ip(&["addr", "add", "10.5.0.1/24", "dev", "t2sattach"]);
    let before = ns.link("t2sattach");
    assert!(!before.up());
    block_on(&ns, || async {
        let cfg = config(
            "t2sattach",
            &["10.5.0.1/24", "10.4.0.1/24", "fd04::1/64"],
            1300,
            Some(2000),
        );
        let device = Device::open(&cfg).expect("attach");
        assert!(!device.created());
        let during = ns.link("t2sattach");
        assert_eq!((during.mtu, during.qlen, during.up()), (1300, 2000, true));
        let addrs = ns.addresses("t2sattach");
        for cidr in ["10.5.0.1/24", "10.4.0.1/24", "fd04::1/64"] {
            assert!(find(&addrs, cidr).is_some(), "{cidr} missing: {addrs:?}");
        }
        drop(device);
    });
    assert!(ns.has_link("t2sattach"));
    let after = ns.link("t2sattach");
    assert_eq!(
        (after.mtu, after.qlen, after.up()),
        (before.mtu, before.qlen, false)
    );
    let addrs: Vec<String> = ns
        .addresses("t2sattach")
        .into_iter()
        .map(|a| a.cidr)
        .collect();
    assert_eq!(
        addrs,
        ["10.5.0.1/24"],
        "only the address that was there before"
    );
}

#[test]
fn attaching_without_settings_keeps_the_owners_mtu_and_addresses() {
    if !root_or_skip("attaching_without_settings_keeps_the_owners_mtu_and_addresses") {
        return;
    }
    let ns = Netns::new("dev-keep");
    ns.ip(&["tuntap", "add", "dev", "t2skeep", "mode", "tun"]);
    ns.ip(&["link", "set", "t2skeep", "mtu", "4000"]);
    ns.ip(&["addr", "add", "10.6.0.1/24", "dev", "t2skeep"]);
    block_on(&ns, || async {
        let cfg = DeviceConfig {
            name: Some("t2skeep".into()),
            addresses: None,
            mtu: None,
            txqueuelen: None,
            offload: Default::default(),
        };
        let device = Device::open(&cfg).expect("attach");
        assert!(!device.created());
        assert_eq!(device.mtu(), 4000, "the attached device's MTU is kept");
        // The kernel adds an fe80:: link-local address when the link comes up.
        let addrs: Vec<String> = ns
            .addresses("t2skeep")
            .into_iter()
            .map(|a| a.cidr)
            .filter(|c| !c.starts_with("fe80:"))
            .collect();
        assert_eq!(
            addrs,
            ["10.6.0.1/24"],
            "no default addresses on an attached device"
        );
        drop(device);
    });
}

#[test]
fn a_failed_configuration_is_rolled_back() {
    if !root_or_skip("a_failed_configuration_is_rolled_back") {
        return;
    }
    let ns = Netns::new("dev-rollback");
    ns.ip(&["tuntap", "add", "dev", "t2sroll", "mode", "tun"]);
    let before = ns.link("t2sroll");
    block_on(&ns, || async {
        // The IPv4 address goes on, then the IPv6 one fails: IPv6 needs MTU >= 1280.
        let cfg = config("t2sroll", &["10.3.0.1/24", "fd03::1/64"], 1000, Some(3000));
        match Device::open(&cfg) {
            Err(DeviceError::Configure { name, error }) => {
                assert_eq!(name, "t2sroll");
                let op = match &error {
                    LinkError::Refused { op, .. } => *op,
                    other => panic!("expected a kernel refusal, got {other:?}"),
                };
                assert_eq!(
                    op,
                    LinkOp::AddAddress("fd03::1/64".parse().unwrap()),
                    "{error}"
                );
            }
            other => panic!("expected Configure error, got {other:?}"),
        }
    });
    let after = ns.link("t2sroll");
    assert_eq!(
        (after.mtu, after.qlen, after.up()),
        (before.mtu, before.qlen, before.up())
    );
    assert!(
        ns.addresses("t2sroll").is_empty(),
        "the IPv4 address was removed again"
    );
}

#[test]
fn open_errors_are_typed() {
    if !root_or_skip("open_errors_are_typed") {
        return;
    }
    let ns = Netns::new("dev-errors");
    block_on(&ns, || async {
        let long = config("a-name-that-is-too-long", &[], 1500, None);
        assert!(matches!(
            Device::open(&long),
            Err(DeviceError::Open(TunError::NameTooLong { .. }))
        ));

        let cfg = config("t2sheld", &["10.9.0.1/24"], 1500, None);
        let _held = Device::open(&cfg).expect("open");
        match Device::open(&cfg) {
            Err(DeviceError::Open(TunError::Busy { name })) => assert_eq!(name, "t2sheld"),
            other => panic!("expected Busy, got {other:?}"),
        }
    });
}

#[test]
fn open_outside_a_runtime_is_an_error_not_a_panic() {
    // No root needed: the runtime is checked before anything is opened.
    let cfg = config("t2snort", &[], 1500, None);
    assert!(matches!(Device::open(&cfg), Err(DeviceError::NoRuntime(_))));
}
