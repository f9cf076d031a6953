//! A small synchronous rtnetlink client: send one request, read until its answer
//! (an ACK, an error with errno and extended-ACK text, or the requested object).
//!
//! Synchronous on purpose: guards restore state from `Drop`, where no async runtime
//! can be assumed. The socket is non-blocking, which is safe because the kernel
//! queues rtnetlink answers before `send` returns; a missing answer is an error,
//! never a hang. Message types come from `netlink-packet-route`; this module must
//! not know what the messages mean (that is `link.rs`).

use std::io;
use std::sync::{Mutex, PoisonError};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_ACK_TLVS, NLM_F_CAPPED, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader,
    NetlinkMessage, NetlinkPayload, NlasIterator,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// Receive buffer: one link or address message is a few KiB at most.
const RECV_BUFFER: usize = 64 * 1024;

/// `NLMSGERR_ATTR_MSG`: the extended-ACK attribute carrying the kernel's text.
const NLMSGERR_ATTR_MSG: u16 = 1;

/// Length of `struct nlmsghdr`.
const NLMSGHDR_LEN: usize = 16;

/// What went wrong with one request, before `link.rs` adds which one it was.
#[derive(Debug)]
pub(crate) enum NlError {
    /// The socket failed, or the kernel sent nothing.
    Io(io::Error),
    /// The kernel answered with an error.
    Refused { errno: i32, message: Option<String> },
    /// The answer could not be decoded.
    Decode(String),
}

/// What a request got back.
#[derive(Debug)]
pub(crate) enum Reply {
    /// A positive acknowledgement.
    Ack,
    /// The object that was asked for.
    Message(RouteNetlinkMessage),
}

/// An rtnetlink socket in the network namespace of the thread that opened it.
#[derive(Debug)]
pub(crate) struct Netlink {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    socket: Socket,
    sequence: u32,
    buf: Vec<u8>,
}

impl Netlink {
    /// Opens, binds and connects a `NETLINK_ROUTE` socket.
    pub(crate) fn open() -> io::Result<Netlink> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        socket.set_non_blocking(true)?;
        // Ask for short error replies carrying the kernel's explanation. Old
        // kernels without these options still work, with less detail.
        let _ = socket.set_cap_ack(true);
        let _ = socket.set_ext_ack(true);
        Ok(Netlink {
            inner: Mutex::new(Inner {
                socket,
                sequence: 0,
                buf: Vec::with_capacity(RECV_BUFFER),
            }),
        })
    }

    /// Sends `message` with `NLM_F_REQUEST | NLM_F_ACK | flags` and waits for the ACK.
    pub(crate) fn ack(&self, message: RouteNetlinkMessage, flags: u16) -> Result<(), NlError> {
        self.request(message, NLM_F_ACK | flags).map(drop)
    }

    /// Sends a `GET` request and returns the object the kernel answers with.
    pub(crate) fn get(&self, message: RouteNetlinkMessage) -> Result<RouteNetlinkMessage, NlError> {
        match self.request(message, 0)? {
            Reply::Message(reply) => Ok(reply),
            Reply::Ack => Err(NlError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the kernel acknowledged a GET request without an answer",
            ))),
        }
    }

    fn request(&self, message: RouteNetlinkMessage, flags: u16) -> Result<Reply, NlError> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.sequence = inner.sequence.wrapping_add(1);
        let sequence = inner.sequence;

        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        packet.finalize();
        let mut bytes = vec![0; packet.buffer_len()];
        packet.serialize(&mut bytes);
        let sent = inner.socket.send(&bytes, 0).map_err(NlError::Io)?;
        if sent != bytes.len() {
            return Err(NlError::Io(io::Error::new(
                io::ErrorKind::WriteZero,
                "netlink request sent partially",
            )));
        }
        inner.receive(sequence)
    }
}

