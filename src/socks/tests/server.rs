//! The server state machine, case by case.

use std::sync::Arc;

use super::super::server::{
    Request, ServerHandshake, ServerPolicy, ServerStatus, ServerStep, Version, encode_reply,
};
use super::super::{Address, Command, Credentials, Error, ReplyCode, Users};
use super::hex;

fn users() -> ServerPolicy {
    let account = Credentials::new("user", "pass").unwrap();
    ServerPolicy {
        users: Arc::new(Users::new(vec![account])),
        ..ServerPolicy::default()
    }
}

fn open() -> ServerPolicy {
    ServerPolicy::default()
}

/// One call with the whole input.
fn feed(policy: ServerPolicy, input: &str) -> (ServerHandshake, ServerStep) {
    let mut handshake = ServerHandshake::new(policy);
    let step = handshake.handshake(&hex(input));
    (handshake, step)
}

/// The input fails with `error` after replying `reply`, and stays failed.
fn fails(policy: ServerPolicy, input: &str, reply: &str, error: Error) {
    let (mut handshake, step) = feed(policy, input);
    assert_eq!(step.status, ServerStatus::Failed(error), "input {input}");
    assert_eq!(step.reply, hex(reply), "input {input}");
    assert!(step.consumed <= hex(input).len());
    assert_sticky(&mut handshake);
}

fn assert_sticky(handshake: &mut ServerHandshake) {
    for input in [
        &b""[..],
        b"\x05\x01\x00",
        b"\x04\x01\x00\x50\x01\x02\x03\x04\x00",
    ] {
        let again = handshake.handshake(input);
        assert_eq!(again.status, ServerStatus::Failed(Error::Failed));
        assert_eq!((again.consumed, again.reply.len()), (0, 0));
    }
}

fn request(version: Version, command: Command, target: &str, user: Option<&str>) -> Request {
    let target = match target.parse() {
        Ok(ip) => Address::Ip(ip),
        Err(_) => {
            let (name, port) = target.rsplit_once(':').unwrap();
            Address::domain(name, port.parse().unwrap()).unwrap()
        }
    };
    Request {
        version,
        command,
        target,
        user: user.map(str::to_owned),
    }
}

const CONNECT_1234: &str = "05 01 00 01 01020304 0050";
fn v5_fail(code: u8) -> String {
    format!("05 {code:02x} 00 01 00000000 0000")
}
const V4_REFUSED: &str = "00 5b 0000 00000000";

#[test]
fn socks4_refused_when_users_are_required() {
    fails(
        users(),
        "04 01 0050 01020304 00",
        V4_REFUSED,
        Error::Socks4Refused,
    );
    fails(
        users(),
        "04 01 0050 01020304 75736572 00",
        V4_REFUSED,
        Error::Socks4Refused,
    );
    fails(
        users(),
        "04 01 0050 00000001 00 61 00",
        V4_REFUSED,
        Error::Socks4Refused,
    );
}

#[test]
fn no_acceptable_method() {
    let none = |offered: &[u8]| Error::NoAcceptableMethod {
        offered: offered.to_vec(),
    };
    fails(users(), "05 01 00", "05 ff", none(&[0]));
    fails(users(), "05 02 00 01", "05 ff", none(&[0, 1]));
    fails(open(), "05 01 02", "05 ff", none(&[2]));
    fails(open(), "05 00", "05 ff", none(&[]));
    fails(users(), "05 00", "05 ff", none(&[]));
}

#[test]
fn wrong_credentials() {
    let failed = |user: &str| Error::AuthFailed {
        user: user.to_owned(),
    };
    fails(
        users(),
        "05 01 02 01 04 75736572 04 6e6f7065",
        "05 02 01 01",
        failed("user"),
    );
    fails(
        users(),
        "05 01 02 01 04 75736572 03 706173",
        "05 02 01 01",
        failed("user"),
    );
    fails(
        users(),
        "05 01 02 01 04 55534552 04 70617373",
        "05 02 01 01",
        failed("USER"),
    );
    fails(
        users(),
        "05 01 02 01 01 ff 04 70617373",
        "05 02 01 01",
        failed("\u{fffd}"),
    );
    // A malformed sub-negotiation is answered with a failure status too.
    let empty_user = Error::FieldLength {
        field: "user name",
        len: 0,
        min: 1,
        max: 255,
    };
    fails(users(), "05 01 02 01 00", "05 02 01 01", empty_user);
    let bad_version = Error::VersionMismatch {
        message: "RFC 1929 request",
        version: 5,
        expected: 1,
    };
    fails(users(), "05 01 02 05 01 00", "05 02 01 01", bad_version);
}

