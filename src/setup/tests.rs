//! The policy as data: which entries `--setup` makes, in which order.
#![allow(clippy::unwrap_used)]

use super::*;

fn lines(ifindex: u32, proxy: &[IpAddr], config: &SetupConfig) -> Vec<String> {
    plan(ifindex, proxy, config)
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
    for (_, entries) in plan(1, &[], &config) {
        for entry in entries {
            assert_eq!(entry.to_string().parse::<RoutingEntry>(), Ok(entry));
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
