//! The driver against an in-memory pipe with a small buffer: what it queues
//! for a peer that never reads, measured exactly.

use std::time::Duration;

use bytes::BytesMut;
use switchboard_proto::frame::encode_frame;
use switchboard_proto::{FrameDecoder, OpCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;
use crate::handle::ConnId;

/// Bytes the pipe holds in each direction: what a peer that never reads can
/// take before writes stall.
const PIPE: usize = 64 * 1024;

/// Echoes every data message, and keeps why the connection ended.
struct Echo(Arc<std::sync::Mutex<Option<TerminateReason>>>);

impl Handler for Echo {
    type Info = ();
    fn handle_in(&mut self, message: Message, _ctx: &mut Context<'_, ()>) -> Outcome {
        Outcome::push(message)
    }
    fn terminate(&mut self, reason: &TerminateReason) {
        *self.0.lock().unwrap() = Some(reason.clone());
    }
}

type Ended = Arc<std::sync::Mutex<Option<TerminateReason>>>;

/// Echoes every data message through its own mailbox, as a message the
/// service relays to its sender's own id reaches it.
struct EchoByMail;

impl Handler for EchoByMail {
    type Info = ();
    fn handle_in(&mut self, message: Message, ctx: &mut Context<'_, ()>) -> Outcome {
        ctx.handle().push(message).expect("the mailbox takes it");
        Outcome::Continue
    }
}

/// Mails a welcome from `init`; answers `sub` with an ack and mails a replay
/// behind it (as a subscribe with history does); answers anything else.
struct Ordered;

impl Handler for Ordered {
    type Info = ();
    fn init(&mut self, ctx: &mut Context<'_, ()>) -> Outcome {
        ctx.handle().push(Message::text("welcome")).unwrap();
        Outcome::Continue
    }
    fn handle_in(&mut self, message: Message, ctx: &mut Context<'_, ()>) -> Outcome {
        let Message::Text(text) = message else {
            return Outcome::Continue;
        };
        let text = text.as_str().trim_end();
        if text == "sub" {
            ctx.handle().push(Message::text("replay")).unwrap();
        }
        Outcome::push(Message::text(format!("ack {text}")))
    }
}

/// Answers a message with a close, and pushes a message behind it.
struct CloseThenMore;

impl Handler for CloseThenMore {
    type Info = ();
    fn handle_in(&mut self, _message: Message, _ctx: &mut Context<'_, ()>) -> Outcome {
        let close = Message::Close(Some(CloseReason::new(CloseCode::NORMAL, "bye")));
        Outcome::Push(vec![close.into(), Message::text("after").into()])
    }
}

/// A running driver for `Echo` over one end of a pipe; returns the other end
/// (the client), the mailbox, whose queue size the tests watch, and where
/// `terminate`'s reason lands.
fn start(options: Options) -> (DuplexStream, Arc<Mailbox<()>>, Ended) {
    let ended = Ended::default();
    let (client, mailbox) = start_with(options, Echo(ended.clone()), &[]);
    (client, mailbox, ended)
}

/// The text messages the pipe holds now, in order.
async fn read_texts(client: &mut DuplexStream) -> Vec<String> {
    let frames = read_all(client).await.into_iter();
    frames
        .map(|(_, payload)| String::from_utf8(payload.to_vec()).unwrap())
        .collect()
}

/// A running driver for `handler` over one end of a pipe, started as an
/// upgrade starts one (`init` has run, and `early`, bytes that came with the
/// handshake, is decoded): the other end and the mailbox.
fn start_with<H: Handler<Info = ()>>(
    options: Options,
    handler: H,
    early: &[u8],
) -> (DuplexStream, Arc<Mailbox<()>>) {
    let (client, server) = tokio::io::duplex(PIPE);
    let mailbox = Arc::new(Mailbox::new(ConnId::next(), &options));
    let setup = Setup {
        role: Role::Server,
        options,
        deflate: None,
        peer_context: None,
        protocol: None,
        shutdown: None,
        on_failed: None,
    };
    let mut driver = Driver::start(server, handler, mailbox.clone(), setup, None, early);
    tokio::spawn(async move {
        std::future::poll_fn(|cx| driver.poll_run(cx)).await;
        driver.finish();
    });
    (client, mailbox)
}

fn client_frame(opcode: OpCode, payload: &[u8]) -> BytesMut {
    let mut out = BytesMut::new();
    encode_frame(&mut out, true, false, opcode, payload, Some([1, 2, 3, 4]));
    out
}

/// Writes `frame` `times` times, or until the pipe stays full for 200 ms;
/// returns how many went through.
async fn write_until_stalled(client: &mut DuplexStream, frame: &[u8], times: usize) -> usize {
    for sent in 0..times {
        let write = tokio::time::timeout(Duration::from_millis(200), client.write_all(frame));
        if !matches!(write.await, Ok(Ok(()))) {
            return sent;
        }
    }
    times
}

/// Reads every frame the pipe holds now, by opcode.
async fn read_frames(client: &mut DuplexStream) -> Vec<OpCode> {
    let frames = read_all(client).await.into_iter();
    frames.map(|(opcode, _)| opcode).collect()
}

/// Every frame the pipe holds now (until it stays empty for 200 ms).
async fn read_all(client: &mut DuplexStream) -> Vec<(OpCode, Bytes)> {
    let mut buf = BytesMut::new();
    let mut decoder = FrameDecoder::new(Role::Client, 1 << 20, false);
    let mut frames = Vec::new();
    loop {
        while let Some(frame) = decoder.decode(&mut buf).unwrap() {
            frames.push((frame.opcode, frame.payload));
        }
        let read = tokio::time::timeout(Duration::from_millis(200), client.read_buf(&mut buf));
        match read.await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return frames,
        }
    }
}

