//! DNS messages as the tunnel sees them (RFC 1035 §4.1, EDNS0 from RFC 6891): read a
//! query's header, first question and OPT record; build the few responses the tunnel
//! answers itself. Sans-IO: bytes in, values out; no sockets, no clock.
//!
//! ```text
//! header (12 bytes)                            question
//! +----+-------+---------+---------+---------+---------+   +-------+-------+--------+
//! | ID | FLAGS | QDCOUNT | ANCOUNT | NSCOUNT | ARCOUNT |   | QNAME | QTYPE | QCLASS |
//! | 2  |   2   |    2    |    2    |    2    |    2    |   | 1-255 |   2   |   2    |
//! +----+-------+---------+---------+---------+---------+   +-------+-------+--------+
//! FLAGS: QR(1) OPCODE(4) AA(1) TC(1) RD(1) | RA(1) Z(1) AD(1) CD(1) RCODE(4)
//! OPT (additional section): NAME 0 | TYPE 41 | CLASS = UDP payload size | TTL = ext-RCODE,
//! version, DO, Z | RDLEN | options
//! ```
//!
//! Parsing goes through hickory-proto. The responses built here copy the query's
//! header and question bytes as they came (so a client that randomises the case of
//! its name, 0x20-style, sees its own bytes back) and append at most one answer and
//! one OPT record; the tests decode every one of them with hickory.

use std::net::IpAddr;

use hickory_proto::ProtoError;
use hickory_proto::op::{Header, MessageType, OpCode};
use hickory_proto::rr::{DNSClass, Name, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

/// Length of the fixed header.
pub const HEADER_LEN: usize = 12;
/// The largest response a client without EDNS0 accepts over UDP (RFC 1035 §4.2.1).
pub const MIN_UDP_PAYLOAD: usize = 512;
/// The UDP payload size we advertise in our own OPT records (the DNS flag day 2020 value).
pub const OUR_UDP_PAYLOAD: u16 = 1232;
/// The longest name, as text without the trailing dot, that the map and SOCKS accept
/// (a wire name is at most 255 bytes, so its text form is at most 253).
pub const MAX_NAME_LEN: usize = 253;

/// RCODE 0: no error.
pub const RCODE_NOERROR: u8 = 0;
/// RCODE 1: the server could not interpret the query.
pub const RCODE_FORMERR: u8 = 1;
/// RCODE 2: the server failed to answer.
pub const RCODE_SERVFAIL: u8 = 2;
/// RCODE 5: the server refuses to answer.
pub const RCODE_REFUSED: u8 = 5;

const FLAG_QR: u16 = 0x8000;
const FLAG_TC: u16 = 0x0200;
const FLAG_RD: u16 = 0x0100;
const FLAG_RA: u16 = 0x0080;
const FLAG_CD: u16 = 0x0010;
const OPCODE_MASK: u16 = 0x7800;
const TYPE_OPT: u16 = 41;
/// A compression pointer to offset 12: the question's name.
const POINTER_TO_QNAME: [u8; 2] = [0xC0, 0x0C];

/// Why a message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    /// Fewer bytes than a header.
    #[error("{len} bytes is shorter than a DNS header")]
    Short {
        /// The message's length.
        len: usize,
    },
    /// The QR bit says this is a response, not a query.
    #[error("a response where a query was expected")]
    NotQuery,
    /// A question name uses a compression pointer. Legal (RFC 1035 4.1.4) but never
    /// sent by real clients in queries; refused because answers built here copy the
    /// question's bytes, where a pointer would point into our own header.
    #[error("a compressed name in the question section")]
    CompressedQuestion,
    /// hickory-proto could not decode the header, a question or a record.
    #[error("malformed DNS message: {source}")]
    Malformed {
        /// The decoder's error.
        source: Box<ProtoError>,
    },
}

impl From<ProtoError> for MessageError {
    fn from(source: ProtoError) -> Self {
        MessageError::Malformed {
            source: Box::new(source),
        }
    }
}

