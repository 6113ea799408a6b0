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

/// How serving ended, once the snapshot was used up: the engine, whose
/// streams the caller saves whatever happened from then on (see
/// [`save_history`]), and the error that ended it early, if one did.
pub struct Ended {
    /// The engine that served.
    pub engine: Arc<dyn Engine>,
    /// What stopped the service other than a signal.
    pub error: Option<anyhow::Error>,
}

/// Serves clients and the API until the first of `signals`, then stops
/// accepting, closes every connection with 1012 (service restart: come back
/// and resume) and waits up to the drain time for them; a second signal cuts
/// the drain short. `snapshot` is what the last graceful stop saved; its file
/// in the data directory is removed once the service is about to serve, and
/// then `announce` says it listens. An error before that is returned as is
/// (the snapshot stays); one after it comes with the engine in [`Ended`].
pub async fn serve(
    config: &Config,
    listeners: Listeners,
    snapshot: Option<Loaded>,
    announce: impl FnOnce(),
    signals: Signals,
) -> anyhow::Result<Ended> {
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
            certificate.clone().reload_on_sighup(hub.metrics.clone())?;
            Some(certificate.acceptor())
        }
        None => None,
    };
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
        crate::snapshot::set_aside_unused(dir);
    }
    announce();
    let serving = Serving {
        config,
        shutdown,
        tls,
    };
    let error = serving
        .run(listener, main, api, workers, signals)
        .await
        .err();
    Ok(Ended {
        engine: hub.engine.clone(),
        error,
    })
}

/// The service from the moment it serves to the end of its drain.
struct Serving<'a> {
    config: &'a Config,
    shutdown: Shutdown,
    tls: Option<TlsAcceptor>,
}

impl Serving<'_> {
    async fn run(
        self,
        listener: TcpListener,
        main: Router,
        api: Option<(TcpListener, Router)>,
        workers: Vec<Worker>,
        mut signals: Signals,
    ) -> anyhow::Result<()> {
        let Self {
            config,
            shutdown,
            tls,
        } = self;
        // Cancelled at the first signal (stop accepting), and at the second
        // (stop draining).
        let (stopping, cut) = (CancellationToken::new(), CancellationToken::new());
        let api_server = api.map(|(api_listener, router)| {
            let stopped = stopping.clone().cancelled_owned();
            tokio::spawn(serve_listener(api_listener, router, tls.clone(), stopped))
        });
        let (trigger, stop_all, cut_short) = (shutdown.clone(), stopping.clone(), cut.clone());
        tokio::spawn(async move {
            signals.next().await;
            // Before logging: a log line that cannot be written must never
            // keep the service from stopping.
            stop_all.cancel();
            trigger.trigger();
            tracing::info!(
                connections = trigger.connections(),
                "shutting down: closing connections with 1012"
            );
            signals.next().await;
            cut_short.cancel();
            tracing::warn!("a second signal: cutting the drain short");
        });
        let finished = CancellationToken::new();
        // Whatever happens from here, the other threads' runtimes end with
        // this function.
        let _finish = finished.clone().drop_guard();
        // Each worker's HTTP requests in progress at the stop are drained too.
        let drained: Vec<CancellationToken> =
            workers.iter().map(|_| CancellationToken::new()).collect();
        let threads = workers
            .into_iter()
            .zip(&drained)
            .enumerate()
            .map(|(i, (worker, drained))| {
                let (stop, drained) = (stopping.clone(), drained.clone());
                worker.spawn(
                    i + 1,
                    main.clone(),
                    tls.clone(),
                    stop,
                    drained,
                    finished.clone(),
                )
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        let serving = async {
            serve_listener(listener, main, tls, stopping.clone().cancelled_owned()).await;
            if let Some(api_server) = api_server {
                // A panic in the API server's task is not this shutdown's business.
                let _ = api_server.await;
            }
            for worker in &drained {
                worker.cancelled().await;
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
        if !served {
            tokio::select! {
                done = tokio::time::timeout_at(deadline, &mut serving) => if done.is_err() {
                    tracing::warn!("drain time over: cutting the HTTP requests still open");
                },
                () = cut.cancelled() => {}
            }
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let drained = tokio::select! {
            drained = shutdown.drain(left) => drained,
            () = cut.cancelled() => false,
        };
        if drained {
            tracing::info!("all connections closed");
        } else {
            tracing::warn!(
                remaining = shutdown.connections(),
                "drain over; exiting with connections still open"
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
        Ok(())
    }
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

/// SIGTERM and SIGINT, listened for from when this is made: made before the
/// snapshot is used up, a stop signal from then on is a graceful stop (the
/// default action would kill the process with the history gone). SIGHUP is
/// caught too, before the service says it listens: a SIGHUP from then on (a
/// certificate renewal hook, a log rotation's or a service manager's reload)
/// must reload the certificate, or do nothing without TLS, and never kill
/// the process; tokio keeps a handler for good once installed.
pub struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers; needs a runtime's context.
    pub fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        drop(signal(SignalKind::hangup())?);
        Ok(Self {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves at the next SIGTERM or SIGINT.
    pub async fn next(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}