#[test]
fn right_credentials_then_request_in_steps() {
    let mut handshake = ServerHandshake::new(users());
    let greeting = handshake.handshake(&hex("05 02 00 02"));
    assert_eq!(
        (greeting.consumed, greeting.status),
        (4, ServerStatus::NeedMore)
    );
    assert_eq!(greeting.reply, hex("05 02"));
    let login = handshake.handshake(&hex("01 04 75736572 04 70617373"));
    assert_eq!((login.consumed, login.status), (11, ServerStatus::NeedMore));
    assert_eq!(login.reply, hex("01 00"));
    let partial = handshake.handshake(&hex("05 01 00 01 0102"));
    assert_eq!(
        (partial.consumed, partial.status),
        (0, ServerStatus::NeedMore)
    );
    assert!(partial.reply.is_empty());
    let done = handshake.handshake(&hex(CONNECT_1234));
    let expected = request(
        Version::Socks5,
        Command::CONNECT,
        "1.2.3.4:80",
        Some("user"),
    );
    assert_eq!(done.status, ServerStatus::Done(expected));
    assert_eq!((done.consumed, done.reply.len()), (10, 0));
    assert_sticky(&mut handshake);
}

#[test]
fn pipelined_handshake_leaves_the_payload() {
    let input = hex(&format!(
        "05 01 02 01 04 75736572 04 70617373 {CONNECT_1234} 474554"
    ));
    let step = ServerHandshake::new(users()).handshake(&input);
    assert_eq!(step.reply, hex("05 02 01 00"));
    assert_eq!(step.consumed, input.len() - 3);
    let expected = request(
        Version::Socks5,
        Command::CONNECT,
        "1.2.3.4:80",
        Some("user"),
    );
    assert_eq!(step.status, ServerStatus::Done(expected));

    let input = hex("04 01 0050 01020304 00 474554");
    let step = ServerHandshake::new(open()).handshake(&input);
    assert_eq!((step.consumed, step.reply.len()), (9, 0));
}

#[test]
fn accepted_requests() {
    let done = |policy, input: &str, expected: Request| {
        let (mut handshake, step) = feed(policy, input);
        assert_eq!(step.status, ServerStatus::Done(expected), "input {input}");
        assert_eq!(step.consumed, hex(input).len());
        assert_sticky(&mut handshake);
    };
    let (v4, v4a, v5) = (Version::Socks4, Version::Socks4a, Version::Socks5);
    let (connect, bind, udp) = (Command::CONNECT, Command::BIND, Command::UDP_ASSOCIATE);
    done(
        open(),
        "04 01 0050 01020304 00",
        request(v4, connect, "1.2.3.4:80", None),
    );
    let alice = Some("alice");
    done(
        open(),
        "04 02 0050 01020304 616c696365 00",
        request(v4, bind, "1.2.3.4:80", alice),
    );
    done(
        open(),
        "04 01 0050 00000001 00 61 00",
        request(v4a, connect, "a:80", None),
    );
    done(
        open(),
        "04 01 0050 000000ff 6964 00 61 00",
        request(v4a, connect, "a:80", Some("id")),
    );
    // The client's preference order does not matter; no-auth wins without users.
    done(
        open(),
        &format!("05 02 02 00 {CONNECT_1234}"),
        request(v5, connect, "1.2.3.4:80", None),
    );
    let v6 = "05 03 00 04 00000000000000000000000000000001 0035";
    done(
        open(),
        &format!("05 01 00 {v6}"),
        request(v5, udp, "[::1]:53", None),
    );
    done(
        open(),
        "05 01 00 05 02 00 03 01 61 0015",
        request(v5, bind, "a:21", None),
    );
}

#[test]
fn unknown_command() {
    let unsupported = |command: u8| Error::UnsupportedCommand {
        command: Command(command),
    };
    for command in [0x00, 0x04, 0x09, 0xff] {
        let input = format!("05 01 00 05 {command:02x} 00 01 01020304 0050");
        fails(
            open(),
            &input,
            &format!("05 00 {}", v5_fail(7)),
            unsupported(command),
        );
        let input = format!("04 {command:02x} 0050 01020304 00");
        fails(open(), &input, V4_REFUSED, unsupported(command));
    }
    // UDP ASSOCIATE does not exist in SOCKS4.
    fails(open(), "04 03 0050 01020304 00", V4_REFUSED, unsupported(3));
    fails(
        open(),
        "04 03 0050 00000001 00 61 00",
        V4_REFUSED,
        unsupported(3),
    );
}

#[test]
fn commands_disabled_by_policy() {
    let unsupported = |command: Command| Error::UnsupportedCommand { command };
    let no_bind = ServerPolicy {
        bind: false,
        ..open()
    };
    let no_udp = ServerPolicy {
        udp_associate: false,
        ..open()
    };
    let v5_refused = format!("05 00 {}", v5_fail(7));
    let bind5 = "05 01 00 05 02 00 01 01020304 0050";
    fails(
        no_bind.clone(),
        bind5,
        &v5_refused,
        unsupported(Command::BIND),
    );
    fails(
        no_bind.clone(),
        "04 02 0050 01020304 00",
        V4_REFUSED,
        unsupported(Command::BIND),
    );
    let udp5 = "05 01 00 05 03 00 01 00000000 0000";
    fails(
        no_udp.clone(),
        udp5,
        &v5_refused,
        unsupported(Command::UDP_ASSOCIATE),
    );
    // What stays allowed.
    assert!(matches!(
        feed(no_bind, udp5).1.status,
        ServerStatus::Done(_)
    ));
    assert!(matches!(
        feed(no_udp, bind5).1.status,
        ServerStatus::Done(_)
    ));
}

