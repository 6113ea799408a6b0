//! The connection's outgoing side: frames gather in a scratch buffer, shared
//! frames (encoded once for many connections) wait in a queue, and both go out
//! in as few writes as the socket takes. Pongs are tracked here too, because
//! whether a ping gets its own pong depends on what is still unwritten.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use switchboard_proto::Message;
use switchboard_proto::message::MessageEncoder;
use tokio::io::AsyncWrite;

use crate::mailbox::Mailbox;

/// Most buffers handed to one vectored write.
const MAX_IOVECS: usize = 64;
/// Initial size of the buffer where the connection's own frames gather before a write.
const SCRATCH_START: usize = 1024;

/// What waits to be written, and how.
pub(super) struct Writer {
    encoder: MessageEncoder,
    /// Written in order, before the scratch buffer: allocated only for shared
    /// frames (those the mailbox holds when the task runs), and for frames
    /// gathered behind them.
    queue: VecDeque<Bytes>,
    /// The connection's own frames, gathered until the next write (one buffer
    /// for a burst of replies, not one allocation each). Always after the queue.
    scratch: BytesMut,
    /// Everything written has been flushed.
    flushed: bool,
    /// Our side of the TCP connection is shut down.
    shut: bool,
    /// Bytes to write until our latest pong is out (those queued before it, and
    /// itself); 0 when it is.
    pong_unwritten: usize,
    /// A write began while that pong waited: it is stuck behind a full socket.
    pong_tried: bool,
    /// The latest ping that arrived while our pong to an earlier one was stuck
    /// unwritten: only it gets answered (RFC 6455 §5.5.3), so a ping flood
    /// queues one read's worth of pongs at most. Pings that arrive together,
    /// before a write, each get their pong, as peers (and Autobahn 2.10) expect.
    /// Boxed: it is rare, and every idle connection carries the field.
    pending_pong: Option<Box<Bytes>>,
}

impl Writer {
    pub(super) fn new(encoder: MessageEncoder) -> Self {
        Self {
            encoder,
            queue: VecDeque::new(),
            scratch: BytesMut::new(),
            flushed: true,
            shut: false,
            pong_unwritten: 0,
            pong_tried: false,
            pending_pong: None,
        }
    }

    /// The encoder, for a connection that hibernates (its writer is idle).
    pub(super) fn into_encoder(self) -> MessageEncoder {
        self.encoder
    }

    pub(super) fn encoder(&mut self) -> &mut MessageEncoder {
        &mut self.encoder
    }

