//! Run with `target/release/floor-relay 127.0.0.1:0` (bench/run.sh does).
//!
//! The bench's yardstick (issue 19): the least work a relay of the seed
//! protocol can do on this kernel. One thread, epoll through mio, a minimal
//! handshake and frame parser, no allocation per delivery, and one `send` per
//! recipient: each message is encoded once into a reused buffer and written to
//! every recipient's socket in turn. It is not a product: no limits beyond a
//! 64 MiB send backlog, no pings, no compression, no fragmented frames. It
//! speaks what the bench's scenarios use, as bench/peers/bun-relay.js does:
//!
//!   /ws?id=N  `{"targets":[..],"payload":P}` sends P to every connection of
//!             each target; with `switchboard.v1`, `{"type":"subscribe",
//!             "topic":T,"id":I}` (acked) and `{"type":"publish","topic":T,
//!             "payload":P}`, delivered as `{"type":"message","topic":T,
//!             "from":ID,"payload":P}`.
//!   /echo     every message comes back; the replies to one read leave in one
//!             write, as Bun's do.
//!
//! With `--uring` (`floor-relay 127.0.0.1:0 --uring`), a message's sends to
//! its recipients go to the kernel in one io_uring submission instead of one
//! `send` each (src/batch.rs): to measure what batching the system calls saves.
//!
//! With `--tokio`, the same relay runs on tokio's single-threaded runtime with
//! a task per connection (src/on_tokio.rs), as Switchboard does: to measure
//! what the runtime costs a relay, apart from what Switchboard does in it.

mod batch;
mod frame;
mod handshake;
mod message;
mod on_tokio;
mod socket;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::task::Waker;

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};

use crate::batch::Batch;
use crate::handshake::Route;
use crate::socket::Socket;

const LISTENER: Token = Token(usize::MAX);

/// A connection whose unsent bytes pass this is dropped (the others' limit).
const MAX_BACKLOG: usize = 64 << 20;

/// Bytes read per `read` call, into one buffer shared by every connection.
const READ_CHUNK: usize = 64 * 1024;

/// One client.
struct Conn {
    socket: Socket,
    /// With `--tokio`: the task reading this connection, woken when its backlog
    /// starts (to wait for the socket to drain) and when it is dropped.
    task: Option<Waker>,
    state: State,
    /// Received bytes not yet a whole frame (or head). Empty, and unallocated,
    /// for an idle connection.
    input: Vec<u8>,
    /// Bytes the socket did not take yet.
    backlog: Vec<u8>,
    /// Topics it subscribed to, to leave them when it goes.
    topics: Vec<Box<str>>,
}

enum State {
    Handshake,
    Relay { id: Box<str> },
    Echo,
}

/// Every connection and who they are.
#[derive(Default)]
struct Server {
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    clients: HashMap<Box<str>, Vec<usize>>,
    topics: HashMap<Box<str>, Vec<usize>>,
    /// Connections to drop once the current event is handled.
    dead: Vec<usize>,
    /// A message's frame, encoded once for all its recipients.
    frame: Vec<u8>,
    /// The frames a connection's read makes for itself (acks, pongs, echoes),
    /// sent in one write once the read is handled.
    replies: Vec<u8>,
    /// A topic delivery's JSON, before framing.
    text: Vec<u8>,
    /// The connections the current message goes to.
    recipients: Vec<usize>,
    /// With `--uring`: the ring their sends go through together.
    batch: Option<Batch>,
}

fn main() -> io::Result<()> {
    let mut addr: SocketAddr = "127.0.0.1:0".parse().expect("an address");
    let mut batch = None;
    let mut tokio = false;
    for arg in std::env::args().skip(1) {
        if arg == "--uring" {
            batch = Some(Batch::new()?);
        } else if arg == "--tokio" {
            tokio = true;
        } else {
            addr = arg
                .parse()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        }
    }
    if tokio {
        return on_tokio::run(addr, Server::default());
    }
    let mut poll = Poll::new()?;
    let mut listener = TcpListener::bind(addr)?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    announce(listener.local_addr()?)?;
    let mut events = Events::with_capacity(1024);
    let mut scratch = vec![0; READ_CHUNK];
    let mut server = Server {
        batch,
        ..Server::default()
    };
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for event in &events {
            if event.token() == LISTENER {
                server.accept(&listener, &poll)?;
                continue;
            }
            let index = event.token().0;
            if event.is_writable() {
                server.flush(index);
            }
            if event.is_readable() || event.is_read_closed() {
                server.read(index, &mut scratch);
            }
            server.reap();
        }
    }
}