/// A question: name, type, class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// QNAME, as on the wire (case preserved).
    pub name: Name,
    /// QTYPE.
    pub qtype: RecordType,
    /// QCLASS.
    pub qclass: DNSClass,
}

/// The EDNS0 facts of a message (its OPT record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edns {
    /// The sender's UDP payload size (values under 512 read as 512).
    pub udp_size: u16,
}

/// A decoded message: what the tunnel needs of a query, or of a response it truncates.
#[derive(Debug, Clone)]
pub struct Message<'a> {
    bytes: &'a [u8],
    header: Header,
    question: Option<Question>,
    question_end: usize,
    edns: Option<Edns>,
}

impl<'a> Message<'a> {
    /// Reads a query: header, questions, and every record (to find the OPT record).
    pub fn decode_query(bytes: &'a [u8]) -> Result<Self, MessageError> {
        let message = Self::decode(bytes, true)?;
        if message.header.message_type() != MessageType::Query {
            return Err(MessageError::NotQuery);
        }
        Ok(message)
    }

    /// Reads a header and its questions only (no records, no EDNS): enough to build a
    /// truncated copy of a response.
    pub fn decode_head(bytes: &'a [u8]) -> Result<Self, MessageError> {
        Self::decode(bytes, false)
    }

    fn decode(bytes: &'a [u8], records: bool) -> Result<Self, MessageError> {
        if bytes.len() < HEADER_LEN {
            return Err(MessageError::Short { len: bytes.len() });
        }
        let mut decoder = BinDecoder::new(bytes);
        let header = Header::read(&mut decoder)?;
        // Questions one at a time: a hostile QDCOUNT costs nothing before bytes run out.
        let mut question = None;
        for _ in 0..header.query_count() {
            let q = hickory_proto::op::Query::read(&mut decoder)?;
            if question.is_none() {
                question = Some(Question {
                    name: q.name().clone(),
                    qtype: q.query_type(),
                    qclass: q.query_class(),
                });
            }
        }
        let question_end = decoder.index();
        if !plain_questions(bytes.get(HEADER_LEN..question_end).unwrap_or_default()) {
            return Err(MessageError::CompressedQuestion);
        }
        let mut edns = None;
        if records {
            let count = u32::from(header.answer_count())
                + u32::from(header.name_server_count())
                + u32::from(header.additional_count());
            for _ in 0..count {
                let record = Record::read(&mut decoder)?;
                if let DNSClass::OPT(udp_size) = record.dns_class() {
                    edns = Some(Edns { udp_size });
                }
            }
        }
        Ok(Message {
            bytes,
            header,
            question,
            question_end,
            edns,
        })
    }

    /// The message ID.
    pub fn id(&self) -> u16 {
        self.header.id()
    }

    /// The opcode is QUERY (0).
    pub fn is_standard_query(&self) -> bool {
        self.header.op_code() == OpCode::Query
    }

    /// QDCOUNT.
    pub fn question_count(&self) -> u16 {
        self.header.query_count()
    }

    /// The first question, if any.
    pub fn question(&self) -> Option<&Question> {
        self.question.as_ref()
    }

    /// The OPT record's facts, if the message has one (only read by `decode_query`).
    pub fn edns(&self) -> Option<Edns> {
        self.edns
    }

    /// The largest response this query's sender takes over UDP: 512 without EDNS0,
    /// else its advertised size; never more than `max_udp_payload` (from the MTU).
    pub fn udp_limit(&self, max_udp_payload: usize) -> usize {
        let client = self.edns.map_or(MIN_UDP_PAYLOAD, |e| {
            usize::from(e.udp_size).max(MIN_UDP_PAYLOAD)
        });
        client.min(max_udp_payload)
    }

    /// Length of the question section on the wire.
    pub fn question_wire_len(&self) -> usize {
        self.question_end.saturating_sub(HEADER_LEN)
    }

