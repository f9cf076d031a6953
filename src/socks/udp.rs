//! The header of every datagram relayed by a SOCKS5 UDP ASSOCIATE (RFC 1928 §7).
//!
//! ```text
//! +----+------+------+----------+----------+----------+
//! |RSV | FRAG | ATYP | DST.ADDR | DST.PORT |   DATA   |
//! +----+------+------+----------+----------+----------+
//! | 2  |  1   |  1   | Variable |    2     | Variable |
//! +----+------+------+----------+----------+----------+
//! ```
//!
//! From the client, DST is where the payload goes; towards the client, it is where the
//! payload came from. FRAG 0 is a whole datagram; this implementation does not
//! reassemble fragments (the RFC allows that) and drops any datagram with FRAG != 0.

use super::reader::Reader;
use super::{Address, Error, Message};

/// The fixed part before the address: RSV (2) and FRAG (1).
pub const FIXED_LEN: usize = 3;

/// The longest header: the fixed part, ATYP, a 255-byte name with its length, a port.
pub const MAX_HEADER_LEN: usize = FIXED_LEN + 1 + 1 + 255 + 2;

/// A UDP request header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// FRAG: 0 for a standalone datagram; anything else is a fragment.
    pub frag: u8,
    /// DST.ADDR and DST.PORT.
    pub target: Address,
}

impl Header {
    /// A standalone (unfragmented) datagram's header.
    pub fn new(target: Address) -> Self {
        Header { frag: 0, target }
    }
}

impl Message for Header {
    fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, Error> {
        let mut r = Reader::new(buf);
        // RSV is 0x0000 by the RFC; it carries no meaning, so any value is accepted.
        let (Some(_rsv), Some(frag)) = (r.u16(), r.u8()) else {
            return Ok(None);
        };
        let Some((target, n)) = Address::decode(r.rest())? else {
            return Ok(None);
        };
        Ok(Some((
            Header { frag, target },
            r.consumed().saturating_add(n),
        )))
    }

    fn encoded_len(&self) -> usize {
        self.target.encoded_len().saturating_add(FIXED_LEN)
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[0, 0, self.frag]);
        self.target.encode(out);
    }
}

/// Splits a whole datagram into its header and payload. A datagram that ends inside
/// its header is [`Error::TruncatedDatagram`].
pub fn parse_datagram(datagram: &[u8]) -> Result<(Header, &[u8]), Error> {
    match Header::decode(datagram)? {
        Some((header, n)) => {
            let payload = datagram.get(n..).unwrap_or_default();
            Ok((header, payload))
        }
        None => Err(Error::TruncatedDatagram {
            len: datagram.len(),
        }),
    }
}

/// Appends a whole datagram (FRAG 0) for `target` carrying `payload` to `out`.
pub fn encode_datagram(target: &Address, payload: &[u8], out: &mut Vec<u8>) {
    out.reserve(
        target
            .encoded_len()
            .saturating_add(FIXED_LEN)
            .saturating_add(payload.len()),
    );
    out.extend_from_slice(&[0, 0, 0]);
    target.encode(out);
    out.extend_from_slice(payload);
}
