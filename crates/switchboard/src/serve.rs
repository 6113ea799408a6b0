//! Serving an axum [`Router`] over HTTP/1.1, keeping each socket a plain
//! `TcpStream` ([`serve()`]) or over TLS ([`serve_tls()`]).
//!
//! [`WebSocketUpgrade`](crate::WebSocketUpgrade) works under any hyper server,
//! `axum::serve` included. Under this one, an upgraded connection keeps its
//! `TcpStream` (axum::serve wraps every socket in a private type of
//! hyper-util's), so frames pushed to an idle connection are written straight to
//! its socket by whoever pushes them, without waking the connection's task.
//! docs/architecture.md ("Direct writes") has the details.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use http::Request;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Serves `router` on `listener` over HTTP/1.1 until `signal` resolves, then
/// stops accepting, lets requests in progress finish (idle keep-alive
/// connections are closed) and returns. Connections already upgraded to
/// WebSocket are not waited for: [`crate::Shutdown`] closes them.
///
/// Accepted sockets get `TCP_NODELAY`: WebSocket frames are small and written
/// one at a time, and Nagle's algorithm would hold each for the peer's delayed
/// ACK (40 ms on Linux). A client has hyper's default 30 seconds to send its
/// request headers, so a connection that never finishes a request is dropped.
///
/// Each request carries the peer's address as axum's
/// [`ConnectInfo<SocketAddr>`](axum::extract::ConnectInfo), for per-address limits.
///
/// A connection reset before it was accepted is skipped. Any other accept
/// error (such as running out of file descriptors) is counted
/// ([`accept_errors`]), logged at error level (one line per 10 seconds at
/// most, with how many were not logged), and accepting resumes after a tenth
/// of a second, which gives connections time to end and free descriptors
/// instead of spinning.
///
/// # Examples
///
/// ```no_run
/// use axum::Router;
///
/// # async fn run(app: Router) -> std::io::Result<()> {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:4000").await?;
/// // Until Ctrl-C; then the WebSocket connections are a `Shutdown`'s to close.
/// switchboard::serve(listener, app, async {
///     let _ = tokio::signal::ctrl_c().await;
/// })
/// .await;
/// # Ok(())
/// # }
/// ```
///
/// # Cancel safety
///
/// Dropping the future stops accepting at once; connections already accepted
/// go on in their own tasks.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    signal: impl Future<Output = ()> + Send + 'static,
) {
    run(listener, router, signal, |stream| async { Ok(stream) }).await;
}

/// As [`serve()`], over TLS: each accepted socket first completes a TLS
/// handshake with `tls`, within [`TLS_HANDSHAKE_TIMEOUT`], and is dropped if
/// it does not. The acceptor's certificate resolver is asked at each
/// handshake, so one that can be swapped (as `switchboard serve` does on
/// SIGHUP) changes the certificate for new connections while live ones keep
/// theirs. Only HTTP/1.1 is served: give `tls` an ALPN list of
/// `http/1.1` (or none).
///
/// An upgraded connection's socket is then a TLS stream, so frames pushed to it
/// always go through its driver: direct writes (see [`serve()`]) need the
/// plain socket, because a TLS record is sealed by the one holding the
/// session's state.
pub async fn serve_tls(
    listener: TcpListener,
    router: Router,
    tls: TlsAcceptor,
    signal: impl Future<Output = ()> + Send + 'static,
) {
    run(listener, router, signal, move |stream| {
        let handshake = tls.accept(stream);
        async move {
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, handshake).await {
                Ok(done) => done,
                Err(_) => Err(io::ErrorKind::TimedOut.into()),
            }
        }
    })
    .await;
}

/// How long an accepted socket has to complete its TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The accept loop of [`serve()`] and [`serve_tls()`]; `open` turns an
/// accepted socket into the stream HTTP is spoken over, in its own task.
async fn run<O, F, S>(
    listener: TcpListener,
    router: Router,
    signal: impl Future<Output = ()> + Send + 'static,
    open: O,
) where
    O: Fn(TcpStream) -> F,
    F: Future<Output = io::Result<S>> + Send + 'static,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let stop = CancellationToken::new();
    let connections = TaskTracker::new();
    let mut signal = pin!(signal);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = accept(&listener) => accepted,
            () = &mut signal => break,
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY");
        }
        let service = TowerToHyperService::new(WithPeer {
            router: router.clone(),
            peer,
        });
        let stop = stop.clone();
        let opening = open(stream);
        connections.spawn(async move {
            let stream = tokio::select! {
                opened = opening => match opened {
                    Ok(stream) => stream,
                    Err(error) => {
                        tracing::debug!(%error, %peer, "connection not opened (TLS handshake)");
                        return;
                    }
                },
                () = stop.cancelled() => return,
            };
            let mut connection = pin!(
                http1::Builder::new()
                    .timer(TokioTimer::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
            );
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = result {
                tracing::debug!(%error, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    stop.cancel();
    connections.close();
    connections.wait().await;
}

/// How long accepting pauses after an error other than a connection reset.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// At most one accept error is logged per this interval; the rest are counted.
const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

static ACCEPT_ERRORS: AtomicU64 = AtomicU64::new(0);

/// Accept errors (other than connections reset before they were accepted)
/// since the process started, over every [`serve()`] in it: running out of
/// file descriptors shows here first.
pub fn accept_errors() -> u64 {
    ACCEPT_ERRORS.load(Ordering::Relaxed)
}

/// The next connection, past errors, which are counted and logged.
async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(error) if is_connection_error(&error) => {}
            Err(error) => {
                ACCEPT_ERRORS.fetch_add(1, Ordering::Relaxed);
                log_accept_error(&error);
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
}

/// Errors about one incoming connection, not about the listener or the process.
fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Logs `error` unless one was logged within the interval; then says how many were not.
fn log_accept_error(error: &io::Error) {
    static LAST: Mutex<Option<(Instant, u64)>> = Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let now = Instant::now();
    match &mut *last {
        Some((at, unlogged)) if now.duration_since(*at) < ACCEPT_ERROR_LOG_INTERVAL => {
            *unlogged += 1;
        }
        _ => {
            let unlogged = last.map_or(0, |(_, unlogged)| unlogged);
            tracing::error!(
                %error,
                unlogged,
                total = accept_errors(),
                "accepting a connection failed; retrying (unlogged: errors since the last line)"
            );
            *last = Some((now, 0));
        }
    }
}

/// The router, with each request told the address of the peer it came from.
#[derive(Clone)]
struct WithPeer {
    router: Router,
    peer: SocketAddr,
}

impl<B> tower_service::Service<Request<B>> for WithPeer
where
    Router: tower_service::Service<Request<B>>,
{
    type Response = <Router as tower_service::Service<Request<B>>>::Response;
    type Error = <Router as tower_service::Service<Request<B>>>::Error;
    type Future = <Router as tower_service::Service<Request<B>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower_service::Service::<Request<B>>::poll_ready(&mut self.router, cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        request.extensions_mut().insert(ConnectInfo(self.peer));
        self.router.call(request)
    }
}
