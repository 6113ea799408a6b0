//! The HTTP routes: `/ws` (the relay), `/healthz`, `/` (a demo chat) and
//! `/client.js` (the JavaScript client it runs on).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Extension;
use axum::Router;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use switchboard::{UpgradeError, WebSocketUpgrade};

use crate::auth::{Identity, Permissions, TokenError};
use crate::engine::{ConnectError, Unavailable};
use crate::hub::Hub;
use crate::ids;
use crate::relay::Relay;
use crate::streams::Position;
use crate::wire::{Mode, PROTOCOL};

/// Prefix of a subprotocol entry that carries a token, for browsers (which
/// cannot set headers): `new WebSocket(url, ["switchboard.v1", "bearer.<jwt>"])`.
pub const TOKEN_PROTOCOL_PREFIX: &str = "bearer.";

/// The client-facing routes, with the echo at `echo_path` when there is one.
pub fn router(hub: Arc<Hub>, echo_path: Option<&str>) -> Router {
    let router = Router::new()
        .route("/", get(demo_page))
        .route("/client.js", get(client_js))
        .route("/ws", get(relay))
        .route("/healthz", get(healthz));
    let router = match echo_path {
        Some(path) => router.route(path, get(crate::echo::echo)),
        None => router,
    };
    router.with_state(hub)
}

/// `/ws`: the handshake, counted in the metrics when it is refused.
async fn relay(
    State(hub): State<Arc<Hub>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, UpgradeError>,
) -> Response {
    let response = handshake(&hub, peer, &query, &headers, upgrade).await;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        hub.metrics.handshake_failed(response.status());
    }
    response
}

async fn handshake(
    hub: &Arc<Hub>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    upgrade: Result<WebSocketUpgrade, UpgradeError>,
) -> Response {
    if !origin_allowed(hub, headers) {
        return (StatusCode::FORBIDDEN, "origin not allowed\n").into_response();
    }
    let identity = match identify(hub, query, headers).await {
        Ok(identity) => identity,
        Err(refused) => {
            if let Refused::Unauthorized(e) = &refused {
                hub.metrics.auth_failed(e.reason());
            }
            return refused.into_response();
        }
    };
    let (slot, options) = match hub.admit(peer) {
        Ok(admitted) => admitted,
        Err(full) => return full.into_response(),
    };
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(e) => return e.into_response(),
    };
    let upgrade = upgrade
        .protocols([PROTOCOL])
        .options(options)
        .shutdown(&hub.shutdown);
    let mode = Mode::for_protocol(upgrade.selected_protocol());
    // Every event of the connection carries these (docs/operations.md, "Logs").
    let span = tracing::info_span!(
        "connection",
        conn = tracing::field::Empty,
        client = %identity.client,
        peer = peer.as_ref().map(|Extension(ConnectInfo(addr))| tracing::field::display(addr)),
        protocol = upgrade.selected_protocol().unwrap_or("none"),
    );
    let upgrade = upgrade.span(span);
    let since = match resume_point(mode, query) {
        Ok(since) => since,
        Err(refused) => return refused.into_response(),
    };
    // Before the handshake's answer: a client that sees it succeed is online,
    // and reachable, on every node.
    let joined = match hub
        .engine
        .connect(
            identity.client.clone(),
            mode,
            since,
            hub.limits.max_connections,
        )
        .await
    {
        Ok(joined) => joined,
        Err(ConnectError::Unavailable(e)) => return unavailable(&e),
        Err(ConnectError::Full { limit }) => {
            let message = format!(
                "too many connections for client {}: at most {limit}\n",
                identity.client
            );
            return (StatusCode::TOO_MANY_REQUESTS, message).into_response();
        }
    };
    upgrade.on_upgrade_with(|handle| Relay::new(hub.clone(), identity, mode, handle, slot, joined))
}

/// The answer when the cluster's store cannot be reached: try again later.
fn unavailable(error: &Unavailable) -> Response {
    let headers = [(header::RETRY_AFTER, "1")];
    (
        StatusCode::SERVICE_UNAVAILABLE,
        headers,
        format!("{error}\n"),
    )
        .into_response()
}

/// The inbox position a connection asks to resume from (`?since=EPOCH:OFFSET`,
/// as its last welcome and deliveries gave them), checked for form (the
/// engine checks it against the inbox).
fn resume_point(mode: Mode, query: &HashMap<String, String>) -> Result<Option<Position>, Refused> {
    let Some(since) = query.get("since") else {
        return Ok(None);
    };
    if mode != Mode::Envelope {
        return Err(Refused::BadRequest(format!(
            "since needs the {PROTOCOL} subprotocol: raw connections see no offsets to resume from"
        )));
    }
    let since = crate::history_api::parse_since(since).ok_or_else(|| {
        Refused::BadRequest(format!(
            "invalid since {since:?}: expected EPOCH:OFFSET as the welcome and deliveries give them, e.g. since=k3x9ab12:16"
        ))
    })?;
    Ok(Some(since))
}

