//! A bounds-checked cursor over a byte slice. Every accessor returns `None` when the
//! slice is too short, which the decoders turn into "need more bytes".

/// Reads fields from the front of a slice without ever indexing out of bounds.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
    consumed: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader {
            rest: buf,
            consumed: 0,
        }
    }

    /// Bytes taken so far.
    pub(crate) fn consumed(&self) -> usize {
        self.consumed
    }

    /// The bytes not read yet.
    pub(crate) fn rest(&self) -> &'a [u8] {
        self.rest
    }

    pub(crate) fn u8(&mut self) -> Option<u8> {
        let (&first, rest) = self.rest.split_first()?;
        self.rest = rest;
        self.consumed = self.consumed.saturating_add(1);
        Some(first)
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        let bytes = self.take(2)?;
        Some(u16::from_be_bytes([*bytes.first()?, *bytes.get(1)?]))
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.rest.len() < n {
            return None;
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        self.consumed = self.consumed.saturating_add(n);
        Some(head)
    }

    /// Takes bytes up to a NUL terminator, consuming the terminator too. The field
    /// (without the NUL) may be at most `max` bytes long.
    pub(crate) fn until_nul(&mut self, max: usize) -> NulField<'a> {
        let window = self.rest.get(..max.saturating_add(1)).unwrap_or(self.rest);
        match window.iter().position(|&b| b == 0) {
            Some(at) => {
                let Some(field) = self.take(at) else {
                    return NulField::Incomplete;
                };
                self.u8();
                NulField::Found(field)
            }
            None if window.len() > max => NulField::TooLong,
            None => NulField::Incomplete,
        }
    }
}

/// The outcome of [`Reader::until_nul`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum NulField<'a> {
    /// The field, without its terminator.
    Found(&'a [u8]),
    /// No terminator yet, and the field is still within its cap.
    Incomplete,
    /// More than the cap and still no terminator.
    TooLong,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_input_is_none_not_panic() {
        let mut r = Reader::new(&[1]);
        assert_eq!(r.u16(), None);
        assert_eq!(r.u8(), Some(1));
        assert_eq!(r.u8(), None);
        assert_eq!(r.take(1), None);
        assert_eq!(r.consumed(), 1);
    }

    #[test]
    fn nul_terminated_fields() {
        let mut r = Reader::new(b"abc\0rest");
        assert_eq!(r.until_nul(3), NulField::Found(b"abc"));
        assert_eq!(r.rest(), b"rest");
        assert_eq!(r.consumed(), 4);

        assert_eq!(Reader::new(b"abcd\0").until_nul(3), NulField::TooLong);
        assert_eq!(Reader::new(b"abcd").until_nul(3), NulField::TooLong);
        assert_eq!(Reader::new(b"abc").until_nul(3), NulField::Incomplete);
        assert_eq!(Reader::new(b"\0").until_nul(0), NulField::Found(b""));
        assert_eq!(Reader::new(b"a").until_nul(0), NulField::TooLong);
    }
}