    /// Nothing is queued, gathered or unflushed.
    pub(super) fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.scratch.is_empty() && self.flushed
    }

    /// Our side of the TCP connection is shut down.
    pub(super) fn is_shut(&self) -> bool {
        self.shut
    }

    /// Drops whatever is still unwritten: the peer will not take it.
    pub(super) fn discard(&mut self) {
        self.queue.clear();
        self.scratch.clear();
    }

    /// Gives up on the socket: drops what is unwritten, and counts it flushed
    /// and shut, so the connection ends now (the socket closes as it is
    /// dropped). Past the close timeout, waiting for a flush or a shutdown
    /// could be for ever: over TLS, both wait on the encrypted bytes still
    /// held for a peer that does not read.
    pub(super) fn abandon(&mut self) {
        self.discard();
        self.flushed = true;
        self.shut = true;
    }

    /// Encodes `message` after the frames already gathered, charging it to the
    /// outbound budget. Returns the frame's length.
    pub(super) fn push_frame<I>(&mut self, message: &Message, mailbox: &Mailbox<I>) -> usize {
        debug_assert!(!mailbox.is_parked(), "output taken while pushers write");
        if let Message::Close(_) = message {
            // Nothing follows a close frame (RFC 6455 §5.5.1): not a pong
            // held back for a ping read before it.
            self.pending_pong = None;
        }
        if self.scratch.capacity() == 0 {
            // Room for a burst of small frames without regrowing; it is given
            // back once written.
            self.scratch.reserve(SCRATCH_START);
        }
        let before = self.scratch.len();
        self.encoder.encode(message, &mut self.scratch);
        let len = self.scratch.len() - before;
        mailbox.charge(len);
        len
    }

    /// Queues an encoded frame after everything before it, charging it to the
    /// outbound budget.
    pub(super) fn push_encoded<I>(&mut self, bytes: Bytes, mailbox: &Mailbox<I>) {
        debug_assert!(!mailbox.is_parked(), "output taken while pushers write");
        mailbox.charge(bytes.len());
        self.queue_scratch();
        self.queue.push_back(bytes);
    }

    /// Answers a ping, unless our pong to an earlier one is stuck behind a full
    /// socket: then only the latest waiting ping is answered, once it is out.
    pub(super) fn answer_ping<I>(&mut self, payload: &Bytes, mailbox: &Mailbox<I>) {
        if self.pong_unwritten > 0 && self.pong_tried {
            self.pending_pong = Some(Box::new(payload.clone()));
        } else {
            self.push_pong(payload.clone(), mailbox);
        }
    }

    fn push_pong<I>(&mut self, payload: Bytes, mailbox: &Mailbox<I>) {
        self.push_frame(&Message::Pong(payload), mailbox);
        self.pong_unwritten = self.queue.iter().map(Bytes::len).sum::<usize>() + self.scratch.len();
        self.pong_tried = false;
    }

    /// Moves the gathered frames onto the queue, behind what is there.
    fn queue_scratch(&mut self) {
        if !self.scratch.is_empty() {
            let frames = self.scratch.split().freeze();
            self.queue.push_back(frames);
        }
    }

    /// Writes until everything is out, or the socket is full.
    pub(super) fn poll_write<S, I>(
        &mut self,
        io: &mut S,
        cx: &mut TaskContext<'_>,
        mailbox: &Mailbox<I>,
    ) -> Poll<std::io::Result<()>>
    where
        S: AsyncWrite + Unpin,
    {
        loop {
            // The pong held back for a later ping goes out once the one before it has.
            if self.pong_unwritten == 0
                && let Some(payload) = self.pending_pong.take()
            {
                self.push_pong(*payload, mailbox);
            }
            self.pong_tried |= self.pong_unwritten > 0;
            let written = if self.queue.is_empty() {
                if self.scratch.is_empty() {
                    break;
                }
                // Nothing is queued before the gathered frames: they go out
                // from the scratch buffer itself, so replies (an echo, an ack)
                // never allocate the queue or share the buffer.
                let written = ready!(Pin::new(&mut *io).poll_write(cx, &self.scratch))?;
                self.scratch.advance(written.min(self.scratch.len()));
                written
            } else {
                self.queue_scratch();
                let written = ready!(self.poll_write_queue(io, cx))?;
                self.consume_queued(written);
                written
            };
            if written == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            mailbox.release(written);
            self.pong_unwritten = self.pong_unwritten.saturating_sub(written);
            self.flushed = false;
        }
        if !self.flushed {
            ready!(Pin::new(io).poll_flush(cx))?;
            self.flushed = true;
            // Everything is written: give back what encoding and queueing held.
            self.scratch = BytesMut::new();
            if self.queue.capacity() > MAX_IOVECS {
                self.queue = VecDeque::new();
            }
        }
        Poll::Ready(Ok(()))
    }

    fn poll_write_queue<S: AsyncWrite + Unpin>(
        &self,
        io: &mut S,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<usize>> {
        let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
        let count = self.queue.len().min(MAX_IOVECS);
        for (slice, bytes) in slices.iter_mut().zip(self.queue.iter()) {
            *slice = IoSlice::new(bytes);
        }
        Pin::new(io).poll_write_vectored(cx, &slices[..count])
    }

    fn consume_queued(&mut self, mut written: usize) {
        while written > 0 {
            let front = self.queue.front_mut().expect("wrote more than was queued");
            if front.len() <= written {
                written -= front.len();
                self.queue.pop_front();
            } else {
                front.advance(written);
                written = 0;
            }
        }
    }

    /// Shuts our side of the TCP connection down once everything is written;
    /// true when that happened now.
    pub(super) fn poll_shut<S: AsyncWrite + Unpin>(
        &mut self,
        io: &mut S,
        cx: &mut TaskContext<'_>,
    ) -> bool {
        if self.shut || !self.is_idle() {
            return false;
        }
        // We close the TCP connection first, as RFC 6455 §7.1.1 asks of servers.
        self.shut = Pin::new(io).poll_shutdown(cx).is_ready();
        self.shut
    }
}

#[cfg(test)]
mod tests {
    use std::task::Poll;

    use switchboard_proto::{CloseCode, CloseReason, FrameDecoder, OpCode, Role};
    use tokio::io::AsyncReadExt;

    use super::*;
    use crate::Options;
    use crate::handle::ConnId;

    /// Writes what the pipe takes now.
    async fn flush(writer: &mut Writer, io: &mut tokio::io::DuplexStream, mailbox: &Mailbox<()>) {
        std::future::poll_fn(|cx| {
            let _ = writer.poll_write(io, cx, mailbox);
            Poll::Ready(())
        })
        .await;
    }

    #[tokio::test]
    async fn no_pong_held_back_goes_out_after_a_close() {
        // A pipe that takes 16 bytes at a time: the first pong goes out in part.
        let (mut peer, mut io) = tokio::io::duplex(16);
        let mailbox = Mailbox::<()>::new(ConnId::next(), &Options::default());
        let mut writer = Writer::new(MessageEncoder::new(Role::Server, None));
        writer.answer_ping(&Bytes::from(vec![1; 100]), &mailbox);
        flush(&mut writer, &mut io, &mailbox).await;
        // A second ping while the first pong is unwritten: its pong waits.
        writer.answer_ping(&Bytes::from(vec![2; 100]), &mailbox);
        let close = CloseReason::new(CloseCode::NORMAL, "");
        writer.push_frame(&Message::Close(Some(close)), &mailbox);
        let mut bytes = BytesMut::new();
        for _ in 0..100 {
            flush(&mut writer, &mut io, &mailbox).await;
            let mut chunk = [0; 64];
            let read =
                tokio::time::timeout(std::time::Duration::from_millis(20), peer.read(&mut chunk));
            match read.await {
                Ok(Ok(n)) if n > 0 => bytes.extend_from_slice(&chunk[..n]),
                _ => break,
            }
        }
        let mut decoder = FrameDecoder::new(Role::Client, 1 << 20, false);
        let mut opcodes = Vec::new();
        while let Some(frame) = decoder.decode(&mut bytes).unwrap() {
            opcodes.push(frame.opcode);
        }
        assert_eq!(opcodes, [OpCode::Pong, OpCode::Close]);
    }
}
