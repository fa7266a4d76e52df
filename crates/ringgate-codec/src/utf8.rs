//! Incremental UTF-8 validation for text messages split over frames and buffers.
//!
//! Fails fast: a chunk is rejected as soon as its bytes cannot be the start of
//! valid UTF-8, not only when the message ends (RFC 6455 8.1 and Autobahn 6.4).
//! Holds at most 3 bytes of an unfinished code point between chunks; the bulk of
//! each chunk is checked by the standard library's validator.

use std::str;

/// Validator state carried between chunks of one text message (5 bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Utf8Validator {
    pending: [u8; 4],
    pending_len: u8,
}

/// The bytes are not, and can never become, valid UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalid;

impl Utf8Validator {
    /// A validator at the start of a message.
    pub const fn new() -> Self {
        Self {
            pending: [0; 4],
            pending_len: 0,
        }
    }

    /// True when no unfinished code point is carried over.
    pub fn is_clean(&self) -> bool {
        self.pending_len == 0
    }

    /// Checks the next `chunk` of the message; `last` marks the message's end.
    pub fn feed(&mut self, chunk: &[u8], last: bool) -> Result<(), Invalid> {
        let rest = self.finish_pending(chunk)?;
        if self.pending_len == 0 {
            if let Err(e) = str::from_utf8(rest) {
                if e.error_len().is_some() {
                    return Err(Invalid);
                }
                // An unfinished code point at the end: at most 3 bytes.
                let tail = &rest[e.valid_up_to()..];
                self.pending[..tail.len()].copy_from_slice(tail);
                self.pending_len = tail.len() as u8;
            }
        }
        if last && self.pending_len != 0 {
            return Err(Invalid);
        }
        Ok(())
    }

    /// Completes a carried-over code point from the head of `chunk`; returns the rest.
    fn finish_pending<'a>(&mut self, chunk: &'a [u8]) -> Result<&'a [u8], Invalid> {
        let mut used = 0;
        while self.pending_len != 0 {
            let Some(&byte) = chunk.get(used) else {
                return Ok(&chunk[used..]);
            };
            self.pending[self.pending_len as usize] = byte;
            self.pending_len += 1;
            used += 1;
            match str::from_utf8(&self.pending[..self.pending_len as usize]) {
                Ok(_) => self.pending_len = 0,
                Err(e) if e.error_len().is_some() => return Err(Invalid),
                Err(_) => debug_assert!(self.pending_len < 4, "4 bytes always decide"),
            }
        }
        Ok(&chunk[used..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(bytes: &[u8]) -> bool {
        str::from_utf8(bytes).is_ok()
    }

    fn split_everywhere(bytes: &[u8]) {
        let expected = whole(bytes);
        for cut in 0..=bytes.len() {
            let mut v = Utf8Validator::new();
            let result = v
                .feed(&bytes[..cut], false)
                .and_then(|()| v.feed(&bytes[cut..], true));
            assert_eq!(result.is_ok(), expected, "{bytes:x?} cut at {cut}");
        }
        // Byte by byte.
        let mut v = Utf8Validator::new();
        let mut result = Ok(());
        for (i, b) in bytes.iter().enumerate() {
            result = result.and_then(|()| v.feed(&[*b], i + 1 == bytes.len()));
        }
        if bytes.is_empty() {
            result = v.feed(&[], true);
        }
        assert_eq!(result.is_ok(), expected, "{bytes:x?} byte by byte");
    }

    #[test]
    fn agrees_with_std_for_every_split() {
        let samples: &[&[u8]] = &[
            b"",
            b"hello",
            "κόσμε".as_bytes(),
            "Hello-µ@ßöäüàá-UTF-8!!".as_bytes(),
            &[0xf0, 0x9f, 0x98, 0x80],       // emoji
            &[0xce, 0xba, 0xe1, 0xbd],       // truncated
            &[0xed, 0xa0, 0x80],             // surrogate
            &[0xf4, 0x90, 0x80, 0x80],       // above U+10FFFF
            &[0xc0, 0xaf],                   // overlong
            &[0xff],                         // never valid
            &[0x80],                         // lone continuation
            &[0xe0, 0x80, 0x80],             // overlong 3-byte
            &[0x61, 0xf0, 0x90, 0x80, 0x62], // truncated in the middle
        ];
        for s in samples {
            split_everywhere(s);
        }
    }

    #[test]
    fn fails_fast_before_the_message_ends() {
        // Autobahn 6.4.1: the second fragment makes the sequence impossible.
        let mut v = Utf8Validator::new();
        assert!(v.feed("κόσμε".as_bytes(), false).is_ok());
        assert_eq!(v.feed(&[0xf4, 0x90], false), Err(Invalid));
        // A lone 0xff cannot start anything.
        assert_eq!(
            Utf8Validator::new().feed(&[b'a', 0xff], false),
            Err(Invalid)
        );
    }

    #[test]
    fn unfinished_code_point_at_the_end_is_invalid() {
        let mut v = Utf8Validator::new();
        assert!(v.feed(&[0xe2, 0x82], false).is_ok());
        assert!(!v.is_clean());
        assert_eq!(v.feed(&[], true), Err(Invalid));
    }

    #[test]
    fn exhaustive_two_byte_sequences_agree_with_std() {
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                let bytes = [a, b];
                let mut v = Utf8Validator::new();
                let r = v
                    .feed(&bytes[..1], false)
                    .and_then(|()| v.feed(&bytes[1..], true));
                assert_eq!(r.is_ok(), whole(&bytes), "{bytes:x?}");
            }
        }
    }
}
