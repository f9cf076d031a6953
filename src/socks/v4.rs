//! SOCKS4 and SOCKS4a messages.
//!
//! Request (SOCKS4; SOCKS4a when DSTIP is `0.0.0.x`, x != 0, and a host name follows):
//!
//! ```text
//! +----+----+----+----+----+----+----+----+----+----+....+----+....+----+
//! | VN | CD | DSTPORT |      DSTIP        | USERID       |NULL| HOST |NULL|
//! +----+----+----+----+----+----+----+----+----+----+....+----+....+----+
//!    1    1      2              4           variable       1   (4a only)
//! VN = 4; CD = 1 CONNECT, 2 BIND
//! ```
//!
//! Reply:
//!
//! ```text
//! +----+----+----+----+----+----+----+----+
//! | VN | CD | DSTPORT |      DSTIP        |
//! +----+----+----+----+----+----+----+----+
//! VN = 0; CD = 90 granted, 91 rejected or failed, 92 no identd, 93 identd mismatch
//! ```

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};

use super::reader::{NulField, Reader};
use super::{Command, DomainName, Error, MAX_FIELD, Message};

/// The version byte of a SOCKS4 request.
pub const VERSION: u8 = 0x04;
/// The version byte of a SOCKS4 reply.
pub const REPLY_VERSION: u8 = 0x00;

/// A SOCKS4 reply code (open: unknown values survive decoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReplyCode(pub u8);

impl ReplyCode {
    /// 90: request granted.
    pub const GRANTED: ReplyCode = ReplyCode(90);
    /// 91: request rejected or failed.
    pub const REJECTED: ReplyCode = ReplyCode(91);
    /// 92: rejected because the server cannot reach identd on the client.
    pub const NO_IDENTD: ReplyCode = ReplyCode(92);
    /// 93: rejected because identd reported a different user id.
    pub const IDENTD_MISMATCH: ReplyCode = ReplyCode(93);
}

impl fmt::Display for ReplyCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match *self {
            ReplyCode::GRANTED => "request granted",
            ReplyCode::REJECTED => "request rejected or failed",
            ReplyCode::NO_IDENTD => "cannot reach identd",
            ReplyCode::IDENTD_MISMATCH => "identd user id mismatch",
            _ => "unknown code",
        };
        write!(f, "{} ({what})", self.0)
    }
}

/// A SOCKS4 user id: up to 255 bytes, no NUL (it is NUL-terminated on the wire).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct UserId(Vec<u8>);

impl UserId {
    /// Validates a user id.
    pub fn new(id: impl Into<Vec<u8>>) -> Result<Self, Error> {
        let id = id.into();
        if id.len() > MAX_FIELD || id.contains(&0) {
            return Err(Error::FieldLength {
                field: "SOCKS4 user id",
                len: id.len(),
                min: 0,
                max: MAX_FIELD,
            });
        }
        Ok(UserId(id))
    }

    /// The bytes of the id.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Where a SOCKS4 request goes: an IPv4 address (SOCKS4) or a host name (SOCKS4a).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// SOCKS4: an IPv4 address and port.
    Ip(SocketAddrV4),
    /// SOCKS4a: a host name and port; DSTIP is sent as `0.0.0.1`.
    Domain(DomainName, u16),
}

impl Target {
    fn port(&self) -> u16 {
        match self {
            Target::Ip(a) => a.port(),
            Target::Domain(_, port) => *port,
        }
    }
}

/// A SOCKS4 or SOCKS4a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// CD: CONNECT (1) or BIND (2); other values survive decoding.
    pub command: Command,
    /// The destination (or, for BIND, the peer expected to connect).
    pub target: Target,
    /// USERID.
    pub user_id: UserId,
}

/// Is this DSTIP the SOCKS4a marker `0.0.0.x` with x != 0?
pub(crate) fn is_socks4a_marker(ip: Ipv4Addr) -> bool {
    let [a, b, c, d] = ip.octets();
    a == 0 && b == 0 && c == 0 && d != 0
}

