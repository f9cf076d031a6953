//! Fuzzing harnesses for the SOCKS codec. They live in the library, not in `fuzz/`,
//! so that stable `cargo test` replays the fuzz corpus and every crash input
//! (`tests/fuzz_corpus.rs`) without nightly; the `fuzz/` targets only call them.
//!
//! Each entry point takes arbitrary bytes. The leading bytes choose a configuration
//! and chunk sizes; the rest is the input. A broken invariant fails an `assert!`,
//! which is the fuzzer's signal; any other input returns normally.
//!
//! Layouts (`n` is `data[k] % 8`, then `n` chunk-size bytes follow, 0 meaning 1):
//!
//! ```text
//! server_handshake_chunks: | policy | n | sizes... | client bytes      |
//! client_handshake_chunks: | config | target | n | sizes... | proxy bytes |
//! client_server:           | config | policy | target kind | target bytes... |
//! decoders, udp_datagram:  | input                                       |
//! policy: bit 0 users required ("user"/"pass"), bit 1 no BIND, bit 2 no UDP
//! config: with b = c & 0x7f: protocol = b % 3 (4, 4a, 5); auth = b / 3 % 3 (none,
//!         user:pass, user id); command = b / 9 % 4 (CONNECT, BIND, UDP ASSOCIATE,
//!         0x7f); bit 7 of c: the password is wrong
//! target (client_handshake_chunks): t % 4 = 1.2.3.4:80, [2001:db8::1]:443,
//!         example.com:443, 0.0.0.1:80
//! ```

// A harness exists to panic when an invariant breaks.
#![allow(clippy::panic)]

use std::fmt::Debug;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use super::client::{Auth, ClientHandshake, ClientStatus, Protocol};
use super::server::{Request, ServerPolicy, ServerStatus, Version};
use super::{Address, Command, Credentials, Error, MAX_MESSAGE, Message, ReplyCode, Users};
use super::{addr, auth, udp, v4, v5};

mod drive;

pub use drive::{ClientRun, Conversation, ServerRun, converse, drive_client, drive_server};

/// The account of a policy that requires authentication, and of a client that has one.
pub const USER: &[u8] = b"user";
/// Its password.
pub const PASSWORD: &[u8] = b"pass";
/// The SOCKS4 user id of a client configured with one.
pub const USER_ID: &[u8] = b"alice";

/// The server policy chosen by `byte` (see the module doc).
pub fn policy(byte: u8) -> ServerPolicy {
    let users = if byte & 1 != 0 {
        Credentials::new(USER, PASSWORD)
            .map(|c| Users::new(vec![c]))
            .unwrap_or_default()
    } else {
        Users::default()
    };
    ServerPolicy {
        users: Arc::new(users),
        bind: byte & 2 == 0,
        udp_associate: byte & 4 == 0,
    }
}

/// Protocol, authentication and command chosen by `byte` (see the module doc).
pub fn client_config(byte: u8) -> (Protocol, Auth, Command) {
    let base = byte & 0x7f;
    let protocol = match base % 3 {
        0 => Protocol::Socks4,
        1 => Protocol::Socks4a,
        _ => Protocol::Socks5,
    };
    let password: &[u8] = if byte & 0x80 != 0 { b"wrong" } else { PASSWORD };
    let auth = match base / 3 % 3 {
        0 => Auth::None,
        1 => Credentials::new(USER, password).map_or(Auth::None, Auth::Password),
        _ => v4::UserId::new(USER_ID).map_or(Auth::None, Auth::UserId),
    };
    let command = match base / 9 % 4 {
        0 => Command::CONNECT,
        1 => Command::BIND,
        2 => Command::UDP_ASSOCIATE,
        _ => Command(0x7f),
    };
    (protocol, auth, command)
}

/// One of four fixed targets (see the module doc).
fn fixed_target(byte: u8) -> Address {
    match byte % 4 {
        0 => Address::Ip(SocketAddr::new(Ipv4Addr::new(1, 2, 3, 4).into(), 80)),
        1 => Address::Ip(SocketAddr::new(
            Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).into(),
            443,
        )),
        2 => Address::domain("example.com", 443).unwrap_or(Address::UNSPECIFIED),
        _ => Address::Ip(SocketAddr::new(Ipv4Addr::new(0, 0, 0, 1).into(), 80)),
    }
}

/// Splits `n | sizes... | input` into chunk sizes (each at least 1) and the input.
pub(crate) fn chunk_plan(data: &[u8]) -> (Vec<usize>, &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return (Vec::new(), data);
    };
    let n = usize::from(n % 8).min(rest.len());
    let (sizes, input) = rest.split_at(n);
    (
        sizes.iter().map(|&s| usize::from(s).max(1)).collect(),
        input,
    )
}

