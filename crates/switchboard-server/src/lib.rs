//! The `switchboard` relay service.
//!
//! Clients connect to `/ws?id=<id>` and send `{"targets":[...],"payload":...}`;
//! the payload goes to every connection of every target. The binary
//! (`src/main.rs`) only wires these modules together:
//!
//! - [`config`]: settings from defaults, a TOML file, env vars and flags.
//! - [`app`]: the HTTP routes and shared state.
//! - [`relay`]: the per-connection [`switchboard::Handler`].
//! - [`wire`]: the JSON protocol (docs/protocol.md).
//! - [`ids`]: client id rules.
//! - [`logging`]: tracing setup.
//! - [`server`]: the listener, signals and graceful shutdown.

#![forbid(unsafe_code)]

pub mod app;
pub mod config;
pub mod ids;
pub mod logging;
pub mod relay;
pub mod server;
pub mod wire;
