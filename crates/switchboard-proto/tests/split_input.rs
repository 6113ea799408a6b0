//! Property: the decoder gives the same result however its input is split, and
//! never panics on any input. This is the stable-toolchain twin of `fuzz/`.

use bytes::BytesMut;
use proptest::prelude::*;
use switchboard_proto::deflate::PeerContext;
use switchboard_proto::frame::encode_frame;
use switchboard_proto::{Limits, Message, MessageDecoder, OpCode, ProtocolError, Role};

/// Everything a decoder yields for a byte stream fed in the given pieces.
fn decode_in_pieces(
    input: &[u8],
    cuts: &[usize],
    compression: Option<PeerContext>,
) -> (Vec<Message>, Option<ProtocolError>) {
    let limits = Limits {
        max_frame_size: 4096,
        max_message_size: 8192,
    };
    let mut decoder = MessageDecoder::new(Role::Server, limits, compression);
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
        compression in prop::option::of(prop_oneof![Just(PeerContext::Kept), Just(PeerContext::Reset)]),
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
        let whole = decode_in_pieces(&input, &[], None);
        let split = decode_in_pieces(&input, &cuts, None);
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
    let whole = decode_in_pieces(&input, &[], None);
    assert_eq!(whole, decode_in_pieces(&input, &every_byte, None));
    assert_eq!(whole.0.len(), 3);
    assert_eq!(whole.0[1], Message::text("héllo wörld"));
}

/// Found by `fuzz/decode`: RSV1 on a continuation frame was only rejected once the
/// frame was complete, so a split stream failed differently (on UTF-8 first).
#[test]
fn rsv1_on_a_continuation_fails_the_same_way_split_or_whole() {
    let input = fuzzer_input();
    let whole = decode_in_pieces(&input, &[], Some(PeerContext::Kept));
    let split = decode_in_pieces(&input, &[19], Some(PeerContext::Kept));
    assert_eq!(whole, split);
    assert_eq!(whole.1, Some(ProtocolError::ReservedBits));
}

/// Fuzzer input: a text fragment, then a continuation frame with RSV1 set.
fn fuzzer_input() -> Vec<u8> {
    vec![
        0x01, 0x81, 0xd2, 0x00, 0x81, 0x08, 0x0e, 0x40, 0x89, 0x01, 0x41, 0x81, 0xd2, 0x81, 0x00,
        0x08, 0x00, 0x89, 0x01, 0x3b, 0x81, 0x41, 0x81, 0xd2, 0x81, 0x0e, 0x00, 0x08, 0x00, 0x89,
        0x01, 0x5d, 0x00, 0x0e, 0x00, 0x00, 0x00, 0x00, 0xfe, 0x00, 0x00, 0x00, 0x00, 0x7e,
    ]
}

/// The size limit and UTF-8 fail-fast agree on which error comes first: a
/// fragment that both overflows the message limit and holds invalid UTF-8.
#[test]
fn oversize_invalid_text_fails_the_same_way_split_or_whole() {
    let mut input = BytesMut::new();
    encode_frame(
        &mut input,
        false,
        false,
        OpCode::Text,
        &[b'a'; 4000],
        Some([1, 2, 3, 4]),
    );
    encode_frame(
        &mut input,
        false,
        false,
        OpCode::Continuation,
        &[b'b'; 4000],
        Some([1, 2, 3, 4]),
    );
    let last = [b"\xff".as_slice(), &[b'c'; 999]].concat();
    encode_frame(
        &mut input,
        true,
        false,
        OpCode::Continuation,
        &last,
        Some([1, 2, 3, 4]),
    );
    let whole = decode_in_pieces(&input, &[], None);
    let split_in_last_frame = decode_in_pieces(&input, &[input.len() - 500], None);
    assert_eq!(whole, split_in_last_frame);
    assert_eq!(whole.1, Some(ProtocolError::InvalidUtf8));
}
