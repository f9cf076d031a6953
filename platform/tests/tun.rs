//! Opening TUN devices against the real kernel, each test in its own network
//! namespace: create, attach, and every distinguishable failure.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap (STYLE.md)

mod netns;

use std::io;
use std::os::fd::AsFd;
use std::time::Duration;

use netns::{Netns, root_or_skip};
use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use tun2socks_platform::{
    Link, MAX_NAME_LEN, Offloads, TunError, TunOptions, VNET_HDR_LEN, open_tun, open_tun_with,
};

#[test]
fn bad_names_fail_before_any_system_call() {
    // No root needed: validation happens first.
    let long = "x".repeat(MAX_NAME_LEN + 1);
    match open_tun(Some(&long)) {
        Err(TunError::NameTooLong { len, max, .. }) => {
            assert_eq!((len, max), (16, 15));
        }
        other => panic!("expected NameTooLong, got {other:?}"),
    }
    for bad in ["", "..", "a/b", "a:b", "a b"] {
        assert!(
            matches!(open_tun(Some(bad)), Err(TunError::InvalidName { .. })),
            "{bad:?}"
        );
    }
}

#[test]
fn create_reports_name_index_and_nonblocking_fd() {
    if !root_or_skip("create_reports_name_index_and_nonblocking_fd") {
        return;
    }
    let ns = Netns::new("tun-create");
    let name = "t2s-create0"; // 11 bytes
    ns.run(|| {
        let tun = open_tun(Some(name)).expect("create");
        assert!(tun.created());
        assert_eq!(tun.name(), name);
        let view = ns.link(name);
        assert_eq!(view.ifindex, tun.ifindex(), "{view:?}");
        assert!(view.flags.iter().any(|f| f == "POINTOPOINT"), "{view:?}");

        let flags = OFlag::from_bits_truncate(fcntl(tun.as_fd(), FcntlArg::F_GETFL).unwrap());
        assert!(flags.contains(OFlag::O_NONBLOCK), "{flags:?}");
        let fd_flags = FdFlag::from_bits_truncate(fcntl(tun.as_fd(), FcntlArg::F_GETFD).unwrap());
        assert!(fd_flags.contains(FdFlag::FD_CLOEXEC), "{fd_flags:?}");

        let mut buf = [0u8; 2048];
        let err = tun
            .recv(&mut buf)
            .expect_err("nothing queued on a down device");
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);

        drop(tun);
        assert!(ns.link_gone(name), "a created device vanishes with its fd");
    });
}

#[test]
fn kernel_picks_a_name_when_none_is_given() {
    if !root_or_skip("kernel_picks_a_name_when_none_is_given") {
        return;
    }
    let ns = Netns::new("tun-anon");
    ns.run(|| {
        let tun = open_tun(None).expect("create");
        assert!(tun.created());
        assert!(tun.name().starts_with("tun"), "{}", tun.name());
        assert_eq!(ns.link(tun.name()).ifindex, tun.ifindex());
    });
}

#[test]
fn attaches_to_an_existing_persistent_tun() {
    if !root_or_skip("attaches_to_an_existing_persistent_tun") {
        return;
    }
    let ns = Netns::new("tun-attach");
    ns.ip(&["tuntap", "add", "dev", "t2spersist", "mode", "tun"]);
    let index = ns.link("t2spersist").ifindex;
    ns.run(|| {
        let tun = open_tun(Some("t2spersist")).expect("attach");
        assert!(!tun.created());
        assert_eq!(tun.ifindex(), index);
    });
    assert!(
        ns.has_link("t2spersist"),
        "a persistent device outlives our fd"
    );
}

#[test]
fn a_device_held_by_another_fd_is_busy() {
    if !root_or_skip("a_device_held_by_another_fd_is_busy") {
        return;
    }
    let ns = Netns::new("tun-busy");
    ns.run(|| {
        let _first = open_tun(Some("t2sbusy")).expect("create");
        match open_tun(Some("t2sbusy")) {
            Err(TunError::Busy { name }) => assert_eq!(name, "t2sbusy"),
            other => panic!("expected Busy, got {other:?}"),
        }
    });
}

#[test]
fn a_tap_or_veth_of_that_name_is_not_tun() {
    if !root_or_skip("a_tap_or_veth_of_that_name_is_not_tun") {
        return;
    }
    let ns = Netns::new("tun-nottun");
    ns.ip(&["tuntap", "add", "dev", "t2stap", "mode", "tap"]);
    ns.ip(&[
        "link", "add", "t2sveth", "type", "veth", "peer", "name", "t2sveth1",
    ]);
    ns.run(|| {
        for name in ["t2stap", "t2sveth"] {
            match open_tun(Some(name)) {
                Err(TunError::NotTun { name: got }) => assert_eq!(got, name),
                other => panic!("{name}: expected NotTun, got {other:?}"),
            }
        }
    });
}