#[tokio::test]
async fn pings_that_arrive_together_each_get_their_pong() {
    let (mut client, _, _) = start(Options::default().ping_interval(None));
    let mut pings = BytesMut::new();
    for i in 0..10u8 {
        pings.extend_from_slice(&client_frame(OpCode::Ping, &[i; 8]));
    }
    client.write_all(&pings).await.unwrap();
    let frames = read_frames(&mut client).await;
    assert_eq!(frames, vec![OpCode::Pong; 10]);
}

#[tokio::test]
async fn frames_the_mailbox_took_go_out_before_the_answer_to_the_peers_close() {
    let (mut client, _) = start_with(Options::default().ping_interval(None), EchoByMail, &[]);
    // In one read: the message is handled (its echo mailed) before the close
    // is decoded, and the mailbox had said it took the echo.
    let mut both = client_frame(OpCode::Text, b"mailed");
    both.extend_from_slice(&client_frame(OpCode::Close, &1000u16.to_be_bytes()));
    client.write_all(&both).await.unwrap();
    assert_eq!(
        read_frames(&mut client).await,
        vec![OpCode::Text, OpCode::Close]
    );
}

#[tokio::test]
async fn what_a_message_mailed_goes_out_before_the_answer_to_the_next_one() {
    // The welcome, and both messages, come with the handshake.
    let mut early = client_frame(OpCode::Text, b"sub");
    early.extend_from_slice(&client_frame(OpCode::Text, b"next"));
    let (mut client, _) = start_with(Options::default().ping_interval(None), Ordered, &early);
    assert_eq!(
        read_texts(&mut client).await,
        ["welcome", "ack sub", "replay", "ack next"]
    );
    // And within one read later on.
    let mut both = client_frame(OpCode::Text, b"sub");
    both.extend_from_slice(&client_frame(OpCode::Text, b"again"));
    client.write_all(&both).await.unwrap();
    assert_eq!(
        read_texts(&mut client).await,
        ["ack sub", "replay", "ack again"]
    );
    // And when the next message comes in another read of the same wake-up:
    // a first frame of exactly one landing read (16 KiB), then the second.
    let padded = format!("sub{}", " ".repeat(LANDING_SIZE - 8 - 3));
    let mut both = client_frame(OpCode::Text, padded.as_bytes());
    assert_eq!(both.len(), LANDING_SIZE);
    both.extend_from_slice(&client_frame(OpCode::Text, b"later"));
    client.write_all(&both).await.unwrap();
    assert_eq!(
        read_texts(&mut client).await,
        ["ack sub", "replay", "ack later"]
    );
}

#[tokio::test]
async fn nothing_a_handler_pushes_behind_its_close_goes_out() {
    let (mut client, mailbox) =
        start_with(Options::default().ping_interval(None), CloseThenMore, &[]);
    client
        .write_all(&client_frame(OpCode::Text, b"go"))
        .await
        .unwrap();
    assert_eq!(read_frames(&mut client).await, vec![OpCode::Close]);
    assert_eq!(mailbox.queued_bytes(), 0);
}

#[tokio::test]
async fn a_ping_flood_queues_one_read_of_pongs_at_most() {
    let options = Options::default().ping_interval(None);
    let (mut client, mailbox, _) = start(options);
    let ping = client_frame(OpCode::Ping, &[7; 125]);
    // 20,000 pings are 2.6 MB: forty times what the pipe holds.
    let pings = 20_000;
    assert_eq!(write_until_stalled(&mut client, &ping, pings).await, pings);
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The pongs of one read wait behind a full pipe, and one more is held for
    // the latest ping.
    let most = LANDING_SIZE / 131 * 127 + 127;
    assert!(
        mailbox.queued_bytes() <= most,
        "{} bytes queued for a ping flood",
        mailbox.queued_bytes()
    );
    let pongs = read_frames(&mut client).await;
    assert!(pongs.iter().all(|op| *op == OpCode::Pong));
    // What the pipe held, plus one read's worth queued and the one held back.
    assert!(
        pongs.len() <= PIPE / 127 + LANDING_SIZE / 131 + 2,
        "{} pongs for {pings} pings",
        pongs.len()
    );
    // The latest ping is answered even so.
    assert!(!pongs.is_empty());
}

