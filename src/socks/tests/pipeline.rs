//! The pipelined SOCKS5 client: everything up to the request in the first write, then
//! each reply checked in turn, whether the replies come together or byte by byte; and
//! our server reading a pipelined handshake.

use std::net::SocketAddr;
use std::sync::Arc;

use super::super::client::{Auth, ClientHandshake, ClientStatus, Protocol};
use super::super::fuzzing::converse;
use super::super::server::{ServerPolicy, ServerStatus};
use super::super::{Address, Command, Credentials, Error, ReplyCode, Users};
use super::hex;

fn target() -> Address {
    Address::Ip("1.2.3.4:80".parse::<SocketAddr>().unwrap())
}

fn password(pass: &str) -> Auth {
    Auth::Password(Credentials::new("user", pass).unwrap())
}

fn pipelined(auth: Auth) -> (ClientHandshake, Vec<u8>) {
    let mut client = ClientHandshake::new(Protocol::Socks5, auth, Command::CONNECT, target())
        .unwrap()
        .pipelined(true);
    let first = client.start();
    assert!(client.start().is_empty(), "start sends once");
    (client, first)
}

const REQUEST: &str = "05 01 00 01 01020304 0050";
const REPLY: &str = "05 00 00 01 0a000001 1f90";

/// Feeds `input` to the client in pieces of `chunk` bytes the way `negotiate` does
/// (keep what was not consumed, parse again while it consumes), and returns the
/// final status, the bytes it asked to send on the way, and what was left unparsed.
fn run(
    client: &mut ClientHandshake,
    input: &[u8],
    chunk: usize,
) -> (Result<ClientStatus, Error>, Vec<u8>, Vec<u8>) {
    let mut buf = Vec::new();
    let mut sent = Vec::new();
    let mut pieces = input.chunks(chunk);
    loop {
        let step = match client.handshake(&buf) {
            Ok(step) => step,
            Err(e) => return (Err(e), sent, buf),
        };
        buf.drain(..step.consumed);
        sent.extend(step.send);
        match step.status {
            ClientStatus::NeedMore if step.consumed > 0 => continue,
            ClientStatus::NeedMore => {}
            done => return (Ok(done), sent, buf),
        }
        match pieces.next() {
            Some(piece) => buf.extend_from_slice(piece),
            None => return (Ok(ClientStatus::NeedMore), sent, buf),
        }
    }
}

#[test]
fn no_auth_sends_greeting_and_request_at_once() {
    let (_, first) = pipelined(Auth::None);
    assert_eq!(first, hex(&format!("05 01 00 {REQUEST}")));
    // A SOCKS4 user id means nothing to SOCKS5: the same bytes.
    let (_, first) = pipelined(Auth::UserId(
        super::super::v4::UserId::new("alice").unwrap(),
    ));
    assert_eq!(first, hex(&format!("05 01 00 {REQUEST}")));
}

#[test]
fn password_sends_greeting_credentials_and_request_at_once() {
    let (_, first) = pipelined(password("pass"));
    assert_eq!(
        first,
        hex(&format!("05 01 02 01 04 75736572 04 70617373 {REQUEST}"))
    );
}

#[test]
fn replies_are_checked_in_turn_whatever_the_pieces() {
    for chunk in 1..=16 {
        let (mut client, _) = pipelined(Auth::None);
        let input = hex(&format!("05 00 {REPLY} 474554"));
        let (status, sent, left) = run(&mut client, &input, chunk);
        let done = ClientStatus::Done(Address::Ip("10.0.0.1:8080".parse().unwrap()));
        assert_eq!(status, Ok(done.clone()), "chunk {chunk}");
        assert!(sent.is_empty(), "nothing more to send (chunk {chunk})");
        // Whatever followed the reply (as far as it was fed) is left to the caller.
        assert!(
            hex("474554").starts_with(&left),
            "chunk {chunk}: {left:02x?}"
        );

        let (mut client, _) = pipelined(password("pass"));
        let input = hex(&format!("05 02 01 00 {REPLY}"));
        let (status, sent, _) = run(&mut client, &input, chunk);
        assert_eq!(status, Ok(done), "chunk {chunk}");
        assert!(sent.is_empty());
    }
}

