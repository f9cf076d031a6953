//! SOCKS5 vectors (RFC 1928), both directions: method negotiation, addresses,
//! requests and replies.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use super::super::v5::{Greeting, MethodSelection, Reply, Request};
use super::super::{Address, Command, Method, ReplyCode};
use super::{check_decode_only, check_vectors, rep};

fn v4(octets: [u8; 4], port: u16) -> Address {
    Address::Ip(SocketAddr::new(Ipv4Addr::from(octets).into(), port))
}

fn v6(segments: [u16; 8], port: u16) -> Address {
    Address::Ip(SocketAddr::new(Ipv6Addr::from(segments).into(), port))
}

fn name(host: &str, port: u16) -> Address {
    Address::domain(host, port).unwrap()
}

/// The three address forms with their wire bytes, used by every framed message.
fn addresses() -> Vec<(Address, String)> {
    vec![
        (v4([1, 2, 3, 4], 80), "01 01020304 0050".to_owned()),
        (v4([0, 0, 0, 0], 0), "01 00000000 0000".to_owned()),
        (
            v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1], 443),
            "04 20010db8000000000000000000000001 01bb".to_owned(),
        ),
        (v6([0; 8], 65535), format!("04 {} ffff", rep("00", 16))),
        (
            name("example.com", 443),
            "03 0b 6578616d706c652e636f6d 01bb".to_owned(),
        ),
        (name("a", 1), "03 01 61 0001".to_owned()),
        (
            name("bücher.de", 80),
            "03 0a 62c3bc636865722e6465 0050".to_owned(),
        ),
        (
            name(&"x".repeat(255), 8080),
            format!("03 ff {} 1f90", rep("78", 255)),
        ),
    ]
}

#[test]
fn address_vectors() {
    check_vectors(&addresses());
}

#[test]
fn greetings() {
    let greeting = |methods: &[u8]| Greeting::new(methods.iter().map(|&m| Method(m)).collect());
    let all: Vec<u8> = (1..=255).collect();
    let all_hex: String = all.iter().map(|m| format!("{m:02x}")).collect();
    check_vectors(&[
        // NMETHODS 0 is well-formed; the server answers 0xFF.
        (greeting(&[]).unwrap(), "05 00".to_owned()),
        (greeting(&[0x00]).unwrap(), "05 01 00".to_owned()),
        (greeting(&[0x02]).unwrap(), "05 01 02".to_owned()),
        (greeting(&[0x00, 0x02]).unwrap(), "05 02 00 02".to_owned()),
        (
            greeting(&[0x00, 0x01, 0x02]).unwrap(),
            "05 03 00 01 02".to_owned(),
        ),
        (greeting(&[0x80, 0xfe]).unwrap(), "05 02 80 fe".to_owned()),
        // 255 methods, 0xFF among them.
        (greeting(&all).unwrap(), format!("05 ff {all_hex}")),
    ]);
}

#[test]
fn method_selections() {
    let select = |m: u8| MethodSelection { method: Method(m) };
    check_vectors(&[
        (select(0x00), "05 00"),
        (select(0x01), "05 01"),
        (select(0x02), "05 02"),
        (select(0x80), "05 80"),
        (select(0xff), "05 ff"),
    ]);
    assert_eq!(select(0xff).method, Method::NO_ACCEPTABLE);
    assert_eq!(select(0x02).method, Method::USERNAME_PASSWORD);
}

#[test]
fn requests_every_command_and_address() {
    let commands = [
        (Command::CONNECT, "01"),
        (Command::BIND, "02"),
        (Command::UDP_ASSOCIATE, "03"),
        (Command(0x00), "00"),
        (Command(0x09), "09"),
        (Command(0xff), "ff"),
    ];
    let mut vectors = Vec::new();
    for (command, cmd) in commands {
        for (target, addr) in addresses() {
            vectors.push((Request { command, target }, format!("05 {cmd} 00 {addr}")));
        }
    }
    check_vectors(&vectors);
}

#[test]
fn replies_every_code_and_address() {
    let mut vectors = Vec::new();
    for code in (0x00..=0x08).chain([0x09, 0x80, 0xff]) {
        for (bound, addr) in addresses() {
            let reply = Reply {
                code: ReplyCode(code),
                bound,
            };
            vectors.push((reply, format!("05 {code:02x} 00 {addr}")));
        }
    }
    check_vectors(&vectors);
    let named = [
        ReplyCode::SUCCEEDED,
        ReplyCode::GENERAL_FAILURE,
        ReplyCode::NOT_ALLOWED,
        ReplyCode::NETWORK_UNREACHABLE,
        ReplyCode::HOST_UNREACHABLE,
        ReplyCode::CONNECTION_REFUSED,
        ReplyCode::TTL_EXPIRED,
        ReplyCode::COMMAND_NOT_SUPPORTED,
        ReplyCode::ADDRESS_TYPE_NOT_SUPPORTED,
    ];
    for (number, code) in (0u8..).zip(named) {
        assert_eq!(code, ReplyCode(number));
        assert!(!code.to_string().contains("unassigned"), "{code}");
    }
    assert!(ReplyCode(0x09).to_string().contains("unassigned"));
}

#[test]
fn reserved_byte_is_ignored() {
    check_decode_only(&[
        (
            "05 01 ff 01 01020304 0050",
            Request {
                command: Command::CONNECT,
                target: v4([1, 2, 3, 4], 80),
            },
        ),
        (
            "05 03 01 03 01 61 0035",
            Request {
                command: Command::UDP_ASSOCIATE,
                target: name("a", 53),
            },
        ),
    ]);
    check_decode_only(&[(
        "05 00 80 01 7f000001 0438",
        Reply {
            code: ReplyCode::SUCCEEDED,
            bound: v4([127, 0, 0, 1], 1080),
        },
    )]);
}
