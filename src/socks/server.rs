//! The server side of the handshake as a state machine: bytes in, replies out.
//!
//! One port serves SOCKS4, SOCKS4a and SOCKS5: the first byte picks the protocol.
//! Input may be pipelined (greeting, authentication, request and payload in one
//! segment); [`ServerHandshake::handshake`] consumes every complete message it can and
//! says how many bytes it took, so whatever follows the request stays with the caller.
//!
//! ```text
//! Start --4--> (SOCKS4/4a request) ----------------------------------> Done
//!       --5--> Greeting --00--> Request ----------------------------> Done
//!                       --02--> Credentials --ok--> Request --------> Done
//! every refusal: its reply, then Failed (sticky)
//! ```

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;

use super::v5::{Greeting, MethodSelection};
use super::{Address, Command, Credentials, Error, Message, Method, ReplyCode, Users};
use super::{auth, v4, v5};

/// Which protocol the client spoke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// SOCKS4 with an IPv4 destination.
    Socks4,
    /// SOCKS4a: SOCKS4 with a host name.
    Socks4a,
    /// SOCKS5.
    Socks5,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Version::Socks4 => "socks4",
            Version::Socks4a => "socks4a",
            Version::Socks5 => "socks5",
        })
    }
}

/// What the server accepts.
#[derive(Debug, Clone)]
pub struct ServerPolicy {
    /// Accounts for RFC 1929. Empty: no authentication, and SOCKS4 is allowed.
    /// Otherwise authentication is required and SOCKS4/4a are refused.
    pub users: Arc<Users>,
    /// Serve BIND.
    pub bind: bool,
    /// Serve UDP ASSOCIATE.
    pub udp_associate: bool,
}

impl Default for ServerPolicy {
    fn default() -> Self {
        ServerPolicy {
            users: Arc::new(Users::default()),
            bind: true,
            udp_associate: true,
        }
    }
}

/// A request that completed the handshake; the server now carries it out and answers
/// with [`Request::reply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The protocol spoken.
    pub version: Version,
    /// CONNECT, BIND or UDP ASSOCIATE (only commands the policy allows arrive here).
    pub command: Command,
    /// DST.ADDR and DST.PORT.
    pub target: Address,
    /// The authenticated SOCKS5 user, or the SOCKS4 user id (lossy UTF-8); `None` when
    /// there is neither.
    pub user: Option<String>,
}

impl Request {
    /// The reply message for this request: `code` and the bound (or, for the second
    /// BIND reply, the peer's) address. SOCKS4 has one failure code, 91, for every
    /// failure, and carries only IPv4 addresses (others are sent as 0.0.0.0).
    pub fn reply(&self, code: ReplyCode, bound: &Address) -> Vec<u8> {
        encode_reply(self.version, code, bound)
    }
}

/// The reply message of `version` for `code` and `bound`.
pub fn encode_reply(version: Version, code: ReplyCode, bound: &Address) -> Vec<u8> {
    match version {
        Version::Socks5 => v5::Reply {
            code,
            bound: bound.clone(),
        }
        .to_bytes(),
        Version::Socks4 | Version::Socks4a => {
            let code = if code == ReplyCode::SUCCEEDED {
                v4::ReplyCode::GRANTED
            } else {
                v4::ReplyCode::REJECTED
            };
            let addr = match bound {
                Address::Ip(SocketAddr::V4(a)) => *a,
                other => SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, other.port()),
            };
            v4::Reply { code, addr }.to_bytes()
        }
    }
}

/// Appends the failure reply for `error` and ends the handshake.
fn refuse(version: Version, consumed: usize, error: Error, reply: &mut Vec<u8>) -> Progress {
    reply.extend(encode_reply(
        version,
        error.reply_code(),
        &Address::UNSPECIFIED,
    ));
    Progress::Failed { consumed, error }
}

/// How far a call to [`ServerHandshake::handshake`] got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerStatus {
    /// Every complete message was handled; more bytes are needed.
    NeedMore,
    /// The handshake is complete; carry out the request.
    Done(Request),
    /// The handshake failed. Send the reply (if any), then close.
    Failed(Error),
}

/// The result of feeding input to [`ServerHandshake::handshake`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerStep {
    /// Bytes of the input consumed; the rest belongs to the next call or, after
    /// `Done`, to the data stream.
    pub consumed: usize,
    /// Bytes to send to the client, in order (may be empty).
    pub reply: Vec<u8>,
    /// Where the handshake stands.
    pub status: ServerStatus,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Start,
    Credentials,
    Request { user: Option<String> },
    Finished,
}

/// One message handled, or not.
enum Progress {
    NeedMore,
    /// A message of `consumed` bytes was handled; continue in the new state.
    Next {
        consumed: usize,
    },
    Done {
        consumed: usize,
        request: Request,
    },
    Failed {
        consumed: usize,
        error: Error,
    },
}

/// The server side of one SOCKS4/4a/5 handshake.
#[derive(Debug, Clone)]
pub struct ServerHandshake {
    policy: ServerPolicy,
    state: State,
}

impl ServerHandshake {
    /// A handshake that accepts what `policy` allows.
    pub fn new(policy: ServerPolicy) -> Self {
        ServerHandshake {
            policy,
            state: State::Start,
        }
    }

