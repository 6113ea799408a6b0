//! The HTTP upgrade (RFC 6455 §4.2).
//!
//! [`WebSocketUpgrade`] is an axum extractor, so it runs after routing and after
//! every middleware layer: auth decides before any WebSocket exists. It also
//! works with plain hyper through [`WebSocketUpgrade::from_parts`]. Each way a
//! request can fail to be an upgrade is an [`UpgradeError`] with its HTTP status.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::response::{IntoResponse, Response};
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Method, StatusCode};
use hyper::upgrade::OnUpgrade;
use switchboard_proto::Role;
use switchboard_proto::deflate::{DeflateParams, negotiate};
use switchboard_proto::handshake::{accept_key, has_token, is_valid_key};
use tracing::{Instrument, Span};

use crate::driver::{self, Setup};
use crate::handle::{ConnHandle, ConnId};
use crate::handler::Handler;
use crate::mailbox::Mailbox;
use crate::options::Options;
use crate::shutdown::Shutdown;

/// Why a request could not be upgraded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UpgradeError {
    /// The method was not GET.
    #[error("WebSocket upgrades must use GET (RFC6455§4.1)")]
    MethodNotGet,
    /// No `Upgrade: websocket` header: an ordinary HTTP request reached a WebSocket route.
    #[error("this endpoint speaks WebSocket: send Upgrade: websocket (RFC6455§4.2.1)")]
    NotWebSocket,
    /// `Connection` does not list `upgrade`.
    #[error("Connection header must include 'upgrade' (RFC6455§4.2.1)")]
    BadConnectionHeader,
    /// `Sec-WebSocket-Version` is not 13.
    #[error("unsupported Sec-WebSocket-Version: only 13 is supported (RFC6455§4.4)")]
    UnsupportedVersion,
    /// `Sec-WebSocket-Key` is missing or not base64 of 16 bytes.
    #[error("missing or invalid Sec-WebSocket-Key (RFC6455§4.2.1)")]
    BadKey,
    /// No `Host` header, or more than one.
    #[error("a WebSocket upgrade needs one Host header (RFC6455§4.2.1)")]
    BadHost,
    /// The server connection cannot be upgraded (HTTP/2 or no upgrade support).
    #[error("this connection cannot be upgraded")]
    NotUpgradable,
}

impl UpgradeError {
    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MethodNotGet => StatusCode::METHOD_NOT_ALLOWED,
            Self::NotWebSocket | Self::UnsupportedVersion | Self::NotUpgradable => {
                StatusCode::UPGRADE_REQUIRED
            }
            Self::BadConnectionHeader | Self::BadKey | Self::BadHost => StatusCode::BAD_REQUEST,
        }
    }
}

impl IntoResponse for UpgradeError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), self.to_string()).into_response();
        let headers = response.headers_mut();
        if self.status() == StatusCode::UPGRADE_REQUIRED {
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            headers.insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
        }
        response
    }
}

/// A validated upgrade request, waiting for its handler.
pub struct WebSocketUpgrade {
    on_upgrade: OnUpgrade,
    key: HeaderValue,
    offered_protocols: Option<HeaderValue>,
    offered_extensions: Option<HeaderValue>,
    protocol: Option<HeaderValue>,
    options: Options,
    shutdown: Option<Shutdown>,
    on_failed: Option<FailedUpgradeCallback>,
    span: Option<Span>,
}

/// What [`WebSocketUpgrade::on_failed_upgrade`] keeps.
pub(crate) type FailedUpgradeCallback = Box<dyn FnOnce(UpgradeFailed) + Send>;

/// hyper could not hand over the connection after the 101 response was sent
/// (the client went away, or the server does not support upgrades).
#[derive(Debug, thiserror::Error)]
#[error("the connection could not be upgraded after the 101 response: {0}")]
pub struct UpgradeFailed(#[from] pub(crate) hyper::Error);

impl std::fmt::Debug for WebSocketUpgrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebSocketUpgrade")
            .field("protocol", &self.protocol)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// The values of a list header given on one line or several, as one.
fn joined(headers: &http::HeaderMap, name: header::HeaderName) -> Option<HeaderValue> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let mut line = first.as_bytes().to_vec();
    for value in values {
        line.extend_from_slice(b", ");
        line.extend_from_slice(value.as_bytes());
    }
    // Made of header values and ", ": a header value still.
    HeaderValue::from_bytes(&line).ok()
}

