//! `decode(encode(x)) == (x, encoded_len)` for every message type and any valid value.

use std::fmt::Debug;
use std::net::SocketAddrV4;

use proptest::collection::vec;
use proptest::prelude::*;

use super::super::auth::Status;
use super::super::v5::{Greeting, MethodSelection};
use super::super::{Message, Method, ReplyCode, udp, v4, v5};
use super::strategies::{address, command, credentials, ipv4, payload, user_id, v4_target};

/// Encodes `value`, checks the length, decodes it back (alone and with bytes after
/// it), and checks that every strict prefix is "need more".
fn roundtrip<M: Message + Debug + PartialEq + Clone>(value: &M) -> Result<(), TestCaseError> {
    let bytes = value.to_bytes();
    prop_assert_eq!(bytes.len(), value.encoded_len());
    let expected = Ok(Some((value.clone(), bytes.len())));
    prop_assert_eq!(&M::decode(&bytes), &expected);
    let mut longer = bytes.clone();
    longer.extend_from_slice(&[0x05, 0x00, 0xff]);
    prop_assert_eq!(&M::decode(&longer), &expected);
    for end in 0..bytes.len() {
        prop_assert_eq!(M::decode(&bytes[..end]), Ok(None), "prefix of {}", end);
    }
    Ok(())
}

proptest! {
    #[test]
    fn address_roundtrips(addr in address()) {
        roundtrip(&addr)?;
    }

    #[test]
    fn socks4_request_roundtrips(command in command(), target in v4_target(), user_id in user_id()) {
        roundtrip(&v4::Request { command, target, user_id })?;
    }

    #[test]
    fn socks4_reply_roundtrips(code in any::<u8>(), addr in ipv4()) {
        let addr: SocketAddrV4 = addr;
        roundtrip(&v4::Reply { code: v4::ReplyCode(code), addr })?;
    }

    #[test]
    fn greeting_roundtrips(methods in vec(any::<u8>(), 0..=255)) {
        roundtrip(&Greeting::new(methods.into_iter().map(Method).collect()).unwrap())?;
    }

    #[test]
    fn method_selection_roundtrips(method in any::<u8>()) {
        roundtrip(&MethodSelection { method: Method(method) })?;
    }

    #[test]
    fn credentials_roundtrip(creds in credentials()) {
        roundtrip(&creds)?;
    }

    #[test]
    fn auth_status_roundtrips(status in any::<u8>()) {
        roundtrip(&Status { status })?;
    }

    #[test]
    fn socks5_request_roundtrips(command in command(), target in address()) {
        roundtrip(&v5::Request { command, target })?;
    }

    #[test]
    fn socks5_reply_roundtrips(code in any::<u8>(), bound in address()) {
        roundtrip(&v5::Reply { code: ReplyCode(code), bound })?;
    }

    #[test]
    fn udp_header_roundtrips(frag in any::<u8>(), target in address()) {
        roundtrip(&udp::Header { frag, target })?;
    }

    #[test]
    fn udp_datagram_roundtrips(target in address(), payload in payload()) {
        let mut datagram = Vec::new();
        udp::encode_datagram(&target, &payload, &mut datagram);
        let header = udp::Header::new(target);
        prop_assert_eq!(datagram.len(), header.encoded_len() + payload.len());
        prop_assert_eq!(udp::parse_datagram(&datagram), Ok((header, &payload[..])));
    }
}