#[test]
fn a_refused_method_is_a_clean_error() {
    let (mut client, _) = pipelined(Auth::None);
    let (status, _, _) = run(&mut client, &hex("05 ff"), 1);
    assert_eq!(status, Err(Error::NoAcceptableMethod { offered: vec![] }));
    assert_eq!(client.handshake(&hex(REPLY)), Err(Error::Failed), "sticky");

    let (mut client, _) = pipelined(password("pass"));
    let (status, _, _) = run(&mut client, &hex("05 ff"), 2);
    assert_eq!(status, Err(Error::NoAcceptableMethod { offered: vec![] }));
}

#[test]
fn a_method_that_was_not_offered_is_an_error() {
    // The credentials already went out: a server that picks "no authentication" would
    // read them as the request.
    let (mut client, _) = pipelined(password("pass"));
    let (status, _, _) = run(&mut client, &hex(&format!("05 00 {REPLY}")), 64);
    assert_eq!(status, Err(Error::UnexpectedMethod { method: 0 }));

    let (mut client, _) = pipelined(Auth::None);
    let (status, _, _) = run(&mut client, &hex("05 02 01 00"), 64);
    assert_eq!(status, Err(Error::UnexpectedMethod { method: 2 }));
}

#[test]
fn a_rejected_login_and_a_failure_reply_are_errors() {
    let (mut client, _) = pipelined(password("wrong"));
    let (status, _, _) = run(&mut client, &hex("05 02 01 01"), 3);
    assert_eq!(status, Err(Error::AuthRejected { status: 1 }));

    let (mut client, _) = pipelined(Auth::None);
    let (status, _, _) = run(&mut client, &hex("05 00 05 05 00 01 00000000 0000"), 4);
    assert_eq!(
        status,
        Err(Error::Rejected {
            reply: ReplyCode::CONNECTION_REFUSED
        })
    );
}

#[test]
fn socks4_is_unchanged_by_pipelining() {
    for protocol in [Protocol::Socks4, Protocol::Socks4a] {
        let plain = ClientHandshake::new(protocol, Auth::None, Command::CONNECT, target())
            .unwrap()
            .start();
        let piped = ClientHandshake::new(protocol, Auth::None, Command::CONNECT, target())
            .unwrap()
            .pipelined(true)
            .start();
        assert_eq!(plain, piped, "{protocol}");
    }
}

#[test]
fn our_server_reads_a_pipelined_handshake() {
    let users = Arc::new(Users::new(vec![Credentials::new("user", "pass").unwrap()]));
    let open = ServerPolicy::default();
    let login = ServerPolicy {
        users,
        ..ServerPolicy::default()
    };
    let bound = Address::Ip("192.0.2.9:4000".parse().unwrap());
    for command in [Command::CONNECT, Command::UDP_ASSOCIATE, Command::BIND] {
        let cases = [
            (Auth::None, open.clone(), None),
            (password("pass"), login.clone(), None),
            (
                password("wrong"),
                login.clone(),
                Some(Error::AuthRejected { status: 1 }),
            ),
            // Credentials offered to a server without accounts: it has no
            // username/password method, and says so.
            (
                password("pass"),
                open.clone(),
                Some(Error::NoAcceptableMethod { offered: vec![] }),
            ),
            (
                Auth::None,
                login.clone(),
                Some(Error::NoAcceptableMethod { offered: vec![] }),
            ),
        ];
        for (auth, policy, error) in cases {
            let client = ClientHandshake::new(Protocol::Socks5, auth.clone(), command, target())
                .unwrap()
                .pipelined(true);
            let talk = converse(client, policy, &bound, b"data");
            let case = format!("{command} {auth:?}");
            match error {
                Some(error) => assert_eq!(talk.client, Err(error), "{case}"),
                None => {
                    let ServerStatus::Done(request) = &talk.server else {
                        panic!("{case}: {:?}", talk.server);
                    };
                    assert_eq!(request.target, target(), "{case}");
                    assert_eq!(request.command, command, "{case}");
                    assert!(talk.server_leftover.is_empty(), "{case}");
                    assert_eq!(talk.client_leftover, b"data", "{case}");
                    let done = ClientStatus::Done(bound.clone());
                    let events = if command == Command::BIND {
                        vec![ClientStatus::Bound(bound.clone()), done]
                    } else {
                        vec![done]
                    };
                    assert_eq!(talk.client, Ok(events), "{case}");
                }
            }
        }
    }
}