/// A browser's `Origin` must be on the allowlist, when there is one. Clients
/// that send no `Origin` are not browsers, and cross-site hijacking needs one.
fn origin_allowed(hub: &Hub, headers: &HeaderMap) -> bool {
    if hub.allowed_origins.is_empty() {
        return true;
    }
    match headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) {
        Some(origin) => hub.allowed_origins.iter().any(|allowed| allowed == origin),
        None => true,
    }
}

/// Why a handshake was refused before the upgrade.
enum Refused {
    /// A missing or invalid `?id=`.
    BadRequest(String),
    /// An id chosen by a client that is not on this host.
    NotLocal(String),
    /// A missing or invalid token.
    Unauthorized(TokenError),
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Self::BadRequest(message) => {
                (StatusCode::BAD_REQUEST, format!("{message}\n")).into_response()
            }
            Self::NotLocal(reason) => {
                let message = format!(
                    "client ids chosen with ?id= are taken from this host only, and this request \
                     {reason}: configure client tokens (--jwt-hs256-secret-file, \
                     --jwt-public-key, --jwt-jwks-url), or --allow-insecure\n"
                );
                (StatusCode::FORBIDDEN, message).into_response()
            }
            Self::Unauthorized(error) => {
                let mut response = (StatusCode::UNAUTHORIZED, format!("{error}\n")).into_response();
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                response
            }
        }
    }
}

/// Who is connecting: the token's `sub` when tokens are configured (`?id=` is
/// then ignored), otherwise `?id=`, from this host only unless
/// `--allow-insecure`.
async fn identify(
    hub: &Hub,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Result<Identity, Refused> {
    let Some(jwt) = &hub.jwt else {
        if hub.chosen_ids_from_this_host_only {
            // An origin the operator listed passed `origin_allowed` already.
            let vetted = !hub.allowed_origins.is_empty();
            crate::local::from_this_host(headers, vetted).map_err(Refused::NotLocal)?;
        }
        let Some(id) = query.get("id") else {
            return Err(Refused::BadRequest(
                "missing id: connect to /ws?id=<client id>".into(),
            ));
        };
        let client = ids::parse(id).map_err(|e| Refused::BadRequest(format!("invalid id: {e}")))?;
        return Ok(Identity {
            client,
            expires_at: None,
            permissions: Permissions::default(),
        });
    };
    let token = bearer_token(query, headers).ok_or(Refused::Unauthorized(TokenError::Missing))?;
    // A key id the JWKS URL's set lacks is fetched for before refusing.
    jwt.verify_fresh(token, &hub.metrics)
        .await
        .map_err(Refused::Unauthorized)
}

/// The token from `Authorization: Bearer`, `?token=`, or a `bearer.` subprotocol.
fn bearer_token<'r>(query: &'r HashMap<String, String>, headers: &'r HeaderMap) -> Option<&'r str> {
    let from_header = crate::auth::bearer(headers);
    let from_protocol = || {
        headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .find_map(|p| p.trim().strip_prefix(TOKEN_PROTOCOL_PREFIX))
    };
    from_header
        .or_else(|| query.get("token").map(String::as_str))
        .or_else(from_protocol)
}

/// Ready (200) or not (503, with the reason): a load balancer sends no
/// clients to a node that cannot reach the cluster's store.
async fn healthz(State(hub): State<Arc<Hub>>) -> Response {
    // This node's own connections and client ids (the API's stats count the cluster's).
    let connections = hub.shutdown.connections();
    let clients = hub.registry.clients();
    let (status, body) = match hub.engine.unready() {
        None => (
            StatusCode::OK,
            serde_json::json!({ "status": "ok", "connections": connections, "clients": clients }),
        ),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({
                "status": "unavailable",
                "reason": reason,
                "connections": connections,
                "clients": clients,
            }),
        ),
    };
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// The browser chat of `examples/browser-chat`, on the JavaScript client.
async fn demo_page() -> Html<&'static str> {
    Html(include_str!("../../../examples/browser-chat/index.html"))
}

/// `@switchboard/client`, minified (built by `clients/js/build.mjs`, which checks
/// that this copy is its output). Any origin may load it: it is public code.
async fn client_js() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("../assets/client.js"),
    )
}
