//! The relay handler: one per `/ws` connection.
//!
//! A connection registers under its client id before its handshake completes. Each text message is
//! parsed for its targets only; the payload stays raw JSON and is rendered at
//! most once per wire mode, then the same frame goes to every recipient.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};

use switchboard::{
    Broker, ClientId, ConnHandle, Context, Format, Handler, Message, Outcome, PreparedMessage,
    Registration,
};

use crate::wire::{self, ErrorCode, Inbound, Mode};

/// One relay connection's state.
pub struct Relay {
    id: ClientId,
    mode: Mode,
    broker: Arc<dyn Broker>,
    max_targets: usize,
    /// Unregisters the connection when the handler is dropped, however it ends.
    _registration: Registration,
}

impl Relay {
    /// A connection of client `id`, speaking `mode`, delivering through `broker`.
    /// It registers at once, before the handshake response goes out, so the client
    /// is reachable as soon as it sees the handshake succeed.
    pub fn new(
        id: ClientId,
        mode: Mode,
        broker: Arc<dyn Broker>,
        max_targets: usize,
        handle: &ConnHandle<()>,
    ) -> Self {
        let registration = broker.register(id.clone(), handle.outbox(), mode.format());
        tracing::debug!(client = %id, conn = %handle.id(), ?mode, "connected");
        Self {
            id,
            mode,
            broker,
            max_targets,
            _registration: registration,
        }
    }

    fn on_text(&mut self, text: &str) -> Outcome {
        let inbound = match wire::parse(text) {
            Ok(inbound) => inbound,
            Err((code, message)) => return self.error(code, &message, None),
        };
        match inbound.kind.as_deref() {
            None | Some("send") => self.send(&inbound),
            Some(other) => self.error(
                ErrorCode::UnknownType,
                &format!("unknown message type {other:?}"),
                inbound.id,
            ),
        }
    }

    fn send(&mut self, inbound: &Inbound<'_>) -> Outcome {
        let (Some(targets), Some(payload)) = (&inbound.targets, inbound.payload) else {
            let missing = if inbound.targets.is_none() {
                "targets"
            } else {
                "payload"
            };
            return self.error(
                ErrorCode::InvalidMessage,
                &format!("missing field `{missing}`"),
                inbound.id,
            );
        };
        if targets.len() > self.max_targets {
            let message = format!(
                "{} targets; at most {} are allowed",
                targets.len(),
                self.max_targets
            );
            return self.error(ErrorCode::TooManyTargets, &message, inbound.id);
        }
        if let Some(bad) = targets.iter().find_map(|t| t.0.as_ref().err()) {
            let message = format!("invalid target {bad:?}: {}", crate::ids::InvalidId);
            return self.error(ErrorCode::InvalidTarget, &message, inbound.id);
        }

        let raw = OnceLock::new();
        let envelope = OnceLock::new();
        let render = |format: Format| -> PreparedMessage {
            if format == Mode::Raw.format() {
                raw.get_or_init(|| wire::raw_delivery(payload)).clone()
            } else {
                envelope
                    .get_or_init(|| wire::envelope_delivery(&self.id, payload))
                    .clone()
            }
        };
        let mut seen = HashSet::with_capacity(targets.len());
        let mut delivered = Vec::new();
        let mut offline = Vec::new();
        for target in targets.iter().filter_map(|t| t.0.as_deref().ok()) {
            if !seen.insert(target) {
                continue;
            }
            if self.broker.send(target, &render) > 0 {
                delivered.push(target);
            } else {
                offline.push(target);
            }
        }
        match (self.mode, inbound.id) {
            (Mode::Envelope, Some(id)) => {
                Outcome::push(Message::text(wire::ack(id, &delivered, &offline)))
            }
            _ => Outcome::Continue,
        }
    }

    fn error(
        &self,
        code: ErrorCode,
        message: &str,
        id: Option<&serde_json::value::RawValue>,
    ) -> Outcome {
        tracing::debug!(client = %self.id, ?code, message, "refused a client message");
        Outcome::push(Message::text(wire::error(code, message, id)))
    }
}

impl Handler for Relay {
    type Info = ();

    fn handle_in(&mut self, message: Message, _ctx: &mut Context<'_, ()>) -> Outcome {
        match message {
            Message::Text(text) => self.on_text(&text),
            _ => self.error(
                ErrorCode::BinaryNotSupported,
                "binary frames are not supported: send JSON as text",
                None,
            ),
        }
    }

    fn terminate(&mut self, reason: &switchboard::TerminateReason) {
        tracing::debug!(client = %self.id, ?reason, "disconnected");
    }
}
