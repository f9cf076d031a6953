//! Any split of the input gives the same result: valid byte streams fed to both state
//! machines in arbitrary chunks (one byte at a time, all at once, anything between),
//! and arbitrary bytes through the fuzz harnesses.

use std::sync::Arc;

use proptest::collection::vec;
use proptest::prelude::*;

use super::super::client::{Auth, ClientHandshake, ClientStatus, Protocol};
use super::super::fuzzing::{self, drive_client, drive_server};
use super::super::server::{Request, ServerPolicy, ServerStatus, Version};
use super::super::v5::{Greeting, MethodSelection};
use super::super::{Address, Command, Credentials, Message, Method, ReplyCode, Users};
use super::super::{auth, v4, v5};
use super::strategies::{
    address, chunks, credentials, domain_name, payload, socks4_ipv4, user_id, wire_bytes,
};

/// What a client sends to a server, and what the server must make of it.
#[derive(Debug, Clone)]
struct ClientScript {
    policy: ServerPolicy,
    bytes: Vec<u8>,
    payload: usize,
    reply: Vec<u8>,
    request: Request,
}

fn socks4_script() -> impl Strategy<Value = ClientScript> {
    let command = prop_oneof![Just(Command::CONNECT), Just(Command::BIND)];
    let target = prop_oneof![
        socks4_ipv4().prop_map(v4::Target::Ip),
        (domain_name(), any::<u16>()).prop_map(|(n, p)| v4::Target::Domain(n, p)),
    ];
    (command, target, user_id(), payload()).prop_map(|(command, target, user_id, payload)| {
        let message = v4::Request {
            command,
            target: target.clone(),
            user_id: user_id.clone(),
        };
        let (version, target) = match target {
            v4::Target::Ip(a) => (Version::Socks4, Address::Ip(a.into())),
            v4::Target::Domain(name, port) => (Version::Socks4a, Address::Domain(name, port)),
        };
        let id = user_id.as_bytes();
        ClientScript {
            policy: ServerPolicy::default(),
            bytes: [message.to_bytes(), payload.clone()].concat(),
            payload: payload.len(),
            reply: Vec::new(),
            request: Request {
                version,
                command,
                target,
                user: (!id.is_empty()).then(|| String::from_utf8_lossy(id).into_owned()),
            },
        }
    })
}

/// A method list that contains `wanted`, among any others.
fn methods_with(wanted: u8) -> impl Strategy<Value = Vec<Method>> {
    (vec(any::<u8>(), 0..8), any::<prop::sample::Index>()).prop_map(move |(mut list, at)| {
        list.insert(at.index(list.len() + 1), wanted);
        list.into_iter().map(Method).collect()
    })
}

fn socks5_script() -> impl Strategy<Value = ClientScript> {
    let command = prop_oneof![
        Just(Command::CONNECT),
        Just(Command::BIND),
        Just(Command::UDP_ASSOCIATE)
    ];
    let login = prop_oneof![Just(None), credentials().prop_map(Some)];
    (login, any::<u8>(), command, address(), payload()).prop_flat_map(
        |(login, other, command, target, payload)| {
            let wanted = if login.is_some() { 2 } else { 0 };
            methods_with(wanted).prop_map(move |methods| {
                let mut bytes = Greeting::new(methods).unwrap().to_bytes();
                let mut reply = MethodSelection {
                    method: Method(wanted),
                }
                .to_bytes();
                let mut policy = ServerPolicy::default();
                if let Some(creds) = &login {
                    // Another account first, so verification looks past the first entry.
                    let other = Credentials::new([other], "x").unwrap();
                    policy.users = Arc::new(Users::new(vec![other, creds.clone()]));
                    bytes.extend(creds.to_bytes());
                    reply.extend([auth::VERSION, auth::STATUS_SUCCESS]);
                }
                let request = v5::Request {
                    command,
                    target: target.clone(),
                };
                bytes.extend(request.to_bytes());
                bytes.extend(&payload);
                ClientScript {
                    policy,
                    bytes,
                    payload: payload.len(),
                    reply,
                    request: Request {
                        version: Version::Socks5,
                        command,
                        target: target.clone(),
                        user: login
                            .as_ref()
                            .map(|c| String::from_utf8_lossy(c.username()).into_owned()),
                    },
                }
            })
        },
    )
}

