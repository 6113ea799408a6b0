//! Properties of the decoder: it gives the same result however its input is
//! split, it never panics on any input (the stable-toolchain twin of `fuzz/`),
//! what it decodes is exactly what was encoded (every length form, fragments,
//! pings between them, compression), and it refuses reserved bits it was not
//! given a meaning for.

use bytes::BytesMut;
use proptest::prelude::*;
use switchboard_proto::deflate::{DeflateParams, Deflater, PeerContext};
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
    decode_with(input, cuts, compression, limits)
}

/// [`decode_in_pieces`] with the given limits.
fn decode_with(
    input: &[u8],
    cuts: &[usize],
    compression: Option<PeerContext>,
    limits: Limits,
) -> (Vec<Message>, Option<ProtocolError>) {
    let (messages, error, _) = decode_renewing(input, cuts, compression, limits, false);
    (messages, error)
}

/// [`decode_with`], which, when `renew` is set, replaces the decoder with a
/// new one made from its limits wherever the input so far is used up and the
/// decoder says it is at rest, as a hibernating connection does; also returns
/// how many times it did.
fn decode_renewing(
    input: &[u8],
    cuts: &[usize],
    compression: Option<PeerContext>,
    limits: Limits,
    renew: bool,
) -> (Vec<Message>, Option<ProtocolError>, usize) {
    let mut decoder = MessageDecoder::new(Role::Server, limits, compression);
    let mut renewed = 0;
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
                    return (messages, None, renewed);
                }
                Ok(Some(message)) => messages.push(message),
                Ok(None) => break,
                Err(e) => return (messages, Some(e), renewed),
            }
        }
        // As the connection's driver does after each message: what was
        // inflated is charged, and a decoder holding an uncharged count is
        // not at rest.
        decoder.take_inflated();
        if renew && buf.is_empty() && decoder.at_rest() {
            assert_eq!(decoder.limits(), limits);
            assert_eq!(decoder.peer_context(), compression);
            decoder = MessageDecoder::new(Role::Server, decoder.limits(), decoder.peer_context());
            renewed += 1;
        }
    }
    (messages, None, renewed)
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

/// One message as a client would send it: its content, whether it is
/// compressed, where its (possibly compressed) payload is cut into fragments,
/// and the ping sent between its first two fragments, if any.
#[derive(Debug, Clone)]
struct Planned {
    message: Message,
    compressed: bool,
    cuts: Vec<usize>,
    ping: Option<Vec<u8>>,
}

/// A payload length from each of the three length forms (7-bit, 16-bit and
/// 64-bit, RFC 6455 §5.2), with their edges.
fn length() -> impl Strategy<Value = usize> {
    prop_oneof![
        0..=125usize,
        Just(126usize),
        126..=3000usize,
        Just(65535usize),
        Just(65536usize),
        65536..=70_000usize,
    ]
}

fn planned() -> impl Strategy<Value = Planned> {
    (
        any::<bool>(),
        length(),
        "[a-zé€😀 ]{1,16}",
        any::<bool>(),
        prop::collection::vec(any::<usize>(), 0..4),
        prop::option::of(prop::collection::vec(any::<u8>(), 0..=125)),
    )
        .prop_map(|(text, len, seed, compressed, cuts, ping)| {
            // Content that repeats, so it compresses, cut at a character boundary.
            let mut content = seed.repeat(len / seed.len() + 1);
            let mut end = len.min(content.len());
            while !content.is_char_boundary(end) {
                end -= 1;
            }
            content.truncate(end);
            let message = if text {
                Message::text(content)
            } else {
                Message::binary(content.into_bytes())
            };
            Planned {
                message,
                compressed,
                cuts,
                ping,
            }
        })
}

/// Encodes `plan` as masked client frames (compressed with a context kept
/// across messages, as `PeerContext::Kept` expects), and returns the bytes and
/// the messages a decoder must give back, in order.
fn encode(plan: &[Planned]) -> (Vec<u8>, Vec<Message>) {
    encode_with(plan, false)
}

/// [`encode`], compressing each message on its own when `reset` (as
/// `PeerContext::Reset` expects).
fn encode_with(plan: &[Planned], reset: bool) -> (Vec<u8>, Vec<Message>) {
    let params = DeflateParams {
        // The test's deflater plays the client, but is built as a server's.
        server_no_context_takeover: reset,
        client_no_context_takeover: false,
        server_max_window_bits: 15,
        server_window_asked: false,
        level: 6,
        min_size: 0,
    };
    let mut deflater = Deflater::new(&params);
    let mut out = BytesMut::new();
    let mut expected = Vec::new();
    for (i, planned) in plan.iter().enumerate() {
        let (opcode, content) = match &planned.message {
            Message::Text(text) => (OpCode::Text, text.as_bytes().to_vec()),
            Message::Binary(data) => (OpCode::Binary, data.to_vec()),
            _ => unreachable!("only data messages are planned"),
        };
        let payload = if planned.compressed {
            deflater.compress(&content).to_vec()
        } else {
            content
        };
        let mut cuts: Vec<usize> = planned
            .cuts
            .iter()
            .map(|c| c % (payload.len() + 1))
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        cuts.push(payload.len());
        let mut start = 0;
        let last = cuts.len() - 1;
        for (n, end) in cuts.into_iter().enumerate() {
            let (op, rsv1) = if n == 0 {
                (opcode, planned.compressed)
            } else {
                (OpCode::Continuation, false)
            };
            let mask = [i as u8, n as u8, 0x5a, 0xa5];
            encode_frame(
                &mut out,
                n == last,
                rsv1,
                op,
                &payload[start..end],
                Some(mask),
            );
            start = end;
            if n == 0
                && n != last
                && let Some(ping) = &planned.ping
            {
                encode_frame(&mut out, true, false, OpCode::Ping, ping, Some(mask));
                expected.push(Message::Ping(ping.clone().into()));
            }
        }
        expected.push(planned.message.clone());
    }
    (out.to_vec(), expected)
}

