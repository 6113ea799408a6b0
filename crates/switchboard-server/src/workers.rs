//! The threads that run connections: tokio's work-stealing runtime, or one
//! single-threaded runtime per worker, each accepting on its own socket.
//!
//! Thread-per-core binds one listening socket per worker to the same address
//! with `SO_REUSEPORT`, and the kernel spreads incoming connections across
//! them. A connection then lives on the thread that accepted it: nothing is
//! handed between threads, and nothing wakes another thread, except a
//! delivery to a connection of another thread that is busy (one that is idle
//! takes it as a direct write from the sender's thread). See
//! docs/performance.md for what each layout costs.

use std::io;
use std::net::SocketAddr;
use std::thread::JoinHandle;

use axum::Router;
use tokio::net::{TcpListener, TcpSocket};
use tokio::runtime::Runtime;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::Scheduler;

/// Connections waiting to be accepted, per listening socket.
const BACKLOG: u32 = 1024;

/// How many threads, and how they share the work.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    threads: usize,
    per_core: bool,
}

impl Layout {
    /// `workers` threads (0: one per CPU we may use) shared as `scheduler` says. One
    /// thread is the same either way: tokio's single-threaded scheduler.
    pub fn new(workers: usize, scheduler: Scheduler) -> Self {
        let threads = match workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        Self {
            threads,
            per_core: threads > 1 && scheduler == Scheduler::ThreadPerCore,
        }
    }

    /// How many threads run connections: the `workers` setting, or with 0 the
    /// CPUs this process may run on (its affinity and cgroup CPU limit).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The runtime of the main thread: the only one, or the first of several.
    pub fn main_runtime(&self) -> io::Result<Runtime> {
        let mut builder = if self.threads == 1 || self.per_core {
            tokio::runtime::Builder::new_current_thread()
        } else {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(self.threads);
            builder
        };
        builder.enable_all().build()
    }

    /// Binds the service's address: one socket, or with thread-per-core one
    /// for the main thread and a [`Worker`] for each other thread, all on the
    /// same port (the first one's, when `addr` asks for port 0). Call it in
    /// the main runtime's context but not inside `block_on`: a worker's
    /// runtime must not be dropped in async code, as it is if a later bind fails.
    pub fn bind(&self, addr: SocketAddr) -> io::Result<(TcpListener, Vec<Worker>)> {
        if !self.per_core {
            return Ok((listen(addr)?, Vec::new()));
        }
        if addr.port() != 0 {
            // SO_REUSEPORT lets any process of this user share the port, and
            // the kernel would split the clients between two servers: a plain
            // bind finds one that listens there, as it does without per-core.
            new_socket(addr)?.bind(addr)?;
        }
        let first = reuse_port_listener(addr)?;
        let addr = first.local_addr()?;
        let workers = (1..self.threads)
            .map(|_| Worker::new(reuse_port_listener(addr)?.into_std()?))
            .collect::<io::Result<_>>()?;
        Ok((first, workers))
    }
}

/// A thread-per-core worker before it starts: its runtime and its socket.
pub struct Worker {
    runtime: Runtime,
    listener: TcpListener,
}

impl Worker {
    /// Built on the calling thread, so that a failure stops the service from
    /// starting rather than leaving a socket nobody accepts on.
    fn new(listener: std::net::TcpListener) -> io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let listener = {
            let _entered = runtime.enter();
            TcpListener::from_std(listener)?
        };
        Ok(Self { runtime, listener })
    }

    /// Serves `router` on this worker's own thread until `stop`, cancels
    /// `drained` once the HTTP requests in progress then are done (or the
    /// thread ends), and keeps the thread's runtime (and so its connections)
    /// running until `finished`.
    pub fn spawn(
        self,
        index: usize,
        router: Router,
        tls: Option<TlsAcceptor>,
        stop: CancellationToken,
        drained: CancellationToken,
        finished: CancellationToken,
    ) -> io::Result<JoinHandle<()>> {
        let Self { runtime, listener } = self;
        std::thread::Builder::new()
            .name(format!("switchboard-{index}"))
            .spawn(move || {
                let drained = drained.drop_guard();
                runtime.block_on(async move {
                    // Ends when the main thread says so, even if a request is
                    // still stalled here: its drain time is the limit.
                    let serving = async {
                        crate::server::serve_listener(
                            listener,
                            router,
                            tls,
                            stop.cancelled_owned(),
                        )
                        .await;
                        drop(drained);
                        finished.cancelled().await;
                    };
                    tokio::select! {
                        () = serving => {}
                        () = finished.cancelled() => {}
                    }
                });
            })
    }
}

/// A listening socket on `addr`, registered with the current runtime.
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = new_socket(addr)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

fn new_socket(addr: SocketAddr) -> io::Result<TcpSocket> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // As `TcpListener::bind` does: a restarted server can bind at once.
    socket.set_reuseaddr(true)?;
    Ok(socket)
}

fn reuse_port_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = new_socket(addr)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}
