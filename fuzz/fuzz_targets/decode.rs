//! Run with `cargo +nightly fuzz run decode` (from `fuzz/`).
//!
//! Feeds arbitrary bytes, split at fuzzer-chosen points, to the message
//! decoder (with and without compression). It must never panic, and the split
//! stream must decode exactly like the whole one.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use switchboard_proto::deflate::PeerContext;
use switchboard_proto::{Limits, Message, MessageDecoder, ProtocolError, Role};

fn decode(input: &[u8], split: usize, compression: Option<PeerContext>) -> (Vec<Message>, Option<ProtocolError>) {
    let limits = Limits {
        max_frame_size: 1 << 16,
        max_message_size: 1 << 18,
    };
    let mut decoder = MessageDecoder::new(Role::Server, limits, compression);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in [&input[..split], &input[split..]] {
        buf.extend_from_slice(piece);
        loop {
            match decoder.next(&mut buf) {
                Ok(Some(Message::Close(reason))) => {
                    out.push(Message::Close(reason));
                    return (out, None);
                }
                Ok(Some(message)) => out.push(message),
                Ok(None) => break,
                Err(error) => return (out, Some(error)),
            }
        }
    }
    (out, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, input)) = data.split_first() else {
        return;
    };
    let compression = match control & 3 {
        0 => None,
        1 => Some(PeerContext::Kept),
        _ => Some(PeerContext::Reset),
    };
    let split = usize::from(control >> 2) % (input.len() + 1);
    assert_eq!(decode(input, input.len(), compression), decode(input, split, compression));
});