fn client_script() -> impl Strategy<Value = ClientScript> {
    prop_oneof![socks4_script(), socks5_script()]
}

/// What a proxy sends to a client, and what the client must make of it.
#[derive(Debug, Clone)]
struct ProxyScript {
    client: ClientHandshake,
    bytes: Vec<u8>,
    payload: usize,
    start: Vec<u8>,
    sent: Vec<u8>,
    events: Vec<ClientStatus>,
}

fn socks4_proxy_script() -> impl Strategy<Value = ProxyScript> {
    let protocol = prop_oneof![Just(Protocol::Socks4), Just(Protocol::Socks4a)];
    let command = prop_oneof![Just(Command::CONNECT), Just(Command::BIND)];
    let auth = prop_oneof![
        Just(Auth::None),
        user_id().prop_map(Auth::UserId),
        credentials().prop_map(Auth::Password),
    ];
    let version = prop_oneof![Just(0u8), Just(4u8)];
    let bound = (socks4_ipv4(), socks4_ipv4(), version);
    (protocol, command, auth, socks4_ipv4(), bound, payload()).prop_filter_map(
        "user name with NUL",
        |(protocol, command, auth, target, (first, second, vn), payload)| {
            let user_id = match &auth {
                Auth::None => v4::UserId::default(),
                Auth::UserId(id) => id.clone(),
                Auth::Password(c) => v4::UserId::new(c.username()).ok()?,
            };
            let target_addr = Address::Ip(target.into());
            let client = ClientHandshake::new(protocol, auth, command, target_addr).ok()?;
            let reply = |addr: std::net::SocketAddrV4| {
                let mut bytes = v4::Reply {
                    code: v4::ReplyCode::GRANTED,
                    addr,
                }
                .to_bytes();
                bytes[0] = vn;
                bytes
            };
            let mut bytes = reply(first);
            let done = ClientStatus::Done(Address::Ip(second.into()));
            let events = if command == Command::BIND {
                bytes.extend(reply(second));
                vec![ClientStatus::Bound(Address::Ip(first.into())), done]
            } else {
                bytes = reply(second);
                vec![done]
            };
            let start = v4::Request {
                command,
                target: v4::Target::Ip(target),
                user_id,
            }
            .to_bytes();
            bytes.extend(&payload);
            Some(ProxyScript {
                client,
                bytes,
                payload: payload.len(),
                start,
                sent: Vec::new(),
                events,
            })
        },
    )
}

fn socks5_proxy_script() -> impl Strategy<Value = ProxyScript> {
    let command = prop_oneof![
        Just(Command::CONNECT),
        Just(Command::BIND),
        Just(Command::UDP_ASSOCIATE)
    ];
    // With credentials the proxy may still choose "no authentication".
    let login = prop_oneof![
        Just((None, false)),
        (credentials(), any::<bool>()).prop_map(|(c, use_it)| (Some(c), use_it)),
    ];
    (login, command, address(), address(), address(), payload()).prop_map(
        |((creds, use_it), command, target, first, second, payload)| {
            let auth = creds.clone().map_or(Auth::None, Auth::Password);
            let client =
                ClientHandshake::new(Protocol::Socks5, auth, command, target.clone()).unwrap();
            let offered = if creds.is_some() { vec![0, 2] } else { vec![0] };
            let start = Greeting::new(offered.into_iter().map(Method).collect()).unwrap();
            let method = if use_it { 2 } else { 0 };
            let mut bytes = vec![v5::VERSION, method];
            let mut sent = Vec::new();
            if let (Some(creds), true) = (&creds, use_it) {
                bytes.extend([auth::VERSION, auth::STATUS_SUCCESS]);
                sent.extend(creds.to_bytes());
            }
            sent.extend(v5::Request { command, target }.to_bytes());
            let reply = |bound: &Address| {
                v5::Reply {
                    code: ReplyCode::SUCCEEDED,
                    bound: bound.clone(),
                }
                .to_bytes()
            };
            let done = ClientStatus::Done(second.clone());
            let events = if command == Command::BIND {
                bytes.extend(reply(&first));
                vec![ClientStatus::Bound(first), done]
            } else {
                vec![done]
            };
            bytes.extend(reply(&second));
            bytes.extend(&payload);
            ProxyScript {
                client,
                bytes,
                payload: payload.len(),
                start: start.to_bytes(),
                sent,
                events,
            }
        },
    )
}

