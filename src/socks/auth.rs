//! Username/password authentication for SOCKS5 (RFC 1929).
//!
//! ```text
//! request (client):                              response (server):
//! +----+------+----------+------+----------+     +----+--------+
//! |VER | ULEN |  UNAME   | PLEN |  PASSWD  |     |VER | STATUS |
//! +----+------+----------+------+----------+     +----+--------+
//! | 1  |  1   | 1 to 255 |  1   | 1 to 255 |     | 1  |   1    |
//! +----+------+----------+------+----------+     +----+--------+
//! VER = 0x01; STATUS 0x00 = success, anything else = failure (close the connection)
//! ```

use std::fmt;

use subtle::ConstantTimeEq;

use super::reader::Reader;
use super::{Error, MAX_FIELD, Message};

/// The sub-negotiation version byte.
pub const VERSION: u8 = 0x01;
/// The status byte of a successful login.
pub const STATUS_SUCCESS: u8 = 0x00;
/// The status byte this crate sends for a failed login.
pub const STATUS_FAILURE: u8 = 0x01;

/// A user name and password, each 1 to 255 bytes.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Credentials {
    username: Vec<u8>,
    password: Vec<u8>,
}

fn check_len(field: &'static str, value: &[u8]) -> Result<(), Error> {
    if value.is_empty() || value.len() > MAX_FIELD {
        return Err(Error::FieldLength {
            field,
            len: value.len(),
            min: 1,
            max: MAX_FIELD,
        });
    }
    Ok(())
}

impl Credentials {
    /// Validates a user name and password (each 1..=255 bytes).
    pub fn new(username: impl Into<Vec<u8>>, password: impl Into<Vec<u8>>) -> Result<Self, Error> {
        let (username, password) = (username.into(), password.into());
        check_len("user name", &username)?;
        check_len("password", &password)?;
        Ok(Credentials { username, password })
    }

    /// The user name.
    pub fn username(&self) -> &[u8] {
        &self.username
    }

    /// The password.
    pub fn password(&self) -> &[u8] {
        &self.password
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &String::from_utf8_lossy(&self.username))
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Message for Credentials {
    fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, Error> {
        let mut r = Reader::new(buf);
        let Some(version) = r.u8() else {
            return Ok(None);
        };
        if version != VERSION {
            return Err(Error::VersionMismatch {
                message: "RFC 1929 request",
                version,
                expected: VERSION,
            });
        }
        let Some(ulen) = r.u8() else { return Ok(None) };
        if ulen == 0 {
            return Err(Error::FieldLength {
                field: "user name",
                len: 0,
                min: 1,
                max: MAX_FIELD,
            });
        }
        let Some(username) = r.take(usize::from(ulen)) else {
            return Ok(None);
        };
        let Some(plen) = r.u8() else { return Ok(None) };
        if plen == 0 {
            return Err(Error::FieldLength {
                field: "password",
                len: 0,
                min: 1,
                max: MAX_FIELD,
            });
        }
        let Some(password) = r.take(usize::from(plen)) else {
            return Ok(None);
        };
        let creds = Credentials {
            username: username.to_vec(),
            password: password.to_vec(),
        };
        Ok(Some((creds, r.consumed())))
    }

    fn encoded_len(&self) -> usize {
        3usize
            .saturating_add(self.username.len())
            .saturating_add(self.password.len())
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.push(VERSION);
        out.push(u8::try_from(self.username.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(&self.username);
        out.push(u8::try_from(self.password.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(&self.password);
    }
}

/// The server's answer to [`Credentials`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// 0x00 success; anything else is a failure.
    pub status: u8,
}

impl Message for Status {
    fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, Error> {
        let mut r = Reader::new(buf);
        // VER should be 0x01; some servers answer 0x05. Like curl, judge by STATUS
        // alone: the byte carries no other meaning.
        let (Some(_version), Some(status)) = (r.u8(), r.u8()) else {
            return Ok(None);
        };
        Ok(Some((Status { status }, r.consumed())))
    }

    fn encoded_len(&self) -> usize {
        2
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[VERSION, self.status]);
    }
}

/// The accounts a server accepts.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Users {
    accounts: Vec<Credentials>,
}

impl fmt::Debug for Users {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(
                self.accounts
                    .iter()
                    .map(|c| String::from_utf8_lossy(&c.username)),
            )
            .finish()
    }
}

impl Users {
    /// A table of accounts. Empty means "no authentication".
    pub fn new(accounts: Vec<Credentials>) -> Self {
        Users { accounts }
    }

    /// True when no account is configured.
    pub fn is_empty(&self) -> bool {
        self.accounts.is_empty()
    }

    /// Does any account match? Compares every account in full, so the time taken
    /// does not tell how much of a guess was right.
    pub fn verify(&self, offered: &Credentials) -> bool {
        self.accounts.iter().fold(false, |found, account| {
            let user = account.username.ct_eq(&offered.username);
            let pass = account.password.ct_eq(&offered.password);
            found | bool::from(user & pass)
        })
    }
}
