//! An optional WebSocket echo (`echo_path`): every message is sent back.
//!
//! For diagnostics (does a WebSocket get through this proxy, and with
//! compression?) and for conformance runs: the Autobahn cases need an echo,
//! and this one runs on the binary's own listener, workers and connection
//! settings, so they test what the service ships rather than an example.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Extension;
use axum::extract::{ConnectInfo, State};
use axum::response::{IntoResponse, Response};
use switchboard::{Context, Handler, Message, Outcome, UpgradeError, WebSocketUpgrade};

use crate::hub::Hub;
use crate::peers::PeerSlot;

/// One echo connection; it holds its place among its address's connections.
struct Echo {
    _peer: Option<PeerSlot>,
}

impl Handler for Echo {
    type Info = ();

    fn handle_in(&mut self, message: Message, _ctx: &mut Context<'_, ()>) -> Outcome {
        Outcome::push(message)
    }
}

/// The echo route's handler: the relay's connection options and limits per
/// address, no identity.
pub async fn echo(
    State(hub): State<Arc<Hub>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    upgrade: Result<WebSocketUpgrade, UpgradeError>,
) -> Response {
    let (slot, options) = match hub.admit(peer) {
        Ok(admitted) => admitted,
        Err(full) => return full.into_response(),
    };
    match upgrade {
        Ok(upgrade) => upgrade
            .options(options)
            .shutdown(&hub.shutdown)
            .on_upgrade(Echo { _peer: slot }),
        Err(e) => e.into_response(),
    }
}
