//! proptest strategies for every value the codec carries.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};

use proptest::collection::vec;
use proptest::prelude::*;

use super::super::{Address, Command, Credentials, DomainName, v4};

/// Up to `max` bytes of the characters, skipping NUL.
fn pack(chars: Vec<char>, max: usize) -> String {
    let mut name = String::new();
    for c in chars.into_iter().filter(|&c| c != '\0') {
        if name.len() + c.len_utf8() > max {
            break;
        }
        name.push(c);
    }
    name
}

/// 1 to 255 bytes of UTF-8 without NUL: host-name-like ASCII (up to the 255-byte
/// limit), or any characters.
pub(super) fn domain_name() -> impl Strategy<Value = DomainName> {
    prop_oneof![
        "[a-z0-9.-]{1,255}",
        "[a-z]{250,255}",
        vec(any::<char>(), 1..=255).prop_map(|chars| pack(chars, 255)),
    ]
    .prop_filter_map("empty name", |name| DomainName::new(name).ok())
}

pub(super) fn ipv4() -> impl Strategy<Value = SocketAddrV4> {
    (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddrV4::new(ip.into(), port))
}

/// Is `ip` the SOCKS4a marker `0.0.0.x`, x != 0?
pub(super) fn is_socks4a_marker(ip: Ipv4Addr) -> bool {
    let [a, b, c, d] = ip.octets();
    a == 0 && b == 0 && c == 0 && d != 0
}

/// An IPv4 address that SOCKS4 can carry: anything but the SOCKS4a marker.
pub(super) fn socks4_ipv4() -> impl Strategy<Value = SocketAddrV4> {
    prop_oneof![
        ipv4(),
        any::<u16>().prop_map(|port| SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)),
    ]
    .prop_filter("SOCKS4a marker", |a| !is_socks4a_marker(*a.ip()))
}

pub(super) fn ipv6() -> impl Strategy<Value = SocketAddr> {
    (any::<[u8; 16]>(), any::<u16>())
        .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port))
}

pub(super) fn address() -> impl Strategy<Value = Address> {
    prop_oneof![
        ipv4().prop_map(|a| Address::Ip(a.into())),
        ipv6().prop_map(Address::from),
        (domain_name(), any::<u16>()).prop_map(|(name, port)| Address::Domain(name, port)),
    ]
}

/// Bytes of 1 to 255 bytes, the RFC 1929 field size.
fn field() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 1..=255),
        vec(any::<u8>(), 255..=255),
        vec(any::<u8>(), 1..=1),
    ]
}

pub(super) fn credentials() -> impl Strategy<Value = Credentials> {
    (field(), field()).prop_map(|(user, pass)| Credentials::new(user, pass).unwrap())
}

/// A SOCKS4 user id: 0 to 255 bytes, no NUL.
pub(super) fn user_id() -> impl Strategy<Value = v4::UserId> {
    prop_oneof![vec(1u8..=255, 0..=255), vec(1u8..=255, 255..=255)]
        .prop_map(|id| v4::UserId::new(id).unwrap())
}

/// Any command, the three known ones more often.
pub(super) fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        Just(Command::CONNECT),
        Just(Command::BIND),
        Just(Command::UDP_ASSOCIATE),
        any::<u8>().prop_map(Command),
    ]
}

/// A SOCKS4 (IPv4) or SOCKS4a (name) destination.
pub(super) fn v4_target() -> impl Strategy<Value = v4::Target> {
    prop_oneof![
        socks4_ipv4().prop_map(v4::Target::Ip),
        (domain_name(), any::<u16>()).prop_map(|(name, port)| v4::Target::Domain(name, port)),
    ]
}

/// Data that follows a handshake.
pub(super) fn payload() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..64)
}

/// Chunk sizes to cycle through.
pub(super) fn chunks() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![vec(1usize..=8, 1..6), vec(1usize..=300, 1..4)]
}

/// Arbitrary bytes, often starting like a SOCKS message.
pub(super) fn wire_bytes() -> impl Strategy<Value = Vec<u8>> {
    let first = prop::sample::select(vec![0x00u8, 0x01, 0x04, 0x05]);
    prop_oneof![
        vec(any::<u8>(), 0..600),
        (first, vec(any::<u8>(), 0..600)).prop_map(|(b, mut rest)| {
            rest.insert(0, b);
            rest
        }),
    ]
}
