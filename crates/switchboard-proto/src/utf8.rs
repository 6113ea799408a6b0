//! UTF-8 for text messages (RFC 6455 §8.1).
//!
//! [`Utf8Validator`] checks a text message as its bytes arrive, across frame and
//! read boundaries, so a connection fails on the first invalid byte instead of
//! after buffering the whole message (Autobahn cases 6.4.*). [`Utf8Bytes`] is the
//! validated result: a cheaply cloneable `str` backed by [`Bytes`].

use bytes::Bytes;

use crate::error::ProtocolError;

/// Validates UTF-8 incrementally; a code point may be split across calls.
#[derive(Debug, Default, Clone)]
pub struct Utf8Validator {
    /// The bytes of a code point that the previous input ended in the middle of.
    carry: [u8; 4],
    carry_len: u8,
}

impl Utf8Validator {
    /// Checks the next piece of a message.
    ///
    /// # Errors
    ///
    /// [`ProtocolError::InvalidUtf8`] as soon as the bytes so far cannot begin
    /// valid UTF-8 (a sequence cut at the end of `input` waits for the next piece).
    pub fn feed(&mut self, mut input: &[u8]) -> Result<(), ProtocolError> {
        if self.carry_len > 0 {
            let have = self.carry_len as usize;
            let need = sequence_len(self.carry[0]).saturating_sub(have);
            let take = need.min(input.len());
            self.carry[have..have + take].copy_from_slice(&input[..take]);
            self.carry_len += take as u8;
            input = &input[take..];
            match simdutf8::compat::from_utf8(&self.carry[..self.carry_len as usize]) {
                Ok(_) => self.carry_len = 0,
                Err(e) if e.error_len().is_none() && input.is_empty() => return Ok(()),
                Err(_) => return Err(ProtocolError::InvalidUtf8),
            }
        }
        // Most input is whole and valid: `basic` says only yes or no, and is
        // quicker than `compat`, which is asked where it failed only when it did.
        if simdutf8::basic::from_utf8(input).is_ok() {
            return Ok(());
        }
        match simdutf8::compat::from_utf8(input) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() => {
                let tail = &input[e.valid_up_to()..];
                self.carry[..tail.len()].copy_from_slice(tail);
                self.carry_len = tail.len() as u8;
                Ok(())
            }
            Err(_) => Err(ProtocolError::InvalidUtf8),
        }
    }

    /// Ends the message.
    ///
    /// # Errors
    ///
    /// [`ProtocolError::InvalidUtf8`] if it stopped in the middle of a code point.
    pub fn finish(&mut self) -> Result<(), ProtocolError> {
        let incomplete = self.carry_len > 0;
        self.carry_len = 0;
        if incomplete {
            Err(ProtocolError::InvalidUtf8)
        } else {
            Ok(())
        }
    }
}

/// The length of the UTF-8 sequence that `lead` starts (1 for invalid leads, so
/// that validation reports them).
fn sequence_len(lead: u8) -> usize {
    match lead {
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF7 => 4,
        _ => 1,
    }
}

/// UTF-8 text backed by [`Bytes`]: clones share the buffer.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Utf8Bytes(Bytes);

impl Utf8Bytes {
    /// Checks that `bytes` are UTF-8 and wraps them.
    ///
    /// # Errors
    ///
    /// [`ProtocolError::InvalidUtf8`] if they are not.
    pub fn try_from_bytes(bytes: Bytes) -> Result<Self, ProtocolError> {
        simdutf8::basic::from_utf8(&bytes).map_err(|_| ProtocolError::InvalidUtf8)?;
        Ok(Self(bytes))
    }

    /// Wraps bytes validated incrementally by the message decoder.
    pub(crate) fn from_validated(bytes: Bytes) -> Self {
        debug_assert!(std::str::from_utf8(&bytes).is_ok());
        Self(bytes)
    }

    /// The text.
    #[expect(
        unsafe_code,
        reason = "re-validating on every read would cost a pass over each message"
    )]
    pub fn as_str(&self) -> &str {
        // SAFETY: every way to build a `Utf8Bytes` holds UTF-8: `try_from_bytes`
        // checks, `From<String>` and `From<&str>` start from a `str`, `Default` is
        // empty, and `from_validated` is private to this crate, called only by
        // `MessageDecoder` after its `Utf8Validator` accepted every byte and the
        // end of the message (the decoder has no mode that skips the check). The
        // bytes are immutable afterwards.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }

    /// The underlying bytes.
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    /// Gives up the text and keeps the bytes.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }
}

impl std::ops::Deref for Utf8Bytes {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for Utf8Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

impl From<String> for Utf8Bytes {
    fn from(s: String) -> Self {
        Self(Bytes::from(s))
    }
}

impl From<&'static str> for Utf8Bytes {
    fn from(s: &'static str) -> Self {
        Self(Bytes::from_static(s.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_everywhere(text: &[u8]) -> bool {
        let expected = std::str::from_utf8(text).is_ok();
        for cut in 0..=text.len() {
            let mut v = Utf8Validator::default();
            let ok = v
                .feed(&text[..cut])
                .and_then(|()| v.feed(&text[cut..]))
                .and_then(|()| v.finish());
            assert_eq!(ok.is_ok(), expected, "cut at {cut} of {text:?}");
        }
        expected
    }

    #[test]
    fn agrees_with_std_for_every_split() {
        assert!(split_everywhere("κόσμε €𝄞 hello".as_bytes()));
        assert!(!split_everywhere(
            b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited"
        ));
        assert!(!split_everywhere(b"\xf4\x90\x80\x80"));
        assert!(!split_everywhere(b"abc\xe2\x82"));
    }

    #[test]
    fn byte_at_a_time_fails_on_the_first_invalid_byte() {
        let text = b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80more";
        let mut v = Utf8Validator::default();
        let failed_at = text.iter().position(|b| v.feed(&[*b]).is_err());
        // 0xED 0xA0 starts a surrogate: the second byte is the first invalid one.
        assert_eq!(failed_at, Some(12));
    }
}