/// Is `ip` the SOCKS4a marker `0.0.0.x`, x != 0, which SOCKS4 cannot carry as an address?
fn is_socks4a_marker(ip: Ipv4Addr) -> bool {
    let [a, b, c, d] = ip.octets();
    a == 0 && b == 0 && c == 0 && d != 0
}

/// Why `ClientHandshake::new` must refuse this combination, if it must.
pub fn client_refusal(protocol: Protocol, command: Command, target: &Address) -> Option<Error> {
    let fits = match (protocol, target) {
        (Protocol::Socks5, _) => true,
        (_, Address::Ip(SocketAddr::V6(_))) => false,
        (_, Address::Ip(SocketAddr::V4(a))) => !is_socks4a_marker(*a.ip()),
        (Protocol::Socks4, Address::Domain(..)) => false,
        (Protocol::Socks4a, Address::Domain(..)) => true,
    };
    if !fits {
        return Some(Error::UnsupportedTarget {
            protocol: protocol.scheme(),
            target: target.to_string(),
        });
    }
    (protocol != Protocol::Socks5 && command == Command::UDP_ASSOCIATE)
        .then_some(Error::UnsupportedCommand { command })
}

/// Feeds client bytes to the server in one chunk, in the chunks `data` chooses and one
/// byte at a time; every way must end alike.
pub fn server_handshake_chunks(data: &[u8]) {
    let Some((&policy_byte, rest)) = data.split_first() else {
        return;
    };
    let policy = policy(policy_byte);
    let (chunks, input) = chunk_plan(rest);
    let whole = drive_server(&policy, input, &[]);
    for sizes in [chunks.as_slice(), &[1]] {
        let split = drive_server(&policy, input, sizes);
        assert_eq!(
            whole.status, split.status,
            "status differs for chunks {sizes:?}"
        );
        assert_eq!(
            whole.reply, split.reply,
            "reply differs for chunks {sizes:?}"
        );
        if !matches!(whole.status, ServerStatus::Failed(_)) {
            assert_eq!(whole.consumed, split.consumed, "consumed differs");
        }
    }
    if let ServerStatus::Done(request) = &whole.status {
        check_request(&policy, request);
    }
}

/// A request the server accepted must be one the policy allows, and its reply must be
/// a valid message of its version.
fn check_request(policy: &ServerPolicy, request: &Request) {
    let allowed = match request.command {
        Command::CONNECT => true,
        Command::BIND => policy.bind,
        Command::UDP_ASSOCIATE => policy.udp_associate && request.version == Version::Socks5,
        _ => false,
    };
    assert!(allowed, "server accepted {request:?} against {policy:?}");
    match request.version {
        Version::Socks4 | Version::Socks4a => {
            assert!(policy.users.is_empty(), "SOCKS4 accepted with users");
            assert_eq!(
                request.version == Version::Socks4a,
                matches!(request.target, Address::Domain(..))
            );
            let reply = request.reply(ReplyCode::SUCCEEDED, &request.target);
            let decoded = v4::Reply::decode(&reply);
            assert!(matches!(decoded, Ok(Some((r, 8))) if r.code == v4::ReplyCode::GRANTED));
        }
        Version::Socks5 => {
            if !policy.users.is_empty() {
                assert_eq!(request.user.as_deref(), Some("user"));
            } else {
                assert_eq!(request.user, None);
            }
            let reply = request.reply(ReplyCode::SUCCEEDED, &request.target);
            let expected = v5::Reply {
                code: ReplyCode::SUCCEEDED,
                bound: request.target.clone(),
            };
            assert_eq!(v5::Reply::decode(&reply), Ok(Some((expected, reply.len()))));
        }
    }
}

/// Feeds proxy bytes to a client in one chunk, in the chunks `data` chooses and one
/// byte at a time; every way must end alike.
pub fn client_handshake_chunks(data: &[u8]) {
    let [config, target, rest @ ..] = data else {
        return;
    };
    let (protocol, auth, command) = client_config(*config);
    let target = fixed_target(*target);
    let refusal = client_refusal(protocol, command, &target);
    let client = match ClientHandshake::new(protocol, auth, command, target) {
        Ok(client) => client,
        Err(error) => {
            assert_eq!(Some(error), refusal);
            return;
        }
    };
    assert_eq!(refusal, None, "ClientHandshake::new accepted it");
    let (chunks, input) = chunk_plan(rest);
    let whole = drive_client(&client, input, &[]);
    for sizes in [chunks.as_slice(), &[1]] {
        let split = drive_client(&client, input, sizes);
        assert_eq!(whole, split, "outcome differs for chunks {sizes:?}");
    }
    check_client_events(protocol, command, &whole);
}

