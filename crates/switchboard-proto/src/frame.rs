//! RFC 6455 §5.2 frames: header decoding and encoding.
//!
//! [`FrameDecoder`] reads frames out of a [`BytesMut`] as bytes arrive, however the
//! input is split. It unmasks payload in place as it arrives, so a caller can look
//! at the part of a frame received so far ([`FrameDecoder::fresh_partial`]) to
//! fail fast on bad UTF-8. It knows nothing of messages: reassembly lives in
//! [`crate::message`].

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::ProtocolError;
use crate::mask::apply_mask;

/// Maximum size of a frame header: 2 bytes, 8 bytes of extended length, 4 of mask.
pub const MAX_HEADER_LEN: usize = 2 + 8 + 4;

/// Largest payload of a control frame (RFC 6455 §5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// A frame opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    /// Continues a fragmented message.
    Continuation,
    /// Starts a text message.
    Text,
    /// Starts a binary message.
    Binary,
    /// Closes the connection.
    Close,
    /// Asks for a pong.
    Ping,
    /// Answers a ping, or is a unilateral heartbeat.
    Pong,
}

impl OpCode {
    fn from_bits(bits: u8) -> Result<Self, ProtocolError> {
        Ok(match bits {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            other => return Err(ProtocolError::UnknownOpcode(other)),
        })
    }

    fn bits(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xA,
        }
    }

    /// Close, ping and pong are control frames.
    pub fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

/// Which end of the connection this codec is: it decides who masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Receives masked frames, sends unmasked ones.
    Server,
    /// Receives unmasked frames, sends masked ones.
    Client,
}

/// A decoded frame with its payload unmasked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Last frame of its message.
    pub fin: bool,
    /// RSV1: the message is compressed (permessage-deflate), on its first frame.
    pub rsv1: bool,
    /// The opcode.
    pub opcode: OpCode,
    /// The unmasked payload.
    pub payload: Bytes,
}

/// The header of the frame being received.
#[derive(Debug, Clone, Copy)]
struct Header {
    fin: bool,
    rsv1: bool,
    opcode: OpCode,
    mask: Option<[u8; 4]>,
    header_len: usize,
    payload_len: usize,
}

/// Decodes frames incrementally.
#[derive(Debug)]
pub struct FrameDecoder {
    role: Role,
    max_frame_size: usize,
    allow_rsv1: bool,
    /// The header of a frame whose payload has not fully arrived.
    pending: Option<Header>,
    /// How many payload bytes of the pending frame are already unmasked.
    unmasked: usize,
    /// How many of those were already handed out by [`Self::fresh_partial`].
    reported: usize,
}

impl FrameDecoder {
    /// A decoder for `role`, refusing frames over `max_frame_size` bytes.
    /// `allow_rsv1` is true when permessage-deflate was negotiated.
    pub fn new(role: Role, max_frame_size: usize, allow_rsv1: bool) -> Self {
        Self {
            role,
            max_frame_size,
            allow_rsv1,
            pending: None,
            unmasked: 0,
            reported: 0,
        }
    }

    /// The largest frame payload accepted.
    pub fn max_frame_size(&self) -> usize {
        self.max_frame_size
    }

    /// Whether no frame is partly received.
    pub fn at_rest(&self) -> bool {
        self.pending.is_none()
    }

