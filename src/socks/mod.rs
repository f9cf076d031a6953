//! SOCKS4, SOCKS4a, SOCKS5 (RFC 1928) and username/password authentication
//! (RFC 1929): wire messages and handshake state machines.
//!
//! Stage: the protocol core, shared by the client side ([`crate::upstream`]) and the
//! reference server ([`crate::server`]). It is sans-IO: it never imports tokio, never
//! touches a socket and never reads a clock. Decoders take `&[u8]` and return the
//! value with the number of bytes consumed, or `Ok(None)` when more bytes are needed;
//! encoders append to a `Vec<u8>` and know their length beforehand.
//!
//! Every length that a peer controls has a hard cap (see the `MAX_*` constants), so a
//! hostile peer can never make a buffer grow without bound. Wire numbers (methods,
//! commands, reply codes) are open newtypes: an unknown value survives decoding and
//! the state machine decides what to answer.
//!
//! Layout:
//! - [`addr`]: the SOCKS5 address (`ATYP | ADDR | PORT`), used by requests, replies
//!   and UDP headers;
//! - [`v4`]: SOCKS4 and SOCKS4a request and reply;
//! - [`v5`]: SOCKS5 method negotiation, request and reply;
//! - [`auth`]: RFC 1929 sub-negotiation;
//! - [`udp`]: the UDP ASSOCIATE datagram header;
//! - [`server`]: [`ServerHandshake`], the server side state machine;
//! - [`client`]: [`ClientHandshake`], the client side state machine.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

pub mod addr;
pub mod auth;
pub mod client;
mod error;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod reader;
pub mod server;
pub mod udp;
pub mod v4;
pub mod v5;

#[cfg(test)]
mod tests;

pub use addr::{Address, DomainName};
pub use auth::{Credentials, Users};
pub use client::{Auth, ClientHandshake, ClientStatus, ClientStep, Protocol};
pub use error::Error;
pub use server::{Request, ServerHandshake, ServerPolicy, ServerStatus, ServerStep, Version};
pub use v5::{Command, Method, ReplyCode};

/// Longest domain name, user name, password or SOCKS4 user id accepted (bytes).
pub const MAX_FIELD: usize = 255;

/// Longest handshake message of any kind (a SOCKS4a request with a maximal user id and
/// host name). A peer that sends more without completing a message is cut off.
pub const MAX_MESSAGE: usize = 8 + MAX_FIELD + 1 + MAX_FIELD + 1;

/// A message that has a byte representation on the wire.
///
/// `decode` returns `Ok(None)` when `buf` holds only a prefix of a valid message
/// ("need more"), `Ok(Some((message, consumed)))` when a whole message is present, and
/// `Err` when the bytes can never become a valid message. It never panics, whatever
/// `buf` holds.
pub trait Message: Sized {
    /// Parses one message from the front of `buf`.
    fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, Error>;

    /// The exact number of bytes `encode` appends.
    fn encoded_len(&self) -> usize;

    /// Appends the wire form to `out`.
    fn encode(&self, out: &mut Vec<u8>);

    /// The wire form as a new vector.
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode(&mut out);
        out
    }
}
