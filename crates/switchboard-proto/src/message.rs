//! Messages: reassembly of frames (RFC 6455 §5.4), limits, and encoding.
//!
//! [`MessageDecoder`] sits one layer above [`FrameDecoder`]: it joins fragments,
//! inflates compressed messages, validates text as it arrives, and passes control
//! frames through even in the middle of a fragmented message. [`MessageEncoder`]
//! is the other direction, for one connection's compression and masking state.

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};

use crate::close::CloseReason;
use crate::deflate::{DeflateParams, Deflater, Inflater, PeerContext};
use crate::error::ProtocolError;
use crate::frame::{FrameDecoder, OpCode, Role, encode_frame};
use crate::prepared::PreparedMessage;
use crate::utf8::{Utf8Bytes, Utf8Validator};

/// A complete message, or a control frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A text message.
    Text(Utf8Bytes),
    /// A binary message.
    Binary(Bytes),
    /// A ping, with its application data.
    Ping(Bytes),
    /// A pong, with its application data.
    Pong(Bytes),
    /// A close frame; `None` when it carried no code.
    Close(Option<CloseReason>),
}

impl Message {
    /// A text message.
    pub fn text(text: impl Into<Utf8Bytes>) -> Self {
        Self::Text(text.into())
    }

    /// A binary message.
    pub fn binary(data: impl Into<Bytes>) -> Self {
        Self::Binary(data.into())
    }

    /// Borrowed where it can be: a `Bytes` clone would cost a reference count
    /// increment and decrement for every frame encoded.
    fn opcode_and_payload(&self) -> (OpCode, Cow<'_, [u8]>) {
        match self {
            Self::Text(t) => (OpCode::Text, Cow::Borrowed(t.as_bytes())),
            Self::Binary(b) => (OpCode::Binary, Cow::Borrowed(b)),
            Self::Ping(b) => (OpCode::Ping, Cow::Borrowed(b)),
            Self::Pong(b) => (OpCode::Pong, Cow::Borrowed(b)),
            Self::Close(None) => (OpCode::Close, Cow::Borrowed(&[])),
            Self::Close(Some(reason)) => (OpCode::Close, Cow::Owned(reason.to_payload().into())),
        }
    }
}

/// Size limits for received data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame payload accepted, in bytes.
    pub max_frame_size: usize,
    /// Largest message accepted (after decompression), in bytes.
    pub max_message_size: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_size: 1 << 20,
            max_message_size: 1 << 20,
        }
    }
}

/// A data message whose final frame has not arrived yet.
#[derive(Debug)]
struct Partial {
    text: bool,
    compressed: bool,
    data: BytesMut,
}

/// Decodes messages from bytes as they arrive.
#[derive(Debug)]
pub struct MessageDecoder {
    frames: FrameDecoder,
    /// Largest message accepted (the frame limit is the frame decoder's).
    max_message_size: usize,
    /// How the peer compresses, when permessage-deflate was negotiated.
    peer_context: Option<PeerContext>,
    // Boxed: most connections never compress or fragment, and every idle
    // connection carries a decoder, so the rare states live off to the side.
    // The inflater exists from the first compressed message on, and only while
    // one is in progress when the peer resets its context.
    inflater: Option<Box<Inflater>>,
    partial: Option<Box<Partial>>,
    utf8: Utf8Validator,
    /// Payload bytes of the frame in flight already checked by fail-fast validation.
    prevalidated: usize,
    /// Bytes inflated and not yet taken ([`Self::take_inflated`]), for a cap
    /// on decompression work.
    inflated: u64,
}

impl MessageDecoder {
    /// A decoder for `role`. `compression` says how the peer compresses when
    /// permessage-deflate was negotiated (see [`DeflateParams::client_context`]).
    ///
    /// Text is always checked to be UTF-8 (RFC 6455 §8.1): a [`Utf8Bytes`] is
    /// never built from bytes nobody checked.
    pub fn new(role: Role, limits: Limits, compression: Option<PeerContext>) -> Self {
        Self {
            frames: FrameDecoder::new(role, limits.max_frame_size, compression.is_some()),
            max_message_size: limits.max_message_size,
            peer_context: compression,
            inflater: None,
            partial: None,
            utf8: Utf8Validator::default(),
            prevalidated: 0,
            inflated: 0,
        }
    }