impl WebSocketUpgrade {
    /// Validates the request head and takes hyper's upgrade handle out of it:
    /// the entry point under plain hyper (axum calls it as an extractor).
    ///
    /// # Errors
    ///
    /// An [`UpgradeError`] for each way the request is not a WebSocket upgrade
    /// (RFC 6455 §4.2.1); each is an HTTP response (400, 405 or 426).
    pub fn from_parts(parts: &mut Parts) -> Result<Self, UpgradeError> {
        let headers = &parts.headers;
        // A list may come on several header lines (RFC 9110 §5.3).
        let any_has = |name, token| {
            headers
                .get_all(name)
                .iter()
                .any(|v: &HeaderValue| v.to_str().is_ok_and(|v| has_token(v, token)))
        };
        if parts.method != Method::GET {
            return Err(UpgradeError::MethodNotGet);
        }
        if headers.get_all(header::HOST).iter().count() != 1 {
            return Err(UpgradeError::BadHost);
        }
        if !any_has(header::UPGRADE, "websocket") {
            return Err(UpgradeError::NotWebSocket);
        }
        if !any_has(header::CONNECTION, "upgrade") {
            return Err(UpgradeError::BadConnectionHeader);
        }
        // Every Sec-WebSocket-Version the request carries must say 13: a second,
        // different one is not something to pick from.
        let versions = headers.get_all(header::SEC_WEBSOCKET_VERSION);
        let all_13 = versions
            .iter()
            .all(|v| v.to_str().is_ok_and(|v| v.trim() == "13"));
        if versions.iter().next().is_none() || !all_13 {
            return Err(UpgradeError::UnsupportedVersion);
        }
        // One key only (RFC 6455 §11.3.1): two are no request to pick from.
        let mut keys = headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
        let key = keys
            .next()
            .filter(|k| is_valid_key(k.as_bytes()) && keys.next().is_none())
            .cloned()
            .ok_or(UpgradeError::BadKey)?;
        let offered_protocols = joined(headers, header::SEC_WEBSOCKET_PROTOCOL);
        let offered_extensions = joined(headers, header::SEC_WEBSOCKET_EXTENSIONS);
        let on_upgrade = parts
            .extensions
            .remove::<OnUpgrade>()
            .ok_or(UpgradeError::NotUpgradable)?;
        Ok(Self {
            on_upgrade,
            key,
            offered_protocols,
            offered_extensions,
            protocol: None,
            options: Options::default(),
            shutdown: None,
            on_failed: None,
            span: None,
        })
    }

    /// Sets this connection's options.
    pub fn options(mut self, options: Options) -> Self {
        self.options = options;
        self
    }

