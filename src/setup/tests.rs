//! The policy as data: which entries `--setup` makes, in which order.
#![allow(clippy::unwrap_used)]

use super::*;

fn lines(ifindex: u32, proxy: &[IpAddr], config: &SetupConfig) -> Vec<String> {
    plan(ifindex, proxy, &[], config)
        .into_iter()
        .flat_map(|(_, entries)| entries)
        .map(|entry| entry.to_string())
        .collect()
}

#[test]
fn default_plan_routes_both_families_and_keeps_the_proxy_direct() {
    let proxy: Vec<IpAddr> = vec!["198.19.2.1".parse().unwrap(), "fd19:2::1".parse().unwrap()];
    let config = SetupConfig {
        exclude: vec!["10.1.2.3/8".parse().unwrap()],
        ..SetupConfig::default()
    };
    assert_eq!(
        lines(7, &proxy, &config),
        [
            "route 0.0.0.0/0 dev 7 table 727",
            "rule inet pref 7260 to 127.0.0.0/8 lookup 254",
            "rule inet pref 7260 to 169.254.0.0/16 lookup 254",
            "rule inet pref 7260 to 198.19.2.1/32 lookup 254",
            "rule inet pref 7260 to 10.0.0.0/8 lookup 254",
            "rule inet pref 7269 lookup 254 suppress_prefixlength 0",
            "rule inet pref 7270 not fwmark 0x2d7 lookup 727",
            "route ::/0 dev 7 table 727",
            "rule inet6 pref 7260 to ::1/128 lookup 254",
            "rule inet6 pref 7260 to fe80::/10 lookup 254",
            "rule inet6 pref 7260 to fd19:2::1/128 lookup 254",
            "rule inet6 pref 7269 lookup 254 suppress_prefixlength 0",
            "rule inet6 pref 7270 not fwmark 0x2d7 lookup 727",
        ]
    );
}

#[test]
fn plan_follows_the_configured_mark_table_and_priority() {
    let config = SetupConfig {
        fwmark: 0x10,
        table: 100_000,
        priority: 5,
        exclude: vec!["2001:db8::/32".parse().unwrap()],
        ..SetupConfig::default()
    };
    let lines = lines(1, &[], &config);
    assert!(lines.contains(&"route ::/0 dev 1 table 100000".to_owned()));
    assert!(lines.contains(&"rule inet6 pref 0 to 2001:db8::/32 lookup 254".to_owned()));
    assert!(lines.contains(&"rule inet pref 4 lookup 254 suppress_prefixlength 0".to_owned()));
    assert_eq!(
        lines.last().unwrap(),
        "rule inet6 pref 5 not fwmark 0x10 lookup 100000"
    );
    // Every line reads back as the entry it came from.
    for (_, entries) in plan(1, &[], &["192.0.2.7".parse().unwrap()], &config) {
        for entry in entries {
            assert_eq!(entry.to_string().parse::<RoutingEntry>(), Ok(entry));
        }
    }
}

#[test]
fn replies_from_this_hosts_other_addresses_keep_the_main_table() {
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    let addresses: Vec<(String, IpAddr)> = [
        ("lo", "127.0.0.1"),
        ("lo", "::1"),
        ("eth0", "192.0.2.7"),
        ("eth0", "2001:db8::7"),
        ("eth0", "fe80::1"),
        ("wlan0", "198.51.100.9"),
        ("wlan0", "192.0.2.7"),
        ("tun0", "198.18.0.1"),
    ]
    .into_iter()
    .map(|(name, a)| (name.to_owned(), ip(a)))
    .collect();
    // The TUN has IPv4 only: no IPv6 rule (a new IPv6 connection would take
    // eth0's address, and the rule would then take it off the tunnel).
    let replies = replies_from("tun0", &addresses);
    assert_eq!(replies, [ip("192.0.2.7"), ip("198.51.100.9")]);
    let mut with_v6 = addresses.clone();
    with_v6.push(("tun0".into(), ip("fd18::1")));
    assert_eq!(
        replies_from("tun0", &with_v6),
        [ip("192.0.2.7"), ip("198.51.100.9"), ip("2001:db8::7")]
    );
    // A TUN with no address of its own: none at all.
    assert!(replies_from("tun1", &addresses).is_empty());
    let lines: Vec<String> = plan(
        7,
        &[],
        &replies_from("tun0", &with_v6),
        &SetupConfig::default(),
    )
    .into_iter()
    .flat_map(|(_, entries)| entries)
    .map(|entry| entry.to_string())
    .collect();
    for expected in [
        "rule inet pref 7265 from 192.0.2.7/32 lookup 254",
        "rule inet pref 7265 from 198.51.100.9/32 lookup 254",
        "rule inet6 pref 7265 from 2001:db8::7/128 lookup 254",
    ] {
        assert!(
            lines.contains(&expected.to_owned()),
            "{expected} not in {lines:#?}"
        );
    }
    // Before the tunnel rule of its family.
    let tunnel = lines
        .iter()
        .position(|l| l.starts_with("rule inet pref 7270"))
        .unwrap();
    let reply = lines
        .iter()
        .position(|l| l.contains("from 192.0.2.7"))
        .unwrap();
    assert!(reply < tunnel);
}

#[test]
fn dns_rules_only_when_the_tunnel_answers_wherever_queries_go() {
    let lines = |hijack_dns: bool| -> Vec<String> {
        let config = SetupConfig {
            hijack_dns,
            ..SetupConfig::default()
        };
        plan(7, &[], &[], &config)
            .into_iter()
            .flat_map(|(_, entries)| entries)
            .map(|entry| entry.to_string())
            .collect()
    };
    assert!(!lines(false).iter().any(|l| l.contains("dport")));
    let with = lines(true);
    for family in ["inet", "inet6"] {
        for protocol in ["udp", "tcp"] {
            let rule = format!("rule {family} pref 7266 ipproto {protocol} dport 53 lookup 727");
            let at = with
                .iter()
                .position(|l| *l == rule)
                .unwrap_or_else(|| panic!("{rule} not in {with:#?}"));
            let suppress = with
                .iter()
                .position(|l| l.starts_with(&format!("rule {family} pref 7269")))
                .unwrap();
            assert!(at < suppress, "{with:#?}");
        }
    }
}

#[test]
fn messages_say_what_to_do() {
    let looped = SetupError::Loop {
        proxy: "198.19.2.1".parse().unwrap(),
        device: "tun0".into(),
        mark: None,
    };
    let text = looped.to_string();
    assert!(
        text.contains("routing loop") && text.contains("tun0"),
        "{text}"
    );
    assert!(
        text.contains("--setup") && text.contains("--interface"),
        "{text}"
    );
    let busy = SetupError::Busy {
        device: "tun0".into(),
        pid: Some(42),
        lock: "/run/tun2socks/net1.lock".into(),
    };
    assert!(busy.to_string().contains("(pid 42)"), "{busy}");
}
