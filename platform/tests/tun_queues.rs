//! Multi-queue TUN devices against the real kernel, each test in its own network
//! namespace: queues of a device we create and of a hand-made one, the fallback to
//! one queue, and "busy" for a multi-queue device another process holds.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap (STYLE.md)

mod netns;

use std::io;
use std::net::UdpSocket;
use std::os::fd::AsFd;

use netns::{Netns, root_or_skip};
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use tun2socks_platform::{Tun, TunError, TunOptions, open_tun, open_tun_with};

const MULTI: TunOptions = TunOptions {
    multi_queue: true,
    vnet_hdr: false,
};

/// Packets waiting in `tun`'s queue, read until `WouldBlock`.
fn drain(tun: &Tun) -> usize {
    let mut buf = [0u8; 2048];
    let mut n = 0;
    loop {
        match tun.recv(&mut buf) {
            Ok(_) => n += 1,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return n,
            Err(e) => panic!("recv: {e}"),
        }
    }
}

/// Gives `dev` an address, brings it up, and sends one UDP datagram from each of
/// `flows` source ports to the far end (the packets enter the TUN).
fn send_flows(ns: &Netns, dev: &str, flows: usize) {
    ns.ip(&["addr", "add", "10.77.0.1/24", "dev", dev]);
    ns.ip(&["link", "set", dev, "up"]);
    ns.run(|| {
        for _ in 0..flows {
            let socket = UdpSocket::bind("10.77.0.1:0").unwrap();
            socket.send_to(b"hello", "10.77.0.2:9").unwrap();
        }
    });
}

#[test]
fn a_created_device_gets_queues_and_the_kernel_spreads_flows_over_them() {
    if !root_or_skip("a_created_device_gets_queues_and_the_kernel_spreads_flows_over_them") {
        return;
    }
    let ns = Netns::new("tun-mq");
    let name = "t2smq0";
    let (first, second) = ns.run(|| {
        let first = open_tun_with(Some(name), &MULTI).expect("create");
        assert!(first.created() && first.multi_queue());
        let second = first.open_queue().expect("second queue");
        assert_eq!(
            (second.name(), second.ifindex()),
            (first.name(), first.ifindex())
        );
        assert!(second.multi_queue());
        let flags = OFlag::from_bits_truncate(fcntl(second.as_fd(), FcntlArg::F_GETFL).unwrap());
        assert!(flags.contains(OFlag::O_NONBLOCK), "{flags:?}");
        (first, second)
    });
    let details = ns.ip(&["-d", "link", "show", "dev", name]);
    assert!(details.contains("multi_queue"), "{details}");
    send_flows(&ns, name, 64);
    let (a, b) = (drain(&first), drain(&second));
    // 64 flows hashed over two queues: all on one has a chance of 2^-63.
    assert!(a > 0 && b > 0, "queue 1: {a} packets, queue 2: {b}");
    assert!(a + b >= 64, "{a} + {b}");
    drop((first, second));
    assert!(
        ns.link_gone(name),
        "the device vanishes with its last queue"
    );
}

#[test]
fn attaches_to_a_hand_made_multi_queue_device_with_or_without_asking() {
    if !root_or_skip("attaches_to_a_hand_made_multi_queue_device_with_or_without_asking") {
        return;
    }
    let ns = Netns::new("tun-mqattach");
    ns.ip(&[
        "tuntap",
        "add",
        "dev",
        "t2smqp",
        "mode",
        "tun",
        "multi_queue",
    ]);
    ns.run(|| {
        let tun = open_tun_with(Some("t2smqp"), &MULTI).expect("attach");
        assert!(!tun.created() && tun.multi_queue());
        let more: Vec<Tun> = (0..3).map(|_| tun.open_queue().expect("queue")).collect();
        assert!(more.iter().all(|q| !q.created()));
        drop((tun, more));
        // One queue asked for: the kernel insists on the flag, so it is given.
        let single = open_tun(Some("t2smqp")).expect("attach without asking");
        assert!(single.multi_queue());
    });
    assert!(
        ns.has_link("t2smqp"),
        "a persistent device outlives our fds"
    );
}

#[test]
fn a_single_queue_hand_made_device_falls_back_to_one_queue() {
    if !root_or_skip("a_single_queue_hand_made_device_falls_back_to_one_queue") {
        return;
    }
    let ns = Netns::new("tun-sq");
    ns.ip(&["tuntap", "add", "dev", "t2ssq", "mode", "tun"]);
    ns.run(|| {
        let tun = open_tun_with(Some("t2ssq"), &MULTI).expect("attach");
        assert!(!tun.created());
        assert!(!tun.multi_queue(), "the device has one queue");
        match tun.open_queue() {
            Err(TunError::Io { error, .. }) => {
                assert_eq!(error.raw_os_error(), Some(libc::EINVAL));
            }
            other => panic!("expected EINVAL, got {other:?}"),
        }
    });
}

#[test]
fn a_multi_queue_device_held_by_another_descriptor_is_busy() {
    if !root_or_skip("a_multi_queue_device_held_by_another_descriptor_is_busy") {
        return;
    }
    let ns = Netns::new("tun-mqbusy");
    ns.run(|| {
        let _first = open_tun_with(Some("t2smqbusy"), &MULTI).expect("create");
        for options in [MULTI, TunOptions::default()] {
            match open_tun_with(Some("t2smqbusy"), &options) {
                Err(TunError::Busy { name }) => assert_eq!(name, "t2smqbusy"),
                other => panic!("{options:?}: expected Busy, got {other:?}"),
            }
        }
    });
}

#[test]
fn a_tap_is_still_not_tun_with_multi_queue() {
    if !root_or_skip("a_tap_is_still_not_tun_with_multi_queue") {
        return;
    }
    let ns = Netns::new("tun-mqtap");
    ns.ip(&["tuntap", "add", "dev", "t2smqtap", "mode", "tap"]);
    ns.run(|| match open_tun_with(Some("t2smqtap"), &MULTI) {
        Err(TunError::NotTun { name }) => assert_eq!(name, "t2smqtap"),
        other => panic!("expected NotTun, got {other:?}"),
    });
}
