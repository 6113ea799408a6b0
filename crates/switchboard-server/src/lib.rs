//! The `switchboard` relay service.
//!
//! Clients connect to `/ws?id=<id>` and send `{"targets":[...],"payload":...}`;
//! the payload goes to every connection of every target. The binary
//! (`src/main.rs`) only wires these modules together:
//!
//! - [`config`]: settings from defaults, a TOML file, env vars and flags.
//! - [`hub`]: the state every connection and request shares.
//! - [`app`]: the client routes: `/ws` with its auth and limits, `/healthz`, `/`.
//! - [`relay`]: the per-connection [`switchboard::Handler`].
//! - [`wire`]: the JSON protocol (docs/protocol.md).
//! - [`api`]: the HTTP API for backends (docs/openapi.json).
//! - [`errors`]: the error codes both of them answer with.
//! - [`auth`]: client tokens (JWT) and API keys.
//! - [`topics`]: topic names, namespaces and presence events.
//! - [`limits`]: per-connection rate limits.
//! - [`ids`]: client id rules.
//! - [`logging`]: tracing setup.
//! - [`server`]: the listeners, signals and graceful shutdown.

#![forbid(unsafe_code)]

pub mod admin;
mod answers;
pub mod api;
pub mod app;
pub mod auth;
pub mod closes;
pub mod config;
pub mod echo;
pub mod engine;
pub mod epochs;
pub mod errors;
mod history_api;
pub mod hub;
pub mod idempotency;
pub mod ids;
pub mod jwks;
pub mod limits;
pub mod local;
pub mod logging;
pub mod metrics;
pub mod peers;
pub mod relay;
pub mod server;
pub mod snapshot;
pub mod streams;
pub mod tls;
pub mod topics;
pub mod wire;
pub mod workers;