    /// Decodes the next complete frame from `buf`, consuming its bytes.
    /// `Ok(None)` means more input is needed.
    ///
    /// # Errors
    ///
    /// The [`ProtocolError`] for a header RFC 6455 §5.2 forbids (reserved bits
    /// or opcodes, masking that does not fit the role, a length not in its
    /// shortest form or with its top bit set, a fragmented or oversized control
    /// frame) or a frame over the size limit, found from the header alone.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
        let header = match self.pending {
            Some(header) => header,
            None => match self.parse_header(buf)? {
                Some(header) => {
                    self.pending = Some(header);
                    header
                }
                None => return Ok(None),
            },
        };
        self.unmask_available(buf, &header);
        if buf.len() < header.header_len + header.payload_len {
            return Ok(None);
        }
        self.pending = None;
        self.unmasked = 0;
        self.reported = 0;
        // Advancing moves the start; a split would share the buffer (an atomic
        // increment and decrement) only to drop the header at once.
        buf.advance(header.header_len);
        let payload = if buf.len() == header.payload_len {
            // The frame is all the buffer holds (a small message read whole):
            // the payload takes the buffer itself. A split would allocate the
            // count that shares it, for a buffer nobody else will use.
            std::mem::take(buf).freeze()
        } else {
            buf.split_to(header.payload_len).freeze()
        };
        Ok(Some(Frame {
            fin: header.fin,
            rsv1: header.rsv1,
            opcode: header.opcode,
            payload,
        }))
    }

    /// After [`Self::decode`] returned `None`: the opcode of the partly received
    /// frame and the payload bytes that arrived since the last call. These bytes
    /// stay in `buf` and are returned again, whole, by `decode`.
    pub fn fresh_partial<'b>(&mut self, buf: &'b BytesMut) -> Option<(OpCode, bool, &'b [u8])> {
        let header = self.pending?;
        let start = header.header_len + self.reported;
        let end = header.header_len + self.unmasked;
        self.reported = self.unmasked;
        Some((header.opcode, header.rsv1, &buf[start..end]))
    }

    fn unmask_available(&mut self, buf: &mut BytesMut, header: &Header) {
        let available = (buf.len() - header.header_len).min(header.payload_len);
        if available > self.unmasked {
            let range = header.header_len + self.unmasked..header.header_len + available;
            if let Some(mask) = header.mask {
                apply_mask(&mut buf[range], mask, self.unmasked);
            }
            self.unmasked = available;
        }
    }

    fn parse_header(&self, buf: &BytesMut) -> Result<Option<Header>, ProtocolError> {
        let [b0, b1, ..] = buf[..] else {
            return Ok(None);
        };
        let fin = b0 & 0x80 != 0;
        let rsv1 = b0 & 0x40 != 0;
        if b0 & 0x30 != 0 || (rsv1 && !self.allow_rsv1) {
            return Err(ProtocolError::ReservedBits);
        }
        let opcode = OpCode::from_bits(b0 & 0x0F)?;
        // RFC 7692 §6.1: only the first frame of a message may carry RSV1.
        if rsv1 && opcode == OpCode::Continuation {
            return Err(ProtocolError::ReservedBits);
        }
        if opcode.is_control() {
            if !fin {
                return Err(ProtocolError::FragmentedControl);
            }
            if rsv1 {
                return Err(ProtocolError::ReservedBits);
            }
        }
        let masked = b1 & 0x80 != 0;
        if masked != (self.role == Role::Server) {
            return Err(ProtocolError::BadMasking);
        }
        let (len, mut at) = match b1 & 0x7F {
            126 => {
                let Some(bytes) = buf.get(2..4) else {
                    return Ok(None);
                };
                let len = u16::from_be_bytes([bytes[0], bytes[1]]);
                if len < 126 {
                    return Err(ProtocolError::NonMinimalLength);
                }
                (u64::from(len), 4)
            }
            127 => {
                let Some(bytes) = buf.get(2..10) else {
                    return Ok(None);
                };
                let len = u64::from_be_bytes(bytes.try_into().expect("8 bytes"));
                if len >> 63 != 0 {
                    return Err(ProtocolError::BadLength);
                }
                if len <= 0xFFFF {
                    return Err(ProtocolError::NonMinimalLength);
                }
                (len, 10)
            }
            small => (small as u64, 2),
        };
        if opcode.is_control() && len > MAX_CONTROL_PAYLOAD as u64 {
            return Err(ProtocolError::ControlTooLong);
        }
        if len > self.max_frame_size as u64 {
            return Err(ProtocolError::FrameTooLarge {
                size: len,
                limit: self.max_frame_size,
            });
        }
        let mask = if masked {
            let Some(bytes) = buf.get(at..at + 4) else {
                return Ok(None);
            };
            at += 4;
            Some(bytes.try_into().expect("4 bytes"))
        } else {
            None
        };
        Ok(Some(Header {
            fin,
            rsv1,
            opcode,
            mask,
            header_len: at,
            payload_len: len as usize,
        }))
    }
}

/// Appends a frame header to `out`.
pub fn encode_header(
    out: &mut impl BufMut,
    fin: bool,
    rsv1: bool,
    opcode: OpCode,
    payload_len: usize,
    mask: Option<[u8; 4]>,
) {
    let b0 = (fin as u8) << 7 | (rsv1 as u8) << 6 | opcode.bits();
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    out.put_u8(b0);
    match payload_len {
        0..=125 => out.put_u8(mask_bit | payload_len as u8),
        126..=0xFFFF => {
            out.put_u8(mask_bit | 126);
            out.put_u16(payload_len as u16);
        }
        _ => {
            out.put_u8(mask_bit | 127);
            out.put_u64(payload_len as u64);
        }
    }
    if let Some(mask) = mask {
        out.put_slice(&mask);
    }
}