/// Limits that every planned message fits.
const ROOMY: Limits = Limits {
    max_frame_size: 1 << 20,
    max_message_size: 1 << 20,
};

/// The offsets of each frame's first byte in a stream of whole frames.
fn frame_starts(input: &[u8]) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut at = 0;
    while at < input.len() {
        starts.push(at);
        let short = usize::from(input[at + 1] & 0x7f);
        let (len, header) = match short {
            126 => (
                usize::from(u16::from_be_bytes([input[at + 2], input[at + 3]])),
                4,
            ),
            127 => {
                let bytes: [u8; 8] = input[at + 2..at + 10].try_into().unwrap();
                (usize::try_from(u64::from_be_bytes(bytes)).unwrap(), 10)
            }
            n => (n, 2),
        };
        at += header + 4 + len;
    }
    starts
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// What comes out is what went in: every message, byte for byte, in order,
    /// with the pings sent between fragments, however the stream is split.
    #[test]
    fn decoded_messages_are_exactly_the_encoded_ones(
        plan in prop::collection::vec(planned(), 1..5),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let (input, expected) = encode(&plan);
        let (decoded, error) = decode_with(&input, &cuts, Some(PeerContext::Kept), ROOMY);
        prop_assert_eq!(error, None);
        prop_assert_eq!(decoded, expected);
    }

    /// A reserved bit with no meaning agreed fails the connection at that frame
    /// (RFC 6455 §5.2): RSV2 or RSV3 anywhere, RSV1 without compression.
    #[test]
    fn unagreed_reserved_bits_are_refused_at_their_frame(
        plan in prop::collection::vec(planned(), 1..4),
        pick in any::<usize>(),
        bit in prop::sample::select(vec![0x40u8, 0x20, 0x10]),
    ) {
        let plan: Vec<Planned> = plan
            .into_iter()
            .map(|p| Planned { compressed: false, ..p })
            .collect();
        let (mut input, _) = encode(&plan);
        let starts = frame_starts(&input);
        let at = starts[pick % starts.len()];
        input[at] |= bit;
        let (_, error) = decode_with(&input, &[], None, ROOMY);
        prop_assert_eq!(error, Some(ProtocolError::ReservedBits));
        // Nothing from that frame on was handed out: the stream before it
        // decodes as it did.
        let (before, _) = decode_with(&input[..at], &[], None, ROOMY);
        let (with_bad, _) = decode_with(&input, &[], None, ROOMY);
        prop_assert_eq!(before, with_bad);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// A decoder that says it is at rest holds nothing a new one would not:
    /// replacing it there (between fragments too, or after a message that a
    /// peer keeping its context compressed, if it said so wrongly) changes
    /// nothing that is decoded, however the stream is split.
    #[test]
    fn a_decoder_at_rest_can_be_made_again_from_its_limits(
        plan in prop::collection::vec(planned(), 1..5),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
        compression in prop::option::of(prop_oneof![Just(PeerContext::Kept), Just(PeerContext::Reset)]),
    ) {
        let mut plan: Vec<Planned> = plan
            .into_iter()
            .map(|p| Planned { compressed: p.compressed && compression.is_some(), ..p })
            .collect();
        // One message twice, so that a context kept is used: the second copy
        // compresses to a reference to the first.
        let twice = Planned {
            message: Message::text("words said twice, which the second time compress to a reference"),
            compressed: compression.is_some(),
            cuts: Vec::new(),
            ping: None,
        };
        plan.extend([twice.clone(), twice]);
        let (input, expected) = encode_with(&plan, compression == Some(PeerContext::Reset));
        // Cut before every frame too, so that each is a chance to renew.
        let mut cuts = cuts;
        cuts.extend(frame_starts(&input));
        let (decoded, error, renewed) = decode_renewing(&input, &cuts, compression, ROOMY, true);
        prop_assert_eq!(error, None);
        prop_assert_eq!(decoded, expected);
        // The stream ends after a whole message: at rest there at least,
        // unless the peer compressed with a context it keeps.
        let kept = compression == Some(PeerContext::Kept) && plan.iter().any(|p| p.compressed);
        prop_assert!(kept || renewed >= 1);
    }
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

/// Between the fragments of a message, or inside a frame, a decoder is not at
/// rest, even when all that arrived has been taken from the buffer.
#[test]
fn a_decoder_is_not_at_rest_inside_a_message_or_a_frame() {
    let mut decoder = MessageDecoder::new(Role::Server, Limits::default(), None);
    assert!(decoder.at_rest());
    let mut buf = BytesMut::new();
    encode_frame(
        &mut buf,
        false,
        false,
        OpCode::Text,
        b"half",
        Some([1, 2, 3, 4]),
    );
    assert_eq!(decoder.next(&mut buf), Ok(None));
    assert!(buf.is_empty());
    assert!(!decoder.at_rest());
    encode_frame(
        &mut buf,
        true,
        false,
        OpCode::Continuation,
        b"!",
        Some([1, 2, 3, 4]),
    );
    assert_eq!(decoder.next(&mut buf), Ok(Some(Message::text("half!"))));
    assert!(decoder.at_rest());
    // A text frame whose payload has partly arrived (and been checked).
    let mut frame = BytesMut::new();
    encode_frame(
        &mut frame,
        true,
        false,
        OpCode::Text,
        b"partly",
        Some([1, 2, 3, 4]),
    );
    buf.extend_from_slice(&frame[..frame.len() - 2]);
    assert_eq!(decoder.next(&mut buf), Ok(None));
    assert!(!decoder.at_rest());
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
