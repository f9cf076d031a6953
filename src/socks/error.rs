//! The protocol core's error type and its mapping to SOCKS5 reply codes.

use super::{Command, v4, v5::ReplyCode};

/// Everything that can go wrong while decoding a SOCKS message or driving a handshake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The first byte of a connection is neither 4 (SOCKS4/4a) nor 5 (SOCKS5).
    #[error("unsupported SOCKS version {version:#04x}")]
    UnsupportedVersion {
        /// The byte received.
        version: u8,
    },
    /// A message carried the wrong version byte for its place in the handshake.
    #[error("{message} has version {version:#04x}, expected {expected:#04x}")]
    VersionMismatch {
        /// Which message.
        message: &'static str,
        /// The byte received.
        version: u8,
        /// The byte required.
        expected: u8,
    },
    /// No offered authentication method is acceptable (RFC 1928 method 0xFF).
    #[error("no acceptable authentication method among {offered:02x?}")]
    NoAcceptableMethod {
        /// The methods the client offered (empty on the client side).
        offered: Vec<u8>,
    },
    /// The server chose a method the client did not offer.
    #[error("proxy chose method {method:#04x}, which was not offered")]
    UnexpectedMethod {
        /// The method the server chose.
        method: u8,
    },
    /// The server refused the offered credentials (RFC 1929 status != 0).
    #[error("authentication failed for user {user:?}")]
    AuthFailed {
        /// The user name as sent (lossy UTF-8), for the log.
        user: String,
    },
    /// The proxy rejected our credentials (client side; RFC 1929 status != 0).
    #[error("proxy rejected the credentials (status {status:#04x})")]
    AuthRejected {
        /// The status byte received.
        status: u8,
    },
    /// SOCKS4 and SOCKS4a cannot authenticate, and this server requires it.
    #[error("SOCKS4 refused: this server requires username/password authentication")]
    Socks4Refused,
    /// A command this server does not serve (unknown, UDP ASSOCIATE over SOCKS4, or
    /// disabled by policy).
    #[error("{command} is not supported")]
    UnsupportedCommand {
        /// The command received.
        command: Command,
    },
    /// An address type other than IPv4 (1), domain (3) or IPv6 (4).
    #[error("unknown address type {atyp:#04x}")]
    UnknownAddressType {
        /// The ATYP byte received.
        atyp: u8,
    },
    /// A domain name that is empty, not UTF-8 or contains a NUL.
    #[error("invalid domain name: {reason}")]
    InvalidDomain {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A length-prefixed or NUL-terminated field is outside its allowed length.
    #[error("{field} is {len} bytes; allowed {min}..={max}")]
    FieldLength {
        /// Which field.
        field: &'static str,
        /// Its length, or the cap plus one when it was cut off unterminated.
        len: usize,
        /// Shortest allowed.
        min: usize,
        /// Longest allowed.
        max: usize,
    },
    /// The SOCKS5 proxy answered the request with a failure code.
    #[error("proxy replied {reply}")]
    Rejected {
        /// The reply code (0x01-0x08, or an unknown value).
        reply: ReplyCode,
    },
    /// The SOCKS4 proxy answered the request with a failure code.
    #[error("proxy replied {code}")]
    Rejected4 {
        /// The SOCKS4 reply code (91-93, or an unknown value).
        code: v4::ReplyCode,
    },
    /// The destination cannot be expressed in the chosen protocol (an IPv6 address or
    /// a host name over plain SOCKS4).
    #[error("{protocol} cannot carry the destination {target}")]
    UnsupportedTarget {
        /// The protocol in use.
        protocol: &'static str,
        /// The destination, for the log.
        target: String,
    },
    /// A UDP datagram too short to hold its SOCKS header.
    #[error("UDP datagram of {len} bytes is too short for its SOCKS header")]
    TruncatedDatagram {
        /// The datagram's length.
        len: usize,
    },
    /// The handshake already failed; no further input is accepted.
    #[error("handshake already failed")]
    Failed,
}

impl Error {
    /// The SOCKS5 reply code that a server sends for this error when it happens at the
    /// request stage. The one place where protocol errors become reply codes.
    pub fn reply_code(&self) -> ReplyCode {
        match self {
            Error::UnsupportedCommand { .. } => ReplyCode::COMMAND_NOT_SUPPORTED,
            Error::UnknownAddressType { .. } => ReplyCode::ADDRESS_TYPE_NOT_SUPPORTED,
            Error::InvalidDomain { .. } => ReplyCode::HOST_UNREACHABLE,
            Error::FieldLength {
                field: "domain name",
                ..
            } => ReplyCode::HOST_UNREACHABLE,
            Error::Rejected { reply } => *reply,
            Error::Socks4Refused | Error::AuthFailed { .. } => ReplyCode::NOT_ALLOWED,
            Error::UnsupportedTarget { .. } => ReplyCode::ADDRESS_TYPE_NOT_SUPPORTED,
            _ => ReplyCode::GENERAL_FAILURE,
        }
    }
}
