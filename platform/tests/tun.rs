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
use tun2socks_platform::{Link, MAX_NAME_LEN, TunError, open_tun};

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
        assert!(!ns.has_link(name), "a created device vanishes with its fd");
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
