//! Replays every fuzz input we keep (`fuzz/corpus/<target>/`, and crash inputs in
//! `fuzz/artifacts/<target>/` when present) through the same harnesses the fuzz
//! targets call, so that CI on stable keeps a fixed crash fixed. Crash inputs of
//! bugs not fixed yet wait in `fuzz/known-crashes/<target>/`, which is not replayed.
//!
//! The seed corpus is generated from real handshakes of our client and server:
//! `T2S_WRITE_SEEDS=1 cargo test --test fuzz_corpus seed_corpus` rewrites it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use tun2socks::socks::client::{ClientHandshake, ClientStatus};
use tun2socks::socks::fuzzing;
use tun2socks::socks::server::{ServerHandshake, ServerPolicy, ServerStatus};
use tun2socks::socks::{Address, Command, Credentials, Message, Method, ReplyCode};
use tun2socks::socks::{auth, udp, v4, v5};

/// What a fuzz target calls with its input.
type Harness = fn(&[u8]);

/// Fuzz targets and the harness each one calls.
const TARGETS: [(&str, Harness); 10] = [
    ("server_handshake", fuzzing::server_handshake_chunks),
    ("client_handshake", fuzzing::client_handshake_chunks),
    ("client_server", fuzzing::client_server),
    ("decoders", fuzzing::decoders),
    ("udp_datagram", fuzzing::udp_datagram),
    ("packet_ingress", tun2socks::fuzzing::packet::packet_ingress),
    ("packet_stack", tun2socks::fuzzing::stack::packet_stack),
    ("dns_message", tun2socks::fuzzing::dns::dns_message),
    ("dns_frames", tun2socks::fuzzing::dns::dns_frames),
    (
        "offload_frames",
        tun2socks::fuzzing::offload::offload_frames,
    ),
];

/// Fewest inputs per target: an empty or lost corpus must not pass silently.
const MIN_PER_TARGET: usize = 10;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_corpus_directory_is_a_known_target() {
    for kind in ["corpus", "artifacts", "known-crashes"] {
        let Ok(entries) = fs::read_dir(fuzz_dir().join(kind)) else {
            continue;
        };
        for entry in entries {
            let name = entry.unwrap().file_name().into_string().unwrap();
            assert!(
                TARGETS.iter().any(|(target, _)| *target == name),
                "fuzz/{kind}/{name} belongs to no target in TARGETS"
            );
        }
    }
}

#[test]
fn replay_corpus_and_crash_inputs() {
    let mut failures = Vec::new();
    let mut total = 0;
    for (target, harness) in TARGETS {
        let mut replayed = 0;
        for kind in ["corpus", "artifacts"] {
            for path in files(&fuzz_dir().join(kind).join(target)) {
                let data = fs::read(&path).unwrap();
                if catch_unwind(AssertUnwindSafe(|| harness(&data))).is_err() {
                    failures.push(path.display().to_string());
                }
                replayed += 1;
            }
        }
        assert!(
            replayed >= MIN_PER_TARGET,
            "only {replayed} inputs for fuzz target {target}; is fuzz/corpus/{target} there?"
        );
        total += replayed;
    }
    assert!(failures.is_empty(), "inputs that fail: {failures:#?}");
    println!("replayed {total} fuzz inputs");
}

/// Everything the client and the server sent each other, recorded byte for byte.
struct Transcript {
    from_client: Vec<u8>,
    from_server: Vec<u8>,
}

/// Runs `client` against a server with `policy`; a successful server answers with
/// `bound` (twice for BIND).
fn record(mut client: ClientHandshake, policy: ServerPolicy, bound: &Address) -> Transcript {
    let mut server = ServerHandshake::new(policy);
    let mut transcript = Transcript {
        from_client: client.start(),
        from_server: Vec::new(),
    };
    let (mut at_server, mut at_client) = (0, 0);
    loop {
        let step = server.handshake(&transcript.from_client[at_server..]);
        at_server += step.consumed;
        transcript.from_server.extend(&step.reply);
        if let ServerStatus::Done(request) = &step.status {
            let replies = if request.command == Command::BIND {
                2
            } else {
                1
            };
            for _ in 0..replies {
                let reply = request.reply(ReplyCode::SUCCEEDED, bound);
                transcript.from_server.extend(reply);
            }
        }
        while let Ok(c) = client.handshake(&transcript.from_server[at_client..]) {
            at_client += c.consumed;
            transcript.from_client.extend(c.send);
            if c.consumed == 0 || matches!(c.status, ClientStatus::Done(_)) {
                break;
            }
        }
        if step.status != ServerStatus::NeedMore {
            return transcript;
        }
    }
}