impl Inner {
    /// Reads datagrams until one holds the answer to `sequence`.
    fn receive(&mut self, sequence: u32) -> Result<Reply, NlError> {
        loop {
            self.buf.clear();
            let len = self.socket.recv(&mut self.buf, libc::MSG_TRUNC);
            let len = match len {
                Ok(len) => len,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    return Err(NlError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the kernel sent no answer",
                    )));
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(NlError::Io(error)),
            };
            if len > self.buf.len() {
                return Err(NlError::Decode(format!(
                    "answer of {len} bytes truncated to {}",
                    self.buf.len()
                )));
            }
            if let Some(reply) = find_answer(&self.buf, sequence)? {
                return Ok(reply);
            }
        }
    }
}

/// Walks the messages of one datagram; returns the answer to `sequence` if present.
fn find_answer(mut datagram: &[u8], sequence: u32) -> Result<Option<Reply>, NlError> {
    let decode = |e: netlink_packet_core::DecodeError| NlError::Decode(e.to_string());
    while !datagram.is_empty() {
        let length = NetlinkBuffer::new_checked(datagram)
            .map_err(decode)?
            .length() as usize;
        let (this, rest) = datagram.split_at(length.min(datagram.len()));
        datagram = rest
            .get(align4(length).saturating_sub(length)..)
            .unwrap_or(&[]);

        let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(this).map_err(decode)?;
        if message.header.sequence_number != sequence {
            continue;
        }
        match message.payload {
            NetlinkPayload::Error(error) => match error.code {
                None => return Ok(Some(Reply::Ack)),
                Some(code) => {
                    return Err(NlError::Refused {
                        errno: code.get().saturating_neg(),
                        message: extended_ack(message.header.flags, &error.header),
                    });
                }
            },
            NetlinkPayload::InnerMessage(inner) => return Ok(Some(Reply::Message(inner))),
            NetlinkPayload::Done(_) => {
                return Err(NlError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the kernel ended the answer without the object",
                )));
            }
            _ => continue,
        }
    }
    Ok(None)
}

/// The kernel's text from an error message's extended-ACK attributes. `payload` is
/// what follows the errno: the request's header (whole request unless capped),
/// then the attributes.
fn extended_ack(flags: u16, payload: &[u8]) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    let echoed = if flags & NLM_F_CAPPED != 0 {
        NLMSGHDR_LEN
    } else {
        let length: [u8; 4] = payload.get(..4)?.try_into().ok()?;
        u32::from_ne_bytes(length) as usize
    };
    let attributes = payload.get(align4(echoed)..)?;
    NlasIterator::new(attributes)
        .map_while(Result::ok)
        .find(|nla| nla.kind() == NLMSGERR_ATTR_MSG)
        .map(|nla| {
            let text = nla.value().split(|&b| b == 0).next().unwrap_or_default();
            String::from_utf8_lossy(text).into_owned()
        })
}

fn align4(len: usize) -> usize {
    len.saturating_add(3) & !3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extended_ack_text_is_found_after_a_capped_header() {
        let mut payload = vec![0u8; NLMSGHDR_LEN];
        // NLMSGERR_ATTR_MSG, length 4 + "bad mtu\0" = 12
        payload.extend_from_slice(&12u16.to_ne_bytes());
        payload.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        payload.extend_from_slice(b"bad mtu\0");
        let flags = NLM_F_ACK_TLVS | NLM_F_CAPPED;
        assert_eq!(extended_ack(flags, &payload).as_deref(), Some("bad mtu"));
        assert_eq!(extended_ack(NLM_F_CAPPED, &payload), None);
        assert_eq!(extended_ack(flags, &payload[..3]), None);
    }

    #[test]
    fn garbage_datagrams_are_decode_errors_not_panics() {
        for datagram in [&[1u8, 2, 3][..], &[0xff; 16][..], &[16, 0, 0, 0, 2, 0][..]] {
            assert!(matches!(find_answer(datagram, 1), Err(NlError::Decode(_))));
        }
        assert!(matches!(find_answer(&[], 1), Ok(None)));
    }
}
