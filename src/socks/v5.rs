//! SOCKS5 messages (RFC 1928).
//!
//! ```text
//! greeting (client):         method selection (server):
//! +----+----------+----------+   +----+--------+
//! |VER | NMETHODS | METHODS  |   |VER | METHOD |
//! +----+----------+----------+   +----+--------+
//! | 05 |    1     | 1 to 255 |   | 05 |   1    |
//! +----+----------+----------+   +----+--------+
//!
//! request (client):                        reply (server):
//! +----+-----+-------+------+----------+----------+   +----+-----+-------+------+----------+----------+
//! |VER | CMD |  RSV  | ATYP | DST.ADDR | DST.PORT |   |VER | REP |  RSV  | ATYP | BND.ADDR | BND.PORT |
//! +----+-----+-------+------+----------+----------+   +----+-----+-------+------+----------+----------+
//! | 05 |  1  | X'00' |  1   | Variable |    2     |   | 05 |  1  | X'00' |  1   | Variable |    2     |
//! +----+-----+-------+------+----------+----------+   +----+-----+-------+------+----------+----------+
//! ```

use std::fmt;

use super::reader::Reader;
use super::{Address, Error, MAX_FIELD, Message};

/// The SOCKS5 version byte.
pub const VERSION: u8 = 0x05;

/// An authentication method (open: unknown values survive decoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Method(pub u8);

impl Method {
    /// 0x00: no authentication required.
    pub const NO_AUTH: Method = Method(0x00);
    /// 0x01: GSSAPI (not supported here; never chosen).
    pub const GSSAPI: Method = Method(0x01);
    /// 0x02: username/password (RFC 1929).
    pub const USERNAME_PASSWORD: Method = Method(0x02);
    /// 0xFF: no acceptable methods.
    pub const NO_ACCEPTABLE: Method = Method(0xFF);
}

/// A request command, shared by SOCKS4 (CD) and SOCKS5 (CMD) which number CONNECT
/// and BIND alike. Open: unknown values survive decoding (the server answers 0x07).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Command(pub u8);

impl Command {
    /// 0x01: CONNECT.
    pub const CONNECT: Command = Command(0x01);
    /// 0x02: BIND.
    pub const BIND: Command = Command(0x02);
    /// 0x03: UDP ASSOCIATE (SOCKS5 only).
    pub const UDP_ASSOCIATE: Command = Command(0x03);
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Command::CONNECT => f.write_str("CONNECT"),
            Command::BIND => f.write_str("BIND"),
            Command::UDP_ASSOCIATE => f.write_str("UDP ASSOCIATE"),
            Command(other) => write!(f, "command {other:#04x}"),
        }
    }
}

/// A SOCKS5 reply code (open: unknown values survive decoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReplyCode(pub u8);

impl ReplyCode {
    /// 0x00: succeeded.
    pub const SUCCEEDED: ReplyCode = ReplyCode(0x00);
    /// 0x01: general SOCKS server failure.
    pub const GENERAL_FAILURE: ReplyCode = ReplyCode(0x01);
    /// 0x02: connection not allowed by ruleset.
    pub const NOT_ALLOWED: ReplyCode = ReplyCode(0x02);
    /// 0x03: network unreachable.
    pub const NETWORK_UNREACHABLE: ReplyCode = ReplyCode(0x03);
    /// 0x04: host unreachable.
    pub const HOST_UNREACHABLE: ReplyCode = ReplyCode(0x04);
    /// 0x05: connection refused.
    pub const CONNECTION_REFUSED: ReplyCode = ReplyCode(0x05);
    /// 0x06: TTL expired (also used for timeouts).
    pub const TTL_EXPIRED: ReplyCode = ReplyCode(0x06);
    /// 0x07: command not supported.
    pub const COMMAND_NOT_SUPPORTED: ReplyCode = ReplyCode(0x07);
    /// 0x08: address type not supported.
    pub const ADDRESS_TYPE_NOT_SUPPORTED: ReplyCode = ReplyCode(0x08);
}

impl fmt::Display for ReplyCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match *self {
            ReplyCode::SUCCEEDED => "succeeded",
            ReplyCode::GENERAL_FAILURE => "general SOCKS server failure",
            ReplyCode::NOT_ALLOWED => "connection not allowed by ruleset",
            ReplyCode::NETWORK_UNREACHABLE => "network unreachable",
            ReplyCode::HOST_UNREACHABLE => "host unreachable",
            ReplyCode::CONNECTION_REFUSED => "connection refused",
            ReplyCode::TTL_EXPIRED => "TTL expired",
            ReplyCode::COMMAND_NOT_SUPPORTED => "command not supported",
            ReplyCode::ADDRESS_TYPE_NOT_SUPPORTED => "address type not supported",
            _ => "unassigned",
        };
        write!(f, "{:#04x} ({what})", self.0)
    }
}

