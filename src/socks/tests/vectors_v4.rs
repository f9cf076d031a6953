//! SOCKS4 and SOCKS4a vectors, both directions.

use std::net::{Ipv4Addr, SocketAddrV4};

use super::super::v4::{Reply, ReplyCode, Request, Target, UserId};
use super::super::{Command, DomainName, MAX_MESSAGE, Message};
use super::{check_decode_only, check_vectors, hex, rep};

fn ip(octets: [u8; 4], port: u16) -> Target {
    Target::Ip(SocketAddrV4::new(Ipv4Addr::from(octets), port))
}

fn name(host: &str, port: u16) -> Target {
    Target::Domain(DomainName::new(host).unwrap(), port)
}

fn request(command: Command, target: Target, user_id: &[u8]) -> Request {
    Request {
        command,
        target,
        user_id: UserId::new(user_id).unwrap(),
    }
}

/// "example.com"
const EXAMPLE: &str = "6578616d706c652e636f6d";

#[test]
fn socks4_requests() {
    let (connect, bind) = (Command::CONNECT, Command::BIND);
    check_vectors(&[
        (
            request(connect, ip([1, 2, 3, 4], 80), b""),
            "04 01 0050 01020304 00".to_owned(),
        ),
        (
            request(connect, ip([1, 2, 3, 4], 80), b"alice"),
            "04 01 0050 01020304 616c696365 00".to_owned(),
        ),
        (
            request(bind, ip([10, 0, 0, 1], 8080), b""),
            "04 02 1f90 0a000001 00".to_owned(),
        ),
        (
            request(bind, ip([192, 168, 1, 2], 65535), b"bob"),
            "04 02 ffff c0a80102 626f62 00".to_owned(),
        ),
        // DSTIP 0.0.0.0 is not the SOCKS4a marker: plain SOCKS4, no host name follows.
        (
            request(connect, ip([0, 0, 0, 0], 0), b""),
            "04 01 0000 00000000 00".to_owned(),
        ),
        // 0.0.1.0 is not a marker either (only the last octet may be non-zero).
        (
            request(connect, ip([0, 0, 1, 0], 1), b""),
            "04 01 0001 00000100 00".to_owned(),
        ),
        // An unknown command survives decoding; the server answers it.
        (
            request(Command(0x7f), ip([255, 255, 255, 255], 1), b"\xff"),
            "04 7f 0001 ffffffff ff 00".to_owned(),
        ),
        // The longest user id.
        (
            request(connect, ip([1, 2, 3, 4], 80), &[b'u'; 255]),
            format!("04 01 0050 01020304 {} 00", rep("75", 255)),
        ),
    ]);
}

#[test]
fn socks4a_requests() {
    let (connect, bind) = (Command::CONNECT, Command::BIND);
    check_vectors(&[
        (
            request(connect, name("example.com", 443), b""),
            format!("04 01 01bb 00000001 00 {EXAMPLE} 00"),
        ),
        (
            request(connect, name("example.com", 443), b"alice"),
            format!("04 01 01bb 00000001 616c696365 00 {EXAMPLE} 00"),
        ),
        (
            request(bind, name("a", 21), b""),
            "04 02 0015 00000001 00 61 00".to_owned(),
        ),
        // UTF-8 host names pass through as bytes.
        (
            request(connect, name("bücher.de", 80), b""),
            "04 01 0050 00000001 00 62c3bc636865722e6465 00".to_owned(),
        ),
        // An IP literal as a name stays a name.
        (
            request(connect, name("1.2.3.4", 80), b""),
            "04 01 0050 00000001 00 312e322e332e34 00".to_owned(),
        ),
    ]);
}

#[test]
fn socks4a_longest_request_is_max_message() {
    let host = "h".repeat(255);
    let value = request(Command::CONNECT, name(&host, 80), &[b'u'; 255]);
    let text = format!(
        "04 01 0050 00000001 {} 00 {} 00",
        rep("75", 255),
        rep("68", 255)
    );
    assert_eq!(hex(&text).len(), MAX_MESSAGE);
    assert_eq!(value.encoded_len(), MAX_MESSAGE);
    check_vectors(&[(value, text)]);
}

#[test]
fn socks4a_any_marker_address_means_a_name() {
    // We send 0.0.0.1; any 0.0.0.x with x != 0 announces a host name.
    check_decode_only(&[
        (
            format!("04 01 01bb 000000ff 00 {EXAMPLE} 00"),
            request(Command::CONNECT, name("example.com", 443), b""),
        ),
        (
            format!("04 01 01bb 00000002 6964 00 {EXAMPLE} 00"),
            request(Command::CONNECT, name("example.com", 443), b"id"),
        ),
    ]);
}

#[test]
fn socks4_replies() {
    let addr = SocketAddrV4::new(Ipv4Addr::new(1, 2, 3, 4), 80);
    let reply = |code: u8| Reply {
        code: ReplyCode(code),
        addr,
    };
    check_vectors(&[
        (reply(90), "00 5a 0050 01020304"),
        (reply(91), "00 5b 0050 01020304"),
        (reply(92), "00 5c 0050 01020304"),
        (reply(93), "00 5d 0050 01020304"),
        (reply(0), "00 00 0050 01020304"),
        (reply(0xff), "00 ff 0050 01020304"),
        (
            Reply {
                code: ReplyCode::GRANTED,
                addr: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
            },
            "00 5a 0000 00000000",
        ),
    ]);
    assert_eq!(ReplyCode::GRANTED, reply(90).code);
    assert_eq!(ReplyCode::REJECTED, reply(91).code);
    assert_eq!(ReplyCode::NO_IDENTD, reply(92).code);
    assert_eq!(ReplyCode::IDENTD_MISMATCH, reply(93).code);
}

#[test]
fn socks4_reply_with_version_4_is_accepted() {
    // Some servers echo VN = 4 in the reply.
    check_decode_only(&[(
        "04 5a 1f90 7f000001",
        Reply {
            code: ReplyCode::GRANTED,
            addr: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080),
        },
    )]);
}