    /// Feeds the bytes received so far that have not been consumed yet. Handles every
    /// complete message in `input`, appending each reply to the step's `reply`.
    pub fn handshake(&mut self, input: &[u8]) -> ServerStep {
        let mut reply = Vec::new();
        let mut consumed = 0usize;
        loop {
            let rest = input.get(consumed..).unwrap_or_default();
            let progress = self.step(rest, &mut reply);
            let status = match progress {
                Progress::NeedMore => ServerStatus::NeedMore,
                Progress::Next { consumed: n } => {
                    consumed = consumed.saturating_add(n);
                    continue;
                }
                Progress::Done {
                    consumed: n,
                    request,
                } => {
                    consumed = consumed.saturating_add(n);
                    self.state = State::Finished;
                    ServerStatus::Done(request)
                }
                Progress::Failed { consumed: n, error } => {
                    consumed = consumed.saturating_add(n);
                    self.state = State::Finished;
                    ServerStatus::Failed(error)
                }
            };
            return ServerStep {
                consumed,
                reply,
                status,
            };
        }
    }

    fn step(&mut self, input: &[u8], reply: &mut Vec<u8>) -> Progress {
        match &self.state {
            State::Start => match input.first() {
                None => Progress::NeedMore,
                Some(&v4::VERSION) => self.socks4_request(input, reply),
                Some(&v5::VERSION) => self.greeting(input, reply),
                Some(&version) => Progress::Failed {
                    consumed: 0,
                    error: Error::UnsupportedVersion { version },
                },
            },
            State::Credentials => self.credentials(input, reply),
            State::Request { user } => {
                let user = user.clone();
                self.socks5_request(input, user, reply)
            }
            State::Finished => Progress::Failed {
                consumed: 0,
                error: Error::Failed,
            },
        }
    }

    fn allows(&self, version: Version, command: Command) -> bool {
        match command {
            Command::CONNECT => true,
            Command::BIND => self.policy.bind,
            Command::UDP_ASSOCIATE => version == Version::Socks5 && self.policy.udp_associate,
            _ => false,
        }
    }

    fn socks4_request(&mut self, input: &[u8], reply: &mut Vec<u8>) -> Progress {
        let refuse =
            |consumed, error, reply: &mut Vec<u8>| refuse(Version::Socks4, consumed, error, reply);
        let (request, consumed) = match v4::Request::decode(input) {
            Ok(Some(decoded)) => decoded,
            Ok(None) => return Progress::NeedMore,
            Err(error) => return refuse(input.len(), error, reply),
        };
        if !self.policy.users.is_empty() {
            return refuse(consumed, Error::Socks4Refused, reply);
        }
        let (version, target) = match request.target {
            v4::Target::Ip(a) => (Version::Socks4, Address::Ip(SocketAddr::V4(a))),
            v4::Target::Domain(name, port) => (Version::Socks4a, Address::Domain(name, port)),
        };
        if !self.allows(version, request.command) {
            let error = Error::UnsupportedCommand {
                command: request.command,
            };
            return refuse(consumed, error, reply);
        }
        let user_id = request.user_id.as_bytes();
        let request = Request {
            version,
            command: request.command,
            target,
            user: (!user_id.is_empty()).then(|| String::from_utf8_lossy(user_id).into_owned()),
        };
        Progress::Done { consumed, request }
    }

    fn greeting(&mut self, input: &[u8], reply: &mut Vec<u8>) -> Progress {
        let (greeting, consumed) = match Greeting::decode(input) {
            Ok(Some(decoded)) => decoded,
            Ok(None) => return Progress::NeedMore,
            Err(error) => {
                return Progress::Failed {
                    consumed: input.len(),
                    error,
                };
            }
        };
        let wanted = if self.policy.users.is_empty() {
            Method::NO_AUTH
        } else {
            Method::USERNAME_PASSWORD
        };
        if !greeting.methods().contains(&wanted) {
            MethodSelection {
                method: Method::NO_ACCEPTABLE,
            }
            .encode(reply);
            let offered = greeting.methods().iter().map(|m| m.0).collect();
            return Progress::Failed {
                consumed,
                error: Error::NoAcceptableMethod { offered },
            };
        }
        MethodSelection { method: wanted }.encode(reply);
        self.state = if wanted == Method::USERNAME_PASSWORD {
            State::Credentials
        } else {
            State::Request { user: None }
        };
        Progress::Next { consumed }
    }

    fn credentials(&mut self, input: &[u8], reply: &mut Vec<u8>) -> Progress {
        let failure = auth::Status {
            status: auth::STATUS_FAILURE,
        };
        let (creds, consumed) = match Credentials::decode(input) {
            Ok(Some(decoded)) => decoded,
            Ok(None) => return Progress::NeedMore,
            Err(error) => {
                failure.encode(reply);
                return Progress::Failed {
                    consumed: input.len(),
                    error,
                };
            }
        };
        let user = String::from_utf8_lossy(creds.username()).into_owned();
        if !self.policy.users.verify(&creds) {
            failure.encode(reply);
            return Progress::Failed {
                consumed,
                error: Error::AuthFailed { user },
            };
        }
        auth::Status {
            status: auth::STATUS_SUCCESS,
        }
        .encode(reply);
        self.state = State::Request { user: Some(user) };
        Progress::Next { consumed }
    }

    fn socks5_request(
        &mut self,
        input: &[u8],
        user: Option<String>,
        reply: &mut Vec<u8>,
    ) -> Progress {
        let refuse =
            |consumed, error, reply: &mut Vec<u8>| refuse(Version::Socks5, consumed, error, reply);
        let (request, consumed) = match v5::Request::decode(input) {
            Ok(Some(decoded)) => decoded,
            Ok(None) => return Progress::NeedMore,
            Err(error) => return refuse(input.len(), error, reply),
        };
        if !self.allows(Version::Socks5, request.command) {
            let error = Error::UnsupportedCommand {
                command: request.command,
            };
            return refuse(consumed, error, reply);
        }
        let request = Request {
            version: Version::Socks5,
            command: request.command,
            target: request.target,
            user,
        };
        Progress::Done { consumed, request }
    }
}