    /// The subprotocols the client offered, in its order of preference.
    pub fn requested_protocols(&self) -> impl Iterator<Item = &str> {
        self.offered_protocols
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|p| !p.is_empty())
    }

    /// Agrees on the first subprotocol the client offered that is in `supported`.
    /// Without a match, the handshake succeeds with no subprotocol (RFC 6455 §4.2.2).
    pub fn protocols<'a>(mut self, supported: impl IntoIterator<Item = &'a str>) -> Self {
        let supported: Vec<&str> = supported.into_iter().collect();
        let chosen = self
            .requested_protocols()
            .find(|p| supported.contains(p))
            .and_then(|p| HeaderValue::from_str(p).ok());
        self.protocol = chosen;
        self
    }

    /// The subprotocol agreed by [`Self::protocols`].
    pub fn selected_protocol(&self) -> Option<&str> {
        self.protocol.as_ref().and_then(|p| p.to_str().ok())
    }

    /// Tracks this connection in `shutdown`, which can close it with 1001.
    pub fn shutdown(mut self, shutdown: &Shutdown) -> Self {
        self.shutdown = Some(shutdown.clone());
        self
    }

    /// Calls `callback` if hyper cannot hand over the connection after the 101
    /// response (the handler's callbacks then never run). Without one, such a
    /// failure is logged at debug level.
    ///
    /// # Examples
    ///
    /// ```
    /// # use switchboard::{Context, Handler, Message, Outcome, WebSocketUpgrade};
    /// # use axum::response::Response;
    /// # struct Echo;
    /// # impl Handler for Echo {
    /// #     type Info = ();
    /// #     fn handle_in(&mut self, m: Message, _: &mut Context<'_, ()>) -> Outcome { Outcome::push(m) }
    /// # }
    /// async fn ws(upgrade: WebSocketUpgrade) -> Response {
    ///     upgrade
    ///         .on_failed_upgrade(|error| eprintln!("upgrade failed: {error}"))
    ///         .on_upgrade(Echo)
    /// }
    /// ```
    pub fn on_failed_upgrade(
        mut self,
        callback: impl FnOnce(UpgradeFailed) + Send + 'static,
    ) -> Self {
        self.on_failed = Some(Box::new(callback));
        self
    }

    /// The connection's span: the handler is made, and its task runs, inside
    /// it, so every event of the connection carries its fields (with JSON logs,
    /// as fields of the event). The connection's id goes in a field named
    /// `conn`, when the span declares one (`conn = tracing::field::Empty`).
    /// Without one the connection gets `info_span!("websocket", conn)`.
    ///
    /// The connection logs one info event when it opens, and one when it
    /// closes with its close code, reason, duration, and messages and bytes
    /// each way; each message it receives at debug. Payloads are never logged.
    ///
    /// ```no_run
    /// use axum::response::Response;
    /// use switchboard::{Context, Handler, Message, Outcome, WebSocketUpgrade};
    /// # struct Echo;
    /// # impl Handler for Echo {
    /// #     type Info = ();
    /// #     fn handle_in(&mut self, message: Message, _: &mut Context<'_, ()>) -> Outcome {
    /// #         Outcome::push(message)
    /// #     }
    /// # }
    ///
    /// async fn ws(upgrade: WebSocketUpgrade) -> Response {
    ///     let span = tracing::info_span!("chat", conn = tracing::field::Empty, user = "ann");
    ///     upgrade.span(span).on_upgrade(Echo)
    /// }
    /// ```
    pub fn span(mut self, span: Span) -> Self {
        self.span = Some(span);
        self
    }

    /// Finishes the handshake: returns the 101 response and, once hyper hands
    /// over the connection, runs `handler` in a task of its own.
    ///
    /// The response is axum's; under plain hyper it serves as it is (its body
    /// is a `hyper::body::Body`).
    ///
    /// # Examples
    ///
    /// ```
    /// # use switchboard::{Context, Handler, Message, Outcome, WebSocketUpgrade};
    /// # use axum::response::Response;
    /// struct Echo;
    ///
    /// impl Handler for Echo {
    ///     type Info = ();
    ///     fn handle_in(&mut self, message: Message, _ctx: &mut Context<'_, ()>) -> Outcome {
    ///         Outcome::push(message)
    ///     }
    /// }
    ///
    /// async fn ws(upgrade: WebSocketUpgrade) -> Response {
    ///     upgrade.on_upgrade(Echo)
    /// }
    /// ```
    #[must_use = "the handshake only completes when this response is sent"]
    pub fn on_upgrade<H: Handler>(self, handler: H) -> Response {
        self.on_upgrade_with(move |_| handler)
    }

    /// Like [`Self::on_upgrade`], building the handler from the connection's own
    /// handle first. The handle works before the 101 response is sent (what is
    /// pushed waits for the socket), so a connection registered here is reachable
    /// as soon as the client sees the handshake succeed; `init` runs only later.
    #[must_use = "the handshake only completes when this response is sent"]
    pub fn on_upgrade_with<H, F>(mut self, make: F) -> Response
    where
        H: Handler,
        F: FnOnce(&ConnHandle<H::Info>) -> H,
    {
        let deflate = match (&self.options.compression, &self.offered_extensions) {
            (Some(options), Some(offer)) => offer.to_str().ok().and_then(|o| negotiate(o, options)),
            _ => None,
        };
        let response = self.response(deflate.as_ref());
        let id = ConnId::next();
        let span = self
            .span
            .take()
            .unwrap_or_else(|| tracing::info_span!("websocket", conn = tracing::field::Empty));
        span.record("conn", tracing::field::display(id));
        let mailbox = Arc::new(Mailbox::new(id, &self.options));
        let handler = span.in_scope(|| make(&ConnHandle::new(mailbox.clone())));
        let setup = Setup {
            role: Role::Server,
            peer_context: deflate.as_ref().map(DeflateParams::client_context),
            deflate,
            protocol: self.selected_protocol().map(str::to_owned),
            shutdown: self.shutdown.as_ref().map(Shutdown::signal),
            options: self.options,
            on_failed: self.on_failed,
        };
        let task =
            driver::Connection::new(self.on_upgrade, handler, mailbox, setup).instrument(span);
        drop(tokio::spawn(task));
        response
    }

    fn response(&self, deflate: Option<&DeflateParams>) -> Response {
        let mut response = Response::default();
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        let accept = accept_key(self.key.as_bytes());
        headers.insert(
            header::SEC_WEBSOCKET_ACCEPT,
            HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
        );
        if let Some(protocol) = &self.protocol {
            headers.insert(header::SEC_WEBSOCKET_PROTOCOL, protocol.clone());
        }
        if let Some(params) = deflate {
            headers.insert(
                header::SEC_WEBSOCKET_EXTENSIONS,
                HeaderValue::from_str(&params.response_header()).expect("ASCII parameters"),
            );
        }
        response
    }
}

impl<S: Send + Sync> FromRequestParts<S> for WebSocketUpgrade {
    type Rejection = UpgradeError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Self::from_parts(parts)
    }
}
