//! Routes and policy rules over netlink against the real kernel: each shows in `ip`
//! output, the kernel's lookup follows them (with and without a mark), and dropping
//! the guards leaves `ip rule` and `ip route show table all` as they were.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap (STYLE.md)

mod netns;

use netns::{Netns, root_or_skip};
use tun2socks_platform::{
    Family, Link, MAIN_TABLE, Route, RouteError, Routing, RoutingEntry, Rule, open_tun,
};

const TABLE: u32 = 3727;
const MARK: u32 = 0x2d7;

/// `ip rule`, `ip -6 rule`, `ip route show table all`, `ip -6 route show table all`.
fn snapshot(ns: &Netns) -> String {
    [
        ns.ip(&["rule"]),
        ns.ip(&["-6", "rule"]),
        ns.ip(&["route", "show", "table", "all"]),
        ns.ip(&["-6", "route", "show", "table", "all"]),
    ]
    .join("\n--\n")
}

/// The tunnel rules in the wg-quick style, plus one `to NET lookup main`.
fn rules(family: Family, direct: &str) -> Vec<RoutingEntry> {
    let mut not_marked = Rule::lookup(family, 7270, TABLE);
    not_marked.invert = true;
    not_marked.fwmark = Some(MARK);
    let mut suppress = Rule::lookup(family, 7269, MAIN_TABLE);
    suppress.suppress_prefix_len = Some(0);
    let mut to = Rule::lookup(family, 7260, MAIN_TABLE);
    to.destination = Some(direct.parse().unwrap());
    [not_marked, suppress, to]
        .into_iter()
        .map(RoutingEntry::Rule)
        .collect()
}

#[test]
fn rules_and_routes_steer_lookups_and_guards_remove_them() {
    if !root_or_skip("rules_and_routes_steer_lookups_and_guards_remove_them") {
        return;
    }
    let ns = Netns::new("route");
    ns.ip(&[
        "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
    ]);
    ns.ip(&["addr", "add", "10.9.0.1/24", "dev", "veth0"]);
    ns.ip(&["addr", "add", "fd09::1/64", "dev", "veth0", "nodad"]);
    ns.ip(&["link", "set", "veth0", "up"]);
    ns.ip(&["link", "set", "veth1", "up"]);
    ns.ip(&["route", "add", "default", "via", "10.9.0.2"]);
    ns.ip(&["-6", "route", "add", "default", "via", "fd09::2"]);
    let veth = ns.link("veth0").ifindex;

    ns.run(|| {
        let tun = open_tun(Some("t2sroute")).expect("create");
        let link = Link::new(tun.ifindex()).expect("netlink");
        let _up = link.set_up().expect("up");
        let _v6 = link.add_address("fd0a::1/64".parse().unwrap()).expect("v6");
        let before = snapshot(&ns);
        let routing = Routing::new().expect("netlink");
        let lookup = |ip: &str, mark| routing.output_interface(ip.parse().unwrap(), mark).unwrap();
        assert_eq!(lookup("192.0.2.1", None), Some(veth));

        let mut entries = vec![
            RoutingEntry::Route(Route {
                destination: "0.0.0.0/0".parse().unwrap(),
                ifindex: tun.ifindex(),
                table: TABLE,
            }),
            RoutingEntry::Route(Route {
                destination: "::/0".parse().unwrap(),
                ifindex: tun.ifindex(),
                table: TABLE,
            }),
        ];
        entries.extend(rules(Family::V4, "192.0.2.0/24"));
        entries.extend(rules(Family::V6, "2001:db8::/32"));
        let guards: Vec<_> = entries
            .iter()
            .map(|entry| routing.add(*entry).expect("add"))
            .collect();
        assert!(guards.iter().all(|g| g.undoes().is_some()));

        let rules = ns.ip(&["rule"]);
        assert!(
            rules.contains("7270:\tnot from all fwmark 0x2d7 lookup 3727"),
            "{rules}"
        );
        assert!(
            rules.contains("7269:\tfrom all lookup main suppress_prefixlength 0"),
            "{rules}"
        );
        assert!(
            rules.contains("7260:\tfrom all to 192.0.2.0/24 lookup main"),
            "{rules}"
        );
        let rules6 = ns.ip(&["-6", "rule"]);
        assert!(
            rules6.contains("7270:\tnot from all fwmark 0x2d7 lookup 3727"),
            "{rules6}"
        );
        let table = ns.ip(&["route", "show", "table", "3727"]);
        assert_eq!(
            table.trim(),
            "default dev t2sroute proto static scope link",
            "{table}"
        );
        let table6 = ns.ip(&["-6", "route", "show", "table", "3727"]);
        assert!(table6.starts_with("default dev t2sroute"), "{table6}");

        // Unmarked: the main default route is suppressed, the tunnel table wins;
        // marked: the main table. Connected and excluded networks stay direct.
        assert_eq!(lookup("198.51.100.1", None), Some(tun.ifindex()));
        assert_eq!(lookup("198.51.100.1", Some(MARK)), Some(veth));
        assert_eq!(lookup("2001:db9::1", None), Some(tun.ifindex()));
        assert_eq!(lookup("2001:db9::1", Some(MARK)), Some(veth));
        assert_eq!(lookup("10.9.0.2", None), Some(veth));
        assert_eq!(lookup("192.0.2.1", None), Some(veth));
        assert_eq!(lookup("2001:db8::1", None), Some(veth));

        // Adding again: the entry exists, so the second guard must not delete it.
        let again = routing.add(entries[2]).expect("add twice");
        assert_eq!(again.undoes(), None);
        drop(again);
        assert!(ns.ip(&["rule"]).contains("fwmark 0x2d7 lookup 3727"));

        drop(guards);
        assert_eq!(snapshot(&ns), before);
        // Gone already: remove() says so instead of failing.
        for entry in &entries {
            assert!(!routing.remove(*entry).expect("remove absent"), "{entry}");
        }
    });
}

