//! The client state machine, case by case.

use std::net::SocketAddr;

use super::super::client::{Auth, ClientHandshake, ClientStatus, ClientStep, Protocol};
use super::super::{Address, Command, Credentials, Error, ReplyCode, v4};
use super::hex;

fn addr(text: &str) -> Address {
    match text.parse::<SocketAddr>() {
        Ok(ip) => Address::Ip(ip),
        Err(_) => {
            let (name, port) = text.rsplit_once(':').unwrap();
            Address::domain(name, port.parse().unwrap()).unwrap()
        }
    }
}

fn password() -> Auth {
    Auth::Password(Credentials::new("user", "pass").unwrap())
}

/// A started client, and what `start` returned.
fn started(
    protocol: Protocol,
    auth: Auth,
    command: Command,
    target: &str,
) -> (ClientHandshake, Vec<u8>) {
    let mut client = ClientHandshake::new(protocol, auth, command, addr(target)).unwrap();
    let first = client.start();
    assert!(client.start().is_empty(), "start sends once");
    (client, first)
}

fn step(client: &mut ClientHandshake, input: &str) -> Result<ClientStep, Error> {
    client.handshake(&hex(input))
}

fn need_more(send: &str, consumed: usize) -> Result<ClientStep, Error> {
    Ok(ClientStep {
        consumed,
        send: hex(send),
        status: ClientStatus::NeedMore,
    })
}

fn finished(status: ClientStatus, consumed: usize) -> Result<ClientStep, Error> {
    Ok(ClientStep {
        consumed,
        send: Vec::new(),
        status,
    })
}

fn assert_sticky(client: &mut ClientHandshake) {
    for input in [
        "",
        "05 00",
        "00 5a 0000 00000000",
        "05 00 00 01 00000000 0000",
    ] {
        assert_eq!(step(client, input), Err(Error::Failed));
    }
}

/// A SOCKS5 client past method selection (no authentication), waiting for the reply.
fn awaiting_reply(command: Command) -> ClientHandshake {
    let (mut client, _) = started(Protocol::Socks5, Auth::None, command, "1.2.3.4:80");
    let request = format!("05 {:02x} 00 01 01020304 0050", command.0);
    assert_eq!(step(&mut client, "05 00"), need_more(&request, 2));
    client
}

#[test]
fn socks5_without_authentication() {
    let (mut client, greeting) = started(
        Protocol::Socks5,
        Auth::None,
        Command::CONNECT,
        "example.com:443",
    );
    assert_eq!(greeting, hex("05 01 00"));
    assert_eq!(step(&mut client, ""), need_more("", 0));
    assert_eq!(step(&mut client, "05"), need_more("", 0));
    let request = "05 01 00 03 0b 6578616d706c652e636f6d 01bb";
    assert_eq!(step(&mut client, "05 00"), need_more(request, 2));
    assert_eq!(step(&mut client, "05 00 00 01 0a00"), need_more("", 0));
    let reply = step(&mut client, "05 00 00 01 0a000001 1f90 474554");
    assert_eq!(
        reply,
        finished(ClientStatus::Done(addr("10.0.0.1:8080")), 10)
    );
    assert_sticky(&mut client);
}

#[test]
fn socks5_with_password() {
    let (mut client, greeting) =
        started(Protocol::Socks5, password(), Command::CONNECT, "[::1]:22");
    assert_eq!(greeting, hex("05 02 00 02"));
    assert_eq!(
        step(&mut client, "05 02"),
        need_more("01 04 75736572 04 70617373", 2)
    );
    assert_eq!(step(&mut client, "01"), need_more("", 0));
    let request = "05 01 00 04 00000000000000000000000000000001 0016";
    assert_eq!(step(&mut client, "01 00"), need_more(request, 2));
    let reply = step(&mut client, "05 00 00 03 01 61 0016");
    assert_eq!(reply, finished(ClientStatus::Done(addr("a:22")), 8));
}

