//! Serving an axum [`Router`] over HTTP/1.1, keeping each socket a plain `TcpStream`.
//!
//! [`WebSocketUpgrade`](crate::WebSocketUpgrade) works under any hyper server,
//! `axum::serve` included. Under this one, an upgraded connection keeps its
//! `TcpStream` (axum::serve wraps every socket in a private type of
//! hyper-util's), so frames pushed to an idle connection are written straight to
//! its socket by whoever pushes them, without waking the connection's task.
//! docs/architecture.md ("Direct writes") has the details.

use std::future::Future;
use std::pin::pin;

use axum::Router;
use axum::serve::Listener;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
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
/// Accepting is axum's (`axum::serve::Listener`): a connection reset before it
/// was accepted is skipped, and any other error (such as running out of file
/// descriptors) is logged and retried after a second.
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
    mut listener: TcpListener,
    router: Router,
    signal: impl Future<Output = ()> + Send + 'static,
) {
    let stop = CancellationToken::new();
    let connections = TaskTracker::new();
    let mut signal = pin!(signal);
    loop {
        let stream = tokio::select! {
            (stream, _) = Listener::accept(&mut listener) => stream,
            () = &mut signal => break,
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY");
        }
        let service = TowerToHyperService::new(router.clone());
        let stop = stop.clone();
        connections.spawn(async move {
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