#[test]
fn without_cap_net_admin_creation_is_permission_denied() {
    if !root_or_skip("without_cap_net_admin_creation_is_permission_denied") {
        return;
    }
    let ns = Netns::new("tun-perm");
    ns.run(|| {
        // Capabilities are per thread: this drops CAP_NET_ADMIN for this test
        // thread only (still uid 0, so /dev/net/tun itself opens).
        caps::drop(
            None,
            caps::CapSet::Effective,
            caps::Capability::CAP_NET_ADMIN,
        )
        .expect("drop CAP_NET_ADMIN");
        match open_tun(Some("t2sperm")) {
            Err(e @ TunError::PermissionDenied { .. }) => {
                assert_eq!(e.errno(), Some(nix::errno::Errno::EPERM as i32));
                assert!(e.to_string().contains("CAP_NET_ADMIN"), "{e}");
            }
            other => panic!("expected PermissionDenied, got {other:?}"),
        }
    });
}

#[test]
fn registers_with_the_tokio_reactor() {
    if !root_or_skip("registers_with_the_tokio_reactor") {
        return;
    }
    let ns = Netns::new("tun-tokio");
    ns.run(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let tun = open_tun(Some("t2stokio")).expect("create");
            // The kernel reports a TUN descriptor writable only while the link is up.
            let _up = Link::new(tun.ifindex()).unwrap().set_up().unwrap();
            let fd = tun.into_async_fd().expect("register");
            let ready = tokio::time::timeout(Duration::from_secs(5), fd.writable()).await;
            drop(
                ready
                    .expect("the reactor reports writability")
                    .expect("writable"),
            );
            assert_eq!(fd.get_ref().name(), "t2stokio");
        });
    });
}