#[test]
fn socks5_with_password_but_proxy_wants_none() {
    let (mut client, _) = started(Protocol::Socks5, password(), Command::CONNECT, "1.2.3.4:80");
    assert_eq!(
        step(&mut client, "05 00"),
        need_more("05 01 00 01 01020304 0050", 2)
    );
}

#[test]
fn socks5_user_id_is_not_offered() {
    let id = Auth::UserId(v4::UserId::new("alice").unwrap());
    let (_, greeting) = started(Protocol::Socks5, id, Command::CONNECT, "1.2.3.4:80");
    assert_eq!(greeting, hex("05 01 00"));
}

#[test]
fn method_not_offered() {
    for (auth, method) in [
        (Auth::None, 0x02),
        (Auth::None, 0x01),
        (password(), 0x01),
        (password(), 0x03),
        (password(), 0x80),
        (password(), 0xfe),
    ] {
        let (mut client, _) = started(Protocol::Socks5, auth, Command::CONNECT, "1.2.3.4:80");
        let got = step(&mut client, &format!("05 {method:02x}"));
        assert_eq!(got, Err(Error::UnexpectedMethod { method }));
        assert_sticky(&mut client);
    }
}

#[test]
fn no_acceptable_method() {
    for auth in [Auth::None, password()] {
        let (mut client, _) = started(Protocol::Socks5, auth, Command::CONNECT, "1.2.3.4:80");
        let got = step(&mut client, "05 ff");
        assert_eq!(
            got,
            Err(Error::NoAcceptableMethod {
                offered: Vec::new()
            })
        );
        assert_sticky(&mut client);
    }
}

#[test]
fn authentication_rejected() {
    for status in [0x01u8, 0x02, 0x80, 0xff] {
        let (mut client, _) = started(Protocol::Socks5, password(), Command::CONNECT, "1.2.3.4:80");
        step(&mut client, "05 02").unwrap();
        let got = step(&mut client, &format!("01 {status:02x}"));
        assert_eq!(got, Err(Error::AuthRejected { status }));
        assert_sticky(&mut client);
    }
}

#[test]
fn socks5_failure_replies() {
    for code in (0x01..=0x08).chain([0x09, 0xff]) {
        let mut client = awaiting_reply(Command::CONNECT);
        let got = step(&mut client, &format!("05 {code:02x} 00 01 00000000 0000"));
        assert_eq!(
            got,
            Err(Error::Rejected {
                reply: ReplyCode(code)
            })
        );
        assert_sticky(&mut client);
    }
}

#[test]
fn malformed_replies() {
    let mismatch = |message, version, expected| Error::VersionMismatch {
        message,
        version,
        expected,
    };
    let (mut client, _) = started(Protocol::Socks5, Auth::None, Command::CONNECT, "1.2.3.4:80");
    assert_eq!(
        step(&mut client, "04 00"),
        Err(mismatch("SOCKS5 method selection", 4, 5))
    );
    let mut client = awaiting_reply(Command::CONNECT);
    assert_eq!(step(&mut client, "04"), Err(mismatch("SOCKS5 reply", 4, 5)));
    let mut client = awaiting_reply(Command::CONNECT);
    let got = step(&mut client, "05 00 00 07");
    assert_eq!(got, Err(Error::UnknownAddressType { atyp: 7 }));
    let (mut client, _) = started(Protocol::Socks5, password(), Command::CONNECT, "1.2.3.4:80");
    step(&mut client, "05 02").unwrap();
    // A status with version byte 05 (a common server bug) is judged by STATUS alone.
    assert!(step(&mut client, "05 00").is_ok());
    let (mut client, _) = started(Protocol::Socks4, Auth::None, Command::CONNECT, "1.2.3.4:80");
    assert_eq!(step(&mut client, "05"), Err(mismatch("SOCKS4 reply", 5, 0)));
}

