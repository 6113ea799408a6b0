//! The HTTP routes: `/ws` (the relay), `/healthz`, and `/` (a demo page).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use switchboard::{Broker, Options, Registry, Shutdown, UpgradeError, WebSocketUpgrade};

use crate::config::Config;
use crate::ids;
use crate::relay::Relay;
use crate::wire::{Mode, PROTOCOL};

/// What every request handler shares.
pub struct AppState {
    /// Live connections by client id.
    pub registry: Registry,
    /// Where relay connections deliver (the registry, behind its interface).
    pub broker: Arc<dyn Broker>,
    /// Options for each relay connection.
    pub options: Options,
    /// Most targets per message.
    pub max_targets: usize,
    /// Closes every connection on shutdown.
    pub shutdown: Shutdown,
}

impl AppState {
    /// State for `config`, with a local registry.
    pub fn new(config: &Config, shutdown: Shutdown) -> Self {
        let registry = Registry::new();
        Self {
            broker: Arc::new(registry.clone()),
            registry,
            options: config.connection_options(),
            max_targets: config.max_targets,
            shutdown,
        }
    }
}

/// The service's routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(demo_page))
        .route("/ws", get(relay))
        .route("/healthz", get(healthz))
        .with_state(state)
}

async fn relay(
    State(state): State<Arc<AppState>>,
    Query(query): Query<HashMap<String, String>>,
    upgrade: Result<WebSocketUpgrade, UpgradeError>,
) -> Response {
    let Some(id) = query.get("id") else {
        return (
            StatusCode::BAD_REQUEST,
            "missing id: connect to /ws?id=<client id>\n",
        )
            .into_response();
    };
    let id = match ids::parse(id) {
        Ok(id) => id,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("invalid id: {e}\n")).into_response(),
    };
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(e) => return e.into_response(),
    };
    let upgrade = upgrade
        .protocols([PROTOCOL])
        .options(state.options.clone())
        .shutdown(&state.shutdown);
    let mode = Mode::for_protocol(upgrade.selected_protocol());
    let broker = state.broker.clone();
    upgrade.on_upgrade_with(|handle| Relay::new(id, mode, broker, state.max_targets, handle))
}

async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    let body = serde_json::json!({
        "status": "ok",
        "connections": state.shutdown.connections(),
        "clients": state.registry.clients(),
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn demo_page() -> Html<&'static str> {
    Html(include_str!("../assets/index.html"))
}