    /// Whether a fragmented message is partly received.
    pub fn in_message(&self) -> bool {
        self.partial.is_some()
    }

    /// The limits the decoder was made with.
    pub fn limits(&self) -> Limits {
        Limits {
            max_frame_size: self.frames.max_frame_size(),
            max_message_size: self.max_message_size,
        }
    }

    /// Whether the decoder is between messages and holds nothing a new one
    /// made with the same limits and peer context would not: no partial
    /// message or frame, no inflater (a peer that keeps its compression
    /// context has one from its first compressed message on), nothing
    /// inflated that was not taken. Such a decoder can be dropped and made
    /// again (a connection that hibernates keeps its limits and the peer's
    /// context instead of its decoder).
    pub fn at_rest(&self) -> bool {
        self.partial.is_none()
            && self.inflater.is_none()
            && self.inflated == 0
            && self.prevalidated == 0
            && self.frames.at_rest()
    }

    /// Bytes held for the message partly received (inflated, when it is
    /// compressed): what a peer makes us keep by not finishing a message.
    pub fn buffered(&self) -> usize {
        self.partial
            .as_ref()
            .map_or(0, |partial| partial.data.len())
    }

    /// Bytes inflated since the last call (since the decoder was made, at
    /// first). A compressed message can inflate a thousandfold, so this, not
    /// the bytes received, measures the work a peer asks of us.
    pub fn take_inflated(&mut self) -> u64 {
        std::mem::take(&mut self.inflated)
    }

    /// How the peer compresses, as given to [`Self::new`].
    pub fn peer_context(&self) -> Option<PeerContext> {
        self.peer_context
    }

    /// Drops the message partly received, for a connection that is being
    /// failed: it will decode nothing more, and should hold no memory for it.
    pub fn discard_partial(&mut self) {
        self.partial = None;
        if let Some(inflater) = self.inflater.take() {
            inflater.give_back();
        }
    }

    /// Decodes the next message from `buf`. `Ok(None)` means more input is needed.
    ///
    /// # Errors
    ///
    /// The [`ProtocolError`] that fails the connection, with its close code
    /// ([`ProtocolError::close_code`]): a frame RFC 6455 forbids, a bad
    /// continuation, invalid UTF-8 in text (found as early as the bytes arrive),
    /// data that does not inflate, or a frame or message over the limits.
    ///
    /// # Examples
    ///
    /// ```
    /// use bytes::BytesMut;
    /// use switchboard_proto::frame::encode_frame;
    /// use switchboard_proto::{Limits, Message, MessageDecoder, OpCode, Role};
    ///
    /// let mut wire = BytesMut::new();
    /// encode_frame(&mut wire, true, false, OpCode::Text, b"hi", Some([1, 2, 3, 4]));
    /// let mut decoder = MessageDecoder::new(Role::Server, Limits::default(), None);
    /// let mut half = wire.split_to(3);
    /// assert_eq!(decoder.next(&mut half).unwrap(), None);
    /// half.unsplit(wire);
    /// assert_eq!(decoder.next(&mut half).unwrap(), Some(Message::text("hi")));
    /// ```
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Message>, ProtocolError> {
        loop {
            let Some(frame) = self.frames.decode(buf)? else {
                self.check_partial_text(buf)?;
                return Ok(None);
            };
            // The bytes not yet validated, borrowed: a `Bytes::slice` would cost
            // a reference count increment and decrement per frame.
            let validated = std::mem::take(&mut self.prevalidated);
            let fresh = &frame.payload[validated..];
            let message = match frame.opcode {
                OpCode::Ping => return Ok(Some(Message::Ping(frame.payload))),
                OpCode::Pong => return Ok(Some(Message::Pong(frame.payload))),
                OpCode::Close => {
                    return Ok(Some(Message::Close(CloseReason::parse(&frame.payload)?)));
                }
                OpCode::Text | OpCode::Binary => {
                    if self.partial.is_some() {
                        return Err(ProtocolError::ExpectedContinuation);
                    }
                    let text = frame.opcode == OpCode::Text;
                    if frame.fin && !frame.rsv1 {
                        // Unfragmented and uncompressed: hand out the payload without a copy.
                        // UTF-8 is checked before size, as fail-fast validation of a
                        // partly received frame would.
                        if text {
                            self.validate(fresh)?;
                            self.check_size(0, frame.payload.len())?;
                            self.finish_text()?;
                            return Ok(Some(Message::Text(Utf8Bytes::from_validated(
                                frame.payload,
                            ))));
                        }
                        self.check_size(0, frame.payload.len())?;
                        return Ok(Some(Message::Binary(frame.payload)));
                    }
                    self.partial = Some(Box::new(Partial {
                        text,
                        compressed: frame.rsv1,
                        data: BytesMut::new(),
                    }));
                    self.append(&frame.payload, fresh)?;
                    frame.fin
                }
                OpCode::Continuation => {
                    if self.partial.is_none() {
                        return Err(ProtocolError::UnexpectedContinuation);
                    }
                    self.append(&frame.payload, fresh)?;
                    frame.fin
                }
            };
            if message {
                return self.complete().map(Some);
            }
        }
    }