#[tokio::test]
async fn a_peer_that_sends_and_never_reads_meets_backpressure_then_the_slow_consumer_close() {
    let budget = 256 * 1024;
    let options = Options::default()
        .max_outbound_bytes(budget)
        .slow_consumer_timeout(Duration::from_millis(500))
        .close_timeout(Duration::from_millis(200));
    let (mut client, mailbox, ended) = start(options);
    let message = client_frame(OpCode::Binary, &[9; 16 * 1024]);
    // 64 MiB offered; the server stops reading once its replies exceed the budget.
    let offered = 4096;
    let taken = write_until_stalled(&mut client, &message, offered).await;
    assert!(taken < offered, "all {offered} messages were read");
    let most = (budget + 2 * PIPE) / (16 * 1024) + 2;
    assert!(
        taken <= most,
        "{taken} messages taken, at most {most} expected"
    );
    assert!(mailbox.queued_bytes() <= budget + 16 * 1024 + 8);
    // Reading stays paused past the slow-consumer timeout: the policy closes it,
    // and at the close timeout what is queued is dropped.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(mailbox.is_closed());
    let frames = read_frames(&mut client).await;
    assert!(frames.iter().all(|op| *op == OpCode::Binary));
    assert_eq!(
        *ended.lock().unwrap(),
        Some(TerminateReason::SlowConsumer(CloseReason::new(
            CloseCode::TRY_AGAIN_LATER,
            "slow consumer: outbound buffer full"
        )))
    );
}

#[tokio::test]
async fn a_reply_left_half_written_goes_out_whole_before_a_frame_pushed_behind_it() {
    let (mut client, mailbox, _) = start(Options::default().ping_interval(None));
    // The echo is larger than the pipe: the first write takes what fits, and
    // the rest waits in the scratch buffer while the pipe is full.
    let big = vec![b'a'; PIPE + PIPE / 2];
    client
        .write_all(&client_frame(OpCode::Text, &big))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let behind = crate::PreparedMessage::text("behind");
    mailbox.push(Outbound::Prepared(behind)).unwrap();
    let mut buf = BytesMut::new();
    let mut decoder = FrameDecoder::new(Role::Client, 1 << 20, false);
    let mut frames = Vec::new();
    while frames.len() < 2 {
        let read = tokio::time::timeout(Duration::from_secs(5), client.read_buf(&mut buf));
        assert!(
            read.await.unwrap().unwrap() > 0,
            "the server stopped writing"
        );
        while let Some(frame) = decoder.decode(&mut buf).unwrap() {
            frames.push((frame.opcode, frame.payload));
        }
    }
    assert_eq!(frames[0], (OpCode::Text, Bytes::from(big)));
    assert_eq!(frames[1], (OpCode::Text, Bytes::from_static(b"behind")));
    // Everything charged to the outbound budget was given back as it was written.
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(mailbox.queued_bytes(), 0);
}

/// Every idle connection carries a driver, and tokio rounds a task up to 128
/// bytes. The service's task is tokio's 112 bytes (header, scheduler, id,
/// trailer), the span's 40 and the connection: this driver with the `Relay`
/// handler (160 bytes) in place of `Echo`'s 8. With the driver at 592 bytes
/// here that is exactly 896; one byte more and every connection's task takes
/// 1,024 (heaptrack's histogram of `loadgen idle` shows which: see
/// docs/performance.md, "Where an idle connection's memory goes").
#[test]
fn the_driver_stays_within_its_share_of_the_task() {
    let driver = std::mem::size_of::<Driver<Echo, Socket>>();
    assert!(driver <= 592, "the driver grew to {driver} bytes");
}

/// A hibernating connection keeps one allocation of its own: this record with
/// the lock and the `Arc` around it (24 bytes). With the `Relay` handler in
/// place of `Echo` (152 bytes more) that is at most 24 + 272 + 152 = 448 bytes, one of
/// jemalloc's size classes (the service's allocator); one byte more and it
/// takes 512 (docs/performance.md, "Hibernation").
#[test]
fn the_hibernation_record_stays_within_its_size_class() {
    let asleep = std::mem::size_of::<super::hibernate::Asleep<Echo>>();
    assert!(
        asleep <= 272,
        "the hibernation record grew to {asleep} bytes"
    );
}
