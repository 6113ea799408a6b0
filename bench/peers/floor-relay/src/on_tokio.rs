//! `--tokio`: the floor's relay on tokio's single-threaded runtime, a task per
//! connection, as Switchboard runs (one worker on one CPU). Deliveries are
//! written by the sender's task (`try_write` on the recipient's socket), as
//! Switchboard's direct writes are, so the two loops make the same system calls;
//! what this adds to the floor is what tokio's reactor and scheduler cost.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;

use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpListener;
use tokio::net::tcp::OwnedReadHalf;

use crate::socket::Socket;
use crate::{READ_CHUNK, Server};

/// The state every task shares: the relay, and the buffer reads land in.
#[derive(Clone)]
struct Shared {
    server: Rc<RefCell<Server>>,
    scratch: Rc<RefCell<Vec<u8>>>,
}

/// Why a connection's task woke.
enum Woke {
    /// This many bytes were read into the scratch buffer (0: the peer is gone).
    Read(usize),
    /// Its backlog may go out now.
    Writable,
    /// The relay dropped it.
    Dropped,
}

/// Serves on `addr` until the process ends.
pub fn run(addr: SocketAddr, server: Server) -> io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let shared = Shared {
        server: Rc::new(RefCell::new(server)),
        scratch: Rc::new(RefCell::new(vec![0; READ_CHUNK])),
    };
    tokio::task::LocalSet::new().block_on(&runtime, async move {
        let listener = TcpListener::bind(addr).await?;
        crate::announce(listener.local_addr()?)?;
        loop {
            // Out of descriptors, or a reset before accept: try again.
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            stream.set_nodelay(true)?;
            let (reader, writer) = stream.into_split();
            let index = shared.server.borrow_mut().insert(Socket::Tokio(writer));
            tokio::task::spawn_local(serve(shared.clone(), index, reader));
        }
    })
}

/// Connection `index`'s task: reads and handles what arrives, and writes its
/// backlog as the socket drains, until the relay drops it.
async fn serve(shared: Shared, index: usize, mut reader: OwnedReadHalf) {
    let task = poll_fn(|cx| Poll::Ready(cx.waker().clone())).await;
    if let Some(conn) = shared.server.borrow_mut().conns[index].as_mut() {
        conn.task = Some(task);
    }
    loop {
        let woke = poll_fn(|cx| {
            let mut server = shared.server.borrow_mut();
            let Some(conn) = server.conns[index].as_mut() else {
                return Poll::Ready(Woke::Dropped);
            };
            if let Socket::Tokio(writer) = &conn.socket
                && !conn.backlog.is_empty()
                && writer.as_ref().poll_write_ready(cx).is_ready()
            {
                return Poll::Ready(Woke::Writable);
            }
            let mut scratch = shared.scratch.borrow_mut();
            let mut buf = ReadBuf::new(&mut scratch);
            // `poll_read`, not `try_read`: a read that does not fill the buffer
            // clears the socket's readiness, as the floor's edge-triggered loop
            // stops at one, so no read is made only to find nothing.
            Pin::new(&mut reader)
                .poll_read(cx, &mut buf)
                .map(|read| Woke::Read(read.map_or(0, |()| buf.filled().len())))
        })
        .await;
        let mut server = shared.server.borrow_mut();
        match woke {
            Woke::Dropped => {
                server.free.push(index);
                return;
            }
            Woke::Writable => server.flush(index),
            Woke::Read(0) => server.dead.push(index),
            Woke::Read(n) => server.received(index, &mut shared.scratch.borrow_mut(), n),
        }
        server.reap();
    }
}
