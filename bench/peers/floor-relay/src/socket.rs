//! A connection's socket, as the loop that drives it holds it: mio's (the
//! floor itself) or the write half of tokio's (`--tokio`, src/on_tokio.rs).
//! Deliveries write to either the same way, so that the two loops run the
//! same relay code and differ only in what drives them.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};

/// Where a connection's frames are written.
pub enum Socket {
    /// The floor's own epoll loop reads and writes it.
    Mio(mio::net::TcpStream),
    /// The connection's tokio task reads the other half; anyone writes this one.
    Tokio(tokio::net::tcp::OwnedWriteHalf),
}

impl Socket {
    /// One `send` of as much of `bytes` as the socket takes now.
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match self {
            Self::Mio(stream) => stream.write(bytes),
            Self::Tokio(half) => half.try_write(bytes),
        }
    }
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Self::Mio(stream) => stream.as_raw_fd(),
            Self::Tokio(half) => half.as_ref().as_raw_fd(),
        }
    }
}