/// `n | sizes...` for the chunk-driven harnesses.
fn with_chunks(head: &[u8], sizes: &[u8], input: &[u8]) -> Vec<u8> {
    let mut seed = head.to_vec();
    seed.push(u8::try_from(sizes.len()).unwrap());
    seed.extend_from_slice(sizes);
    seed.extend_from_slice(input);
    seed
}

/// With `T2S_WRITE_SEEDS=1`, writes a seed; otherwise checks that the committed
/// corpus holds exactly this seed (a harness layout change must come with new seeds).
fn write(target: &str, name: &str, data: &[u8]) {
    let dir = fuzz_dir().join("corpus").join(target);
    if std::env::var_os("T2S_WRITE_SEEDS").is_some() {
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(name), data).unwrap();
        return;
    }
    let committed = fs::read(dir.join(name))
        .unwrap_or_else(|e| panic!("{target}/{name}: {e}; regenerate with T2S_WRITE_SEEDS=1"));
    assert!(
        committed == data,
        "{target}/{name} differs from what the harness generates; regenerate with \
         T2S_WRITE_SEEDS=1 cargo test --test fuzz_corpus seed_corpus"
    );
}

const CHUNKINGS: [&[u8]; 3] = [&[], &[1], &[3, 7, 2]];

/// Real handshakes of our client against our server, in both directions, for the
/// configurations and fixed targets the harnesses decode.
fn handshake_seeds() {
    let bound = Address::Ip("192.0.2.7:4321".parse().unwrap());
    let mut count = 0;
    // Right and wrong password (bit 7), every protocol, authentication and command.
    for config in (0u8..36).chain([0x80 | 5, 0x80 | 14]) {
        for target in 0u8..4 {
            let (protocol, auth, command) = fuzzing::client_config(config);
            let address = match target {
                0 => Address::Ip("1.2.3.4:80".parse().unwrap()),
                1 => Address::Ip("[2001:db8::1]:443".parse().unwrap()),
                2 => Address::domain("example.com", 443).unwrap(),
                _ => Address::Ip("0.0.0.1:80".parse().unwrap()),
            };
            let Ok(client) = ClientHandshake::new(protocol, auth.clone(), command, address) else {
                continue;
            };
            let users = matches!(auth, tun2socks::socks::Auth::Password(_));
            let policy_byte = u8::from(users);
            let talk = record(client, fuzzing::policy(policy_byte), &bound);
            let sizes = CHUNKINGS[count % CHUNKINGS.len()];
            count += 1;
            let name = format!("seed-{config:02x}-{target}");
            let mut from_client = talk.from_client;
            from_client.extend_from_slice(b"GET / HTTP/1.0\r\n\r\n");
            write(
                "server_handshake",
                &name,
                &with_chunks(&[policy_byte], sizes, &from_client),
            );
            let mut from_server = talk.from_server;
            from_server.extend_from_slice(b"HTTP/1.0 200 OK\r\n");
            let seed = with_chunks(&[config, target], sizes, &from_server);
            write("client_handshake", &name, &seed);
        }
    }
    // 0.0.0.x over SOCKS4 and SOCKS4a must be refused by `new` (it once was not).
    for config in [0u8, 1, 3, 4] {
        let seed = with_chunks(&[config, 3], &[], b"\x00\x5a\x00\x50\x00\x00\x00\x01");
        write(
            "client_handshake",
            &format!("regression-marker-{config:02x}"),
            &seed,
        );
    }
    // What other clients send: several methods, pipelined, refused, malformed.
    let raw: [(&str, u8, &[u8]); 6] = [
        (
            "curl-creds",
            1,
            b"\x05\x03\x00\x01\x02\x01\x04user\x04pass\x05\x01\x00\x03\x01a\x00\x50",
        ),
        ("no-methods", 0, b"\x05\x00"),
        (
            "socks4-with-users",
            1,
            b"\x04\x01\x00\x50\x01\x02\x03\x04\x00",
        ),
        (
            "udp-over-socks4",
            0,
            b"\x04\x03\x00\x50\x01\x02\x03\x04id\x00",
        ),
        (
            "bad-atyp",
            0,
            b"\x05\x01\x00\x05\x01\x00\x05\x01\x02\x03\x04\x00\x50",
        ),
        ("http", 0, b"GET / HTTP/1.1\r\n"),
    ];
    for (name, policy, bytes) in raw {
        write(
            "server_handshake",
            &format!("seed-{name}"),
            &with_chunks(&[policy], &[], bytes),
        );
    }
}

