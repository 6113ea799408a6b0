//! The HTTP API for backends, under `/api/v1` (docs/openapi.json is the contract).
//!
//! JSON in and out. Every error is `{"error":{"code":"...","message":"..."}}`
//! with a stable code and the matching status. Requests need
//! `Authorization: Bearer <api key>`, except `GET /api/v1/openapi.json`; with no
//! keys configured the API is open on a loopback listener to requests from this
//! host ([`crate::local`]) and closed elsewhere.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use switchboard::{ClientId, CloseReason};

use crate::config::MetricsAuth;
use crate::engine::{self, PRESENCE_PAGE, PageRefused, PresencePage, Traffic, Unavailable};
use crate::errors::ErrorCode;
use crate::history_api;
use crate::hub::Hub;
use crate::idempotency;
use crate::ids::{self, Target};

/// The OpenAPI 3.1 document of this API.
pub const OPENAPI: &str = include_str!("../../../docs/openapi.json");

/// Most operations in one batch.
pub const MAX_BATCH: usize = 100;

impl From<Unavailable> for ApiError {
    fn from(error: Unavailable) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            error.to_string(),
        )
    }
}

/// An API error: status, stable code, message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub(crate) fn bad_request(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    fn body(&self) -> ErrorBody<'_> {
        ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: &self.message,
            },
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: ErrorCode,
    message: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            // Redis is expected back within seconds (nodes reconnect with backoff).
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        response
    }
}

/// A JSON body whose every rejection is an [`ApiError`].
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        // The syntax of the whole body first: serde stops at the first wrong
        // type, and a body cut short after one (`[1,`) is not JSON at all.
        let Json(raw) = Json::<Box<RawValue>>::from_request(req, state)
            .await
            .map_err(rejection)?;
        // serde's derive would also read an array, as the fields in order.
        if !raw.get().starts_with('{') {
            return Err(ApiError::bad_request(
                ErrorCode::InvalidRequest,
                "the body must be a JSON object",
            ));
        }
        let Json(value) = Json::<T>::from_bytes(raw.get().as_bytes()).map_err(rejection)?;
        Ok(Self(value))
    }
}

/// A path parameter whose rejection (a segment that is not UTF-8 once
/// decoded) is an [`ApiError`], not axum's plain text.
pub(crate) struct ApiPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for ApiPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(value)| Self(value))
            .map_err(|e| ApiError::bad_request(ErrorCode::InvalidRequest, e.body_text()))
    }
}

/// The API's error for each way a JSON body can be refused.
fn rejection(refused: JsonRejection) -> ApiError {
    match refused {
        JsonRejection::JsonDataError(e) => {
            ApiError::bad_request(ErrorCode::InvalidRequest, e.body_text())
        }
        JsonRejection::JsonSyntaxError(e) => {
            ApiError::bad_request(ErrorCode::InvalidJson, e.body_text())
        }
        JsonRejection::MissingJsonContentType(e) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::UnsupportedMediaType,
            e.body_text(),
        ),
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::PayloadTooLarge,
            "the request body is larger than api_max_body_bytes",
        ),
        other => ApiError::bad_request(ErrorCode::InvalidRequest, other.body_text()),
    }
}

#[derive(Clone)]
pub(crate) struct Api {
    pub(crate) hub: Arc<Hub>,
    /// No keys are configured and the listener is loopback: no key needed
    /// from this host ([`crate::local`]).
    open: bool,
}

/// How request bodies are read: at most `max_bytes`, within `read_timeout`.
#[derive(Debug, Clone, Copy)]
pub struct BodyRules {
    /// Largest body; a larger one, declared or sent, gets 413.
    pub max_bytes: usize,
    /// How long the whole body may take to arrive; past it, 408.
    pub read_timeout: std::time::Duration,
}

/// Reads the request body before any handler does: 413 at once for a
/// `Content-Length` over the limit (without waiting for the body), 413 for a
/// body that grows over it, 400 for one malformed on the wire (bad chunked
/// encoding), and 408 for one that does not arrive whole in time, so a
/// stalled client cannot hold a request open.
async fn read_body(rules: BodyRules, request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::PayloadTooLarge,
            "the request body is larger than api_max_body_bytes",
        )
        .into_response()
    };
    if declared.is_some_and(|len| len > rules.max_bytes as u64) {
        return too_large();
    }
    let (parts, body) = request.into_parts();
    let read = axum::body::to_bytes(body, rules.max_bytes);
    let bytes = match tokio::time::timeout(rules.read_timeout, read).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(error)) => {
            let error = error.into_inner();
            if error.is::<http_body_util::LengthLimitError>() {
                return too_large();
            }
            // Not the client's size: a body cut off or malformed on the wire.
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidRequest,
                format!("the request body could not be read: {error}"),
            )
            .into_response();
        }
        Err(_) => {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                ErrorCode::RequestTimeout,
                format!(
                    "the request body did not arrive within {} s (api_body_timeout_secs)",
                    rules.read_timeout.as_secs_f64()
                ),
            )
            .into_response();
        }
    };
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