    /// The header and question bytes as received.
    fn head_bytes(&self) -> &'a [u8] {
        self.bytes.get(..self.question_end).unwrap_or_default()
    }

    fn question_bytes(&self) -> &'a [u8] {
        self.bytes
            .get(HEADER_LEN..self.question_end)
            .unwrap_or_default()
    }

    fn flags(&self) -> u16 {
        u16::from_be_bytes([
            self.bytes.get(2).copied().unwrap_or(0),
            self.bytes.get(3).copied().unwrap_or(0),
        ])
    }
}

/// The first question's name as the fake-IP map keys it: labels joined by dots,
/// ASCII lower-case, no trailing dot. `None` for the root name and for names the
/// proxy could not be handed as a host name (a byte outside printable ASCII, or a
/// dot inside a label). Writes into `buf`, so a lookup allocates nothing.
pub fn map_name<'b>(name: &Name, buf: &'b mut [u8; MAX_NAME_LEN]) -> Option<&'b str> {
    let mut len = 0usize;
    for label in name.iter() {
        if len > 0 {
            *buf.get_mut(len)? = b'.';
            len += 1;
        }
        for &byte in label {
            if !(0x21..=0x7e).contains(&byte) || byte == b'.' {
                return None;
            }
            *buf.get_mut(len)? = byte.to_ascii_lowercase();
            len += 1;
        }
    }
    if len == 0 {
        return None;
    }
    std::str::from_utf8(buf.get(..len)?).ok()
}

/// Reads a message's ID (its first two bytes).
pub fn id_of(message: &[u8]) -> Option<u16> {
    match message {
        [a, b, ..] => Some(u16::from_be_bytes([*a, *b])),
        _ => None,
    }
}

/// Overwrites a message's ID; false if it is shorter than two bytes.
pub fn set_id(message: &mut [u8], id: u16) -> bool {
    match message {
        [a, b, ..] => {
            [*a, *b] = id.to_be_bytes();
            true
        }
        _ => false,
    }
}

/// Writes a response header plus the query's question section. Flags: QR, the query's
/// opcode, RD and CD; RA set; `tc` as given.
fn response_head(
    query: &Message<'_>,
    rcode: u8,
    answers: u16,
    additional: u16,
    tc: bool,
    out: &mut Vec<u8>,
) {
    let flags = query.flags();
    let mut new = FLAG_QR | FLAG_RA | (flags & (OPCODE_MASK | FLAG_RD | FLAG_CD));
    if tc {
        new |= FLAG_TC;
    }
    new |= u16::from(rcode & 0x0f);
    out.extend_from_slice(&query.id().to_be_bytes());
    out.extend_from_slice(&new.to_be_bytes());
    out.extend_from_slice(&query.question_count().to_be_bytes());
    out.extend_from_slice(&answers.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&additional.to_be_bytes());
    out.extend_from_slice(query.question_bytes());
}

/// Our OPT record (when the query had one): payload size [`OUR_UDP_PAYLOAD`], no flags.
fn opt_record(out: &mut Vec<u8>) {
    out.push(0); // root name
    out.extend_from_slice(&TYPE_OPT.to_be_bytes());
    out.extend_from_slice(&OUR_UDP_PAYLOAD.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]); // extended RCODE, version, DO + Z
    out.extend_from_slice(&[0, 0]); // RDLENGTH
}

fn additional_count(query: &Message<'_>) -> u16 {
    u16::from(query.edns.is_some())
}

