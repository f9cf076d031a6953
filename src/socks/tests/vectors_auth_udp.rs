//! RFC 1929 and UDP ASSOCIATE header vectors, both directions.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use super::super::auth::Status;
use super::super::udp::{self, Header};
use super::super::{Address, Credentials, Error, Message};
use super::{check_decode_only, check_vectors, hex, rep};

fn creds(user: &[u8], pass: &[u8]) -> Credentials {
    Credentials::new(user, pass).unwrap()
}

#[test]
fn credentials() {
    check_vectors(&[
        (creds(b"u", b"p"), "01 01 75 01 70".to_owned()),
        (
            creds(b"user", b"pass"),
            "01 04 75736572 04 70617373".to_owned(),
        ),
        // RFC 1929 fields are bytes: NUL and non-UTF-8 are allowed.
        (creds(b"\x00\xff", b"\x80"), "01 02 00ff 01 80".to_owned()),
        (
            creds(&[b'u'; 255], b"p"),
            format!("01 ff {} 01 70", rep("75", 255)),
        ),
        (
            creds(b"u", &[b'p'; 255]),
            format!("01 01 75 ff {}", rep("70", 255)),
        ),
        (
            creds(&[b'u'; 255], &[b'p'; 255]),
            format!("01 ff {} ff {}", rep("75", 255), rep("70", 255)),
        ),
    ]);
}

#[test]
fn credentials_debug_hides_the_password() {
    let shown = format!("{:?}", creds(b"user", b"hunter2"));
    assert!(
        shown.contains("user") && !shown.contains("hunter2"),
        "{shown}"
    );
}

#[test]
fn auth_status() {
    let status = |s: u8| Status { status: s };
    check_vectors(&[
        (status(0x00), "01 00"),
        (status(0x01), "01 01"),
        (status(0xff), "01 ff"),
    ]);
}

fn addresses() -> Vec<(Address, &'static str)> {
    vec![
        (
            Address::Ip(SocketAddr::new(Ipv4Addr::new(8, 8, 8, 8).into(), 53)),
            "01 08080808 0035",
        ),
        (
            Address::Ip(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 53)),
            "04 00000000000000000000000000000001 0035",
        ),
        (
            Address::domain("dns.google", 53).unwrap(),
            "03 0a 646e732e676f6f676c65 0035",
        ),
    ]
}

#[test]
fn udp_headers_every_frag_and_address() {
    let mut vectors = Vec::new();
    for frag in [0x00u8, 0x01, 0x7f, 0x80, 0xff] {
        for (target, addr) in addresses() {
            vectors.push((Header { frag, target }, format!("0000 {frag:02x} {addr}")));
        }
    }
    check_vectors(&vectors);
    let standalone = Header::new(addresses()[0].0.clone());
    assert_eq!(standalone.frag, 0);
}

#[test]
fn udp_reserved_bytes_are_ignored() {
    check_decode_only(&[(
        "ffff 00 01 08080808 0035",
        Header::new(addresses()[0].0.clone()),
    )]);
}

#[test]
fn udp_datagrams() {
    for (target, addr) in addresses() {
        for payload in [&b""[..], b"\x00", b"hello", &[0xab; 1500]] {
            let wire = [hex(&format!("000000 {addr}")), payload.to_vec()].concat();
            let mut out = vec![0xee];
            udp::encode_datagram(&target, payload, &mut out);
            assert_eq!(out[1..], wire[..], "encode_datagram appends");
            let (header, body) = udp::parse_datagram(&wire).unwrap();
            assert_eq!(header, Header::new(target.clone()));
            assert_eq!(body, payload);
            // A fragment parses too; dropping it is the relay's decision.
            let mut fragment = wire.clone();
            fragment[2] = 1;
            assert_eq!(udp::parse_datagram(&fragment).unwrap().0.frag, 1);
        }
    }
}

#[test]
fn udp_datagram_cut_inside_its_header() {
    for (_, addr) in addresses() {
        let wire = hex(&format!("000000 {addr}"));
        for end in 0..wire.len() {
            assert_eq!(
                udp::parse_datagram(&wire[..end]),
                Err(Error::TruncatedDatagram { len: end })
            );
        }
        assert!(wire.len() <= udp::MAX_HEADER_LEN);
    }
    let longest = Header::new(Address::domain("x".repeat(255), 1).unwrap());
    assert_eq!(longest.encoded_len(), udp::MAX_HEADER_LEN);
}