/// Tells bench/run.sh where to connect.
fn announce(addr: SocketAddr) -> io::Result<()> {
    println!("listening on {addr}");
    io::stdout().flush()
}

impl Server {
    fn accept(&mut self, listener: &TcpListener, poll: &Poll) -> io::Result<()> {
        loop {
            let (stream, _) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                // Out of descriptors, or a reset before accept: try at the next event.
                Err(_) => return Ok(()),
            };
            stream.set_nodelay(true)?;
            let index = self.insert(Socket::Mio(stream));
            let Some(Conn {
                socket: Socket::Mio(stream),
                ..
            }) = self.conns[index].as_mut()
            else {
                unreachable!("just inserted");
            };
            // Edge-triggered both ways: a writable edge comes only after a full socket drains.
            poll.registry().register(
                stream,
                Token(index),
                Interest::READABLE | Interest::WRITABLE,
            )?;
        }
    }

    /// Takes a new connection in; returns its index.
    fn insert(&mut self, socket: Socket) -> usize {
        let index = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        self.conns[index] = Some(Conn {
            socket,
            task: None,
            state: State::Handshake,
            input: Vec::new(),
            backlog: Vec::new(),
            topics: Vec::new(),
        });
        index
    }

    /// Reads everything the socket has (mio is edge-triggered) and handles it.
    fn read(&mut self, index: usize, scratch: &mut [u8]) {
        loop {
            let Some(Conn {
                socket: Socket::Mio(stream),
                ..
            }) = self.conns[index].as_mut()
            else {
                return;
            };
            let n = match stream.read(scratch) {
                Ok(0) => return self.dead.push(index),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return self.dead.push(index),
            };
            self.received(index, scratch, n);
            if n < scratch.len() {
                return;
            }
        }
    }

    /// Handles the `n` bytes just read into `scratch` for connection `index`.
    fn received(&mut self, index: usize, scratch: &mut [u8], n: usize) {
        let Some(conn) = self.conns[index].as_mut() else {
            return;
        };
        // Whole frames are handled straight from the shared buffer; only a
        // partial one is copied into the connection's own.
        let mut input = std::mem::take(&mut conn.input);
        if input.is_empty() {
            let used = self.handle(index, &mut scratch[..n]);
            input.extend_from_slice(&scratch[used..n]);
        } else {
            input.extend_from_slice(&scratch[..n]);
            let used = self.handle(index, &mut input);
            input.drain(..used);
        }
        if input.is_empty() {
            input = Vec::new();
        }
        if let Some(conn) = self.conns[index].as_mut() {
            conn.input = input;
        }
    }

    /// Handles the whole frames (or the head) at the start of `buf`; returns
    /// how many bytes they took.
    fn handle(&mut self, index: usize, buf: &mut [u8]) -> usize {
        if matches!(
            self.conns[index].as_ref().map(|c| &c.state),
            Some(State::Handshake)
        ) {
            return self.handshake(index, buf);
        }
        let echo = matches!(
            self.conns[index].as_ref().map(|c| &c.state),
            Some(State::Echo)
        );
        let mut used = 0;
        let mut replies = std::mem::take(&mut self.replies);
        loop {
            let (opcode, len, end) = match frame::parse(&mut buf[used..]) {
                Ok(Some((f, end))) => (f.opcode, f.payload.len(), end),
                Ok(None) => break,
                Err(frame::Violation) => {
                    self.dead.push(index);
                    break;
                }
            };
            let payload = &buf[used + end - len..used + end];
            used += end;
            match opcode {
                frame::CLOSE => {
                    frame::encode(frame::CLOSE, &payload[..payload.len().min(2)], &mut replies);
                    self.dead.push(index);
                    break;
                }
                frame::PING => frame::encode(frame::PONG, payload, &mut replies),
                frame::PONG => {}
                _ if echo => frame::encode(opcode, payload, &mut replies),
                _ => message::handle(self, index, payload, &mut replies),
            }
        }
        if !replies.is_empty() {
            send(&mut self.conns, &mut self.dead, index, &replies);
            replies.clear();
        }
        self.replies = replies;
        used
    }

    fn handshake(&mut self, index: usize, buf: &mut [u8]) -> usize {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            if buf.len() > handshake::MAX_HEAD {
                self.dead.push(index);
            }
            return 0;
        };
        let Some((route, response)) = handshake::answer(&buf[..end]) else {
            self.dead.push(index);
            return buf.len();
        };
        let conn = self.conns[index].as_mut().expect("a live connection");
        conn.state = match route {
            Route::Echo => State::Echo,
            Route::Relay { id, .. } => {
                self.clients.entry(id.clone()).or_default().push(index);
                State::Relay { id }
            }
        };
        send(&mut self.conns, &mut self.dead, index, &response);
        end + 4
    }

    /// Writes what waited for the socket to drain.
    fn flush(&mut self, index: usize) {
        let Some(conn) = self.conns[index].as_mut() else {
            return;
        };
        if conn.backlog.is_empty() {
            return;
        }
        let backlog = std::mem::take(&mut conn.backlog);
        send(&mut self.conns, &mut self.dead, index, &backlog);
    }

    /// Sends the message's frame to every recipient gathered for it: one
    /// `send` each, or with `--uring` one submission for them all.
    fn deliver(&mut self) {
        let Self {
            conns,
            dead,
            frame,
            recipients,
            batch,
            ..
        } = self;
        match batch {
            Some(batch) => {
                if let Err(e) = batch.send_all(conns, dead, recipients, frame) {
                    panic!("io_uring submission failed: {e}");
                }
            }
            None => {
                for &to in recipients.iter() {
                    send(conns, dead, to, frame);
                }
            }
        }
        recipients.clear();
    }

    /// Drops the connections that ended, and their places in ids and topics.
    fn reap(&mut self) {
        while let Some(index) = self.dead.pop() {
            let Some(conn) = self.conns[index].take() else {
                continue;
            };
            if let Some(task) = &conn.task {
                task.wake_by_ref();
            }
            if let State::Relay { id } = &conn.state {
                leave(&mut self.clients, id, index);
            }
            for topic in &conn.topics {
                leave(&mut self.topics, topic, index);
            }
            // A task's index is freed by the task as it ends: until then it may
            // still look at its place, which must not hold a newer connection.
            if conn.task.is_none() {
                self.free.push(index);
            }
        }
    }
}

