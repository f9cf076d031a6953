//! DNS over TCP framing (RFC 1035 §4.2.2, RFC 7766 §8): every message is preceded by
//! its length as two bytes, big-endian. Sans-IO: bytes in, whole messages out.
//!
//! ```text
//! +--------+----------------------+--------+------------------
//! | LENGTH | message (LENGTH B)   | LENGTH | next message ...
//! |   2    |                      |   2    |
//! +--------+----------------------+--------+------------------
//! ```

/// Splits a byte stream into length-prefixed messages (sans-IO).
#[derive(Debug, Default)]
pub struct Frames {
    buf: Vec<u8>,
    start: usize,
}

impl Frames {
    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The bytes not yet returned as messages (a partial message among them), taken
    /// out.
    pub fn take_rest(&mut self) -> Vec<u8> {
        let rest = self.buf.split_off(self.start.min(self.buf.len()));
        self.buf.clear();
        self.start = 0;
        rest
    }

    /// The next complete message, if all its bytes are here. Empty messages are skipped.
    pub fn next_message(&mut self) -> Option<Vec<u8>> {
        loop {
            let rest = self.buf.get(self.start..)?;
            let [a, b, body @ ..] = rest else {
                return None;
            };
            let len = usize::from(u16::from_be_bytes([*a, *b]));
            let message = body.get(..len)?.to_vec();
            self.start = self.start.saturating_add(2 + len);
            if !message.is_empty() {
                return Some(message);
            }
        }
    }
}