#[test]
fn remove_deletes_a_described_entry_and_unreachable_has_no_interface() {
    if !root_or_skip("remove_deletes_a_described_entry_and_unreachable_has_no_interface") {
        return;
    }
    let ns = Netns::new("route-remove");
    ns.run(|| {
        let routing = Routing::new().expect("netlink");
        // No route at all: no interface, not an error.
        assert_eq!(
            routing
                .output_interface("198.51.100.1".parse().unwrap(), None)
                .unwrap(),
            None
        );
        let before = snapshot(&ns);
        let mut rule = Rule::lookup(Family::V4, 7270, TABLE);
        rule.fwmark = Some(MARK);
        rule.invert = true;
        // Made by `ip`, removed from its description (a crashed run's leftover).
        ns.ip(&[
            "rule", "add", "not", "fwmark", "0x2d7", "lookup", "3727", "pref", "7270",
        ]);
        let lo = ns.link("lo").ifindex;
        ns.ip(&["route", "add", "default", "dev", "lo", "table", "3727"]);
        assert!(routing.remove(RoutingEntry::Rule(rule)).unwrap());
        let route = Route {
            destination: "0.0.0.0/0".parse().unwrap(),
            ifindex: lo,
            table: TABLE,
        };
        assert!(routing.remove(RoutingEntry::Route(route)).unwrap());
        assert_eq!(snapshot(&ns), before);
        // A route on a missing interface is refused with the kernel's errno.
        let bad = Route {
            destination: "0.0.0.0/0".parse().unwrap(),
            ifindex: 999_999,
            table: TABLE,
        };
        let error = routing.add(RoutingEntry::Route(bad)).unwrap_err();
        assert!(matches!(error, RouteError::Refused { .. }), "{error}");
        assert!(
            error.to_string().contains("add route 0.0.0.0/0 dev 999999"),
            "{error}"
        );
    });
}