/// The `/api/v1` routes. `loopback` says whether their listener is loopback-only.
pub fn router(hub: Arc<Hub>, body: BodyRules, loopback: bool) -> Router {
    let api = Api {
        open: hub.api_keys.is_empty() && loopback,
        hub,
    };
    let protected = Router::new()
        .route("/api/v1/send", post(send))
        .route("/api/v1/publish", post(publish))
        .route("/api/v1/disconnect", post(disconnect))
        .route("/api/v1/batch", post(batch))
        // Topics may hold `/`: the rest of the path is the topic.
        .route("/api/v1/presence/{*topic}", get(presence))
        .route("/api/v1/clients/{id}", get(client))
        .route("/api/v1/clients/{id}/inbox", get(history_api::inbox))
        .route("/api/v1/history/{*topic}", get(history_api::topic))
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/admin/stream", get(admin_stream));
    let metrics = Router::new().route("/metrics", get(metrics));
    let (protected, metrics) = match api.hub.metrics_auth {
        MetricsAuth::ApiKey => (protected.merge(metrics), Router::new()),
        MetricsAuth::None => (protected, metrics),
    };
    // The key is checked before the body is read: a caller without one
    // gets its 401 at once, and holds no buffered body meanwhile.
    let protected = protected
        .route_layer(middleware::from_fn(move |request, next| {
            read_body(body, request, next)
        }))
        .route_layer(middleware::from_fn_with_state(api.clone(), require_key));
    Router::new()
        .merge(crate::admin::pages())
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/{*rest}", any(not_found))
        .merge(protected)
        .merge(metrics)
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::MethodNotAllowed,
                "method not allowed here",
            )
        })
        .layer(DefaultBodyLimit::max(body.max_bytes))
        .with_state(api)
}

/// JSON 404 for unknown paths under `/api/` (and everywhere on an API-only listener).
pub async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        "no such endpoint; see /api/v1/openapi.json",
    )
}

async fn require_key(State(api): State<Api>, request: Request, next: Next) -> Response {
    if api.open {
        return match crate::local::from_this_host(request.headers(), false) {
            Ok(()) => next.run(request).await,
            Err(reason) => {
                api.hub.metrics.auth_failed("api_key");
                let message = format!(
                    "without API keys the API is open to this host only, and this request \
                     {reason}: configure --api-key"
                );
                ApiError::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, message)
                    .into_response()
            }
        };
    }
    if api.hub.api_keys.is_empty() {
        let message = "the API is off on this listener: configure --api-key";
        return ApiError::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, message)
            .into_response();
    }
    let presented = crate::auth::bearer(request.headers());
    match presented {
        Some(key) if api.hub.api_keys.accepts(key) => next.run(request).await,
        _ => {
            api.hub.metrics.auth_failed("api_key");
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                "send Authorization: Bearer <api key>",
            )
            .into_response()
        }
    }
}

