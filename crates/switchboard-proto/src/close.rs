//! Close codes and close frame payloads (RFC 6455 §5.5.1 and §7.4).

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::ProtocolError;

/// A close status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CloseCode(pub u16);

impl CloseCode {
    /// 1000: the purpose of the connection was fulfilled.
    pub const NORMAL: Self = Self(1000);
    /// 1001: the server is going down, or a browser navigated away.
    pub const GOING_AWAY: Self = Self(1001);
    /// 1002: the peer broke the protocol.
    pub const PROTOCOL_ERROR: Self = Self(1002);
    /// 1003: a data type the endpoint cannot accept (e.g. binary where text is expected).
    pub const UNSUPPORTED_DATA: Self = Self(1003);
    /// 1005: reserved; means "the close frame had no code". Never sent.
    pub const NO_STATUS: Self = Self(1005);
    /// 1006: reserved; means "closed without a close frame". Never sent.
    pub const ABNORMAL: Self = Self(1006);
    /// 1007: a message's data was inconsistent with its type (invalid UTF-8, bad deflate data).
    pub const INVALID_PAYLOAD: Self = Self(1007);
    /// 1008: a policy was violated (used for slow consumers by default).
    pub const POLICY: Self = Self(1008);
    /// 1009: a frame or message is larger than the configured limit.
    pub const TOO_BIG: Self = Self(1009);
    /// 1011: the server hit an unexpected condition (a handler panicked).
    pub const INTERNAL_ERROR: Self = Self(1011);
    /// 1012: the service is restarting.
    pub const SERVICE_RESTART: Self = Self(1012);
    /// 1013: try again later (server overloaded, or the client reads too slowly).
    pub const TRY_AGAIN_LATER: Self = Self(1013);

    /// Whether this code may appear in a close frame on the wire (RFC 6455 §7.4.1,
    /// the IANA registry, and the 3000-4999 ranges for libraries and applications).
    pub fn is_sendable(self) -> bool {
        matches!(self.0, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

impl From<u16> for CloseCode {
    fn from(code: u16) -> Self {
        Self(code)
    }
}

impl std::fmt::Display for CloseCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The code and reason of a close frame.
///
/// It always holds a code that may be sent ([`CloseCode::is_sendable`]: never
/// 1005, 1006 or 1015) and a reason of at most [`MAX_REASON_LEN`] bytes, so
/// every `CloseReason` fits a close frame as it is.
///
/// # Examples
///
/// ```
/// use switchboard_proto::{CloseCode, CloseReason};
///
/// let close = CloseReason::new(CloseCode::NORMAL, "bye");
/// assert_eq!(close.code(), CloseCode::NORMAL);
/// assert_eq!(close.reason(), "bye");
/// assert!(CloseReason::try_new(1006, "lost").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason {
    code: CloseCode,
    reason: String,
}

/// Largest close reason that fits a control frame (125 bytes minus the code).
pub const MAX_REASON_LEN: usize = 123;

impl CloseReason {
    /// A close reason, with the reason text cut at a character boundary to fit a frame.
    ///
    /// # Panics
    ///
    /// If `code` may not be sent ([`CloseCode::is_sendable`]): a code chosen by
    /// the program is a constant, and a wrong one is a bug. For a code that
    /// comes from outside, use [`CloseReason::try_new`].
    #[track_caller]
    pub fn new(code: impl Into<CloseCode>, reason: impl Into<String>) -> Self {
        match Self::try_new(code, reason) {
            Ok(close) => close,
            Err(error) => panic!("{error}"),
        }
    }

    /// A close reason, with the reason text cut at a character boundary to fit a frame.
    ///
    /// # Errors
    ///
    /// [`ProtocolError::BadCloseCode`] if `code` may not be sent on the wire.
    pub fn try_new(
        code: impl Into<CloseCode>,
        reason: impl Into<String>,
    ) -> Result<Self, ProtocolError> {
        let code = code.into();
        if !code.is_sendable() {
            return Err(ProtocolError::BadCloseCode(code.0));
        }
        let mut reason = reason.into();
        if reason.len() > MAX_REASON_LEN {
            let mut end = MAX_REASON_LEN;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
        }
        Ok(Self { code, reason })
    }

    /// The status code.
    pub fn code(&self) -> CloseCode {
        self.code
    }

    /// The human-readable reason (at most [`MAX_REASON_LEN`] bytes).
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// Parses a received close frame payload. `Ok(None)` means the frame had no code.
    ///
    /// # Errors
    ///
    /// [`ProtocolError::BadClosePayload`] for a one-byte payload,
    /// [`ProtocolError::BadCloseCode`] for a code that may not be sent, and
    /// [`ProtocolError::InvalidUtf8`] for a reason that is not UTF-8.
    pub fn parse(payload: &[u8]) -> Result<Option<Self>, ProtocolError> {
        match payload {
            [] => Ok(None),
            [_] => Err(ProtocolError::BadClosePayload),
            [hi, lo, reason @ ..] => {
                let code = CloseCode(u16::from_be_bytes([*hi, *lo]));
                if !code.is_sendable() {
                    return Err(ProtocolError::BadCloseCode(code.0));
                }
                let reason =
                    simdutf8::basic::from_utf8(reason).map_err(|_| ProtocolError::InvalidUtf8)?;
                Ok(Some(Self {
                    code,
                    reason: reason.to_owned(),
                }))
            }
        }
    }

    /// The close frame payload: the code in network order, then the reason.
    pub fn to_payload(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(2 + self.reason.len());
        out.put_u16(self.code.0);
        out.put_slice(self.reason.as_bytes());
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_and_invalid_codes_match_autobahn_7_7_and_7_9() {
        for code in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999,
        ] {
            assert!(CloseCode(code).is_sendable(), "{code}");
        }
        for code in [0, 999, 1004, 1005, 1006, 1016, 1100, 2000, 2999, 5000] {
            assert!(!CloseCode(code).is_sendable(), "{code}");
        }
    }

    #[test]
    fn parse_round_trips_and_rejects_bad_payloads() {
        let reason = CloseReason::new(1000, "bye");
        assert_eq!(
            CloseReason::parse(&reason.to_payload()).unwrap(),
            Some(reason)
        );
        assert_eq!(CloseReason::parse(&[]).unwrap(), None);
        assert_eq!(
            CloseReason::parse(&[3]),
            Err(ProtocolError::BadClosePayload)
        );
        assert_eq!(
            CloseReason::parse(&[0x03, 0xe8, 0xff]),
            Err(ProtocolError::InvalidUtf8)
        );
        assert_eq!(
            CloseReason::parse(&[0x03, 0xed]),
            Err(ProtocolError::BadCloseCode(1005))
        );
    }

    #[test]
    fn codes_that_may_not_be_sent_are_refused() {
        for code in [0, 1004, 1005, 1006, 1015, 2999, 5000] {
            assert_eq!(
                CloseReason::try_new(code, ""),
                Err(ProtocolError::BadCloseCode(code))
            );
        }
        assert!(std::panic::catch_unwind(|| CloseReason::new(1006, "")).is_err());
        assert_eq!(CloseReason::new(4000, "x").code(), CloseCode(4000));
    }

    #[test]
    fn long_reasons_are_cut_at_a_char_boundary() {
        let reason = CloseReason::new(1000, "é".repeat(100));
        assert!(reason.reason().len() <= MAX_REASON_LEN);
        assert!(reason.reason().len() > MAX_REASON_LEN - 2);
        assert!(reason.to_payload().len() <= 125);
    }
}
