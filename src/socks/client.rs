//! The client side of the handshake as a state machine: what to send first, then
//! replies in and the next message out, until the proxy has answered the request.
//!
//! ```text
//! SOCKS4/4a: send request                      -> await reply -> Done
//! SOCKS5:    send greeting -> await method -00-> send request  -> await reply -> Done
//!                                          -02-> send credentials -> await status -> ...
//! BIND:      ... -> await reply (Bound) -> await second reply -> Done
//! ```
//!
//! Pipelined SOCKS5 ([`ClientHandshake::pipelined`]) sends every message up to the
//! request in the first write and then only reads: one round trip instead of two (or
//! three with a login). Each reply is still checked in turn, and a refusal at any stage
//! is the same error as without pipelining.
//!
//! ```text
//! SOCKS5, no login: send greeting(00) + request                -> await method 00
//!                                                                -> await reply -> Done
//! SOCKS5, login:    send greeting(02) + credentials + request  -> await method 02
//!                                                                -> await status -> await reply
//! ```
//!
//! Not every server reads past the message it expects (microsocks drops the rest of a
//! segment), so pipelining is the caller's choice; with credentials it offers only
//! username/password, since what follows the greeting must be what the server expects.

use std::net::SocketAddr;

use super::v5::{Greeting, MethodSelection};
use super::{Address, Command, Credentials, Error, Message, Method, ReplyCode};
use super::{auth, v4, v5};

/// The protocol spoken to the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// SOCKS4: IPv4 destinations only; the proxy never sees a host name.
    Socks4,
    /// SOCKS4a: IPv4 addresses or host names (resolved by the proxy).
    Socks4a,
    /// SOCKS5.
    Socks5,
}

impl Protocol {
    /// The URL scheme of this protocol.
    pub fn scheme(self) -> &'static str {
        match self {
            Protocol::Socks4 => "socks4",
            Protocol::Socks4a => "socks4a",
            Protocol::Socks5 => "socks5",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.scheme())
    }
}

/// How the client identifies itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Auth {
    /// Nothing (SOCKS5 offers method 0x00 only; SOCKS4 sends an empty user id).
    #[default]
    None,
    /// SOCKS5: offer username/password (RFC 1929) besides no-auth.
    /// SOCKS4/4a: the user name is sent as the user id.
    Password(Credentials),
    /// SOCKS4/4a user id (SOCKS5 ignores it).
    UserId(v4::UserId),
}

/// How far a call to [`ClientHandshake::handshake`] got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientStatus {
    /// More bytes from the proxy are needed.
    NeedMore,
    /// First BIND reply: the proxy listens at this address. Keep feeding input: the
    /// second reply comes when a peer connects.
    Bound(Address),
    /// The request succeeded: the bound address (CONNECT: the proxy's outbound socket;
    /// UDP ASSOCIATE: the relay; BIND: the peer that connected). From here on, bytes
    /// are the data stream.
    Done(Address),
}

/// The result of feeding input to [`ClientHandshake::handshake`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientStep {
    /// Bytes of the input consumed.
    pub consumed: usize,
    /// Bytes to send to the proxy now (may be empty).
    pub send: Vec<u8>,
    /// Where the handshake stands.
    pub status: ClientStatus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Initial,
    MethodSelection,
    AuthStatus,
    Reply,
    SecondReply,
    Finished,
}

/// The client side of one SOCKS4/4a/5 handshake.
#[derive(Debug, Clone)]
pub struct ClientHandshake {
    protocol: Protocol,
    auth: Auth,
    command: Command,
    target: Address,
    state: State,
    /// Send everything up to the request at once (SOCKS5).
    pipeline: bool,
    /// The request (and the credentials) went out with the greeting.
    sent_ahead: bool,
}

