//! Error vectors: bytes that can never become a valid message, and values that the
//! constructors refuse.

use super::super::Message;
use super::super::auth::Status;
use super::super::v5::{Greeting, MethodSelection};
use super::super::{Address, Credentials, DomainName, Error, Method, udp, v4, v5};
use super::{check_errors, hex, rep};

fn unknown_atyp(atyp: u8) -> Error {
    Error::UnknownAddressType { atyp }
}

fn field(field: &'static str, len: usize, min: usize) -> Error {
    Error::FieldLength {
        field,
        len,
        min,
        max: 255,
    }
}

fn version(message: &'static str, version: u8, expected: u8) -> Error {
    Error::VersionMismatch {
        message,
        version,
        expected,
    }
}

const NOT_UTF8: Error = Error::InvalidDomain {
    reason: "not UTF-8",
};
const HAS_NUL: Error = Error::InvalidDomain {
    reason: "contains NUL",
};

/// Bad addresses after `prefix` (the bytes before ATYP): unknown ATYP, an empty name,
/// a name that is not UTF-8 or holds a NUL.
fn bad_addresses(prefix: &str) -> Vec<(String, Error)> {
    let mut cases: Vec<(String, Error)> = [0x00u8, 0x02, 0x05, 0x06, 0x7f, 0xff]
        .iter()
        .map(|&atyp| (format!("{prefix} {atyp:02x}"), unknown_atyp(atyp)))
        .collect();
    cases.extend([
        (format!("{prefix} 03 00 0050"), field("domain name", 0, 1)),
        (format!("{prefix} 03 01 ff 0050"), NOT_UTF8),
        (format!("{prefix} 03 02 c3 28 0050"), NOT_UTF8),
        (format!("{prefix} 03 03 61 00 62 0050"), HAS_NUL),
    ]);
    cases
}

#[test]
fn addresses() {
    check_errors::<Address, _>(&bad_addresses(""));
}

#[test]
fn socks5_requests_and_replies() {
    check_errors::<v5::Request, _>(&bad_addresses("05 01 00"));
    check_errors::<v5::Reply, _>(&bad_addresses("05 00 00"));
    check_errors::<v5::Request, _>(&[
        ("04", version("SOCKS5 request", 4, 5)),
        ("00", version("SOCKS5 request", 0, 5)),
    ]);
    check_errors::<v5::Reply, _>(&[
        ("04", version("SOCKS5 reply", 4, 5)),
        ("01", version("SOCKS5 reply", 1, 5)),
    ]);
}

#[test]
fn udp_headers() {
    check_errors::<udp::Header, _>(&bad_addresses("0000 00"));
    assert_eq!(
        udp::parse_datagram(&[0, 0, 0, 5, 1, 2, 3]),
        Err(unknown_atyp(5))
    );
}

#[test]
fn method_negotiation_versions() {
    check_errors::<Greeting, _>(&[
        ("04", version("SOCKS5 greeting", 4, 5)),
        ("00", version("SOCKS5 greeting", 0, 5)),
        ("ff", version("SOCKS5 greeting", 0xff, 5)),
    ]);
    check_errors::<MethodSelection, _>(&[
        ("04", version("SOCKS5 method selection", 4, 5)),
        ("01", version("SOCKS5 method selection", 1, 5)),
    ]);
}

#[test]
fn rfc1929() {
    check_errors::<Credentials, String>(&[
        ("00".to_owned(), version("RFC 1929 request", 0, 1)),
        ("05".to_owned(), version("RFC 1929 request", 5, 1)),
        ("02".to_owned(), version("RFC 1929 request", 2, 1)),
        ("01 00".to_owned(), field("user name", 0, 1)),
        ("01 01 75 00".to_owned(), field("password", 0, 1)),
        (
            format!("01 ff {} 00", rep("75", 255)),
            field("password", 0, 1),
        ),
    ]);
    // The status's version byte is not judged (servers that answer 05 xx exist).
    for (text, status) in [("05 00", 0u8), ("00 01", 1)] {
        let bytes = hex(text);
        assert_eq!(
            Status::decode(&bytes),
            Ok(Some((Status { status }, 2))),
            "{text}"
        );
    }
}

#[test]
fn socks4_requests() {
    check_errors::<v4::Request, String>(&[
        ("05".to_owned(), version("SOCKS4 request", 5, 4)),
        ("00".to_owned(), version("SOCKS4 request", 0, 4)),
        // 256 bytes of user id and still no NUL.
        (
            format!("04 01 0050 01020304 {}", rep("75", 256)),
            field("SOCKS4 user id", 256, 0),
        ),
        // SOCKS4a: 256 bytes of host name and still no NUL.
        (
            format!("04 01 0050 00000001 00 {}", rep("68", 256)),
            field("SOCKS4a host name", 256, 0),
        ),
        (
            format!("04 01 0050 000000ff 6964 00 {}", rep("68", 256)),
            field("SOCKS4a host name", 256, 0),
        ),
        (
            "04 01 0050 00000001 00 00".to_owned(),
            field("domain name", 0, 1),
        ),
        ("04 01 0050 00000001 00 ff 00".to_owned(), NOT_UTF8),
    ]);
}

#[test]
fn socks4_replies() {
    check_errors::<v4::Reply, _>(&[
        ("01", version("SOCKS4 reply", 1, 0)),
        ("05", version("SOCKS4 reply", 5, 0)),
        ("5a", version("SOCKS4 reply", 0x5a, 0)),
    ]);
}

#[test]
fn constructors_refuse_what_the_wire_cannot_carry() {
    assert_eq!(DomainName::new(""), Err(field("domain name", 0, 1)));
    assert_eq!(
        DomainName::new("x".repeat(256)),
        Err(field("domain name", 256, 1))
    );
    assert_eq!(DomainName::new("a\0b"), Err(HAS_NUL));
    assert_eq!(DomainName::from_bytes(b"\xff"), Err(NOT_UTF8));
    assert!(DomainName::new("x".repeat(255)).is_ok());
    // 255 bytes, fewer characters.
    assert!(DomainName::new("é".repeat(127) + "x").is_ok());
    assert!(DomainName::new("é".repeat(128)).is_err());

    assert_eq!(Credentials::new("", "p"), Err(field("user name", 0, 1)));
    assert_eq!(Credentials::new("u", ""), Err(field("password", 0, 1)));
    assert_eq!(
        Credentials::new(vec![1; 256], "p"),
        Err(field("user name", 256, 1))
    );
    assert_eq!(
        Credentials::new("u", vec![1; 256]),
        Err(field("password", 256, 1))
    );

    assert!(v4::UserId::new(vec![1; 255]).is_ok());
    assert_eq!(
        v4::UserId::new(vec![1; 256]),
        Err(field("SOCKS4 user id", 256, 0))
    );
    assert!(v4::UserId::new(*b"a\0b").is_err());

    assert!(Greeting::new(vec![Method(1); 255]).is_ok());
    assert_eq!(
        Greeting::new(vec![Method(1); 256]),
        Err(Error::FieldLength {
            field: "method list",
            len: 256,
            min: 0,
            max: 255
        })
    );
}