/// `GET /metrics`: this node's metrics in the Prometheus text format.
async fn metrics(State(api): State<Api>) -> Response {
    let text = api.hub.metrics_text().await;
    let content_type = "text/plain; version=0.0.4; charset=utf-8";
    ([(header::CONTENT_TYPE, content_type)], text).into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendRequest {
    targets: Vec<Target>,
    payload: Box<RawValue>,
    #[serde(default)]
    from: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishRequest {
    topic: String,
    payload: Box<RawValue>,
    #[serde(default)]
    from: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectRequest {
    id: Target,
    #[serde(default, deserialize_with = "integral")]
    code: Option<u16>,
    #[serde(default)]
    reason: Option<String>,
}

/// A close code as JSON Schema sees an integer: `3000` and `3000.0` alike.
fn integral<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    let Some(number) = Option::<f64>::deserialize(d)? else {
        return Ok(None);
    };
    if number.fract() == 0.0 && (0.0..=f64::from(u16::MAX)).contains(&number) {
        Ok(Some(number as u16))
    } else {
        Err(serde::de::Error::custom(format!(
            "code must be an integer close code, not {number}"
        )))
    }
}

/// A request that passed every check, ready to run.
enum Checked<'r> {
    Send {
        targets: ids::Targets<'r>,
        from: Option<ClientId>,
        payload: &'r RawValue,
    },
    Publish {
        topic: &'r str,
        from: Option<ClientId>,
        payload: &'r RawValue,
    },
    Disconnect {
        id: &'r str,
        close: CloseReason,
    },
}

impl Api {
    fn check_send<'r>(&self, request: &'r SendRequest) -> Result<Checked<'r>, ApiError> {
        if request.targets.len() > self.hub.limits.max_targets {
            let message = format!(
                "at most {} targets are allowed",
                self.hub.limits.max_targets
            );
            return Err(ApiError::bad_request(ErrorCode::TooManyTargets, message));
        }
        Ok(Checked::Send {
            targets: ids::unique(request.targets.iter().map(Target::as_result))
                .map_err(|bad| invalid_id("target", bad))?,
            from: request.from.as_deref().map(checked_id).transpose()?,
            payload: &request.payload,
        })
    }

    fn check_publish<'r>(&self, request: &'r PublishRequest) -> Result<Checked<'r>, ApiError> {
        if request.topic == crate::topics::CLIENT_EVENTS {
            let message = format!("only the cluster publishes to {:?}", request.topic);
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                ErrorCode::Forbidden,
                message,
            ));
        }
        Ok(Checked::Publish {
            topic: checked_topic(&self.hub, &request.topic)?,
            from: request.from.as_deref().map(checked_id).transpose()?,
            payload: &request.payload,
        })
    }

    fn check_disconnect<'r>(
        &self,
        request: &'r DisconnectRequest,
    ) -> Result<Checked<'r>, ApiError> {
        let id = request
            .id
            .0
            .as_deref()
            .map_err(|bad| invalid_id("id", bad))?;
        let code = request.code.unwrap_or(1000);
        if !(code == 1000 || (3000..=4999).contains(&code)) {
            return Err(ApiError::bad_request(
                ErrorCode::InvalidRequest,
                "code must be 1000 or 3000-4999",
            ));
        }
        let reason = request
            .reason
            .as_deref()
            .unwrap_or("disconnected by the server");
        Ok(Checked::Disconnect {
            id,
            close: CloseReason::new(code, reason),
        })
    }

    /// Runs `checked`, once per `Idempotency-Key` when the request has one.
    async fn run_once(
        &self,
        headers: &HeaderMap,
        route: &str,
        checked: Checked<'_>,
    ) -> Result<Response, ApiError> {
        let Some(key) = headers.get("idempotency-key") else {
            return Ok(Json(self.run(checked, None).await?).into_response());
        };
        let key = key
            .to_str()
            .ok()
            .filter(|key| idempotency::is_valid(key))
            .ok_or_else(|| {
                let message = format!(
                    "Idempotency-Key must be 1 to {} visible ASCII characters",
                    idempotency::MAX_KEY_LEN
                );
                ApiError::bad_request(ErrorCode::InvalidRequest, message)
            })?;
        // This node remembers the result (and a retry that arrives while the
        // first runs waits for it); in cluster mode Redis does too, for a
        // retry that reaches another node.
        let scoped: Arc<str> = format!("{route}:{key}").into();
        let result = self
            .hub
            .idempotency
            .run(route, key, self.run(checked, Some(scoped)));
        Ok(Json(result.await?).into_response())
    }

    /// Runs `checked`; `key` is its scoped `Idempotency-Key`, if it has one.
    async fn run(
        &self,
        checked: Checked<'_>,
        key: Option<Arc<str>>,
    ) -> Result<serde_json::Value, ApiError> {
        Ok(match checked {
            Checked::Send {
                targets,
                from,
                payload,
            } => {
                let message = engine::Message {
                    from,
                    payload: payload.get().into(),
                    key,
                };
                let sent = self.hub.engine.send(&targets, message).await?;
                let offsets: serde_json::Map<_, _> = sent
                    .offsets()
                    .into_iter()
                    .map(|(target, offset)| (target.to_owned(), offset.into()))
                    .collect();
                serde_json::json!({
                    "delivered": sent.delivered(),
                    "offline": sent.offline(),
                    "offsets": offsets,
                })
            }
            Checked::Publish {
                topic,
                from,
                payload,
            } => {
                let message = engine::Message {
                    from,
                    payload: payload.get().into(),
                    key,
                };
                let history = self.hub.namespaces.find(topic).and_then(|ns| ns.history());
                let published = self
                    .hub
                    .engine
                    .publish(topic.into(), history, message)
                    .await?;
                match published.offset {
                    Some(offset) => serde_json::json!({
                        "subscribers": published.subscribers,
                        "offset": offset,
                    }),
                    None => serde_json::json!({ "subscribers": published.subscribers }),
                }
            }
            Checked::Disconnect { id, close } => {
                let connections = self.hub.engine.disconnect(id.into(), close).await?;
                serde_json::json!({ "connections": connections })
            }
        })
    }
}