    /// Validates the text that has arrived of an unfinished frame (fail fast, Autobahn 6.4.*).
    fn check_partial_text(&mut self, buf: &BytesMut) -> Result<(), ProtocolError> {
        let plain_text_in_flight = match &self.partial {
            Some(p) => p.text && !p.compressed,
            None => true,
        };
        let Some((opcode, rsv1, fresh)) = self.frames.fresh_partial(buf) else {
            return Ok(());
        };
        let is_text = match opcode {
            OpCode::Text => self.partial.is_none() && !rsv1,
            OpCode::Continuation => self.partial.is_some() && plain_text_in_flight,
            _ => false,
        };
        if is_text {
            self.prevalidated += fresh.len();
            self.utf8.feed(fresh)?;
        }
        Ok(())
    }

    fn append(&mut self, payload: &[u8], fresh: &[u8]) -> Result<(), ProtocolError> {
        // Taken out while it grows; an error fails the connection, so it need not go back.
        let mut partial = self.partial.take().expect("a message is in progress");
        if partial.compressed {
            self.inflate_onto(&mut partial, Some(payload))?;
        } else {
            if partial.text {
                self.validate(fresh)?;
            }
            self.check_size(partial.data.len(), payload.len())?;
            partial.data.extend_from_slice(payload);
        }
        self.partial = Some(partial);
        Ok(())
    }

    /// Inflates `input` onto the message, or with `None` the stripped tail that ends
    /// it, and validates the text that came out.
    fn inflate_onto(
        &mut self,
        partial: &mut Partial,
        input: Option<&[u8]>,
    ) -> Result<(), ProtocolError> {
        let limit = self.max_message_size;
        debug_assert!(
            self.peer_context.is_some(),
            "RSV1 is only accepted with deflate"
        );
        let inflater = self.inflater.get_or_insert_with(Inflater::lend);
        let start = partial.data.len();
        match input {
            Some(input) => inflater.inflate(input, &mut partial.data, limit)?,
            None => inflater.finish_message(&mut partial.data, limit)?,
        }
        self.inflated += (partial.data.len() - start) as u64;
        if partial.text {
            self.validate(&partial.data[start..])?;
        }
        Ok(())
    }

    fn complete(&mut self) -> Result<Message, ProtocolError> {
        let mut partial = self.partial.take().expect("a message is in progress");
        if partial.compressed {
            self.inflate_onto(&mut partial, None)?;
            if self.peer_context == Some(PeerContext::Reset) {
                // Nothing carries over to the next message: the window goes back to the pool.
                if let Some(inflater) = self.inflater.take() {
                    inflater.give_back();
                }
            }
        }
        let data = partial.data.freeze();
        if partial.text {
            self.finish_text()?;
            Ok(Message::Text(Utf8Bytes::from_validated(data)))
        } else {
            Ok(Message::Binary(data))
        }
    }

    fn check_size(&self, have: usize, more: usize) -> Result<(), ProtocolError> {
        let limit = self.max_message_size;
        if have + more > limit {
            return Err(ProtocolError::MessageTooLarge { limit });
        }
        Ok(())
    }

