//! Protocol errors. Each variant knows the close code (RFC 6455 §7.4.1) that a
//! peer must be sent when the connection fails because of it.

use crate::close::CloseCode;

/// A violation of RFC 6455 or RFC 7692, or of a configured limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// RSV2/RSV3 set, or RSV1 without permessage-deflate, or RSV1 where it may not be.
    #[error("reserved bits set without a negotiated extension (RFC6455§5.2)")]
    ReservedBits,
    /// An opcode that RFC 6455 reserves.
    #[error("unknown opcode {0:#x} (RFC6455§5.2)")]
    UnknownOpcode(u8),
    /// A control frame without FIN.
    #[error("fragmented control frame (RFC6455§5.5)")]
    FragmentedControl,
    /// A control frame with more than 125 bytes of payload.
    #[error("control frame payload over 125 bytes (RFC6455§5.5)")]
    ControlTooLong,
    /// A client frame without a mask, or a server frame with one.
    #[error("frame masking does not match the sender's role (RFC6455§5.1)")]
    BadMasking,
    /// A 64-bit length with the most significant bit set.
    #[error("frame length has its most significant bit set (RFC6455§5.2)")]
    BadLength,
    /// A payload length in a longer form than it needs (RFC 6455 §5.2: "the
    /// minimal number of bytes MUST be used").
    #[error("payload length not minimally encoded (RFC6455§5.2)")]
    NonMinimalLength,
    /// A continuation frame with no message in progress.
    #[error("unexpected continuation frame (RFC6455§5.4)")]
    UnexpectedContinuation,
    /// A new data frame while a fragmented message is still in progress.
    #[error("expected a continuation frame (RFC6455§5.4)")]
    ExpectedContinuation,
    /// A close frame whose payload is one byte long.
    #[error("close frame payload of one byte (RFC6455§5.5.1)")]
    BadClosePayload,
    /// A close code that may not be sent on the wire.
    #[error("invalid close code {0} (RFC6455§7.4)")]
    BadCloseCode(u16),
    /// Text that is not UTF-8.
    #[error("invalid UTF-8 in a text message or close reason (RFC6455§8.1)")]
    InvalidUtf8,
    /// A frame larger than the configured frame limit.
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge {
        /// The declared payload length.
        size: u64,
        /// The configured limit.
        limit: usize,
    },
    /// A message (after decompression) larger than the configured message limit.
    #[error("message exceeds the limit of {limit} bytes")]
    MessageTooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// A handshake answer with an extension that was not offered, or with
    /// permessage-deflate parameters a client must refuse.
    #[error("extension answer that was not offered or is invalid (RFC7692§5)")]
    BadExtension,
    /// Compressed data that does not inflate.
    #[error("invalid permessage-deflate data (RFC7692§7.2.2)")]
    BadDeflate,
}

impl ProtocolError {
    /// The close code sent to the peer when the connection fails with this error.
    pub fn close_code(&self) -> CloseCode {
        match self {
            Self::InvalidUtf8 | Self::BadDeflate => CloseCode::INVALID_PAYLOAD,
            Self::FrameTooLarge { .. } | Self::MessageTooLarge { .. } => CloseCode::TOO_BIG,
            _ => CloseCode::PROTOCOL_ERROR,
        }
    }
}
