//! Property: the decoder gives the same result however its input is split, and
//! never panics on any input. This is the stable-toolchain twin of `fuzz/`.

use bytes::BytesMut;
use proptest::prelude::*;
use switchboard_proto::frame::encode_frame;
use switchboard_proto::{Limits, Message, MessageDecoder, OpCode, ProtocolError, Role};

/// Everything a decoder yields for a byte stream fed in the given pieces.
fn decode_in_pieces(
    input: &[u8],
    cuts: &[usize],
    compression: bool,
) -> (Vec<Message>, Option<ProtocolError>) {
    let limits = Limits {
        max_frame_size: 4096,
        max_message_size: 8192,
    };
    let mut decoder = MessageDecoder::new(Role::Server, limits, compression, true);
    let mut buf = BytesMut::new();
    let mut messages = Vec::new();
    let mut start = 0;
    let mut ends: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    ends.sort_unstable();
    ends.push(input.len());
    for end in ends {
        buf.extend_from_slice(&input[start..end.max(start)]);
        start = end.max(start);
        loop {
            match decoder.next(&mut buf) {
                Ok(Some(Message::Close(reason))) => {
                    messages.push(Message::Close(reason));
                    return (messages, None);
                }
                Ok(Some(message)) => messages.push(message),
                Ok(None) => break,
                Err(e) => return (messages, Some(e)),
            }
        }
    }
    (messages, None)
}

/// A byte stream of plausible client frames, some of them broken.
fn frames() -> impl Strategy<Value = Vec<u8>> {
    let frame = (
        any::<bool>(),
        prop::sample::select(vec![0u8, 1, 2, 8, 9, 10, 3]),
        prop::collection::vec(any::<u8>(), 0..300),
        any::<[u8; 4]>(),
    );
    prop::collection::vec(frame, 0..8).prop_map(|frames| {
        let mut out = BytesMut::new();
        for (fin, op, payload, mask) in frames {
            let opcode = match op {
                0 => OpCode::Continuation,
                1 => OpCode::Text,
                2 => OpCode::Binary,
                8 => OpCode::Close,
                9 => OpCode::Ping,
                _ => OpCode::Pong,
            };
            encode_frame(&mut out, fin, false, opcode, &payload, Some(mask));
        }
        out.to_vec()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_bytes_split_anywhere_decode_the_same(
        input in prop::collection::vec(any::<u8>(), 0..600),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
        compression in any::<bool>(),
    ) {
        let whole = decode_in_pieces(&input, &[], compression);
        let split = decode_in_pieces(&input, &cuts, compression);
        prop_assert_eq!(whole.0, split.0);
        // A split stream may fail earlier (fail-fast UTF-8), but never differently.
        prop_assert_eq!(whole.1, split.1);
    }

    #[test]
    fn framed_streams_split_anywhere_decode_the_same(
        input in frames(),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let whole = decode_in_pieces(&input, &[], false);
        let split = decode_in_pieces(&input, &cuts, false);
        prop_assert_eq!(whole, split);
    }
}

#[test]
fn byte_at_a_time_equals_whole_for_a_mixed_stream() {
    let mut input = BytesMut::new();
    encode_frame(
        &mut input,
        false,
        false,
        OpCode::Text,
        "héllo ".as_bytes(),
        Some([1, 2, 3, 4]),
    );
    encode_frame(
        &mut input,
        true,
        false,
        OpCode::Ping,
        b"ping",
        Some([5, 6, 7, 8]),
    );
    encode_frame(
        &mut input,
        true,
        false,
        OpCode::Continuation,
        "wörld".as_bytes(),
        Some([9, 9, 9, 9]),
    );
    encode_frame(
        &mut input,
        true,
        false,
        OpCode::Binary,
        &[0, 1, 2],
        Some([0, 0, 0, 1]),
    );
    let every_byte: Vec<usize> = (0..input.len()).collect();
    let whole = decode_in_pieces(&input, &[], false);
    assert_eq!(whole, decode_in_pieces(&input, &every_byte, false));
    assert_eq!(whole.0.len(), 3);
    assert_eq!(whole.0[1], Message::text("héllo wörld"));
}
