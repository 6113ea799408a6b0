//! The payload every scenario sends, and its check on arrival.
//!
//! A payload is compact JSON, `{"f":FROM,"s":SEQ,"t":SENT_NS,"x":CHECK,"z":"PAD"}`:
//! the sender, its sequence number, the send time in nanoseconds since the load
//! generator started, a checksum of those three, and padding up to the requested
//! size. It is canonical (no spaces, integers below 2^53, ASCII, keys in sorted
//! order), so a peer that parses and re-serialises it delivers the same bytes,
//! whether its objects keep insertion order (`JSON.stringify`) or sort their keys
//! (`serde_json::Value`). On arrival the header is parsed, the checksum checked, and the whole
//! payload regenerated and compared byte for byte: any changed byte, in the header
//! or the padding, makes the delivery count as corrupted.

use std::fmt::Write as _;

use crate::rng::mix;

/// What a payload says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Sender: a client id, or a connection index for echo.
    pub from: u32,
    /// The sender's sequence number, from 1.
    pub seq: u32,
    /// When it was sent, in nanoseconds on the load generator's clock.
    pub sent_ns: u64,
}

impl Stamp {
    /// The checksum of the header fields: 48 bits, so that JSON numbers stay exact.
    fn check(&self) -> u64 {
        mix(mix((u64::from(self.from) << 32) | u64::from(self.seq)) ^ self.sent_ns)
            & ((1 << 48) - 1)
    }

    /// The padding byte, which varies with the sequence number.
    fn pad_byte(&self) -> u8 {
        b'a' + (self.seq % 26) as u8
    }
}

/// Appends the payload for `stamp`, padded so that it is at least `size` bytes.
pub fn write(stamp: &Stamp, size: usize, out: &mut String) {
    let start = out.len();
    // Writing to a String cannot fail.
    let _ = write!(
        out,
        r#"{{"f":{},"s":{},"t":{},"x":{},"z":""#,
        stamp.from,
        stamp.seq,
        stamp.sent_ns,
        stamp.check()
    );
    let closing = r#""}"#;
    let pad = size.saturating_sub(out.len() - start + closing.len());
    out.extend(std::iter::repeat_n(char::from(stamp.pad_byte()), pad));
    out.push_str(closing);
}

/// The payload for `stamp` as a new string.
pub fn render(stamp: &Stamp, size: usize) -> String {
    let mut out = String::with_capacity(size + 8);
    write(stamp, size, &mut out);
    out
}

/// Parses and verifies a received payload that was sent with `size`. `scratch` is
/// reused between calls to regenerate the expected bytes without allocating.
pub fn check(bytes: &[u8], size: usize, scratch: &mut String) -> Option<Stamp> {
    let stamp = parse_header(bytes)?;
    scratch.clear();
    write(&stamp.0, size, scratch);
    (stamp.1 == stamp.0.check() && scratch.as_bytes() == bytes).then_some(stamp.0)
}

/// The stamp and the checksum as received.
fn parse_header(bytes: &[u8]) -> Option<(Stamp, u64)> {
    let rest = bytes.strip_prefix(br#"{"f":"#)?;
    let (from, rest) = number(rest)?;
    let rest = rest.strip_prefix(br#","s":"#)?;
    let (seq, rest) = number(rest)?;
    let rest = rest.strip_prefix(br#","t":"#)?;
    let (sent_ns, rest) = number(rest)?;
    let rest = rest.strip_prefix(br#","x":"#)?;
    let (check, _) = number(rest)?;
    let stamp = Stamp {
        from: u32::try_from(from).ok()?,
        seq: u32::try_from(seq).ok()?,
        sent_ns,
    };
    Some((stamp, check))
}

/// A decimal number at the start of `bytes`, and what follows it.
fn number(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let digits = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 19 {
        return None;
    }
    let value = bytes[..digits]
        .iter()
        .fold(0u64, |acc, &d| acc * 10 + u64::from(d - b'0'));
    Some((value, &bytes[digits..]))
}

/// The payload of a `switchboard.v1` topic delivery,
/// `{"type":"message","topic":..,"from":..,"payload":P}`: `P` is the last field.
pub fn unwrap_envelope(bytes: &[u8]) -> Option<&[u8]> {
    const KEY: &[u8] = br#""payload":"#;
    let at = bytes.windows(KEY.len()).position(|w| w == KEY)?;
    bytes[at + KEY.len()..].strip_suffix(b"}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAMP: Stamp = Stamp {
        from: 12,
        seq: 345,
        sent_ns: 6_789_000,
    };

    #[test]
    fn a_payload_round_trips_and_has_the_requested_size() {
        let text = render(&STAMP, 200);
        assert_eq!(text.len(), 200);
        assert!(serde_json::from_str::<serde_json::Value>(&text).is_ok());
        assert_eq!(check(text.as_bytes(), 200, &mut String::new()), Some(STAMP));
        // A size smaller than the header gives the header with empty padding.
        assert!(render(&STAMP, 0).ends_with(r#""z":""}"#));
    }

    #[test]
    fn any_changed_byte_is_caught() {
        let text = render(&STAMP, 100);
        for i in 0..text.len() {
            let mut bytes = text.clone().into_bytes();
            bytes[i] ^= 0x01;
            assert_eq!(check(&bytes, 100, &mut String::new()), None, "byte {i}");
        }
        assert_eq!(check(&text.as_bytes()[..99], 100, &mut String::new()), None);
    }

    #[test]
    fn re_serialising_json_keeps_the_bytes() {
        let text = render(&STAMP, 64);
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(serde_json::to_string(&value).unwrap(), text);
    }

    #[test]
    fn unwraps_a_topic_envelope() {
        let inner = render(&STAMP, 50);
        let envelope =
            format!(r#"{{"type":"message","topic":"bench:t","from":"0","payload":{inner}}}"#);
        assert_eq!(unwrap_envelope(envelope.as_bytes()), Some(inner.as_bytes()));
    }
}