fn check_version(r: &mut Reader<'_>, message: &'static str) -> Result<Option<()>, Error> {
    match r.u8() {
        None => Ok(None),
        Some(VERSION) => Ok(Some(())),
        Some(version) => Err(Error::VersionMismatch {
            message,
            version,
            expected: VERSION,
        }),
    }
}

/// The client's greeting: the authentication methods it offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    methods: Vec<Method>,
}

impl Greeting {
    /// A greeting offering `methods` (at most 255).
    pub fn new(methods: Vec<Method>) -> Result<Self, Error> {
        if methods.len() > MAX_FIELD {
            return Err(Error::FieldLength {
                field: "method list",
                len: methods.len(),
                min: 0,
                max: MAX_FIELD,
            });
        }
        Ok(Greeting { methods })
    }

    /// The offered methods, in the client's order. May be empty on decode (NMETHODS 0),
    /// which a server answers with [`Method::NO_ACCEPTABLE`].
    pub fn methods(&self) -> &[Method] {
        &self.methods
    }
}

impl Message for Greeting {
    fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, Error> {
        let mut r = Reader::new(buf);
        if check_version(&mut r, "SOCKS5 greeting")?.is_none() {
            return Ok(None);
        }
        let Some(n) = r.u8() else { return Ok(None) };
        let Some(methods) = r.take(usize::from(n)) else {
            return Ok(None);
        };
        let methods = methods.iter().map(|&m| Method(m)).collect();
        Ok(Some((Greeting { methods }, r.consumed())))
    }

    fn encoded_len(&self) -> usize {
        self.methods.len().saturating_add(2)
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.push(VERSION);
        out.push(u8::try_from(self.methods.len()).unwrap_or(u8::MAX));
        out.extend(self.methods.iter().map(|m| m.0));
    }
}

/// The server's choice of method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodSelection {
    /// The chosen method, or [`Method::NO_ACCEPTABLE`].
    pub method: Method,
}

impl Message for MethodSelection {
    fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, Error> {
        let mut r = Reader::new(buf);
        if check_version(&mut r, "SOCKS5 method selection")?.is_none() {
            return Ok(None);
        }
        let Some(method) = r.u8() else {
            return Ok(None);
        };
        Ok(Some((
            MethodSelection {
                method: Method(method),
            },
            r.consumed(),
        )))
    }

    fn encoded_len(&self) -> usize {
        2
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[VERSION, self.method.0]);
    }
}

/// Parses `VER CODE RSV ATYP ADDR PORT`, the shape shared by request and reply.
fn decode_framed(buf: &[u8], message: &'static str) -> Result<Option<(u8, Address, usize)>, Error> {
    let mut r = Reader::new(buf);
    if check_version(&mut r, message)?.is_none() {
        return Ok(None);
    }
    // RSV must be 0x00 by the RFC; it carries no meaning, so any value is accepted.
    let (Some(code), Some(_rsv)) = (r.u8(), r.u8()) else {
        return Ok(None);
    };
    let Some((addr, n)) = Address::decode(r.rest())? else {
        return Ok(None);
    };
    Ok(Some((code, addr, r.consumed().saturating_add(n))))
}

fn encode_framed(code: u8, addr: &Address, out: &mut Vec<u8>) {
    out.extend_from_slice(&[VERSION, code, 0x00]);
    addr.encode(out);
}

/// A SOCKS5 request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// CMD.
    pub command: Command,
    /// DST.ADDR and DST.PORT.
    pub target: Address,
}

impl Message for Request {
    fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, Error> {
        Ok(
            decode_framed(buf, "SOCKS5 request")?.map(|(cmd, target, n)| {
                let request = Request {
                    command: Command(cmd),
                    target,
                };
                (request, n)
            }),
        )
    }

    fn encoded_len(&self) -> usize {
        self.target.encoded_len().saturating_add(3)
    }

    fn encode(&self, out: &mut Vec<u8>) {
        encode_framed(self.command.0, &self.target, out);
    }
}

/// A SOCKS5 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// REP.
    pub code: ReplyCode,
    /// BND.ADDR and BND.PORT.
    pub bound: Address,
}

impl Message for Reply {
    fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, Error> {
        Ok(decode_framed(buf, "SOCKS5 reply")?.map(|(rep, bound, n)| {
            let reply = Reply {
                code: ReplyCode(rep),
                bound,
            };
            (reply, n)
        }))
    }

    fn encoded_len(&self) -> usize {
        self.bound.encoded_len().saturating_add(3)
    }

    fn encode(&self, out: &mut Vec<u8>) {
        encode_framed(self.code.0, &self.bound, out);
    }
}
