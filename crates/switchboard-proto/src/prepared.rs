//! Server messages encoded once and shared by every recipient.
//!
//! A server frame is never masked, so its bytes are the same for every
//! connection: [`PreparedMessage`] holds the frame (written whole when it is
//! built, or encoded on first use) and lends it to writes that take it at once,
//! or hands out clones of the same [`Bytes`] to those that queue it. With
//! permessage-deflate and no context takeover, the compressed frame is shared
//! the same way.

use std::sync::{Arc, OnceLock};

use bytes::{Buf, Bytes, BytesMut};

use crate::deflate::compress_standalone;
use crate::error::ProtocolError;
use crate::frame::{OpCode, encode_frame, encode_header};
use crate::message::Message;
use crate::utf8::Utf8Bytes;

/// Room kept in front of a frame written whole, for the largest unmasked
/// server header (2 + 8 bytes).
const ROOM: usize = 10;

/// A text or binary message ready to be written to many connections.
#[derive(Clone)]
pub struct PreparedMessage(Arc<Inner>);

struct Inner {
    opcode: OpCode,
    body: Body,
    deflated: OnceLock<(u32, Bytes)>,
}

/// The message's bytes: a payload whose frame is encoded on first use, or a
/// frame written whole ([`PreparedMessage::text_with`]), whose payload is the
/// part after the header. The latter is never sliced when it is built: the
/// first clone of bytes made from a `Vec` whose length is its capacity (as
/// [`PreparedMessage::text_copied`] makes them) allocates their shared count,
/// and a frame written directly to every socket is never cloned at all. (A
/// `Vec` with room to spare gets its count when it becomes `Bytes`.)
enum Body {
    Payload {
        payload: Bytes,
        plain: OnceLock<Bytes>,
    },
    Frame {
        frame: Bytes,
        header: u8,
    },
}

impl std::fmt::Debug for PreparedMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedMessage")
            .field("opcode", &self.0.opcode)
            .field("len", &self.payload().len())
            .finish()
    }
}

impl PreparedMessage {
    fn new(opcode: OpCode, payload: Bytes) -> Self {
        Self(Arc::new(Inner {
            opcode,
            body: Body::Payload {
                payload,
                plain: OnceLock::new(),
            },
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
        let mut buf = Vec::with_capacity(ROOM + size_hint);
        buf.extend_from_slice(&[0; ROOM]);
        write(&mut buf);
        simdutf8::basic::from_utf8(&buf[ROOM..]).map_err(|_| ProtocolError::InvalidUtf8)?;
        Ok(Self::text_frame(buf))
    }

    /// A text message of `text`, copied once into its frame (as [`Self::text_with`],
    /// without checking again what a `&str` already is).
    pub fn text_copied(text: &str) -> Self {
        let mut buf = Vec::with_capacity(ROOM + text.len());
        buf.extend_from_slice(&[0; ROOM]);
        buf.extend_from_slice(text.as_bytes());
        Self::text_frame(buf)
    }

    /// The message whose UTF-8 text follows `ROOM` bytes kept for the header.
    fn text_frame(mut buf: Vec<u8>) -> Self {
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
        let mut frame = Bytes::from(buf);
        // Advanced, not sliced: a slice is a clone.
        frame.advance(start);
        Self(Arc::new(Inner {
            opcode: OpCode::Text,
            body: Body::Frame {
                frame,
                header: header_len as u8,
            },
            deflated: OnceLock::new(),
        }))
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
    pub fn payload(&self) -> &[u8] {
        match &self.0.body {
            Body::Payload { payload, .. } => payload,
            Body::Frame { frame, header } => &frame[usize::from(*header)..],
        }
    }

    /// The uncompressed server frame (encoded on first use, unless it was
    /// written whole when the message was built).
    pub fn plain_frame(&self) -> Bytes {
        self.plain().clone()
    }

    /// The uncompressed server frame, borrowed: for a write that takes it at
    /// once, with no clone of the bytes to pay for.
    pub fn plain_bytes(&self) -> &[u8] {
        self.plain()
    }

    fn plain(&self) -> &Bytes {
        match &self.0.body {
            Body::Payload { payload, plain } => plain.get_or_init(|| {
                let mut out = BytesMut::new();
                encode_frame(&mut out, true, false, self.0.opcode, payload, None);
                out.freeze()
            }),
            Body::Frame { frame, .. } => frame,
        }
    }

    /// The compressed server frame for connections without context takeover,
    /// compressed on first use at `level` (a later, different level is compressed anew).
    pub fn deflated_frame(&self, level: u32) -> Bytes {
        self.with_deflated_frame(level, Bytes::clone)
    }

    /// `use_frame` of the compressed frame, borrowed when it is the one cached.
    pub fn with_deflated_frame<R>(&self, level: u32, use_frame: impl FnOnce(&Bytes) -> R) -> R {
        let (cached_level, frame) = self.0.deflated.get_or_init(|| (level, self.deflate(level)));
        if *cached_level == level {
            use_frame(frame)
        } else {
            use_frame(&self.deflate(level))
        }
    }

    fn deflate(&self, level: u32) -> Bytes {
        let compressed = compress_standalone(self.payload(), level);
        let mut out = BytesMut::new();
        encode_frame(&mut out, true, true, self.0.opcode, &compressed, None);
        out.freeze()
    }

    /// The message as a plain [`Message`] (for encoders that must mask).
    pub fn to_message(&self) -> Message {
        let payload = match &self.0.body {
            Body::Payload { payload, .. } => payload.clone(),
            Body::Frame { frame, header } => frame.slice(usize::from(*header)..),
        };
        match self.0.opcode {
            OpCode::Text => {
                Message::Text(Utf8Bytes::try_from_bytes(payload).expect("built from UTF-8 text"))
            }
            _ => Message::Binary(payload),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{FrameDecoder, Role};

    #[test]
    fn text_with_and_text_copied_build_the_same_frame_as_text() {
        for len in [0, 5, 125, 126, 300, 70_000] {
            let text = "é".repeat(len / 2);
            let direct =
                PreparedMessage::text_with(len, |buf| buf.extend_from_slice(text.as_bytes()))
                    .unwrap();
            let copied = PreparedMessage::text_copied(&text);
            let classic = PreparedMessage::text(text.clone());
            for built in [&direct, &copied] {
                assert_eq!(built.plain_frame(), classic.plain_frame(), "len {len}");
                assert_eq!(built.plain_bytes(), classic.plain_bytes(), "len {len}");
                assert_eq!(built.payload(), classic.payload());
                assert_eq!(built.to_message(), classic.to_message());
                assert_eq!(built.deflated_frame(6), classic.deflated_frame(6));
            }
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