fn proxy_script() -> impl Strategy<Value = ProxyScript> {
    prop_oneof![socks4_proxy_script(), socks5_proxy_script()]
}

proptest! {
    /// Greeting, credentials, request and payload in one chunk, one byte at a time,
    /// and in arbitrary chunks: the same request, the same replies, and the payload
    /// left unconsumed.
    #[test]
    fn server_any_split(script in client_script(), chunks in chunks()) {
        let len = script.bytes.len();
        for sizes in [&[][..], &[1], &chunks] {
            let run = drive_server(&script.policy, &script.bytes, sizes);
            prop_assert_eq!(&run.status, &ServerStatus::Done(script.request.clone()));
            prop_assert_eq!(&run.reply, &script.reply);
            prop_assert_eq!(run.consumed, len - script.payload);
        }
    }

    /// Proxy replies (and the second BIND reply, and data) in one chunk, one byte at a
    /// time, and in arbitrary chunks: the same events, the same bytes sent, and the
    /// data left unconsumed.
    #[test]
    fn client_any_split(script in proxy_script(), chunks in chunks()) {
        let len = script.bytes.len();
        for sizes in [&[][..], &[1], &chunks] {
            let run = drive_client(&script.client, &script.bytes, sizes);
            prop_assert_eq!(&run.error, &None);
            prop_assert_eq!(&run.start, &script.start);
            prop_assert_eq!(&run.sent, &script.sent);
            prop_assert_eq!(&run.events, &script.events);
            prop_assert_eq!(run.consumed, len - script.payload);
        }
    }

    /// Arbitrary bytes: the harnesses check that chunking never changes the outcome,
    /// that nothing is over-consumed, and that failure is sticky.
    #[test]
    fn server_any_bytes_any_split(policy in any::<u8>(), sizes in vec(any::<u8>(), 0..8), data in wire_bytes()) {
        let mut input = vec![policy, sizes.len() as u8];
        input.extend(sizes);
        input.extend(data);
        fuzzing::server_handshake_chunks(&input);
    }

    #[test]
    fn client_any_bytes_any_split(config in any::<u8>(), target in any::<u8>(), sizes in vec(any::<u8>(), 0..8), data in wire_bytes()) {
        let mut input = vec![config, target, sizes.len() as u8];
        input.extend(sizes);
        input.extend(data);
        fuzzing::client_handshake_chunks(&input);
    }

    /// Decoders never panic, and a decoded message never claims more bytes than given.
    #[test]
    fn decoders_never_panic(data in wire_bytes()) {
        macro_rules! within {
            ($($t:ty),*) => {$(
                if let Ok(Some((_, n))) = <$t>::decode(&data) {
                    prop_assert!(n <= data.len());
                }
            )*};
        }
        within!(Address, v4::Request, v4::Reply, Greeting, MethodSelection, v5::Request,
            v5::Reply, Credentials, auth::Status, super::super::udp::Header);
        fuzzing::decoders(&data);
        fuzzing::udp_datagram(&data);
    }

    #[test]
    fn client_server_any_config(data in vec(any::<u8>(), 0..300)) {
        fuzzing::client_server(&data);
    }
}
