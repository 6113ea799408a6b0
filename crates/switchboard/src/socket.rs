//! The upgraded socket a connection's driver reads and writes.
//!
//! When hyper served the connection straight from a [`TcpStream`] (as
//! [`crate::serve`] and `hyper::server::conn::http1` over `TokioIo<TcpStream>`
//! do), the stream is taken out of hyper's [`Upgraded`] and shared: the driver
//! reads and writes it, and while the driver waits with nothing queued, whoever
//! pushes a prepared frame may write it straight to the socket (see
//! [`crate::mailbox`]), without waking the connection's task. Any other server
//! stack (axum::serve wraps its sockets in a type of its own, TLS wraps them too)
//! keeps the `Upgraded` and every frame goes through the driver.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// A connection's socket after the handshake.
pub(crate) enum Socket {
    /// A TCP stream the mailbox may also write to while the driver waits.
    Tcp(Arc<TcpStream>),
    /// Whatever hyper upgraded (TLS, for one), written only by the driver.
    /// Boxed, so that a plain TCP connection's socket is two words, not six.
    Upgraded(Box<TokioIo<Upgraded>>),
}

impl Socket {
    /// The socket, and any bytes hyper read past the handshake (the client's
    /// first frames may arrive with it).
    pub fn new(upgraded: Upgraded) -> (Self, Bytes) {
        match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => (Self::Tcp(Arc::new(parts.io.into_inner())), parts.read_buf),
            Err(upgraded) => (
                Self::Upgraded(Box::new(TokioIo::new(upgraded))),
                Bytes::new(),
            ),
        }
    }

    /// The stream others may write to directly, if this is a plain TCP stream.
    pub fn shared(&self) -> Option<Arc<TcpStream>> {
        match self {
            Self::Tcp(stream) => Some(stream.clone()),
            Self::Upgraded(_) => None,
        }
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(stream) => loop {
                ready!(stream.poll_read_ready(cx))?;
                let unfilled = buf.initialize_unfilled();
                let asked = unfilled.len();
                if let Some(n) = transfer(stream, Interest::READABLE, asked, || {
                    stream.try_read(unfilled)
                })? {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
            },
            Self::Upgraded(io) => Pin::new(&mut **io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            // `send`, as tokio's own `poll_write` makes, not a one-buffer
            // `writev`, which reaches the socket through the file layer's
            // vectored write.
            Self::Tcp(stream) => poll_tcp_write(stream, cx, buf.len(), || stream.try_write(buf)),
            Self::Upgraded(io) => Pin::new(&mut **io).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let [one] = bufs {
            return self.poll_write(cx, one);
        }
        match self.get_mut() {
            Self::Tcp(stream) => {
                let asked = bufs.iter().map(|b| b.len()).sum();
                poll_tcp_write(stream, cx, asked, || stream.try_write_vectored(bufs))
            }
            Self::Upgraded(io) => Pin::new(&mut **io).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(_) => Poll::Ready(Ok(())),
            Self::Upgraded(io) => Pin::new(&mut **io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            // The mailbox gives its clone back when the connection stops taking
            // frames, which is before the driver shuts its side down; should a
            // clone be left, the socket closes when the driver drops it.
            Self::Tcp(stream) => match Arc::get_mut(stream) {
                Some(stream) => Pin::new(stream).poll_shutdown(cx),
                None => Poll::Ready(Ok(())),
            },
            Self::Upgraded(io) => Pin::new(&mut **io).poll_shutdown(cx),
        }
    }
}

/// Writes `asked` bytes with `write` once the socket is writable.
fn poll_tcp_write(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    asked: usize,
    write: impl Fn() -> io::Result<usize>,
) -> Poll<io::Result<usize>> {
    loop {
        ready!(stream.poll_write_ready(cx))?;
        if let Some(n) = transfer(stream, Interest::WRITABLE, asked, &write)? {
            return Poll::Ready(Ok(n));
        }
    }
}

/// One read or write of up to `asked` bytes, through `try_io`. As tokio's own
/// `poll_read` and `poll_write` do, moving fewer bytes than asked (the socket is
/// drained, or its buffer is full) clears the readiness at once, by answering
/// WouldBlock to `try_io`, rather than leaving the next call a system call that
/// fails: without this, every message read cost two `recvfrom`s. `Ok(None)`:
/// the readiness was stale and is now cleared, so wait for the socket.
fn transfer(
    stream: &TcpStream,
    interest: Interest,
    asked: usize,
    op: impl FnOnce() -> io::Result<usize>,
) -> io::Result<Option<usize>> {
    let mut moved = None;
    let outcome = stream.try_io(interest, || {
        let n = op()?;
        moved = Some(n);
        if n > 0 && n < asked {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(())
    });
    match (moved, outcome) {
        (Some(n), _) => Ok(Some(n)),
        (None, Err(e)) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
        (None, _) => Ok(None),
    }
}