/// Reads a NUL-terminated field of at most [`MAX_FIELD`] bytes.
fn nul_field<'a>(r: &mut Reader<'a>, field: &'static str) -> Result<Option<&'a [u8]>, Error> {
    match r.until_nul(MAX_FIELD) {
        NulField::Found(bytes) => Ok(Some(bytes)),
        NulField::Incomplete => Ok(None),
        NulField::TooLong => Err(Error::FieldLength {
            field,
            len: MAX_FIELD.saturating_add(1),
            min: 0,
            max: MAX_FIELD,
        }),
    }
}

impl Message for Request {
    fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, Error> {
        let mut r = Reader::new(buf);
        let Some(version) = r.u8() else {
            return Ok(None);
        };
        if version != VERSION {
            return Err(Error::VersionMismatch {
                message: "SOCKS4 request",
                version,
                expected: VERSION,
            });
        }
        let (Some(command), Some(port), Some(ip)) = (r.u8(), r.u16(), r.array::<4>()) else {
            return Ok(None);
        };
        let Some(user_id) = nul_field(&mut r, "SOCKS4 user id")? else {
            return Ok(None);
        };
        let user_id = UserId(user_id.to_vec());
        let ip = Ipv4Addr::from(ip);
        let target = if is_socks4a_marker(ip) {
            let Some(host) = nul_field(&mut r, "SOCKS4a host name")? else {
                return Ok(None);
            };
            Target::Domain(DomainName::from_bytes(host)?, port)
        } else {
            Target::Ip(SocketAddrV4::new(ip, port))
        };
        let request = Request {
            command: Command(command),
            target,
            user_id,
        };
        Ok(Some((request, r.consumed())))
    }

    fn encoded_len(&self) -> usize {
        let host = match &self.target {
            Target::Ip(_) => 0,
            Target::Domain(name, _) => name.len().saturating_add(1),
        };
        8usize
            .saturating_add(self.user_id.0.len())
            .saturating_add(1)
            .saturating_add(host)
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.push(VERSION);
        out.push(self.command.0);
        out.extend_from_slice(&self.target.port().to_be_bytes());
        match &self.target {
            Target::Ip(a) => out.extend_from_slice(&a.ip().octets()),
            Target::Domain(..) => out.extend_from_slice(&[0, 0, 0, 1]),
        }
        out.extend_from_slice(&self.user_id.0);
        out.push(0);
        if let Target::Domain(name, _) = &self.target {
            out.extend_from_slice(name.as_str().as_bytes());
            out.push(0);
        }
    }
}

/// A SOCKS4 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// CD: 90-93.
    pub code: ReplyCode,
    /// DSTPORT and DSTIP: the bound address (BIND, and CONNECT where the server
    /// reports it) or the connecting peer (second BIND reply).
    pub addr: SocketAddrV4,
}

impl Message for Reply {
    fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, Error> {
        let mut r = Reader::new(buf);
        let Some(version) = r.u8() else {
            return Ok(None);
        };
        // The specification says VN is 0; some servers echo 4. Both are unambiguous.
        if version != REPLY_VERSION && version != VERSION {
            return Err(Error::VersionMismatch {
                message: "SOCKS4 reply",
                version,
                expected: REPLY_VERSION,
            });
        }
        let (Some(code), Some(port), Some(ip)) = (r.u8(), r.u16(), r.array::<4>()) else {
            return Ok(None);
        };
        let reply = Reply {
            code: ReplyCode(code),
            addr: SocketAddrV4::new(Ipv4Addr::from(ip), port),
        };
        Ok(Some((reply, r.consumed())))
    }

    fn encoded_len(&self) -> usize {
        8
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.push(REPLY_VERSION);
        out.push(self.code.0);
        out.extend_from_slice(&self.addr.port().to_be_bytes());
        out.extend_from_slice(&self.addr.ip().octets());
    }
}
