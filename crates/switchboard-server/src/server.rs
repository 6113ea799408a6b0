//! Running the service: listen, serve, and shut down gracefully.

use std::future::Future;
use std::sync::Arc;

use switchboard::Shutdown;
use tokio::net::TcpListener;

use crate::app::{AppState, router};
use crate::config::Config;

/// Serves on `listener` until `stop` resolves, then stops accepting, closes
/// every connection with 1001 and waits up to the drain time for them.
pub async fn serve(
    config: &Config,
    listener: TcpListener,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let shutdown = Shutdown::new();
    let state = Arc::new(AppState::new(config, shutdown.clone()));
    let trigger = shutdown.clone();
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            stop.await;
            tracing::info!(
                connections = trigger.connections(),
                "shutting down: closing connections with 1001"
            );
            trigger.trigger();
        })
        .await?;
    if shutdown.drain(config.shutdown_drain).await {
        tracing::info!("all connections closed");
    } else {
        tracing::warn!(
            remaining = shutdown.connections(),
            "drain time over; exiting with connections still open"
        );
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = interrupt => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