/// Appends a whole frame to `out`, masking the payload when `mask` is given.
pub fn encode_frame(
    out: &mut BytesMut,
    fin: bool,
    rsv1: bool,
    opcode: OpCode,
    payload: &[u8],
    mask: Option<[u8; 4]>,
) {
    out.reserve(MAX_HEADER_LEN + payload.len());
    encode_header(out, fin, rsv1, opcode, payload.len(), mask);
    let start = out.len();
    out.put_slice(payload);
    if let Some(mask) = mask {
        apply_mask(&mut out[start..], mask, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CloseCode;

    const MASK: [u8; 4] = [0xA1, 0xB2, 0xC3, 0xD4];

    fn client_frame(opcode: OpCode, fin: bool, payload: &[u8]) -> BytesMut {
        let mut out = BytesMut::new();
        encode_frame(&mut out, fin, false, opcode, payload, Some(MASK));
        out
    }

    #[test]
    fn decodes_each_length_encoding() {
        for len in [0, 1, 125, 126, 65535, 65536, 200_000] {
            let payload = vec![7u8; len];
            let mut buf = client_frame(OpCode::Binary, true, &payload);
            let mut dec = FrameDecoder::new(Role::Server, usize::MAX, false);
            let frame = dec.decode(&mut buf).unwrap().unwrap();
            assert_eq!(frame.payload.len(), len);
            assert!(frame.payload.iter().all(|b| *b == 7));
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn one_byte_at_a_time_gives_the_same_frame() {
        let wire = client_frame(OpCode::Text, true, b"hello, world");
        let mut dec = FrameDecoder::new(Role::Server, 1 << 20, false);
        let mut buf = BytesMut::new();
        let mut seen = Vec::new();
        let mut frame = None;
        for byte in wire.iter() {
            buf.put_u8(*byte);
            match dec.decode(&mut buf).unwrap() {
                Some(f) => frame = Some(f),
                None => {
                    if let Some((_, _, fresh)) = dec.fresh_partial(&buf) {
                        seen.extend_from_slice(fresh);
                    }
                }
            }
        }
        let frame = frame.unwrap();
        assert_eq!(&frame.payload[..], b"hello, world");
        assert_eq!(
            &seen[..],
            b"hello, worl",
            "every byte but the last is seen early"
        );
    }

    #[test]
    fn rejects_what_rfc_6455_forbids() {
        let cases: [(&[u8], ProtocolError); 6] = [
            (
                &[0x81 | 0x20, 0x80, 0, 0, 0, 0],
                ProtocolError::ReservedBits,
            ),
            (&[0x83, 0x80, 0, 0, 0, 0], ProtocolError::UnknownOpcode(3)),
            (&[0x09, 0x80, 0, 0, 0, 0], ProtocolError::FragmentedControl),
            (&[0x89, 0xFE, 0, 126], ProtocolError::ControlTooLong),
            (&[0x81, 0x00], ProtocolError::BadMasking),
            (&[0xC1, 0x80, 0, 0, 0, 0], ProtocolError::ReservedBits),
        ];
        for (bytes, expected) in cases {
            let mut dec = FrameDecoder::new(Role::Server, 1 << 20, false);
            let mut buf = BytesMut::from(bytes);
            assert_eq!(dec.decode(&mut buf), Err(expected), "{bytes:?}");
        }
    }

    #[test]
    fn rejects_lengths_in_a_longer_form_than_they_need() {
        let mut too_long_16 = vec![0x82, 0xFE, 0, 125];
        let mut too_long_64 = vec![0x82, 0xFF, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF];
        // The shortest lengths of each form are accepted.
        let mut ok_16 = vec![0x82, 0xFE, 0, 126, 1, 2, 3, 4];
        ok_16.extend(std::iter::repeat_n(0, 126));
        let mut ok_64 = vec![0x82, 0xFF, 0, 0, 0, 0, 0, 1, 0, 0, 1, 2, 3, 4];
        ok_64.extend(std::iter::repeat_n(0, 0x1_0000));
        for bytes in [&mut too_long_16, &mut too_long_64] {
            bytes.extend([1, 2, 3, 4]);
            let mut dec = FrameDecoder::new(Role::Server, 1 << 20, false);
            let mut buf = BytesMut::from(&bytes[..]);
            assert_eq!(
                dec.decode(&mut buf),
                Err(ProtocolError::NonMinimalLength),
                "{:?}",
                &bytes[..10.min(bytes.len())]
            );
            assert_eq!(
                ProtocolError::NonMinimalLength.close_code(),
                CloseCode::PROTOCOL_ERROR
            );
        }
        for (bytes, len) in [(ok_16, 126), (ok_64, 0x1_0000)] {
            let mut dec = FrameDecoder::new(Role::Server, 1 << 20, false);
            let frame = dec
                .decode(&mut BytesMut::from(&bytes[..]))
                .unwrap()
                .unwrap();
            assert_eq!(frame.payload.len(), len);
        }
    }

    #[test]
    fn refuses_oversize_frames_from_the_header_alone() {
        let mut dec = FrameDecoder::new(Role::Server, 1000, false);
        let mut buf = BytesMut::from(&[0x82, 0xFE, 0x10, 0x00][..]);
        assert_eq!(
            dec.decode(&mut buf),
            Err(ProtocolError::FrameTooLarge {
                size: 4096,
                limit: 1000
            })
        );
    }

    #[test]
    fn client_role_reads_unmasked_server_frames() {
        let mut buf = BytesMut::new();
        encode_frame(&mut buf, true, false, OpCode::Text, b"hi", None);
        let mut dec = FrameDecoder::new(Role::Client, 1 << 20, false);
        assert_eq!(&dec.decode(&mut buf).unwrap().unwrap().payload[..], b"hi");
    }
}
