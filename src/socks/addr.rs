//! The SOCKS5 address, as used in requests, replies and UDP headers (RFC 1928 §4, §5):
//!
//! ```text
//! +------+----------+----------+
//! | ATYP | DST.ADDR | DST.PORT |
//! +------+----------+----------+
//! |  1   | Variable |    2     |
//! +------+----------+----------+
//! ATYP 0x01: 4 bytes IPv4 | 0x03: 1 length byte, then 1-255 bytes of name | 0x04: 16 bytes IPv6
//! ```

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

use super::reader::Reader;
use super::{Error, MAX_FIELD, Message};

/// ATYP for an IPv4 address.
pub const ATYP_IPV4: u8 = 0x01;
/// ATYP for a domain name.
pub const ATYP_DOMAIN: u8 = 0x03;
/// ATYP for an IPv6 address.
pub const ATYP_IPV6: u8 = 0x04;

/// A host name as SOCKS carries it: 1 to 255 bytes of UTF-8 without NUL.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomainName(String);

impl DomainName {
    /// Validates a host name.
    pub fn new(name: impl Into<String>) -> Result<Self, Error> {
        let name = name.into();
        if name.is_empty() || name.len() > MAX_FIELD {
            return Err(Error::FieldLength {
                field: "domain name",
                len: name.len(),
                min: 1,
                max: MAX_FIELD,
            });
        }
        if name.contains('\0') {
            return Err(Error::InvalidDomain {
                reason: "contains NUL",
            });
        }
        Ok(DomainName(name))
    }

    /// Validates a host name received as bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        let name = std::str::from_utf8(bytes).map_err(|_| Error::InvalidDomain {
            reason: "not UTF-8",
        })?;
        DomainName::new(name)
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Its length in bytes (1..=255).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false: a `DomainName` has at least one byte.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A destination or bound address: an IP socket address or a host name and port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    /// An IPv4 or IPv6 address and port.
    Ip(SocketAddr),
    /// A host name and port, to be resolved by whoever connects.
    Domain(DomainName, u16),
}

impl Address {
    /// The unspecified IPv4 address with port 0 (`0.0.0.0:0`).
    pub const UNSPECIFIED: Address =
        Address::Ip(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0));

    /// A host name and port; fails if the name is not a valid [`DomainName`].
    pub fn domain(name: impl Into<String>, port: u16) -> Result<Self, Error> {
        Ok(Address::Domain(DomainName::new(name)?, port))
    }

    /// The port.
    pub fn port(&self) -> u16 {
        match self {
            Address::Ip(addr) => addr.port(),
            Address::Domain(_, port) => *port,
        }
    }

    /// The IP socket address, if this is not a host name.
    pub fn ip(&self) -> Option<SocketAddr> {
        match self {
            Address::Ip(addr) => Some(*addr),
            Address::Domain(..) => None,
        }
    }

    /// True for `0.0.0.0` and `::` (with any port). SOCKS clients send it when they do
    /// not know their own address, e.g. in a BIND or UDP ASSOCIATE request.
    pub fn is_unspecified(&self) -> bool {
        matches!(self, Address::Ip(addr) if addr.ip().is_unspecified())
    }
}

impl From<SocketAddr> for Address {
    fn from(addr: SocketAddr) -> Self {
        // flowinfo and scope id have no place on the wire; drop them so that an
        // address compares equal to its decoded self.
        match addr {
            SocketAddr::V6(v6) => {
                Address::Ip(SocketAddr::V6(SocketAddrV6::new(*v6.ip(), v6.port(), 0, 0)))
            }
            v4 => Address::Ip(v4),
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Ip(addr) => write!(f, "{addr}"),
            Address::Domain(name, port) => write!(f, "{name}:{port}"),
        }
    }
}

impl Message for Address {
    fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, Error> {
        let mut r = Reader::new(buf);
        let Some(atyp) = r.u8() else { return Ok(None) };
        let addr = match atyp {
            ATYP_IPV4 => {
                let (Some(ip), Some(port)) = (r.array::<4>(), r.u16()) else {
                    return Ok(None);
                };
                Address::Ip(SocketAddr::new(Ipv4Addr::from(ip).into(), port))
            }
            ATYP_IPV6 => {
                let (Some(ip), Some(port)) = (r.array::<16>(), r.u16()) else {
                    return Ok(None);
                };
                Address::Ip(SocketAddr::new(Ipv6Addr::from(ip).into(), port))
            }
            ATYP_DOMAIN => {
                let Some(len) = r.u8() else { return Ok(None) };
                let (Some(name), Some(port)) = (r.take(usize::from(len)), r.u16()) else {
                    return Ok(None);
                };
                Address::Domain(DomainName::from_bytes(name)?, port)
            }
            atyp => return Err(Error::UnknownAddressType { atyp }),
        };
        Ok(Some((addr, r.consumed())))
    }

    fn encoded_len(&self) -> usize {
        match self {
            Address::Ip(SocketAddr::V4(_)) => 1 + 4 + 2,
            Address::Ip(SocketAddr::V6(_)) => 1 + 16 + 2,
            Address::Domain(name, _) => name.len().saturating_add(4),
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Address::Ip(SocketAddr::V4(a)) => {
                out.push(ATYP_IPV4);
                out.extend_from_slice(&a.ip().octets());
            }
            Address::Ip(SocketAddr::V6(a)) => {
                out.push(ATYP_IPV6);
                out.extend_from_slice(&a.ip().octets());
            }
            Address::Domain(name, _) => {
                out.push(ATYP_DOMAIN);
                // A DomainName is at most 255 bytes by construction.
                out.push(u8::try_from(name.len()).unwrap_or(u8::MAX));
                out.extend_from_slice(name.as_str().as_bytes());
            }
        }
        out.extend_from_slice(&self.port().to_be_bytes());
    }
}