pub(crate) fn checked_id(id: &str) -> Result<ClientId, ApiError> {
    ids::parse(id).map_err(|_| invalid_id("id", id))
}

fn invalid_id(field: &str, bad: &str) -> ApiError {
    ApiError::bad_request(
        ErrorCode::InvalidId,
        format!("invalid {field} {bad:?}: {}", ids::InvalidId),
    )
}

pub(crate) fn checked_topic<'t>(hub: &Hub, topic: &'t str) -> Result<&'t str, ApiError> {
    hub.namespaces
        .check(topic)
        .map_err(|(code, message)| ApiError::bad_request(code, message))?;
    Ok(topic)
}

async fn send(
    State(api): State<Api>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<SendRequest>,
) -> Result<Response, ApiError> {
    let checked = api.check_send(&request)?;
    api.run_once(&headers, "send", checked).await
}

async fn publish(
    State(api): State<Api>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<PublishRequest>,
) -> Result<Response, ApiError> {
    let checked = api.check_publish(&request)?;
    api.run_once(&headers, "publish", checked).await
}

async fn disconnect(
    State(api): State<Api>,
    ApiJson(request): ApiJson<DisconnectRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    api.run(api.check_disconnect(&request)?, None)
        .await
        .map(Json)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest {
    operations: Vec<Box<RawValue>>,
}

/// One batch operation, parsed. (An internally tagged enum cannot hold the raw
/// payload, so the `op` field is taken off first.)
enum Operation {
    Send(SendRequest),
    Publish(PublishRequest),
    Disconnect(DisconnectRequest),
}

fn parse_operation(raw: &RawValue) -> Result<Operation, String> {
    let Fields(mut fields) = serde_json::from_str(raw.get()).map_err(|e| e.to_string())?;
    let at = fields
        .iter()
        .position(|(name, _)| name == "op")
        .ok_or("missing field `op`")?;
    let (_, op) = fields.remove(at);
    let op: String = serde_json::from_str(op.get()).map_err(|e| format!("op: {e}"))?;
    // The other fields as an object again, for the operation's own type.
    let rest: Vec<String> = fields
        .iter()
        .map(|(name, value)| format!("{}:{}", serde_json::Value::from(name.as_str()), value.get()))
        .collect();
    let rest = format!("{{{}}}", rest.join(","));
    let parsed = match op.as_str() {
        "send" => serde_json::from_str(&rest).map(Operation::Send),
        "publish" => serde_json::from_str(&rest).map(Operation::Publish),
        "disconnect" => serde_json::from_str(&rest).map(Operation::Disconnect),
        other => return Err(format!("unknown op {other:?}: send, publish or disconnect")),
    };
    parsed.map_err(|e| e.to_string())
}

/// An operation's fields in order, refusing a name given twice, as the typed
/// bodies of `/send` and the WebSocket messages do (a map would keep the last).
struct Fields(Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Fields;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an operation object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Fields, A::Error> {
                let mut fields: Vec<(String, Box<RawValue>)> = Vec::new();
                while let Some((name, value)) = map.next_entry::<String, Box<RawValue>>()? {
                    if fields.iter().any(|(seen, _)| *seen == name) {
                        return Err(serde::de::Error::custom(format_args!(
                            "duplicate field `{name}`"
                        )));
                    }
                    fields.push((name, value));
                }
                Ok(Fields(fields))
            }
        }
        deserializer.deserialize_map(Visit)
    }
}