/// A response with one A or AAAA record for the query's (first) name: `ip` with
/// `ttl` seconds. The record's name is a pointer to the question.
pub fn address_answer(query: &Message<'_>, ip: IpAddr, ttl: u32, out: &mut Vec<u8>) {
    response_head(query, RCODE_NOERROR, 1, additional_count(query), false, out);
    out.extend_from_slice(&POINTER_TO_QNAME);
    let (rtype, rdata): (RecordType, &[u8]) = match &ip {
        IpAddr::V4(v4) => (RecordType::A, &v4.octets()[..]),
        IpAddr::V6(v6) => (RecordType::AAAA, &v6.octets()[..]),
    };
    out.extend_from_slice(&u16::from(rtype).to_be_bytes());
    out.extend_from_slice(&u16::from(DNSClass::IN).to_be_bytes());
    out.extend_from_slice(&ttl.to_be_bytes());
    let rdlen = u16::try_from(rdata.len()).unwrap_or(0);
    out.extend_from_slice(&rdlen.to_be_bytes());
    out.extend_from_slice(rdata);
    if query.edns.is_some() {
        opt_record(out);
    }
}

/// Whether `query` asks for a zone transfer (AXFR or IXFR), whose answer is a
/// stream of messages rather than one.
pub fn is_zone_transfer(query: &[u8]) -> bool {
    Message::decode_query(query)
        .ok()
        .and_then(|message| message.question().map(|q| q.qtype))
        .is_some_and(|qtype| matches!(qtype, RecordType::AXFR | RecordType::IXFR))
}

/// A response with no records and `rcode` (NOERROR for "no data", SERVFAIL, ...).
pub fn empty_response(query: &Message<'_>, rcode: u8, out: &mut Vec<u8>) {
    response_head(query, rcode, 0, additional_count(query), false, out);
    if query.edns.is_some() {
        opt_record(out);
    }
}

/// FORMERR for bytes that did not decode: the header's ID and opcode echoed, no
/// question. `None` if there is not even a header.
pub fn format_error(bytes: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let head = bytes.get(..4)?;
    if bytes.len() < HEADER_LEN {
        return None;
    }
    let flags = u16::from_be_bytes([*head.get(2)?, *head.get(3)?]);
    let new = FLAG_QR | FLAG_RA | (flags & (OPCODE_MASK | FLAG_RD)) | u16::from(RCODE_FORMERR);
    out.extend_from_slice(head.get(..2)?);
    out.extend_from_slice(&new.to_be_bytes());
    out.extend_from_slice(&[0; 8]);
    Some(())
}

/// The truncated form of `response` (TC=1, its header and question, no records), for
/// a client that cannot take it whole over UDP; it retries over TCP. Carries our OPT
/// record when the query had one. Falls back to `query`'s header and question if the
/// response's own do not decode.
pub fn truncated(response: &[u8], query: &Message<'_>, out: &mut Vec<u8>) {
    let additional = additional_count(query);
    match Message::decode_head(response) {
        Ok(head) => {
            let bytes = head.head_bytes();
            let flags = head.flags() | FLAG_TC;
            out.extend_from_slice(bytes.get(..2).unwrap_or(&[0, 0]));
            out.extend_from_slice(&flags.to_be_bytes());
            out.extend_from_slice(&head.question_count().to_be_bytes());
            out.extend_from_slice(&[0, 0, 0, 0]);
            out.extend_from_slice(&additional.to_be_bytes());
            out.extend_from_slice(head.question_bytes());
        }
        Err(_) => response_head(query, RCODE_NOERROR, 0, additional, true, out),
    }
    if query.edns.is_some() {
        opt_record(out);
    }
}

/// The question section is names written out in labels (no compression pointers),
/// each followed by its type and class, and nothing else.
fn plain_questions(mut section: &[u8]) -> bool {
    while !section.is_empty() {
        loop {
            let Some((&len, rest)) = section.split_first() else {
                return false;
            };
            if len & 0xc0 != 0 {
                return false;
            }
            if len == 0 {
                section = rest;
                break;
            }
            let Some(rest) = rest.get(usize::from(len)..) else {
                return false;
            };
            section = rest;
        }
        let Some(rest) = section.get(4..) else {
            return false;
        };
        section = rest;
    }
    true
}