    fn validate(&mut self, bytes: &[u8]) -> Result<(), ProtocolError> {
        self.utf8.feed(bytes)
    }

    fn finish_text(&mut self) -> Result<(), ProtocolError> {
        self.utf8.finish()
    }
}

/// How a server connection turns a [`PreparedMessage`] into frame bytes, for
/// connections whose frames depend on no per-connection state (see
/// [`MessageEncoder::shared_framing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedFraming {
    /// No compression: the message's plain frame.
    Plain,
    /// permessage-deflate without context takeover: messages of at least
    /// `min_size` bytes are compressed (once, shared) at `level`.
    Deflated {
        /// The zlib level.
        level: u32,
        /// Smaller payloads are sent uncompressed.
        min_size: u32,
    },
}

impl SharedFraming {
    /// The frame to write for `message`: a clone of bytes shared by every
    /// connection with the same framing.
    pub fn frame(self, message: &PreparedMessage) -> Bytes {
        match self {
            Self::Deflated { level, min_size } if message.payload().len() >= min_size as usize => {
                message.deflated_frame(level)
            }
            _ => message.plain_frame(),
        }
    }

    /// `write` with the frame for `message`, borrowed: a write that takes the
    /// bytes at once needs no clone of them.
    pub fn with_frame<R>(self, message: &PreparedMessage, write: impl FnOnce(&[u8]) -> R) -> R {
        match self {
            Self::Deflated { level, min_size } if message.payload().len() >= min_size as usize => {
                message.with_deflated_frame(level, |frame| write(frame))
            }
            _ => write(message.plain_bytes()),
        }
    }
}

/// Encodes outgoing messages for one connection: compression state and masking.
#[derive(Debug)]
pub struct MessageEncoder {
    role: Role,
    /// Boxed for the same reason as the decoder's inflater.
    deflater: Option<Box<(Deflater, DeflateParams)>>,
}

impl MessageEncoder {
    /// An encoder for `role`, compressing with `deflate` when it was negotiated.
    pub fn new(role: Role, deflate: Option<DeflateParams>) -> Self {
        Self {
            role,
            deflater: deflate.map(|params| Box::new((Deflater::new(&params), params))),
        }
    }

    /// Appends `message` as one frame to `out`.
    pub fn encode(&mut self, message: &Message, out: &mut BytesMut) {
        let (opcode, payload) = message.opcode_and_payload();
        let mask = self.next_mask();
        match self.deflater.as_deref_mut() {
            Some((deflater, _)) if !opcode.is_control() && deflater.wants(payload.len()) => {
                let compressed = deflater.compress(&payload);
                encode_frame(out, true, true, opcode, &compressed, mask);
            }
            _ => encode_frame(out, true, false, opcode, &payload, mask),
        }
    }

    /// The frame bytes of a prepared message for this connection. Without
    /// compression, or with settings that share frames, this is a cheap clone of
    /// bytes encoded once for every recipient.
    pub fn encode_prepared(&mut self, message: &PreparedMessage) -> Bytes {
        if self.role == Role::Client {
            let mut out = BytesMut::new();
            self.encode(&message.to_message(), &mut out);
            return out.freeze();
        }
        if let Some(framing) = self.shared_framing() {
            return framing.frame(message);
        }
        match self.deflater.as_deref_mut() {
            Some((deflater, _)) if deflater.wants(message.payload().len()) => {
                let compressed = deflater.compress(message.payload());
                let mut out = BytesMut::new();
                encode_frame(&mut out, true, true, message.opcode(), &compressed, None);
                out.freeze()
            }
            _ => message.plain_frame(),
        }
    }

    /// Whether permessage-deflate was negotiated for this encoder.
    pub fn compresses(&self) -> bool {
        self.deflater.is_some()
    }

    /// How this connection frames prepared messages, when that needs no state of
    /// its own (a server without compression, or compressing without context
    /// takeover): anyone holding it can produce the connection's frame. `None`
    /// for a client (frames are masked) or a compressor that keeps its window.
    pub fn shared_framing(&self) -> Option<SharedFraming> {
        if self.role == Role::Client {
            return None;
        }
        match self.deflater.as_deref() {
            None => Some(SharedFraming::Plain),
            Some((_, params)) if params.shares_standalone_frames() => {
                Some(SharedFraming::Deflated {
                    level: params.level,
                    // Held small: every connection's mailbox keeps a copy.
                    min_size: u32::try_from(params.min_size).unwrap_or(u32::MAX),
                })
            }
            Some(_) => None,
        }
    }