/// Checks every operation first: if one is refused the request fails with
/// its status (400, or 403 for a publish to `$clients`) naming it, and none
/// runs. Then runs them in order.
async fn batch(
    State(api): State<Api>,
    ApiJson(request): ApiJson<BatchRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if request.operations.len() > MAX_BATCH {
        let message = format!("at most {MAX_BATCH} operations per batch");
        return Err(ApiError::bad_request(ErrorCode::TooManyOperations, message));
    }
    // The operation's own status: a refusal is 400 or 403, Redis down 503.
    let in_operation = |i: usize, e: ApiError| {
        ApiError::new(e.status, e.code, format!("operations[{i}]: {}", e.message))
    };
    let operations = request
        .operations
        .iter()
        .enumerate()
        .map(|(i, raw)| {
            parse_operation(raw)
                .map_err(|e| in_operation(i, ApiError::bad_request(ErrorCode::InvalidRequest, e)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let checked = operations
        .iter()
        .enumerate()
        .map(|(i, op)| {
            match op {
                Operation::Send(r) => api.check_send(r),
                Operation::Publish(r) => api.check_publish(r),
                Operation::Disconnect(r) => api.check_disconnect(r),
            }
            .map_err(|e| in_operation(i, e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // In order, each answered before the next starts, as separate requests would be.
    let mut results = Vec::with_capacity(checked.len());
    for (i, checked) in checked.into_iter().enumerate() {
        let result = api.run(checked, None).await.map_err(|e| {
            let ran = ApiError::new(
                e.status,
                e.code,
                format!("{} ({i} before it ran)", e.message),
            );
            in_operation(i, ran)
        });
        results.push(result?);
    }
    Ok(Json(serde_json::json!({ "results": results })))
}

#[derive(Serialize)]
struct PresenceResult {
    topic: String,
    subscribers: usize,
    clients: std::collections::BTreeMap<String, usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

async fn presence(
    State(api): State<Api>,
    ApiPath(topic): ApiPath,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<PresenceResult>, ApiError> {
    let topic = checked_topic(&api.hub, &topic)?;
    let page = presence_page(&api.hub, &query)?;
    let presence = api.hub.engine.presence(topic.into(), page).await?;
    Ok(Json(PresenceResult {
        topic: topic.to_owned(),
        subscribers: presence.subscribers,
        clients: presence
            .clients
            .into_iter()
            .map(|(client, n)| (client.to_string(), n))
            .collect(),
        next: presence.next,
    }))
}

/// `cursor` and `limit` from a presence query, checked.
fn presence_page(hub: &Hub, query: &HashMap<String, String>) -> Result<PresencePage, ApiError> {
    let limit = query
        .get("limit")
        .map(|text| {
            text.parse::<u64>().map_err(|_| {
                let message = format!("invalid limit {text:?}: 1 to {PRESENCE_PAGE}");
                ApiError::bad_request(ErrorCode::InvalidRequest, message)
            })
        })
        .transpose()?;
    let cursor = query.get("cursor").map(String::as_str);
    PresencePage::asked(&*hub.engine, cursor, limit).map_err(|e| match e {
        PageRefused::Limit(message) => ApiError::bad_request(ErrorCode::InvalidRequest, message),
        PageRefused::Cursor(message) => ApiError::bad_request(ErrorCode::InvalidCursor, message),
    })
}

#[derive(Serialize)]
struct ClientResult {
    id: String,
    online: bool,
    connections: usize,
}

async fn client(
    State(api): State<Api>,
    ApiPath(id): ApiPath,
) -> Result<Json<ClientResult>, ApiError> {
    let id = checked_id(&id)?;
    let connections = api.hub.engine.connections(vec![id.clone()]).await?[0];
    Ok(Json(ClientResult {
        id: id.to_string(),
        online: connections > 0,
        connections,
    }))
}

#[derive(Serialize)]
struct StatsResult {
    clients: usize,
    topics: usize,
    #[serde(flatten)]
    traffic: Traffic,
}

/// The dashboard's stream of the cluster's state.
async fn admin_stream(State(api): State<Api>) -> Response {
    crate::admin::stream(&api.hub)
}

/// The cluster's figures (one node's, with the memory engine); other nodes'
/// traffic is as their last heartbeat gave it.
async fn stats(State(api): State<Api>) -> Result<Json<StatsResult>, ApiError> {
    let online = api.hub.engine.counts().await?;
    let nodes = api.hub.engine.nodes(api.hub.traffic()).await?;
    Ok(Json(StatsResult {
        clients: online.clients,
        topics: online.topics,
        traffic: crate::engine::total(&nodes),
    }))
}