#[test]
fn socks4_replies() {
    for code in [91u8, 92, 93, 0, 89, 94, 0xff] {
        let (mut client, _) = started(Protocol::Socks4, Auth::None, Command::CONNECT, "1.2.3.4:80");
        let got = step(&mut client, &format!("00 {code:02x} 0000 00000000"));
        assert_eq!(
            got,
            Err(Error::Rejected4 {
                code: v4::ReplyCode(code)
            })
        );
        assert_sticky(&mut client);
    }
    for vn in ["00", "04"] {
        let (mut client, _) = started(Protocol::Socks4a, Auth::None, Command::CONNECT, "a:80");
        let got = step(&mut client, &format!("{vn} 5a 0050 01020304 ff"));
        assert_eq!(got, finished(ClientStatus::Done(addr("1.2.3.4:80")), 8));
    }
}

#[test]
fn socks4_requests_per_auth() {
    let request = |protocol, auth, target| started(protocol, auth, Command::CONNECT, target).1;
    let id = Auth::UserId(v4::UserId::new("alice").unwrap());
    assert_eq!(
        request(Protocol::Socks4, Auth::None, "1.2.3.4:80"),
        hex("04 01 0050 01020304 00")
    );
    assert_eq!(
        request(Protocol::Socks4, id.clone(), "1.2.3.4:80"),
        hex("04 01 0050 01020304 616c696365 00")
    );
    // The user name of a password goes as the user id; the password is not sent.
    assert_eq!(
        request(Protocol::Socks4a, password(), "a:80"),
        hex("04 01 0050 00000001 75736572 00 61 00")
    );
    // SOCKS4a sends an IP destination as plain SOCKS4.
    assert_eq!(
        request(Protocol::Socks4a, id, "1.2.3.4:80"),
        hex("04 01 0050 01020304 616c696365 00")
    );
    let bind = started(Protocol::Socks4, Auth::None, Command::BIND, "0.0.0.0:0").1;
    assert_eq!(bind, hex("04 02 0000 00000000 00"));
}

#[test]
fn bind_gets_two_replies() {
    let mut client = awaiting_reply(Command::BIND);
    let first = "05 00 00 01 c0000201 1000";
    let second = "05 00 00 04 20010db8000000000000000000000002 d431";
    assert_eq!(
        step(&mut client, first),
        finished(ClientStatus::Bound(addr("192.0.2.1:4096")), 10)
    );
    let got = step(&mut client, second);
    assert_eq!(
        got,
        finished(ClientStatus::Done(addr("[2001:db8::2]:54321")), 22)
    );
    assert_sticky(&mut client);

    // Both replies in one segment: one message per call, the rest stays for the next.
    let mut client = awaiting_reply(Command::BIND);
    let both = hex(&format!("{first} {second} 474554"));
    let got = client.handshake(&both);
    assert_eq!(
        got,
        finished(ClientStatus::Bound(addr("192.0.2.1:4096")), 10)
    );
    let got = client.handshake(&both[10..]);
    assert_eq!(
        got,
        finished(ClientStatus::Done(addr("[2001:db8::2]:54321")), 22)
    );

    let (mut client, _) = started(Protocol::Socks4, Auth::None, Command::BIND, "1.2.3.4:21");
    let got = step(&mut client, "00 5a 1000 c0000201");
    assert_eq!(
        got,
        finished(ClientStatus::Bound(addr("192.0.2.1:4096")), 8)
    );
    let got = step(&mut client, "00 5a 0015 01020304");
    assert_eq!(got, finished(ClientStatus::Done(addr("1.2.3.4:21")), 8));
    // A failed second reply is still a failure.
    let mut client = awaiting_reply(Command::BIND);
    step(&mut client, first).unwrap();
    let got = step(&mut client, "05 05 00 01 00000000 0000");
    assert_eq!(
        got,
        Err(Error::Rejected {
            reply: ReplyCode::CONNECTION_REFUSED
        })
    );
}