/// Waits (up to 5 s) for one packet on a non-blocking TUN opened with a
/// `virtio_net_hdr`; returns the header and the IP packet.
fn recv_with_header(tun: &tun2socks_platform::Tun) -> ([u8; VNET_HDR_LEN], Vec<u8>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut hdr = [0u8; VNET_HDR_LEN];
        let mut buf = vec![0u8; 65_536];
        let mut bufs = [io::IoSliceMut::new(&mut hdr), io::IoSliceMut::new(&mut buf)];
        match tun.recv_vectored(&mut bufs) {
            Ok(n) => {
                assert!(n > VNET_HDR_LEN, "short read {n}");
                buf.truncate(n - VNET_HDR_LEN);
                if is_our_udp(&buf) {
                    return (hdr, buf);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                assert!(std::time::Instant::now() < deadline, "no packet");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("recv: {e}"),
        }
    }
}

/// Sends one UDP datagram of `segments * 1000` bytes with `UDP_SEGMENT` 1000 (one
/// super-packet for the kernel) to 10.77.0.2:9 through the TUN.
fn send_udp_gso(segments: usize) {
    use std::os::fd::AsRawFd;
    let socket = std::net::UdpSocket::bind("10.77.0.1:0").unwrap();
    let size: libc::c_int = 1000;
    // SAFETY: `socket` is open for the whole call; UDP_SEGMENT reads one c_int from
    // `size`, which lives on the stack with the length passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_SEGMENT,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "UDP_SEGMENT: {}", io::Error::last_os_error());
    let payload = vec![0x5au8; segments * 1000];
    socket.send_to(&payload, "10.77.0.2:9").unwrap();
}

#[test]
fn offload_hands_over_a_udp_super_packet_with_its_header() {
    if !root_or_skip("offload_hands_over_a_udp_super_packet_with_its_header") {
        return;
    }
    let ns = Netns::new("tun-offload");
    ns.run(|| {
        let mut tun = open_tun_with(
            Some("t2soff0"),
            &TunOptions {
                vnet_hdr: true,
                ..TunOptions::default()
            },
        )
        .unwrap();
        assert!(tun.vnet_hdr());
        let tcp = Offloads::CSUM.union(Offloads::TSO4).union(Offloads::TSO6);
        tun.set_offload(tcp).expect("checksum and TSO offload");
        tun.set_offload(tcp.union(Offloads::USO4).union(Offloads::USO6))
            .expect("USO (Linux 6.2+)");
        let link = Link::new(tun.ifindex()).unwrap();
        let _mtu = link.set_mtu(1500).unwrap();
        let _up = link.set_up().unwrap();
        let _addr = link.add_address("10.77.0.1/24".parse().unwrap()).unwrap();

        send_udp_gso(3);
        let (hdr, packet) = recv_with_header(&tun);
        // virtio_net_hdr: flags, gso_type, hdr_len, gso_size (host order) ...
        assert_eq!(hdr[1], 5, "gso_type UDP_L4: {hdr:?}");
        assert_eq!(u16::from_ne_bytes([hdr[4], hdr[5]]), 1000, "gso_size");
        assert_eq!(hdr[0] & 1, 1, "NEEDS_CSUM");
        assert_eq!(packet[0] >> 4, 4);
        assert_eq!(packet.len(), 20 + 8 + 3000, "one super-packet, not three");

        // A write takes a header too: an all-zero one and a plain ICMP echo reply
        // makes the kernel count one received packet.
        let hdr = [0u8; VNET_HDR_LEN];
        let echo = [
            0x45, 0, 0, 28, 0, 0, 0, 0, 64, 1, 0, 0, 10, 77, 0, 2, 10, 77, 0, 1, 0, 0, 0xff, 0xff,
            0, 0, 0, 0,
        ];
        let mut echo = echo.to_vec();
        let sum = !ipv4_header_sum(&echo[..20]);
        echo[10..12].copy_from_slice(&sum.to_be_bytes());
        tun.send_vectored(&[io::IoSlice::new(&hdr), io::IoSlice::new(&echo)])
            .expect("write with a header");
    });
}

/// IPv4 UDP to 10.77.0.2 (not the IPv6 router solicitations a link sends when up).
fn is_our_udp(packet: &[u8]) -> bool {
    packet.len() > 20 && packet[0] >> 4 == 4 && packet[9] == 17 && packet[16..20] == [10, 77, 0, 2]
}

fn ipv4_header_sum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[test]
fn without_offload_a_vnet_device_segments_in_the_kernel() {
    if !root_or_skip("without_offload_a_vnet_device_segments_in_the_kernel") {
        return;
    }
    let ns = Netns::new("tun-nooffload");
    ns.ip(&["tuntap", "add", "dev", "t2soff1", "mode", "tun"]);
    ns.run(|| {
        // Attached, with a header but no offload: three datagrams, plain headers.
        let tun = open_tun_with(
            Some("t2soff1"),
            &TunOptions {
                vnet_hdr: true,
                ..TunOptions::default()
            },
        )
        .unwrap();
        assert!(!tun.created());
        let link = Link::new(tun.ifindex()).unwrap();
        let _up = link.set_up().unwrap();
        let _addr = link.add_address("10.77.0.1/24".parse().unwrap()).unwrap();
        send_udp_gso(3);
        for _ in 0..3 {
            let (hdr, packet) = recv_with_header(&tun);
            assert_eq!(hdr[1], 0, "no GSO without offload: {hdr:?}");
            assert_eq!(packet.len(), 20 + 8 + 1000);
        }
    });
}

/// Attaches to `name` again right after this process closed its last fd on
/// it. The tests of this binary run in parallel threads, and another test's
/// `Command::spawn` (`ns.ip`) can be between its fork and its exec at the
/// moment of that close: the child then holds a copy of the fd until exec
/// closes it (O_CLOEXEC), and the device is still busy for that short while.
/// CI once hit exactly that. So `Busy` is retried, for at most two seconds;
/// any other error, or a device still busy after that, fails the test.
fn reopen(name: &str, vnet_hdr: bool) -> tun2socks_platform::Tun {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        match open_tun_with(
            Some(name),
            &TunOptions {
                vnet_hdr,
                ..TunOptions::default()
            },
        ) {
            Err(TunError::Busy { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other.unwrap(),
        }
    }
}

#[test]
fn offload_needs_the_header_and_is_undone_on_an_attached_device() {
    if !root_or_skip("offload_needs_the_header_and_is_undone_on_an_attached_device") {
        return;
    }
    let ns = Netns::new("tun-offreset");
    ns.ip(&["tuntap", "add", "dev", "t2soff2", "mode", "tun"]);
    ns.run(|| {
        let mut plain = open_tun(Some("t2soff2")).unwrap();
        let err = plain.set_offload(Offloads::CSUM).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        drop(plain);

        let mut tun = reopen("t2soff2", true);
        tun.set_offload(Offloads::CSUM.union(Offloads::USO4).union(Offloads::USO6))
            .unwrap();
        drop(tun);
        // The next reader has no header: it must get the datagrams one by one.
        let plain = reopen("t2soff2", false);
        let link = Link::new(plain.ifindex()).unwrap();
        let _up = link.set_up().unwrap();
        let _addr = link.add_address("10.77.0.1/24".parse().unwrap()).unwrap();
        send_udp_gso(2);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut lens = Vec::new();
        while lens.len() < 2 {
            let mut buf = vec![0u8; 65_536];
            match plain.recv(&mut buf) {
                Ok(n) if is_our_udp(&buf[..n]) => lens.push(n),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(std::time::Instant::now() < deadline, "got {lens:?}");
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(lens, [1028, 1028], "offload was reset on close");
    });
}
