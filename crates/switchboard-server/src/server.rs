//! Running the service: listen, serve, and shut down gracefully.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use switchboard::{CloseCode, CloseReason, Shutdown};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::engine::Engine;
use crate::hub::Hub;
use crate::snapshot::Loaded;
use crate::workers::Worker;
use crate::{api, app};

/// Where the service accepts connections.
pub struct Listeners {
    /// Clients (and the API, without `api`), served on this thread.
    pub main: TcpListener,
    /// With thread-per-core, the other threads' sockets on the same port.
    pub workers: Vec<Worker>,
    /// The API's own address, if it has one.
    pub api: Option<TcpListener>,
}

/// Serves clients and the API until `stop` resolves, then stops accepting,
/// closes every connection with 1012 (service restart: come back and resume)
/// and waits up to the drain time for them. Returns the engine, whose
/// streams the caller saves once this runtime's tasks are gone (see
/// [`save_history`]). `snapshot` is what the last graceful stop saved; its
/// file in the data directory is removed once the service is about to serve,
/// and then `announce` says it listens.
pub async fn serve(
    config: &Config,
    listeners: Listeners,
    snapshot: Option<Loaded>,
    announce: impl FnOnce() -> anyhow::Result<()>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Arc<dyn Engine>> {
    let Listeners {
        main: listener,
        workers,
        api: api_listener,
    } = listeners;
    let shutdown = Shutdown::closing_with(CloseReason::new(
        CloseCode::SERVICE_RESTART,
        "server restarting",
    ));
    let restored = snapshot.as_ref().map(|loaded| loaded.streams.len());
    let hub = Arc::new(Hub::new(config, shutdown.clone(), snapshot)?);
    let tls = match &config.tls {
        Some(certificate) => {
            #[cfg(unix)]
            certificate.clone().reload_on_sighup(hub.metrics.clone())?;
            Some(certificate.acceptor())
        }
        None => None,
    };
    let stopping = CancellationToken::new();
    let main_loopback = listener.local_addr()?.ip().is_loopback();
    let body = api::BodyRules {
        max_bytes: config.api_max_body_bytes,
        read_timeout: config.api_body_timeout,
    };
    let api_routes = |loopback| api::router(hub.clone(), body, loopback);
    let mut main = app::router(hub.clone(), config.echo_path.as_deref());
    let api = match api_listener {
        Some(api_listener) => {
            let loopback = api_listener.local_addr()?.ip().is_loopback();
            Some((api_listener, api_routes(loopback).fallback(api::not_found)))
        }
        None => {
            main = main.merge(api_routes(main_loopback));
            None
        }
    };
    // The start is sure (the hub holds the history and the routes are built),
    // and nothing is served yet: the snapshot is used up now, so that a start
    // that fails keeps it, and a crash from here on never restores it twice.
    if let (Some(streams), Some(dir)) = (restored, &config.data_dir) {
        crate::snapshot::consume(dir)?;
        tracing::info!(streams, "history restored from the last graceful stop");
    }
    if let Some(dir) = &config.unused_data_dir {
        crate::snapshot::set_aside_unused(dir)?;
    }
    announce()?;
    let api_server = api.map(|(api_listener, router)| {
        let stopped = stopping.clone().cancelled_owned();
        tokio::spawn(serve_listener(api_listener, router, tls.clone(), stopped))
    });
    let trigger = shutdown.clone();
    let stop_all = stopping.clone();
    tokio::spawn(async move {
        stop.await;
        tracing::info!(
            connections = trigger.connections(),
            "shutting down: closing connections with 1012"
        );
        stop_all.cancel();
        trigger.trigger();
    });
    let finished = CancellationToken::new();
    let threads = workers
        .into_iter()
        .enumerate()
        .map(|(i, worker)| {
            let stop = stopping.clone();
            worker.spawn(i + 1, main.clone(), tls.clone(), stop, finished.clone())
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    let serving = async {
        serve_listener(listener, main, tls, stopping.clone().cancelled_owned()).await;
        if let Some(api_server) = api_server {
            // A panic in the API server's task is not this shutdown's business.
            let _ = api_server.await;
        }
    };
    tokio::pin!(serving);
    // `serving` may end first (with nothing in progress it ends as soon as
    // the stop arrives), and must not be polled again once it has.
    let served = tokio::select! {
        () = &mut serving => true,
        () = stopping.cancelled() => false,
    };
    // One drain time for everything: HTTP requests in progress and WebSocket
    // close handshakes. What is still open at its end is cut, and the process
    // exits, so a client that stalls can never hold a shutdown.
    let deadline = tokio::time::Instant::now() + config.shutdown_drain;
    if !served
        && tokio::time::timeout_at(deadline, &mut serving)
            .await
            .is_err()
    {
        tracing::warn!("drain time over: cutting the HTTP requests still open");
    }
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    if shutdown.drain(left).await {
        tracing::info!("all connections closed");
    } else {
        tracing::warn!(
            remaining = shutdown.connections(),
            "drain time over; exiting with connections still open"
        );
    }
    // The other threads' runtimes (and any connection left on them) end now.
    finished.cancel();
    tokio::task::spawn_blocking(move || {
        for thread in threads {
            let _ = thread.join();
        }
    })
    .await?;
    Ok(hub.engine.clone())
}

/// Serves `router` on `listener` until `stop`, over TLS when given an acceptor.
pub async fn serve_listener(
    listener: TcpListener,
    router: Router,
    tls: Option<TlsAcceptor>,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    match tls {
        Some(tls) => switchboard::serve_tls(listener, router, tls, stop).await,
        None => switchboard::serve(listener, router, stop).await,
    }
}

/// Writes the engine's streams to the data directory, if history persists.
/// Call it once nothing can append any more: after the runtime that served
/// (and any HTTP request still in flight on it) has shut down.
pub fn save_history(config: &Config, engine: &dyn Engine) -> anyhow::Result<()> {
    let Some(dir) = &config.data_dir else {
        return Ok(());
    };
    match engine.save(dir) {
        Ok(Some(path)) => tracing::info!(path = %path.display(), "history saved"),
        Ok(None) => {}
        Err(error) => {
            return Err(anyhow::Error::new(error).context(format!(
                "saving history to {}: the next start begins with empty history and new epochs",
                dir.display()
            )));
        }
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
