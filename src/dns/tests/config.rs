//! Defaults and validation of [`DnsConfig`], and the mode's text form.

use std::net::IpAddr;

use crate::dns::{DnsConfig, DnsError, DnsMode};

fn device() -> Vec<IpAddr> {
    vec!["198.18.0.1".parse().unwrap(), "fd18::1".parse().unwrap()]
}

#[test]
fn defaults_are_valid_and_inside_the_tun_networks() {
    let c = DnsConfig::default();
    assert_eq!(c.mode, DnsMode::Udp);
    c.validate(&device()).unwrap();
    let tun4: ipnet::IpNet = "198.18.0.0/15".parse().unwrap();
    let tun6: ipnet::IpNet = "fd18::/64".parse().unwrap();
    assert_eq!(c.fake_pools.len(), 2);
    assert!(tun4.contains(&c.fake_pools[0]));
    assert!(tun6.contains(&c.fake_pools[1]));
    DnsConfig {
        mode: DnsMode::FakeIp,
        ..c
    }
    .validate(&device())
    .unwrap();
}

#[test]
fn rejects_pools_with_device_addresses_overlaps_and_the_server() {
    let mut c = DnsConfig {
        mode: DnsMode::FakeIp,
        fake_pools: vec!["198.18.0.0/16".parse().unwrap()],
        ..DnsConfig::default()
    };
    assert!(matches!(
        c.validate(&device()),
        Err(DnsError::PoolContainsDevice { .. })
    ));
    c.fake_pools = vec!["fd18::/64".parse().unwrap()];
    assert!(matches!(
        c.validate(&device()),
        Err(DnsError::PoolContainsDevice { .. })
    ));
    c.fake_pools = vec![
        "198.18.128.0/17".parse().unwrap(),
        "198.18.200.0/24".parse().unwrap(),
    ];
    assert!(matches!(
        c.validate(&device()),
        Err(DnsError::PoolsOverlap { .. })
    ));
    c.fake_pools = vec![
        "198.18.128.0/17".parse().unwrap(),
        "10.9.0.0/16".parse().unwrap(),
    ];
    c.validate(&device()).unwrap();
    c.server = Some("10.9.0.53".parse().unwrap());
    assert!(matches!(
        c.validate(&device()),
        Err(DnsError::PoolContainsServer { .. })
    ));
    // In any mode, the resolver must not be the device itself.
    for server in device() {
        c.server = Some(server);
        for mode in [DnsMode::Udp, DnsMode::Tcp, DnsMode::FakeIp] {
            c.mode = mode;
            assert!(matches!(
                c.validate(&device()),
                Err(DnsError::ServerIsDevice { server: s }) if s == server
            ));
        }
    }
    c.mode = DnsMode::FakeIp;
    c.server = None;
    c.fake_pools.clear();
    assert!(matches!(
        c.validate(&device()),
        Err(DnsError::InvalidSetting { .. })
    ));
}

#[test]
fn rejects_zero_limits() {
    let base = DnsConfig::default();
    for bad in [
        DnsConfig {
            tcp_connections: 0,
            ..base.clone()
        },
        DnsConfig {
            tcp_pipeline: 0,
            ..base.clone()
        },
        DnsConfig {
            tcp_pipeline: 5000,
            ..base.clone()
        },
        DnsConfig {
            max_fake_entries: 0,
            ..base.clone()
        },
        DnsConfig {
            fake_ttl: std::time::Duration::ZERO,
            ..base.clone()
        },
        DnsConfig {
            query_timeout: std::time::Duration::ZERO,
            ..base.clone()
        },
    ] {
        assert!(
            matches!(
                bad.validate(&device()),
                Err(DnsError::InvalidSetting { .. })
            ),
            "{bad:?}"
        );
    }
}

#[test]
fn mode_text_round_trips() {
    for mode in [DnsMode::Udp, DnsMode::Tcp, DnsMode::FakeIp] {
        assert_eq!(mode.to_string().parse::<DnsMode>().unwrap(), mode);
    }
    assert_eq!("fake-ip".parse::<DnsMode>().unwrap(), DnsMode::FakeIp);
    assert!(matches!(
        "fakeip".parse::<DnsMode>(),
        Err(DnsError::UnknownMode { .. })
    ));
}

#[test]
fn small_fake_ip_pools_are_named_with_their_size() {
    let pools = |list: &[&str]| list.iter().map(|p| p.parse().unwrap()).collect();
    let mut c = DnsConfig {
        mode: DnsMode::FakeIp,
        ..DnsConfig::default()
    };
    // The defaults (a /17 and a /65) are not small.
    assert_eq!(c.small_pools(), vec![]);
    // Usable: all but the network address, and for IPv4 the broadcast address; a
    // /32 and a /31 keep theirs.
    c.fake_pools = pools(&[
        "10.0.0.7/32",
        "10.0.1.0/31",
        "10.1.0.0/24",
        "10.2.1.0/25",
        "fd00::/120",
        "fd00::100/121",
        "::/0",
    ]);
    assert_eq!(
        c.small_pools(),
        vec![
            ("10.0.0.7/32".parse().unwrap(), 1),
            ("10.0.1.0/31".parse().unwrap(), 2),
            ("10.1.0.0/24".parse().unwrap(), 254),
            ("10.2.1.0/25".parse().unwrap(), 126),
            ("fd00::/120".parse().unwrap(), 255),
            ("fd00::100/121".parse().unwrap(), 127),
        ]
    );
    c.fake_pools = pools(&["10.1.0.0/23", "fd00::/119"]);
    assert_eq!(c.small_pools(), vec![]);
    // Only fake-ip mode hands addresses out of the pools.
    c.mode = DnsMode::Udp;
    assert_eq!(c.small_pools(), vec![]);
}
