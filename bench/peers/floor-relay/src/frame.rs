//! The least of RFC 6455 a relay needs: whole client frames (masked, not
//! fragmented, not compressed) in, unmasked server frames out.

/// One frame read from a client, unmasked in place.
pub struct Frame<'a> {
    pub opcode: u8,
    pub payload: &'a [u8],
}

/// Why a connection must end.
#[derive(Debug)]
pub struct Violation;

/// The next whole frame at the start of `buf` and its length on the wire, or
/// `None` if it has not all arrived. Fragmented and unmasked frames are refused:
/// the bench's clients send neither.
pub fn parse(buf: &mut [u8]) -> Result<Option<(Frame<'_>, usize)>, Violation> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x80 == 0 || b0 & 0x70 != 0 || b1 & 0x80 == 0 {
        return Err(Violation);
    }
    let (len, mut at) = match b1 & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => {
            let mut be = [0; 8];
            be.copy_from_slice(&buf[2..10]);
            (
                usize::try_from(u64::from_be_bytes(be)).map_err(|_| Violation)?,
                10,
            )
        }
        126 | 127 => return Ok(None),
        len => (len as usize, 2),
    };
    let end = at + 4 + len;
    if buf.len() < end {
        return Ok(None);
    }
    let mut mask = [0; 4];
    mask.copy_from_slice(&buf[at..at + 4]);
    at += 4;
    let payload = &mut buf[at..end];
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
    Ok(Some((
        Frame {
            opcode: b0 & 0x0f,
            payload,
        },
        end,
    )))
}

/// Appends a whole unmasked server frame carrying `payload` to `out`.
pub fn encode(opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
    out.push(0x80 | opcode);
    match payload.len() {
        len @ 0..=125 => out.push(len as u8),
        len @ 126..=0xffff => {
            out.push(126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

/// Opcodes.
pub const TEXT: u8 = 1;
pub const CLOSE: u8 = 8;
pub const PING: u8 = 9;
pub const PONG: u8 = 10;