/// `config | policy | kind | target bytes` for `client_server`.
fn client_server_seeds() {
    let targets: [(&str, Vec<u8>); 4] = [
        ("v4", [&[0u8][..], &[198, 19, 2, 2, 0, 80]].concat()),
        (
            "v6",
            [&[1u8][..], &[0xfd, 0x19, 0, 2], &[0; 11], &[2, 1, 0xbb]].concat(),
        ),
        (
            "name",
            [&[2u8, 11][..], b"example.com", &[1, 0xbb]].concat(),
        ),
        ("marker", [&[0u8][..], &[0, 0, 0, 7, 0, 80]].concat()),
    ];
    for (name, target) in &targets {
        for (config, policy) in [
            (0u8, 0u8),
            (1, 0),
            (2, 0),
            (5, 1),
            (11, 0),
            (20, 4),
            (14, 2),
        ] {
            let seed = [&[config, policy][..], target].concat();
            write(
                "client_server",
                &format!("seed-{name}-{config:02x}-{policy}"),
                &seed,
            );
        }
    }
}

/// One of every message, encoded, for `decoders` and `udp_datagram`.
fn message_seeds() {
    let v4addr = Address::Ip("1.2.3.4:80".parse().unwrap());
    let v6addr = Address::Ip("[2001:db8::1]:443".parse().unwrap());
    let name = Address::domain("example.com", 443).unwrap();
    let ip4 = "1.2.3.4:80".parse().unwrap();
    let creds = Credentials::new("user", "pass").unwrap();
    let mut messages: Vec<(&str, Vec<u8>)> = vec![
        ("addr-v4", v4addr.to_bytes()),
        ("addr-v6", v6addr.to_bytes()),
        ("addr-name", name.to_bytes()),
        (
            "v4-reply",
            v4::Reply {
                code: v4::ReplyCode::GRANTED,
                addr: ip4,
            }
            .to_bytes(),
        ),
        (
            "greeting",
            v5::Greeting::new(vec![Method(0), Method(2)])
                .unwrap()
                .to_bytes(),
        ),
        (
            "selection",
            v5::MethodSelection { method: Method(2) }.to_bytes(),
        ),
        ("credentials", creds.to_bytes()),
        ("status", auth::Status { status: 0 }.to_bytes()),
    ];
    for (tag, target) in [
        ("ip", v4::Target::Ip(ip4)),
        (
            "name",
            v4::Target::Domain(
                tun2socks::socks::DomainName::new("example.com").unwrap(),
                80,
            ),
        ),
    ] {
        let request = v4::Request {
            command: Command::CONNECT,
            target,
            user_id: v4::UserId::new("alice").unwrap(),
        };
        messages.push((
            if tag == "ip" {
                "v4-request"
            } else {
                "v4a-request"
            },
            request.to_bytes(),
        ));
    }
    for (tag, addr) in [("v4", &v4addr), ("v6", &v6addr), ("name", &name)] {
        let request = v5::Request {
            command: Command::CONNECT,
            target: addr.clone(),
        };
        let reply = v5::Reply {
            code: ReplyCode::SUCCEEDED,
            bound: addr.clone(),
        };
        let header = udp::Header::new(addr.clone());
        messages.push((tag, request.to_bytes()));
        messages.push((tag, reply.to_bytes()));
        messages.push((tag, header.to_bytes()));
        let mut datagram = Vec::new();
        udp::encode_datagram(addr, b"\x12\x34\x01\x00\x00\x01", &mut datagram);
        write("udp_datagram", &format!("seed-{tag}"), &datagram);
        datagram[2] = 1;
        write("udp_datagram", &format!("seed-{tag}-fragment"), &datagram);
        write(
            "udp_datagram",
            &format!("seed-{tag}-header-only"),
            &header.to_bytes(),
        );
    }
    for (i, (tag, bytes)) in messages.iter().enumerate() {
        write("decoders", &format!("seed-{i:02}-{tag}"), bytes);
    }
    let long = Address::domain("x".repeat(255), 1).unwrap();
    write(
        "udp_datagram",
        "seed-longest-header",
        &udp::Header::new(long).to_bytes(),
    );
    write("udp_datagram", "seed-truncated", &[0, 0, 0, 3, 10, b'a']);
}

/// The seed corpus (`seed-*` files) is what real handshakes and messages generate
/// today; `T2S_WRITE_SEEDS=1` rewrites it.
#[test]
fn seed_corpus_matches_the_generator() {
    handshake_seeds();
    client_server_seeds();
    message_seeds();
    // The packet and DNS targets: real packets and queries (`tun2socks::fuzzing::seeds`).
    for (target, name, data) in tun2socks::fuzzing::seeds::all() {
        write(target, &name, &data);
    }
}
