//! Our client against our server, in memory, for every protocol, authentication,
//! command, address and policy: the server must receive exactly what the client
//! asked for, and a refusal must reach the client as the matching error.

use std::net::SocketAddr;
use std::sync::Arc;

use super::super::client::{Auth, ClientHandshake, ClientStatus, Protocol};
use super::super::fuzzing::converse;
use super::super::server::{ServerPolicy, ServerStatus, Version};
use super::super::{Address, Command, Credentials, Error, ReplyCode, Users, v4};

fn creds(pass: &str) -> Credentials {
    Credentials::new("user", pass).unwrap()
}

fn targets() -> Vec<Address> {
    let ip = |text: &str| Address::Ip(text.parse::<SocketAddr>().unwrap());
    vec![
        ip("198.19.2.2:80"),
        ip("0.0.0.0:0"),
        ip("255.255.255.255:65535"),
        ip("[fd19:2::2]:443"),
        ip("[::]:0"),
        Address::domain("target.test", 8080).unwrap(),
        Address::domain("t".repeat(255), 1).unwrap(),
        Address::domain("ünïcode", 7).unwrap(),
    ]
}

fn auths() -> Vec<Auth> {
    vec![
        Auth::None,
        Auth::Password(creds("pass")),
        Auth::Password(creds("wrong")),
        Auth::UserId(v4::UserId::new("alice").unwrap()),
        Auth::UserId(v4::UserId::new(vec![b'i'; 255]).unwrap()),
    ]
}

fn policies() -> Vec<ServerPolicy> {
    let users = Arc::new(Users::new(vec![creds("other"), creds("pass")]));
    let mut policies = Vec::new();
    for users in [Arc::new(Users::default()), users] {
        for (bind, udp_associate) in [(true, true), (false, true), (true, false)] {
            policies.push(ServerPolicy {
                users: users.clone(),
                bind,
                udp_associate,
            });
        }
    }
    policies
}

/// What the server should make of the client's handshake.
fn expected_server_error(
    policy: &ServerPolicy,
    protocol: Protocol,
    auth: &Auth,
    command: Command,
) -> Option<Error> {
    let socks5 = protocol == Protocol::Socks5;
    if !policy.users.is_empty() {
        match (socks5, auth) {
            (false, _) => return Some(Error::Socks4Refused),
            (true, Auth::Password(c)) if c.password() != b"pass" => {
                return Some(Error::AuthFailed {
                    user: "user".into(),
                });
            }
            (true, Auth::Password(_)) => {}
            (true, _) => return Some(Error::NoAcceptableMethod { offered: vec![0] }),
        }
    }
    let allowed = match command {
        Command::CONNECT => true,
        Command::BIND => policy.bind,
        Command::UDP_ASSOCIATE => policy.udp_associate,
        _ => false,
    };
    (!allowed).then_some(Error::UnsupportedCommand { command })
}

/// The client's view of the server's refusal.
fn client_error(protocol: Protocol, server: &Error) -> Error {
    match (protocol, server) {
        (Protocol::Socks4 | Protocol::Socks4a, _) => Error::Rejected4 {
            code: v4::ReplyCode::REJECTED,
        },
        (_, Error::NoAcceptableMethod { .. }) => Error::NoAcceptableMethod { offered: vec![] },
        (_, Error::AuthFailed { .. }) => Error::AuthRejected { status: 1 },
        (_, error) => Error::Rejected {
            reply: error.reply_code(),
        },
    }
}

/// The server's record of who the client is.
fn expected_user(policy: &ServerPolicy, protocol: Protocol, auth: &Auth) -> Option<String> {
    let bytes = match (protocol, auth) {
        (Protocol::Socks5, Auth::Password(c)) if !policy.users.is_empty() => c.username(),
        (Protocol::Socks5, _) | (_, Auth::None) => return None,
        (_, Auth::Password(c)) => c.username(),
        (_, Auth::UserId(id)) => id.as_bytes(),
    };
    Some(String::from_utf8_lossy(bytes).into_owned())
}

#[test]
fn client_against_server_every_combination() {
    let protocols = [Protocol::Socks4, Protocol::Socks4a, Protocol::Socks5];
    let commands = [
        Command::CONNECT,
        Command::BIND,
        Command::UDP_ASSOCIATE,
        Command(0x7f),
    ];
    let (mut accepted, mut refused, mut impossible) = (0, 0, 0);
    for protocol in protocols {
        for auth in auths() {
            for command in commands {
                for target in targets() {
                    let Ok(client) =
                        ClientHandshake::new(protocol, auth.clone(), command, target.clone())
                    else {
                        impossible += 1;
                        continue;
                    };
                    for policy in policies() {
                        let bound = match (protocol, &target) {
                            (Protocol::Socks5, other) => other.clone(),
                            _ => Address::Ip("192.0.2.9:4000".parse().unwrap()),
                        };
                        let talk = converse(client.clone(), policy.clone(), &bound, b"data");
                        let case = format!("{protocol} {auth:?} {command} {target} {policy:?}");
                        assert!(talk.server_leftover.is_empty(), "{case}");
                        if let Some(error) =
                            expected_server_error(&policy, protocol, &auth, command)
                        {
                            assert_eq!(talk.client, Err(client_error(protocol, &error)), "{case}");
                            assert_eq!(talk.server, ServerStatus::Failed(error), "{case}");
                            refused += 1;
                            continue;
                        }
                        let ServerStatus::Done(request) = &talk.server else {
                            panic!("{case}: {:?}", talk.server);
                        };
                        let version = match (protocol, &target) {
                            (Protocol::Socks5, _) => Version::Socks5,
                            (_, Address::Domain(..)) => Version::Socks4a,
                            _ => Version::Socks4,
                        };
                        assert_eq!(request.version, version, "{case}");
                        assert_eq!(request.command, command, "{case}");
                        assert_eq!(request.target, target, "{case}");
                        assert_eq!(
                            request.user,
                            expected_user(&policy, protocol, &auth),
                            "{case}"
                        );
                        let done = ClientStatus::Done(bound.clone());
                        let events = if command == Command::BIND {
                            vec![ClientStatus::Bound(bound.clone()), done]
                        } else {
                            vec![done]
                        };
                        assert_eq!(talk.client, Ok(events), "{case}");
                        assert_eq!(talk.client_leftover, b"data", "{case}");
                        accepted += 1;
                    }
                }
            }
        }
    }
    // Every path was taken, many times.
    assert!(
        accepted > 300 && refused > 300 && impossible > 20,
        "{accepted} {refused} {impossible}"
    );
}

#[test]
fn socks4_failure_codes_reach_the_client_as_91() {
    let target = Address::Ip("1.2.3.4:80".parse().unwrap());
    let client =
        ClientHandshake::new(Protocol::Socks4, Auth::None, Command::CONNECT, target).unwrap();
    let mut server = super::super::ServerHandshake::new(ServerPolicy::default());
    let mut client = client;
    let step = server.handshake(&client.start());
    let ServerStatus::Done(request) = step.status else {
        panic!("{:?}", step.status)
    };
    let reply = request.reply(ReplyCode::CONNECTION_REFUSED, &Address::UNSPECIFIED);
    let got = client.handshake(&reply);
    assert_eq!(
        got,
        Err(Error::Rejected4 {
            code: v4::ReplyCode::REJECTED
        })
    );
}