impl ClientHandshake {
    /// A handshake asking the proxy to carry out `command` for `target`. Fails if the
    /// protocol cannot express the target (IPv6 over SOCKS4/4a, a name over SOCKS4,
    /// an address `0.0.0.x` with x != 0 over SOCKS4/4a) or the command (UDP ASSOCIATE
    /// over SOCKS4/4a).
    pub fn new(
        protocol: Protocol,
        auth: Auth,
        command: Command,
        target: Address,
    ) -> Result<Self, Error> {
        let fits = match (protocol, &target) {
            (Protocol::Socks5, _) => true,
            (_, Address::Ip(SocketAddr::V6(_))) => false,
            // DSTIP 0.0.0.x (x != 0) is the SOCKS4a marker: the proxy would wait for a
            // host name after the user id and take whatever follows for one.
            (_, Address::Ip(SocketAddr::V4(a))) => !v4::is_socks4a_marker(*a.ip()),
            (Protocol::Socks4, Address::Domain(..)) => false,
            _ => true,
        };
        if !fits {
            return Err(Error::UnsupportedTarget {
                protocol: protocol.scheme(),
                target: target.to_string(),
            });
        }
        if protocol != Protocol::Socks5 && command == Command::UDP_ASSOCIATE {
            return Err(Error::UnsupportedCommand { command });
        }
        Ok(ClientHandshake {
            protocol,
            auth,
            command,
            target,
            state: State::Initial,
            pipeline: false,
            sent_ahead: false,
        })
    }

    /// Pipelines the SOCKS5 handshake: [`ClientHandshake::start`] returns the greeting,
    /// the credentials (if any) and the request together. With
    /// [`Auth::Password`] the greeting then offers only username/password. SOCKS4/4a
    /// have a single message anyway; for them this changes nothing.
    /// Whether the request has gone out and its reply is all that is awaited (a
    /// proxy that closes now refuses the request without saying so; `ssh -D` does
    /// when the destination refuses).
    pub fn awaiting_reply(&self) -> bool {
        self.state == State::Reply
    }

    pub fn pipelined(mut self, on: bool) -> Self {
        self.pipeline = on;
        self
    }

    /// The first message to send (the SOCKS4 request or the SOCKS5 greeting).
    pub fn start(&mut self) -> Vec<u8> {
        if self.state != State::Initial {
            return Vec::new();
        }
        match self.protocol {
            Protocol::Socks5 if self.pipeline => {
                self.state = State::MethodSelection;
                self.sent_ahead = true;
                let (method, credentials) = match &self.auth {
                    Auth::Password(creds) => (Method::USERNAME_PASSWORD, creds.to_bytes()),
                    Auth::None | Auth::UserId(_) => (Method::NO_AUTH, Vec::new()),
                };
                let mut first = Greeting::new(vec![method])
                    .map(|g| g.to_bytes())
                    .unwrap_or_default();
                first.extend_from_slice(&credentials);
                first.extend_from_slice(&self.socks5_request());
                first
            }
            Protocol::Socks5 => {
                let mut methods = vec![Method::NO_AUTH];
                if matches!(self.auth, Auth::Password(_)) {
                    methods.push(Method::USERNAME_PASSWORD);
                }
                self.state = State::MethodSelection;
                // At most two methods: always within the 255 limit.
                Greeting::new(methods)
                    .map(|g| g.to_bytes())
                    .unwrap_or_default()
            }
            Protocol::Socks4 | Protocol::Socks4a => {
                self.state = State::Reply;
                self.socks4_request()
            }
        }
    }

    fn socks4_request(&self) -> Vec<u8> {
        let user_id = match &self.auth {
            Auth::None => v4::UserId::default(),
            Auth::UserId(id) => id.clone(),
            // A user name is 1..=255 bytes; only a NUL inside it fails here.
            Auth::Password(creds) => v4::UserId::new(creds.username()).unwrap_or_default(),
        };
        let target = match &self.target {
            Address::Ip(SocketAddr::V4(a)) => v4::Target::Ip(*a),
            Address::Domain(name, port) => v4::Target::Domain(name.clone(), *port),
            // Excluded by `new`.
            Address::Ip(SocketAddr::V6(a)) => v4::Target::Ip(std::net::SocketAddrV4::new(
                std::net::Ipv4Addr::UNSPECIFIED,
                a.port(),
            )),
        };
        v4::Request {
            command: self.command,
            target,
            user_id,
        }
        .to_bytes()
    }

