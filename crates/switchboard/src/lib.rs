//! Switchboard: a WebSocket toolkit where every connection is a task with an address.
//!
//! The model is Elixir's WebSock: a connection runs a [`Handler`] whose callbacks
//! (`init`, `handle_in`, `handle_info`, `handle_control`, `terminate`) each return
//! an [`Outcome`]. Every connection is its own tokio task with a mailbox, and its
//! [`ConnHandle`] lets any code send it messages, push frames or close it, as
//! Elixir code sends to a pid.
//!
//! - [`upgrade`]: [`WebSocketUpgrade`], an axum extractor (and plain hyper entry
//!   point) that runs after routing and middleware, so auth can decide first.
//! - [`client`]: [`client::Connector`], which connects to `ws://` and `wss://` URLs
//!   and runs a [`Handler`] in the client role, on the same driver as the server.
//! - [`handler`]: the [`Handler`] trait, [`Outcome`], [`Context`] and [`TerminateReason`].
//! - [`handle`]: [`ConnHandle`] and [`Outbox`], the addresses of a connection.
//! - [`options`]: per-connection [`Options`]: limits, timeouts, compression, backpressure.
//! - [`ReceiveBudget`]: memory for partly received data, shared by connections.
//! - [`registry`]: [`Registry`], live connections by client id, behind the [`Broker`] trait.
//! - [`pubsub`]: [`PubSub`], topics with encode-once publish and presence.
//! - [`testing`]: [`testing::Harness`], which drives a handler without a socket, for unit tests.
//! - [`shutdown`]: [`Shutdown`], which closes every connection with 1001 and waits for them.
//! - [`serve()`]: an HTTP/1.1 server for an axum `Router` under which pushed frames
//!   can bypass the connection's task (see docs/architecture.md), and
//!   [`serve_tls()`], the same over TLS.
//!
//! The protocol itself lives in [`switchboard_proto`], re-exported as [`proto`].
//!
//! ```no_run
//! use axum::{Router, routing::get, response::Response};
//! use switchboard::{Context, Handler, Message, Outcome, WebSocketUpgrade};
//!
//! struct Echo;
//!
//! impl Handler for Echo {
//!     type Info = ();
//!     fn handle_in(&mut self, message: Message, _ctx: &mut Context<'_, ()>) -> Outcome {
//!         Outcome::push(message)
//!     }
//! }
//!
//! async fn ws(upgrade: WebSocketUpgrade) -> Response {
//!     upgrade.on_upgrade(Echo)
//! }
//!
//! # async fn run() -> std::io::Result<()> {
//! let app: Router = Router::new().route("/ws", get(ws));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:4000").await?;
//! switchboard::serve(listener, app, std::future::pending()).await;
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]

mod budget;
pub mod client;
mod driver;
pub mod handle;
pub mod handler;
mod lot;
mod mailbox;
mod members;
pub mod options;
pub mod pubsub;
pub mod registry;
mod serve;
mod sharded;
pub mod shutdown;
mod socket;
pub mod stats;
mod telemetry;
pub mod testing;
pub mod upgrade;

pub use budget::ReceiveBudget;
pub use handle::{ConnHandle, ConnId, Held, Outbound, Outbox, PushError, SendError, TimerRef};
pub use handler::{Context, Handler, Outcome, TerminateReason};
pub use options::{Options, SlowConsumerPolicy};
pub use pubsub::{
    PresenceChange, PresenceListener, PubSub, SubscribeError, Subscription, TopicSummary,
};
pub use registry::{Broker, ClientId, Format, Registration, Registry};
pub use serve::{TLS_HANDSHAKE_TIMEOUT, accept_errors, serve, serve_tls};
pub use sharded::Spread;
pub use shutdown::Shutdown;
pub use stats::{ShardedCounter, Stats, StatsSnapshot};
pub use switchboard_proto as proto;
pub use switchboard_proto::{CloseCode, CloseReason, Message, PreparedMessage, Utf8Bytes};
pub use upgrade::{UpgradeError, UpgradeFailed, WebSocketUpgrade};
