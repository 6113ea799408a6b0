//! Server messages encoded once and shared by every recipient.
//!
//! A server frame is never masked, so its bytes are the same for every
//! connection: [`PreparedMessage`] encodes the frame on first use and hands out
//! clones of the same [`Bytes`]. With permessage-deflate and no context takeover,
//! the compressed frame is shared the same way.

use std::sync::{Arc, OnceLock};

use bytes::{Bytes, BytesMut};

use crate::deflate::compress_standalone;
use crate::error::ProtocolError;
use crate::frame::{OpCode, encode_frame, encode_header};
use crate::message::Message;
use crate::utf8::Utf8Bytes;

/// A text or binary message ready to be written to many connections.
#[derive(Clone)]
pub struct PreparedMessage(Arc<Inner>);

struct Inner {
    opcode: OpCode,
    payload: Bytes,
    plain: OnceLock<Bytes>,
    deflated: OnceLock<(u32, Bytes)>,
}

impl std::fmt::Debug for PreparedMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedMessage")
            .field("opcode", &self.0.opcode)
            .field("len", &self.0.payload.len())
            .finish()
    }
}

impl PreparedMessage {
    fn new(opcode: OpCode, payload: Bytes) -> Self {
        Self(Arc::new(Inner {
            opcode,
            payload,
            plain: OnceLock::new(),
            deflated: OnceLock::new(),
        }))
    }

    /// A text message.
    pub fn text(text: impl Into<Utf8Bytes>) -> Self {
        Self::new(OpCode::Text, text.into().into_bytes())
    }

    /// A text message written by `write` straight into its frame: one allocation
    /// and no copy for the frame and the payload together (the header is filled in
    /// afterwards, in room kept in front). `size_hint` is the expected length of
    /// the text: with it right, the buffer never grows. Fails if `write` wrote
    /// invalid UTF-8.
    pub fn text_with(
        size_hint: usize,
        write: impl FnOnce(&mut Vec<u8>),
    ) -> Result<Self, ProtocolError> {
        // Room for the largest unmasked server header (2 + 8 bytes).
        const ROOM: usize = 10;
        let mut buf = Vec::with_capacity(ROOM + size_hint);
        buf.extend_from_slice(&[0; ROOM]);
        write(&mut buf);
        simdutf8::basic::from_utf8(&buf[ROOM..]).map_err(|_| ProtocolError::InvalidUtf8)?;
        let mut header = [0u8; ROOM];
        let mut unused = &mut header[..];
        encode_header(
            &mut unused,
            true,
            false,
            OpCode::Text,
            buf.len() - ROOM,
            None,
        );
        let header_len = ROOM - unused.len();
        let start = ROOM - header_len;
        buf[start..ROOM].copy_from_slice(&header[..header_len]);
        let frame = Bytes::from(buf).slice(start..);
        Ok(Self(Arc::new(Inner {
            opcode: OpCode::Text,
            payload: frame.slice(header_len..),
            plain: OnceLock::from(frame),
            deflated: OnceLock::new(),
        })))
    }

    /// A binary message.
    pub fn binary(data: impl Into<Bytes>) -> Self {
        Self::new(OpCode::Binary, data.into())
    }

    /// The opcode (text or binary).
    pub fn opcode(&self) -> OpCode {
        self.0.opcode
    }

    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.0.payload
    }

    /// The uncompressed server frame, encoded on first use.
    pub fn plain_frame(&self) -> Bytes {
        self.0
            .plain
            .get_or_init(|| {
                let mut out = BytesMut::new();
                encode_frame(&mut out, true, false, self.0.opcode, &self.0.payload, None);
                out.freeze()
            })
            .clone()
    }

    /// The compressed server frame for connections without context takeover,
    /// compressed on first use at `level` (a later, different level is compressed anew).
    pub fn deflated_frame(&self, level: u32) -> Bytes {
        let (cached_level, frame) = self.0.deflated.get_or_init(|| (level, self.deflate(level)));
        if *cached_level == level {
            frame.clone()
        } else {
            self.deflate(level)
        }
    }

    fn deflate(&self, level: u32) -> Bytes {
        let compressed = compress_standalone(&self.0.payload, level);
        let mut out = BytesMut::new();
        encode_frame(&mut out, true, true, self.0.opcode, &compressed, None);
        out.freeze()
    }

    /// The message as a plain [`Message`] (for encoders that must mask).
    pub fn to_message(&self) -> Message {
        match self.0.opcode {
            OpCode::Text => Message::Text(
                Utf8Bytes::try_from_bytes(self.0.payload.clone()).expect("built from UTF-8 text"),
            ),
            _ => Message::Binary(self.0.payload.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{FrameDecoder, Role};

    #[test]
    fn text_with_builds_the_same_frame_as_text() {
        for len in [0, 5, 125, 126, 300, 70_000] {
            let text = "é".repeat(len / 2);
            let direct =
                PreparedMessage::text_with(len, |buf| buf.extend_from_slice(text.as_bytes()))
                    .unwrap();
            let classic = PreparedMessage::text(text.clone());
            assert_eq!(direct.plain_frame(), classic.plain_frame(), "len {len}");
            assert_eq!(direct.payload(), classic.payload());
            let mut wire = BytesMut::from(&direct.plain_frame()[..]);
            let frame = FrameDecoder::new(Role::Client, usize::MAX, false)
                .decode(&mut wire)
                .unwrap()
                .unwrap();
            assert_eq!(&frame.payload[..], text.as_bytes());
        }
    }

    #[test]
    fn text_with_refuses_invalid_utf8() {
        assert!(PreparedMessage::text_with(1, |buf| buf.push(0xff)).is_err());
    }
}
