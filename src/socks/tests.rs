//! Tests of the SOCKS codec across its modules: hex vectors for every message in both
//! directions, error vectors, truncation at every length, property tests for
//! round trips and input splits, and the two handshake state machines, alone and
//! talking to each other.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::fmt::Debug;

use super::{Error, Message};

mod client;
mod errors;
mod interop;
mod pipeline;
mod roundtrip;
mod server;
mod splits;
mod strategies;
mod vectors_auth_udp;
mod vectors_v4;
mod vectors_v5;

/// Bytes from hex digits; whitespace is ignored.
fn hex(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    assert!(
        digits.len() % 2 == 0,
        "odd number of hex digits in {text:?}"
    );
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
        .collect()
}

/// `byte` (two hex digits) repeated `n` times.
fn rep(byte: &str, n: usize) -> String {
    byte.repeat(n)
}

/// Bytes that follow a message on the wire and must be left alone.
const TRAILER: [u8; 3] = [0xaa, 0x00, 0x55];

/// Every strict prefix of `bytes` is "need more", never an error and never a panic.
fn assert_prefixes_need_more<M: Message + Debug>(bytes: &[u8]) {
    for end in 0..bytes.len() {
        let result = M::decode(&bytes[..end]);
        assert!(
            matches!(result, Ok(None)),
            "prefix {:02x?} of {:02x?}: {result:?}",
            &bytes[..end],
            bytes
        );
    }
}

/// `(value, hex)` vectors: encoding gives the bytes, `encoded_len` their length;
/// decoding gives the value back (also with bytes after it); every truncation is
/// "need more".
fn check_vectors<M, S>(vectors: &[(M, S)])
where
    M: Message + Debug + PartialEq + Clone,
    S: AsRef<str>,
{
    for (value, text) in vectors {
        let bytes = hex(text.as_ref());
        assert_eq!(value.to_bytes(), bytes, "encoding {value:?}");
        assert_eq!(value.encoded_len(), bytes.len(), "encoded_len of {value:?}");
        check_decodes(&bytes, value);
    }
}

/// `(hex, value)` for input that is accepted but not what we would send (reserved
/// bytes set, alternative markers): it decodes to the value, with or without a
/// trailer, and every truncation is "need more".
fn check_decode_only<M, S>(cases: &[(S, M)])
where
    M: Message + Debug + PartialEq + Clone,
    S: AsRef<str>,
{
    for (text, value) in cases {
        let bytes = hex(text.as_ref());
        assert_ne!(value.to_bytes(), bytes, "not a decode-only case: {value:?}");
        check_decodes(&bytes, value);
    }
}

fn check_decodes<M: Message + Debug + PartialEq + Clone>(bytes: &[u8], value: &M) {
    let expected = Ok(Some((value.clone(), bytes.len())));
    assert_eq!(M::decode(bytes), expected, "decoding {bytes:02x?}");
    let mut longer = bytes.to_vec();
    longer.extend_from_slice(&TRAILER);
    assert_eq!(M::decode(&longer), expected, "decoding {longer:02x?}");
    assert_prefixes_need_more::<M>(bytes);
}

/// `(hex, error)`: the bytes fail with that error (also with bytes after them), and
/// every strict prefix is still "need more", so the error comes as soon as the bytes
/// prove it and no sooner.
fn check_errors<M: Message + Debug, S: AsRef<str>>(cases: &[(S, Error)]) {
    for (text, error) in cases {
        let bytes = hex(text.as_ref());
        let result = M::decode(&bytes);
        assert_eq!(
            result.as_ref().err(),
            Some(error),
            "decoding {bytes:02x?}: {result:?}"
        );
        let mut longer = bytes.clone();
        longer.extend_from_slice(&TRAILER);
        let result = M::decode(&longer);
        assert_eq!(
            result.as_ref().err(),
            Some(error),
            "decoding {longer:02x?}: {result:?}"
        );
        assert_prefixes_need_more::<M>(&bytes);
    }
}

#[test]
fn hex_helper() {
    assert_eq!(hex("05 01\n00"), [5, 1, 0]);
    assert_eq!(hex(&rep("ab", 3)), [0xab; 3]);
    assert!(hex("").is_empty());
}