#[test]
fn udp_associate_gets_the_relay() {
    let (mut client, _) = started(
        Protocol::Socks5,
        Auth::None,
        Command::UDP_ASSOCIATE,
        "0.0.0.0:0",
    );
    assert_eq!(
        step(&mut client, "05 00"),
        need_more("05 03 00 01 00000000 0000", 2)
    );
    let got = step(&mut client, "05 00 00 01 7f000001 9c40");
    assert_eq!(
        got,
        finished(ClientStatus::Done(addr("127.0.0.1:40000")), 10)
    );
}

#[test]
fn targets_the_protocol_cannot_carry() {
    let new = |protocol, command, target: &str| {
        ClientHandshake::new(protocol, Auth::None, command, addr(target)).map(drop)
    };
    let unsupported = |protocol: &'static str, target: &str| {
        Err(Error::UnsupportedTarget {
            protocol,
            target: target.to_owned(),
        })
    };
    let connect = Command::CONNECT;
    assert_eq!(
        new(Protocol::Socks4, connect, "[::1]:80"),
        unsupported("socks4", "[::1]:80")
    );
    assert_eq!(
        new(Protocol::Socks4a, connect, "[::1]:80"),
        unsupported("socks4a", "[::1]:80")
    );
    assert_eq!(
        new(Protocol::Socks4, connect, "a.b:80"),
        unsupported("socks4", "a.b:80")
    );
    assert_eq!(new(Protocol::Socks4a, connect, "a.b:80"), Ok(()));
    assert_eq!(new(Protocol::Socks5, connect, "[::1]:80"), Ok(()));
    assert_eq!(new(Protocol::Socks4, connect, "0.0.0.0:80"), Ok(()));
    // 0.0.0.x (x != 0) is the SOCKS4a marker: as DSTIP it announces a host name that
    // is not there, and the proxy would read the next bytes as one.
    for marker in ["0.0.0.1:80", "0.0.0.255:80"] {
        assert_eq!(
            new(Protocol::Socks4, connect, marker),
            unsupported("socks4", marker)
        );
        assert_eq!(
            new(Protocol::Socks4a, connect, marker),
            unsupported("socks4a", marker)
        );
        assert_eq!(new(Protocol::Socks5, connect, marker), Ok(()));
    }
    let udp = Command::UDP_ASSOCIATE;
    for protocol in [Protocol::Socks4, Protocol::Socks4a] {
        let got = new(protocol, udp, "1.2.3.4:80");
        assert_eq!(got, Err(Error::UnsupportedCommand { command: udp }));
    }
}

#[test]
fn handshake_before_start_fails() {
    let mut client = ClientHandshake::new(
        Protocol::Socks5,
        Auth::None,
        Command::CONNECT,
        addr("1.2.3.4:80"),
    )
    .unwrap();
    assert_eq!(step(&mut client, "05 00"), Err(Error::Failed));
}

#[test]
fn awaiting_reply_only_once_the_request_is_out() {
    // SOCKS5: greeting out, method chosen, request out: only then.
    let (mut client, _) = started(
        Protocol::Socks5,
        Auth::None,
        Command::CONNECT,
        "192.0.2.1:80",
    );
    assert!(!client.awaiting_reply());
    step(&mut client, "05 00").unwrap();
    assert!(client.awaiting_reply());
    step(&mut client, "05 00 00 01 00000000 0000").unwrap();
    assert!(!client.awaiting_reply());
    // SOCKS4: the request is the first message.
    let (client, _) = started(
        Protocol::Socks4,
        Auth::None,
        Command::CONNECT,
        "192.0.2.1:80",
    );
    assert!(client.awaiting_reply());
    // The message a proxy's silent close gives, by when it came.
    let proxy: SocketAddr = "192.0.2.9:1080".parse().unwrap();
    let after = crate::upstream::UpstreamError::Closed {
        proxy,
        after_request: true,
    };
    assert!(after.to_string().contains("after the request"), "{after}");
    let during = crate::upstream::UpstreamError::Closed {
        proxy,
        after_request: false,
    };
    assert!(
        during.to_string().contains("during the handshake"),
        "{during}"
    );
}