/// Takes connection `index` out of `key`'s list.
fn leave(map: &mut HashMap<Box<str>, Vec<usize>>, key: &str, index: usize) {
    if let Some(list) = map.get_mut(key) {
        list.retain(|&i| i != index);
        if list.is_empty() {
            map.remove(key);
        }
    }
}

/// One `send` of `bytes` to connection `index`, or onto its backlog while the
/// socket is full (or something waits before it).
fn send(conns: &mut [Option<Conn>], dead: &mut Vec<usize>, index: usize, bytes: &[u8]) {
    let Some(conn) = conns[index].as_mut() else {
        return;
    };
    let written = if conn.backlog.is_empty() {
        match conn.socket.write(bytes) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(_) => return dead.push(index),
        }
    } else {
        0
    };
    if written < bytes.len() {
        hold(conn, dead, index, &bytes[written..]);
    }
}

/// Keeps what connection `index`'s socket did not take, to write once it
/// drains; drops the connection whose backlog grows past the limit.
fn hold(conn: &mut Conn, dead: &mut Vec<usize>, index: usize, rest: &[u8]) {
    if conn.backlog.is_empty()
        && let Some(task) = &conn.task
    {
        task.wake_by_ref();
    }
    conn.backlog.extend_from_slice(rest);
    if conn.backlog.len() > MAX_BACKLOG {
        dead.push(index);
    }
}
