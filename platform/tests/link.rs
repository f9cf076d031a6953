//! Interface changes over netlink against the real kernel: each one shows in `ip`
//! output, and its guard restores what was there before.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap (STYLE.md)

mod netns;

use netns::{Netns, find, root_or_skip};
use nix::errno::Errno;
use tun2socks_platform::{Link, LinkError, LinkOp, open_tun};

#[test]
fn changes_show_in_ip_and_guards_restore_them() {
    if !root_or_skip("changes_show_in_ip_and_guards_restore_them") {
        return;
    }
    let ns = Netns::new("link-restore");
    ns.ip(&["tuntap", "add", "dev", "t2slink", "mode", "tun"]);
    let before = ns.link("t2slink");
    assert!(!before.up());
    ns.run(|| {
        let tun = open_tun(Some("t2slink")).expect("attach");
        let link = Link::new(tun.ifindex()).expect("netlink");
        let state = link.state().expect("state");
        assert_eq!(
            (state.name.as_str(), state.mtu, state.txqueuelen, state.up),
            ("t2slink", before.mtu, before.qlen, false)
        );

        let mut guards = vec![
            link.set_mtu(1400).expect("mtu"),
            link.set_txqueuelen(4321).expect("txqueuelen"),
            link.set_up().expect("up"),
            link.add_address("10.7.0.1/24".parse().unwrap())
                .expect("v4"),
            link.add_address("fd07::1/64".parse().unwrap()).expect("v6"),
        ];
        assert_eq!(guards[0].undoes(), Some(LinkOp::SetMtu(before.mtu)));
        assert_eq!(guards[2].undoes(), Some(LinkOp::SetDown));

        let view = ns.link("t2slink");
        assert_eq!(
            (view.mtu, view.qlen, view.up()),
            (1400, 4321, true),
            "{view:?}"
        );
        let addrs = ns.addresses("t2slink");
        let v4 = find(&addrs, "10.7.0.1/24").expect("v4 address listed");
        assert_eq!(v4.family, "inet");
        let v6 = find(&addrs, "fd07::1/64").expect("v6 address listed");
        assert!(v6.usable(), "NODAD: usable at once: {v6:?}");
        // ... and delivered locally at once: add_address waited for the local route,
        // which the kernel installs from a work queue after acknowledging.
        let local = ns.ip(&["-6", "route", "show", "table", "local", "dev", "t2slink"]);
        assert!(local.contains("local fd07::1 "), "{local}");

        while let Some(guard) = guards.pop() {
            drop(guard);
        }
        let after = ns.link("t2slink");
        assert_eq!(
            (after.mtu, after.qlen, after.up()),
            (before.mtu, before.qlen, false)
        );
        let addrs = ns.addresses("t2slink");
        assert!(find(&addrs, "10.7.0.1/24").is_none(), "{addrs:?}");
        assert!(find(&addrs, "fd07::1/64").is_none(), "{addrs:?}");
    });
}

#[test]
fn guards_restore_in_their_namespace_from_any_thread() {
    if !root_or_skip("guards_restore_in_their_namespace_from_any_thread") {
        return;
    }
    let ns = Netns::new("link-thread");
    let (tun, guards) = ns.run(|| {
        let tun = open_tun(Some("t2sthread")).expect("create");
        let link = Link::new(tun.ifindex()).expect("netlink");
        let guards = vec![
            link.set_mtu(1280).expect("mtu"),
            link.add_address("10.8.0.1/24".parse().unwrap())
                .expect("v4"),
        ];
        (tun, guards)
    });
    // This thread is in the original namespace; the guards' socket is not.
    assert_eq!(ns.link("t2sthread").mtu, 1280);
    drop(guards);
    assert_eq!(ns.link("t2sthread").mtu, 1500);
    assert!(ns.addresses("t2sthread").is_empty());
    drop(tun);
}

#[test]
fn forget_keeps_the_change_and_noop_guards_keep_what_was_there() {
    if !root_or_skip("forget_keeps_the_change_and_noop_guards_keep_what_was_there") {
        return;
    }
    let ns = Netns::new("link-forget");
    ns.run(|| {
        let tun = open_tun(Some("t2sforget")).expect("create");
        let link = Link::new(tun.ifindex()).expect("netlink");
        link.set_mtu(1300).expect("mtu").forget();
        assert_eq!(ns.link("t2sforget").mtu, 1300);

        let same = link.set_mtu(1300).expect("same mtu");
        assert_eq!(same.undoes(), None);
        drop(same);
        assert_eq!(ns.link("t2sforget").mtu, 1300);

        let first = link
            .add_address("10.6.0.1/24".parse().unwrap())
            .expect("v4");
        let again = link
            .add_address("10.6.0.1/24".parse().unwrap())
            .expect("present");
        assert_eq!(again.undoes(), None, "already present: not ours to remove");
        drop(again);
        assert!(find(&ns.addresses("t2sforget"), "10.6.0.1/24").is_some());
        first.restore().expect("restore");
        assert!(find(&ns.addresses("t2sforget"), "10.6.0.1/24").is_none());
    });
}

#[test]
fn refusals_carry_the_operation_and_errno() {
    if !root_or_skip("refusals_carry_the_operation_and_errno") {
        return;
    }
    let ns = Netns::new("link-errno");
    ns.run(|| {
        let tun = open_tun(Some("t2serrno")).expect("create");
        let link = Link::new(tun.ifindex()).expect("netlink");
        let e = link.set_mtu(70_000).expect_err("above the device maximum");
        let LinkError::Refused {
            op, errno, message, ..
        } = &e
        else {
            panic!("expected Refused, got {e:?}");
        };
        assert_eq!(
            (*op, *errno),
            (LinkOp::SetMtu(70_000), Errno::EINVAL as i32)
        );
        assert!(e.to_string().contains("set MTU 70000"), "{e}");
        // The kernel's extended ACK says why ("mtu greater than device maximum").
        assert!(message.as_deref().is_some_and(|m| m.contains("mtu")), "{e}");
        assert_eq!(
            ns.link("t2serrno").mtu,
            1500,
            "a refused change changes nothing"
        );

        let missing = Link::new(999_999).expect("netlink");
        match missing.state() {
            Err(LinkError::Refused {
                op: LinkOp::Get,
                ifindex: 999_999,
                errno,
                ..
            }) => {
                assert_eq!(errno, Errno::ENODEV as i32);
            }
            other => panic!("expected ENODEV, got {other:?}"),
        }

        caps::drop(
            None,
            caps::CapSet::Effective,
            caps::Capability::CAP_NET_ADMIN,
        )
        .expect("drop CAP_NET_ADMIN for this thread");
        match link.set_mtu(1400) {
            Err(e @ LinkError::Refused { .. }) => assert_eq!(e.errno(), Some(Errno::EPERM as i32)),
            other => panic!("expected EPERM, got {other:?}"),
        }
    });
}

#[test]
fn restoring_on_a_vanished_device_is_not_an_error() {
    if !root_or_skip("restoring_on_a_vanished_device_is_not_an_error") {
        return;
    }
    let ns = Netns::new("link-gone");
    ns.run(|| {
        let tun = open_tun(Some("t2sgone")).expect("create");
        let link = Link::new(tun.ifindex()).expect("netlink");
        let mtu = link.set_mtu(1400).expect("mtu");
        let addr = link.add_address("fd06::1/64".parse().unwrap()).expect("v6");
        drop(tun);
        assert!(ns.link_gone("t2sgone"));
        mtu.restore().expect("ENODEV counts as restored");
        addr.restore().expect("ENODEV counts as restored");
    });
}
