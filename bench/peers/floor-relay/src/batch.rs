//! `--uring`: the sends of one message to all its recipients go to the kernel
//! in one io_uring submission instead of one `send` system call each. Issue 19
//! reports that this gained nothing on a floor built elsewhere (the loopback TCP
//! work dominates, not the system call's entry and exit); this lets the bench
//! check it here, against the same floor with one `send` per recipient.

use std::io;
use std::os::fd::AsRawFd;

use io_uring::{IoUring, opcode, types};

use crate::{Conn, hold};

/// Sends in one submission at most; a larger fan-out takes several.
const RING: usize = 4096;

/// The ring, reused for every message.
pub struct Batch {
    ring: IoUring,
}

impl Batch {
    /// A ring for one thread's sends.
    pub fn new() -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .build(RING as u32)?;
        Ok(Self { ring })
    }

    /// Sends `frame` to every connection in `recipients` (what a socket does not
    /// take waits on its backlog, as with `send`), with one submission per
    /// `RING` recipients. Every send has completed when this returns.
    /// `recipients` names each connection once, as the bench's scenarios do:
    /// two sends to one socket in one submission could put the second's bytes
    /// after part of the first's.
    pub fn send_all(
        &mut self,
        conns: &mut [Option<Conn>],
        dead: &mut Vec<usize>,
        recipients: &[usize],
        frame: &[u8],
    ) -> io::Result<()> {
        for chunk in recipients.chunks(RING) {
            let mut queued = 0;
            for &to in chunk {
                let Some(conn) = conns[to].as_mut() else {
                    continue;
                };
                if !conn.backlog.is_empty() {
                    // Something waits before it: the frame waits behind it.
                    hold(conn, dead, to, frame);
                    continue;
                }
                let fd = types::Fd(conn.socket.as_raw_fd());
                let len = u32::try_from(frame.len()).expect("frames under 4 GiB");
                let send = opcode::Send::new(fd, frame.as_ptr(), len)
                    // A send that would block completes at once with EAGAIN
                    // instead of waiting for room in the socket, so that every
                    // one has completed when `submit_and_wait` returns.
                    .flags(libc::MSG_DONTWAIT)
                    .build()
                    .user_data(to as u64);
                // SAFETY: the kernel reads `frame` and uses the socket only until
                // the send completes, and every send queued here completes before
                // this function returns (the wait below, with MSG_DONTWAIT): the
                // buffer and the socket, both borrowed for the whole call, outlive
                // it. The queue has room, as it is emptied by each chunk's submission.
                #[allow(unsafe_code)]
                unsafe {
                    self.ring
                        .submission()
                        .push(&send)
                        .expect("room for a chunk");
                }
                queued += 1;
            }
            if queued == 0 {
                continue;
            }
            loop {
                match self.ring.submit_and_wait(queued) {
                    Ok(_) => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
            for done in self.ring.completion() {
                let to = usize::try_from(done.user_data()).expect("an index");
                let written = match done.result() {
                    n if n >= 0 => n as usize,
                    e if e == -libc::EAGAIN => 0,
                    _ => {
                        dead.push(to);
                        continue;
                    }
                };
                if written < frame.len()
                    && let Some(conn) = conns[to].as_mut()
                {
                    hold(conn, dead, to, &frame[written..]);
                }
            }
        }
        Ok(())
    }
}