#[test]
fn bad_addresses_get_their_reply_codes() {
    for atyp in [0x00, 0x02, 0x05, 0xff] {
        let input = format!("05 01 00 05 01 00 {atyp:02x}");
        let reply = format!("05 00 {}", v5_fail(8));
        fails(open(), &input, &reply, Error::UnknownAddressType { atyp });
    }
    let not_utf8 = Error::InvalidDomain {
        reason: "not UTF-8",
    };
    let reply = format!("05 00 {}", v5_fail(4));
    fails(
        open(),
        "05 01 00 05 01 00 03 01 ff 0050",
        &reply,
        not_utf8.clone(),
    );
    let empty = Error::FieldLength {
        field: "domain name",
        len: 0,
        min: 1,
        max: 255,
    };
    // An empty name is as unreachable as a malformed one: 0x04 for both.
    let reply = format!("05 00 {}", v5_fail(4));
    fails(open(), "05 01 00 05 01 00 03 00 0050", &reply, empty);
    // SOCKS4a: every failure is 91.
    fails(open(), "04 01 0050 00000001 00 ff 00", V4_REFUSED, not_utf8);
}

#[test]
fn wrong_versions() {
    for first in (0..=255u8).filter(|&b| b != 4 && b != 5) {
        fails(
            open(),
            &format!("{first:02x} 01 00"),
            "",
            Error::UnsupportedVersion { version: first },
        );
    }
    let mismatch = Error::VersionMismatch {
        message: "SOCKS5 request",
        version: 4,
        expected: 5,
    };
    fails(
        open(),
        "05 01 00 04 01 0050",
        &format!("05 00 {}", v5_fail(1)),
        mismatch,
    );
}

#[test]
fn need_more_consumes_nothing_partial() {
    for input in [
        "",
        "05",
        "05 02 00",
        "04 01 0050 010203",
        "04 01 0050 00000001 00 61",
    ] {
        let (_, step) = feed(open(), input);
        assert_eq!(step.status, ServerStatus::NeedMore, "input {input}");
        assert_eq!((step.consumed, step.reply.len()), (0, 0));
    }
    // A complete greeting is handled at once even when the request is not there yet.
    let (_, step) = feed(open(), "05 01 00 05 01");
    assert_eq!((step.consumed, step.reply), (3, hex("05 00")));
}

#[test]
fn replies_per_version() {
    let bound = Address::Ip("1.2.3.4:80".parse().unwrap());
    let v6 = Address::Ip("[::1]:8080".parse().unwrap());
    let name = Address::domain("a", 21).unwrap();
    let reply = |version, code: u8, bound: &Address| encode_reply(version, ReplyCode(code), bound);
    assert_eq!(
        reply(Version::Socks5, 0, &bound),
        hex("05 00 00 01 01020304 0050")
    );
    assert_eq!(
        reply(Version::Socks5, 5, &name),
        hex("05 05 00 03 01 61 0015")
    );
    assert_eq!(
        reply(Version::Socks4, 0, &bound),
        hex("00 5a 0050 01020304")
    );
    // SOCKS4 has one failure code and IPv4 only: others go as 0.0.0.0 with the port.
    for code in 1..=8 {
        assert_eq!(
            reply(Version::Socks4a, code, &bound),
            hex("00 5b 0050 01020304")
        );
    }
    assert_eq!(reply(Version::Socks4, 0, &v6), hex("00 5a 1f90 00000000"));
    assert_eq!(
        reply(Version::Socks4a, 0, &name),
        hex("00 5a 0015 00000000")
    );
    let req = request(Version::Socks4a, Command::CONNECT, "a:21", None);
    assert_eq!(
        req.reply(ReplyCode::SUCCEEDED, &bound),
        hex("00 5a 0050 01020304")
    );
}

#[test]
fn every_error_maps_to_a_reply_code() {
    let cases = [
        (
            Error::UnsupportedCommand {
                command: Command(9),
            },
            0x07,
        ),
        (Error::UnknownAddressType { atyp: 9 }, 0x08),
        (Error::InvalidDomain { reason: "x" }, 0x04),
        (
            Error::Rejected {
                reply: ReplyCode(0x05),
            },
            0x05,
        ),
        (Error::Socks4Refused, 0x02),
        (Error::AuthFailed { user: "u".into() }, 0x02),
        (
            Error::UnsupportedTarget {
                protocol: "socks4",
                target: "x".into(),
            },
            0x08,
        ),
        (Error::UnsupportedVersion { version: 9 }, 0x01),
        (Error::Failed, 0x01),
        (Error::TruncatedDatagram { len: 1 }, 0x01),
    ];
    for (error, code) in cases {
        assert_eq!(error.reply_code(), ReplyCode(code), "{error}");
    }
}