/// Bound only for BIND and only first; Done only last; SOCKS4 addresses are IPv4.
fn check_client_events(protocol: Protocol, command: Command, run: &ClientRun) {
    for (i, event) in run.events.iter().enumerate() {
        let addr = match event {
            ClientStatus::Bound(addr) => {
                assert!(command == Command::BIND && i == 0, "unexpected Bound");
                addr
            }
            ClientStatus::Done(addr) => {
                assert_eq!(i.saturating_add(1), run.events.len(), "Done is not last");
                addr
            }
            ClientStatus::NeedMore => panic!("NeedMore is never recorded as an event"),
        };
        if protocol != Protocol::Socks5 {
            assert!(matches!(addr, Address::Ip(SocketAddr::V4(_))));
        }
    }
    if command == Command::BIND && matches!(run.events.last(), Some(ClientStatus::Done(_))) {
        assert_eq!(run.events.len(), 2, "BIND must report Bound before Done");
    }
}

/// Drives a client against a server in memory, for the configuration, policy and
/// target `data` chooses, and checks that the server got what the client asked.
pub fn client_server(data: &[u8]) {
    let [config, policy_byte, kind, rest @ ..] = data else {
        return;
    };
    let Some(target) = target_from(*kind, rest) else {
        return;
    };
    let (protocol, auth, command) = client_config(*config);
    let policy = policy(*policy_byte);
    let refusal = client_refusal(protocol, command, &target);
    let client = match ClientHandshake::new(protocol, auth.clone(), command, target.clone()) {
        Ok(client) => client,
        Err(error) => {
            assert_eq!(Some(error), refusal);
            return;
        }
    };
    assert_eq!(refusal, None, "ClientHandshake::new accepted it");
    let bound = Address::Ip(SocketAddr::new(Ipv4Addr::new(192, 0, 2, 7).into(), 4321));
    let talk = converse(client, policy.clone(), &bound, b"payload");
    check_conversation(&talk, &policy, protocol, &auth, command, &target, &bound);
}

/// A target from `kind` and the bytes after it: IPv4 (6 bytes), IPv6 (18 bytes) or a
/// name (length, name, port). `None` when the bytes do not make one.
fn target_from(kind: u8, bytes: &[u8]) -> Option<Address> {
    let port = |b: &[u8]| Some(u16::from_be_bytes(b.get(..2)?.try_into().ok()?));
    match kind % 3 {
        0 => {
            let ip: [u8; 4] = bytes.get(..4)?.try_into().ok()?;
            Some(Address::Ip(SocketAddr::new(
                IpAddr::from(ip),
                port(bytes.get(4..)?)?,
            )))
        }
        1 => {
            let ip: [u8; 16] = bytes.get(..16)?.try_into().ok()?;
            let addr = SocketAddr::new(IpAddr::from(ip), port(bytes.get(16..)?)?);
            Some(Address::from(addr))
        }
        _ => {
            let (&len, rest) = bytes.split_first()?;
            let name = rest.get(..usize::from(len))?;
            let name = addr::DomainName::from_bytes(name).ok()?;
            Some(Address::Domain(name, port(rest.get(usize::from(len)..)?)?))
        }
    }
}

/// What the server and client must have ended with, given who they are.
fn check_conversation(
    talk: &Conversation,
    policy: &ServerPolicy,
    protocol: Protocol,
    auth: &Auth,
    command: Command,
    target: &Address,
    bound: &Address,
) {
    let users = !policy.users.is_empty();
    let right_password = matches!(auth, Auth::Password(c) if c.password() == PASSWORD);
    let allowed = match command {
        Command::CONNECT => true,
        Command::BIND => policy.bind,
        Command::UDP_ASSOCIATE => policy.udp_associate,
        _ => false,
    };
    let socks4 = protocol != Protocol::Socks5;
    let expected_error = if users && socks4 {
        Some(Error::Socks4Refused)
    } else if users && !matches!(auth, Auth::Password(_)) {
        Some(Error::NoAcceptableMethod { offered: vec![0] })
    } else if users && !right_password {
        Some(Error::AuthFailed {
            user: "user".to_owned(),
        })
    } else if !allowed {
        Some(Error::UnsupportedCommand { command })
    } else {
        None
    };
    assert!(
        talk.server_leftover.is_empty(),
        "client sent more than asked"
    );
    let Some(expected_error) = expected_error else {
        return check_success(talk, protocol, auth, command, target, bound, users);
    };
    assert_eq!(talk.server, ServerStatus::Failed(expected_error.clone()));
    let client_error = match (&expected_error, socks4) {
        (_, true) => Error::Rejected4 {
            code: v4::ReplyCode::REJECTED,
        },
        (Error::NoAcceptableMethod { .. }, false) => Error::NoAcceptableMethod {
            offered: Vec::new(),
        },
        (Error::AuthFailed { .. }, false) => Error::AuthRejected {
            status: auth::STATUS_FAILURE,
        },
        (error, false) => Error::Rejected {
            reply: error.reply_code(),
        },
    };
    assert_eq!(talk.client, Err(client_error));
}