    fn next_mask(&mut self) -> Option<[u8; 4]> {
        if self.role == Role::Server {
            return None;
        }
        Some(crate::mask::random_key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deflate::{DeflateOptions, negotiate};

    fn decoder(compression: bool) -> MessageDecoder {
        let context = compression.then_some(PeerContext::Kept);
        MessageDecoder::new(Role::Server, Limits::default(), context)
    }

    fn frame(fin: bool, opcode: OpCode, payload: &[u8]) -> BytesMut {
        let mut out = BytesMut::new();
        encode_frame(&mut out, fin, false, opcode, payload, Some([9, 8, 7, 6]));
        out
    }

    #[test]
    fn joins_fragments_and_passes_control_frames_through() {
        let mut buf = frame(false, OpCode::Text, b"Hello, ");
        buf.extend_from_slice(&frame(true, OpCode::Ping, b"p"));
        buf.extend_from_slice(&frame(true, OpCode::Continuation, b"world"));
        let mut dec = decoder(false);
        assert_eq!(
            dec.next(&mut buf).unwrap(),
            Some(Message::Ping(Bytes::from_static(b"p")))
        );
        assert_eq!(
            dec.next(&mut buf).unwrap(),
            Some(Message::text("Hello, world"))
        );
        assert_eq!(dec.next(&mut buf).unwrap(), None);
    }

    #[test]
    fn continuation_rules() {
        let mut dec = decoder(false);
        let mut buf = frame(true, OpCode::Continuation, b"x");
        assert_eq!(
            dec.next(&mut buf),
            Err(ProtocolError::UnexpectedContinuation)
        );
        let mut dec = decoder(false);
        let mut buf = frame(false, OpCode::Text, b"a");
        buf.extend_from_slice(&frame(true, OpCode::Text, b"b"));
        assert_eq!(dec.next(&mut buf), Err(ProtocolError::ExpectedContinuation));
    }

    #[test]
    fn message_limit_covers_fragments() {
        let limits = Limits {
            max_frame_size: 100,
            max_message_size: 150,
        };
        let mut dec = MessageDecoder::new(Role::Server, limits, None);
        let mut buf = frame(false, OpCode::Binary, &[0; 100]);
        buf.extend_from_slice(&frame(true, OpCode::Continuation, &[0; 100]));
        assert_eq!(
            dec.next(&mut buf),
            Err(ProtocolError::MessageTooLarge { limit: 150 })
        );
    }

    #[test]
    fn invalid_utf8_fails_before_the_frame_is_complete() {
        let wire = frame(true, OpCode::Text, b"abc\xff and much more text after it");
        let mut dec = decoder(false);
        let mut buf = BytesMut::from(&wire[..10]);
        assert_eq!(dec.next(&mut buf), Err(ProtocolError::InvalidUtf8));
    }

    /// Regression: with UTF-8 checks switched off, unchecked bytes became a
    /// `Utf8Bytes`, whose `as_str` trusts them. There is no such switch now:
    /// every path a text message can take is checked.
    #[test]
    fn invalid_utf8_never_becomes_text_on_any_path() {
        let bad = b"ok \xc3\x28 not UTF-8";
        let mut single = frame(true, OpCode::Text, bad);
        let mut fragmented = frame(false, OpCode::Text, &bad[..4]);
        fragmented.extend_from_slice(&frame(true, OpCode::Continuation, &bad[4..]));
        // A sequence cut off by the end of the message.
        let mut truncated = frame(false, OpCode::Text, b"abc");
        truncated.extend_from_slice(&frame(true, OpCode::Continuation, b"\xe2\x82"));
        for buf in [&mut single, &mut fragmented, &mut truncated] {
            assert_eq!(decoder(false).next(buf), Err(ProtocolError::InvalidUtf8));
        }
        let params = negotiate("permessage-deflate", &DeflateOptions::default()).unwrap();
        let mut client = MessageEncoder::new(Role::Client, Some(params));
        let mut compressed = BytesMut::new();
        // Long enough to be worth compressing.
        let long_bad = bad.repeat(20);
        client.encode(&Message::Binary(long_bad.into()), &mut compressed);
        assert_ne!(compressed[0] & 0x40, 0, "the frame is compressed (RSV1)");
        // The same compressed bytes, sent as text: opcode binary (2) becomes text (1).
        compressed[0] = (compressed[0] & 0xF0) | 0x1;
        assert_eq!(
            decoder(true).next(&mut compressed),
            Err(ProtocolError::InvalidUtf8)
        );
    }

    #[test]
    fn compressed_messages_round_trip_through_the_encoder() {
        let params = negotiate("permessage-deflate", &DeflateOptions::default()).unwrap();
        let mut client = MessageEncoder::new(Role::Client, Some(params));
        let mut wire = BytesMut::new();
        let text = "compress me ".repeat(50);
        client.encode(&Message::text(text.clone()), &mut wire);
        assert!(wire.len() < text.len() / 4);
        let mut dec = decoder(true);
        assert_eq!(dec.next(&mut wire).unwrap(), Some(Message::text(text)));
    }

    #[test]
    fn an_inflater_is_held_only_while_a_resetting_client_sends() {
        let params = negotiate("permessage-deflate", &DeflateOptions::default()).unwrap();
        assert_eq!(params.client_context(), PeerContext::Reset);
        let limits = Limits::default();
        let mut dec = MessageDecoder::new(Role::Server, limits, Some(PeerContext::Reset));
        assert!(
            dec.inflater.is_none(),
            "none before the first compressed message"
        );
        for i in 0..3 {
            let text = format!("message {i} ").repeat(40);
            let compressed = crate::deflate::compress_standalone(text.as_bytes(), 6);
            let (head, tail) = compressed.split_at(compressed.len() / 2);
            let mut wire = BytesMut::new();
            let mask = Some([1, 2, 3, 4]);
            encode_frame(&mut wire, false, true, OpCode::Text, head, mask);
            assert_eq!(dec.next(&mut wire), Ok(None));
            assert!(
                dec.inflater.is_some(),
                "held while the message is in progress"
            );
            encode_frame(&mut wire, true, false, OpCode::Continuation, tail, mask);
            assert_eq!(dec.next(&mut wire), Ok(Some(Message::text(text))));
            assert!(dec.inflater.is_none(), "given back when the message ends");
        }
    }

    #[test]
    fn an_inflater_keeps_the_context_of_a_client_that_keeps_it() {
        let params = negotiate("permessage-deflate", &DeflateOptions::default()).unwrap();
        let mut dec = decoder(true);
        // The client side of a connection where the client keeps its context.
        let mut deflater = Deflater::new(&DeflateParams {
            server_no_context_takeover: false,
            ..params
        });
        let text = "the same words again and again ".repeat(8);
        let mut sizes = Vec::new();
        for _ in 0..2 {
            let compressed = deflater.compress(text.as_bytes());
            sizes.push(compressed.len());
            let mut wire = BytesMut::new();
            encode_frame(
                &mut wire,
                true,
                true,
                OpCode::Text,
                &compressed,
                Some([5; 4]),
            );
            assert_eq!(dec.next(&mut wire), Ok(Some(Message::text(text.clone()))));
            assert!(dec.inflater.is_some(), "kept for the next message");
        }
        assert!(
            sizes[1] < sizes[0] / 2,
            "the second message refers back: {sizes:?}"
        );
    }

    #[test]
    fn prepared_frames_are_shared_between_connections() {
        let message = PreparedMessage::text(String::from("x").repeat(200));
        let params = negotiate("permessage-deflate", &DeflateOptions::default()).unwrap();
        let mut a = MessageEncoder::new(Role::Server, Some(params));
        let mut b = MessageEncoder::new(Role::Server, Some(params));
        let (fa, fb) = (a.encode_prepared(&message), b.encode_prepared(&message));
        assert_eq!(fa.as_ptr(), fb.as_ptr(), "one compressed frame for both");
        let mut plain = MessageEncoder::new(Role::Server, None);
        assert_eq!(
            plain.encode_prepared(&message).as_ptr(),
            message.plain_frame().as_ptr()
        );
    }
}