    fn socks5_request(&self) -> Vec<u8> {
        v5::Request {
            command: self.command,
            target: self.target.clone(),
        }
        .to_bytes()
    }

    /// Feeds bytes received from the proxy (those not consumed yet). On error the
    /// handshake is over; close the connection.
    pub fn handshake(&mut self, input: &[u8]) -> Result<ClientStep, Error> {
        let result = self.step(input);
        if result.is_err() {
            self.state = State::Finished;
        }
        result
    }

    fn step(&mut self, input: &[u8]) -> Result<ClientStep, Error> {
        let need_more = ClientStep {
            consumed: 0,
            send: Vec::new(),
            status: ClientStatus::NeedMore,
        };
        match self.state {
            State::Initial | State::Finished => Err(Error::Failed),
            State::MethodSelection => {
                let Some((selection, consumed)) = MethodSelection::decode(input)? else {
                    return Ok(need_more);
                };
                let send = match (selection.method, &self.auth) {
                    (Method::NO_ACCEPTABLE, _) => {
                        return Err(Error::NoAcceptableMethod {
                            offered: Vec::new(),
                        });
                    }
                    // Pipelined: the server must pick the one method offered (the bytes
                    // after the greeting were written for it).
                    (Method::USERNAME_PASSWORD, Auth::Password(_)) if self.sent_ahead => {
                        self.state = State::AuthStatus;
                        Vec::new()
                    }
                    (Method::NO_AUTH, Auth::None | Auth::UserId(_)) if self.sent_ahead => {
                        self.state = State::Reply;
                        Vec::new()
                    }
                    (Method(method), _) if self.sent_ahead => {
                        return Err(Error::UnexpectedMethod { method });
                    }
                    (Method::NO_AUTH, _) => {
                        self.state = State::Reply;
                        self.socks5_request()
                    }
                    (Method::USERNAME_PASSWORD, Auth::Password(creds)) => {
                        self.state = State::AuthStatus;
                        creds.to_bytes()
                    }
                    (Method(method), _) => return Err(Error::UnexpectedMethod { method }),
                };
                Ok(ClientStep {
                    consumed,
                    send,
                    status: ClientStatus::NeedMore,
                })
            }
            State::AuthStatus => {
                let Some((status, consumed)) = auth::Status::decode(input)? else {
                    return Ok(need_more);
                };
                if status.status != auth::STATUS_SUCCESS {
                    return Err(Error::AuthRejected {
                        status: status.status,
                    });
                }
                self.state = State::Reply;
                let send = if self.sent_ahead {
                    Vec::new()
                } else {
                    self.socks5_request()
                };
                Ok(ClientStep {
                    consumed,
                    send,
                    status: ClientStatus::NeedMore,
                })
            }
            State::Reply | State::SecondReply => {
                let Some((addr, consumed)) = self.reply(input)? else {
                    return Ok(need_more);
                };
                let status = if self.state == State::Reply && self.command == Command::BIND {
                    self.state = State::SecondReply;
                    ClientStatus::Bound(addr)
                } else {
                    self.state = State::Finished;
                    ClientStatus::Done(addr)
                };
                Ok(ClientStep {
                    consumed,
                    send: Vec::new(),
                    status,
                })
            }
        }
    }

    /// Decodes a request reply of the protocol in use; a failure code is an error.
    fn reply(&self, input: &[u8]) -> Result<Option<(Address, usize)>, Error> {
        match self.protocol {
            Protocol::Socks5 => {
                let Some((reply, consumed)) = v5::Reply::decode(input)? else {
                    return Ok(None);
                };
                if reply.code != ReplyCode::SUCCEEDED {
                    return Err(Error::Rejected { reply: reply.code });
                }
                Ok(Some((reply.bound, consumed)))
            }
            Protocol::Socks4 | Protocol::Socks4a => {
                let Some((reply, consumed)) = v4::Reply::decode(input)? else {
                    return Ok(None);
                };
                if reply.code != v4::ReplyCode::GRANTED {
                    return Err(Error::Rejected4 { code: reply.code });
                }
                Ok(Some((Address::Ip(SocketAddr::V4(reply.addr)), consumed)))
            }
        }
    }
}