#[allow(clippy::too_many_arguments)]
fn check_success(
    talk: &Conversation,
    protocol: Protocol,
    auth: &Auth,
    command: Command,
    target: &Address,
    bound: &Address,
    users: bool,
) {
    let ServerStatus::Done(request) = &talk.server else {
        panic!("server did not accept: {:?}", talk.server);
    };
    assert_eq!(request.command, command);
    assert_eq!(&request.target, target);
    let version = match (protocol, target) {
        (Protocol::Socks5, _) => Version::Socks5,
        (_, Address::Domain(..)) => Version::Socks4a,
        _ => Version::Socks4,
    };
    assert_eq!(request.version, version);
    let user = match (protocol, auth) {
        (Protocol::Socks5, Auth::Password(c)) if users => Some(c.username()),
        (Protocol::Socks5, _) => None,
        (_, Auth::Password(c)) => Some(c.username()),
        (_, Auth::UserId(id)) => Some(id.as_bytes()),
        (_, Auth::None) => None,
    };
    let user = user.map(|u| String::from_utf8_lossy(u).into_owned());
    assert_eq!(request.user, user);
    let done = ClientStatus::Done(bound.clone());
    let events = if command == Command::BIND {
        vec![ClientStatus::Bound(bound.clone()), done]
    } else {
        vec![done]
    };
    assert_eq!(talk.client, Ok(events));
    assert_eq!(
        talk.client_leftover, b"payload",
        "payload must stay unconsumed"
    );
}

/// Runs every decoder on `data` and checks what each must guarantee (see
/// [`check_decoder`]).
pub fn decoders(data: &[u8]) {
    check_decoder::<Address>(data);
    check_decoder::<v4::Request>(data);
    check_decoder::<v4::Reply>(data);
    check_decoder::<v5::Greeting>(data);
    check_decoder::<v5::MethodSelection>(data);
    check_decoder::<v5::Request>(data);
    check_decoder::<v5::Reply>(data);
    check_decoder::<Credentials>(data);
    check_decoder::<auth::Status>(data);
    check_decoder::<udp::Header>(data);
}

/// For one decoder: no panic; a decoded message has a length in `1..=data.len()`,
/// re-encodes to `encoded_len` bytes that decode to itself; and decoding is monotone
/// in the input: every prefix is "need more" until the first prefix that decodes or
/// fails, and from there on every longer prefix gives that same result.
pub fn check_decoder<M: Message + Debug + PartialEq>(data: &[u8]) {
    let full = M::decode(data);
    if let Ok(Some((message, n))) = &full {
        assert!(
            *n >= 1 && *n <= data.len(),
            "consumed {n} of {}",
            data.len()
        );
        let bytes = message.to_bytes();
        assert_eq!(
            bytes.len(),
            message.encoded_len(),
            "encoded_len of {message:?}"
        );
        match M::decode(&bytes) {
            Ok(Some((again, m))) => {
                assert_eq!(&again, message, "re-decoded message differs");
                assert_eq!(m, bytes.len(), "re-decoded length differs");
            }
            other => panic!("{message:?} encodes to {bytes:02x?}: {other:?}"),
        }
    }
    // Past the longest message every decoder has decided; no need to look further.
    let longest = data.len().min(MAX_MESSAGE.saturating_add(1));
    let mut decided = false;
    for end in 0..=longest {
        let prefix = M::decode(data.get(..end).unwrap_or_default());
        match prefix {
            Ok(None) => assert!(!decided, "need-more after a decision at {end}"),
            decision => {
                assert_eq!(decision, full, "prefix of {end} bytes decides otherwise");
                decided = true;
            }
        }
    }
}

/// Parses `data` as a relayed UDP datagram and checks header and payload make it up
/// exactly; a standalone datagram re-encodes to the same header and payload.
pub fn udp_datagram(data: &[u8]) {
    match udp::parse_datagram(data) {
        Ok((header, payload)) => {
            let total = header.encoded_len().saturating_add(payload.len());
            assert_eq!(total, data.len(), "header and payload do not add up");
            assert!(data.ends_with(payload));
            let mut out = Vec::new();
            udp::encode_datagram(&header.target, payload, &mut out);
            let again = udp::parse_datagram(&out);
            let expected = udp::Header {
                frag: 0,
                target: header.target.clone(),
            };
            assert_eq!(again, Ok((expected, payload)));
        }
        Err(Error::TruncatedDatagram { len }) => {
            assert_eq!(len, data.len());
            assert!(len < udp::MAX_HEADER_LEN);
            assert_eq!(udp::Header::decode(data), Ok(None));
        }
        Err(error) => assert_eq!(udp::Header::decode(data), Err(error)),
    }
}
