//! The relay handler: one per `/ws` connection.
//!
//! A connection registers under its client id before its handshake completes.
//! Each text message is parsed for what routing needs (type, targets, topic);
//! the payload stays raw JSON and is rendered at most once per wire mode, then
//! the same frame goes to every recipient.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::value::RawValue;
use switchboard::{
    ClientId, CloseCode, ConnHandle, Context, Handler, Held, Message, Outbox, Outcome,
    Registration, SubscribeError, TerminateReason, TimerRef,
};

use crate::answers::Answers;
use crate::auth::{Identity, Permissions, TokenError};
use crate::engine::{
    self, Joined, PageRefused, Pending, PresencePage, Subscribe, SubscribeRefused, Subscribed,
};
use crate::hub::Hub;
use crate::ids::TargetList;
use crate::limits::{Frame, RateLimiter, Verdict};
use crate::metrics::Counted;
use crate::peers::PeerSlot;
use crate::streams::Position;
use crate::topics::{CLIENT_EVENTS, Namespace, Namespaces};
use crate::wire::{self, At, ErrorCode, Inbound, Mode, Since};

/// Close code when a client's token expires without a refresh.
pub const TOKEN_EXPIRED: u16 = 4001;

/// Messages a relay connection sends itself.
#[derive(Debug)]
pub enum RelayInfo {
    /// The token of this generation has expired.
    TokenExpired(u32),
    /// The engine has answered a subscribe.
    Subscribed {
        /// The topic.
        topic: Arc<str>,
        /// Which attempt to subscribe it answers.
        attempt: u64,
        /// The subscribe's `"id"`, when it asked for an ack.
        id: Option<Box<RawValue>>,
        /// The engine's answer.
        result: Result<Subscribed, SubscribeRefused>,
        /// What the subscribe holds against the outbound budget, until its
        /// answer is handled: what waits in the mailbox stays bounded.
        held: Held,
    },
}

/// A refusal: the error code and a message for the client.
type Refusal = (ErrorCode, String);

/// One relay connection's state.
pub struct Relay {
    hub: Arc<Hub>,
    id: ClientId,
    mode: Mode,
    permissions: Permissions,
    /// Bumped on each refresh, so a stale expiry timer is ignored.
    token_generation: u32,
    expiry_timer: Option<TimerRef>,
    /// Made with the first subscribe: a connection that never subscribes
    /// (and every idle one until it does) holds one pointer, not two maps.
    topics: Option<Box<Topics>>,
    /// The size of the message being handled: what its answer, while the
    /// engine has it, holds against the connection's outbound budget.
    handling: u32,
    /// Answers waiting for the engine, sent in the order of their messages.
    answers: Answers,
    limiter: RateLimiter,
    /// Unregisters the connection when the handler is dropped, however it ends.
    _registration: Registration,
    /// Its place among its address's connections, given back the same way.
    _peer: Option<PeerSlot>,
    /// Counted open (the upgrade went through) and closed, in the metrics.
    counted: (bool, bool),
}

impl Relay {
    /// A connection of `identity` speaking `mode`. It registers at once, before the
    /// handshake response goes out, so the client is reachable as soon as it sees
    /// the handshake succeed.
    pub fn new(
        hub: Arc<Hub>,
        identity: Identity,
        mode: Mode,
        handle: &ConnHandle<RelayInfo>,
        peer: Option<PeerSlot>,
        joined: Box<dyn Joined>,
    ) -> Self {
        let registration = joined.attach(handle.outbox());
        let limits = hub.limits;
        let mut relay = Self {
            id: identity.client,
            mode,
            permissions: identity.permissions,
            token_generation: 0,
            expiry_timer: None,
            topics: None,
            handling: 0,
            answers: Answers::default(),
            limiter: RateLimiter::new(&limits),
            _registration: registration,
            _peer: peer,
            counted: (false, false),
            hub,
        };
        relay.schedule_expiry(identity.expires_at, handle);
        relay
    }

    /// The connection's topics, made with the first subscribe.
    fn topics(&mut self) -> &mut Topics {
        self.topics.get_or_insert_default()
    }

    fn schedule_expiry(&mut self, expires_at: Option<u64>, handle: &ConnHandle<RelayInfo>) {
        if let Some(timer) = self.expiry_timer.take() {
            timer.cancel();
        }
        // Wrapping: only equality with the latest generation matters.
        self.token_generation = self.token_generation.wrapping_add(1);
        if let Some(expires_at) = expires_at {
            // The same clock skew the handshake allowed, or a token accepted a few
            // seconds after its `exp` would be cut off at once.
            let leeway = self.hub.jwt.as_ref().map_or(0, |jwt| jwt.leeway_secs());
            // To the sub-second: whole seconds let a connection outlive its
            // token by up to one.
            let Some(deadline) =
                UNIX_EPOCH.checked_add(Duration::from_secs(expires_at.saturating_add(leeway)))
            else {
                // Past what the system clock can name: the token outlives the process.
                return;
            };
            let delay = deadline
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            let info = RelayInfo::TokenExpired(self.token_generation);
            self.expiry_timer = Some(handle.send_after(info, delay));
        }
    }

    fn on_text(&mut self, text: &str, ctx: &mut Context<'_, RelayInfo>) -> Outcome {
        // What it costs while an answer is pending: its text, and a task.
        self.handling = u32::try_from(text.len() + 256).unwrap_or(u32::MAX);
        let inbound = match wire::parse(text) {
            Ok(inbound) => inbound,
            // The id of a message of the wrong shape is still named.
            Err(refusal) => return self.refuse(refusal, wire::id_of(text)),
        };
        let kind = inbound.kind.as_deref().unwrap_or("send");
        if kind != "send" && self.mode == Mode::Raw && is_envelope_only(kind) {
            let message = format!("{kind:?} needs the {} subprotocol", wire::PROTOCOL);
            return self.refuse((ErrorCode::EnvelopeRequired, message), inbound.id);
        }
        let result = match kind {
            "send" => self.send(&inbound, ctx),
            "subscribe" => self.subscribe(&inbound, ctx),
            "unsubscribe" => self.unsubscribe(&inbound, ctx),
            "publish" => self.publish(&inbound, ctx),
            "presence" => self.presence(&inbound, ctx),
            "status" => self.status(&inbound, ctx),
            "refresh" => self.refresh(&inbound, ctx),
            other => Err((
                ErrorCode::UnknownType,
                format!("unknown message type {other:?}"),
            )),
        };
        match result {
            Ok(Some(reply)) => self.answers.reply(reply),
            Ok(None) => Outcome::Continue,
            Err(refusal) => self.refuse(refusal, inbound.id),
        }
    }

    fn send(
        &self,
        inbound: &Inbound<'_>,
        ctx: &Context<'_, RelayInfo>,
    ) -> Result<Option<String>, Refusal> {
        let targets = self.targets(inbound.targets.as_ref(), "targets")?;
        let payload = required(inbound.payload, "payload")?;
        self.may_send(&targets)?;
        let pending = self.hub.engine.send(&targets, self.message(payload));
        // Raw clients get no ack, but their errors name the id too.
        let acks = self.ack_id(inbound).is_some();
        self.answer(inbound.id, ctx, pending, move |sent, id| {
            // Only a message that asked for an ack pays for rendering one.
            let id = id.filter(|_| acks)?;
            Some(wire::ack_send(
                id,
                &sent.delivered(),
                &sent.offline(),
                &sent.offsets(),
            ))
        })
    }

    /// A message from this client.
    fn message(&self, payload: &RawValue) -> engine::Message {
        engine::Message {
            from: Some(self.id.clone()),
            payload: payload.get().into(),
            key: None,
        }
    }

    /// Answers a message with what the engine's answer makes of it: at once
    /// when the answer is ready (the memory engine), or from a task when it
    /// comes (a cluster's store). An engine that cannot be reached is an
    /// `unavailable` error, with or without an `"id"`: the message was not
    /// handled, and the client may send it again.
    fn answer<T: Send + 'static>(
        &self,
        id: Option<&RawValue>,
        ctx: &Context<'_, RelayInfo>,
        mut pending: Pending<T>,
        reply: impl FnOnce(T, Option<&RawValue>) -> Option<String> + Send + 'static,
    ) -> Result<Option<String>, Refusal> {
        if let Some(answer) = pending.ready_now() {
            return answer
                .map(|value| reply(value, id))
                .map_err(|e| (ErrorCode::Unavailable, e.to_string()));
        }
        let outbox = ctx.handle().outbox();
        let id = id.map(ToOwned::to_owned);
        // A peer that sends faster than the store answers stops being read.
        let held = outbox.hold(self.handling as usize);
        self.answers.later(
            &outbox,
            Box::pin(async move {
                let text = match pending.await {
                    Ok(value) => reply(value, id.as_deref()),
                    Err(e) => Some(wire::error(
                        ErrorCode::Unavailable,
                        &e.to_string(),
                        id.as_deref(),
                    )),
                };
                drop(held);
                text
            }),
        );
        Ok(None)
    }

    fn subscribe(
        &mut self,
        inbound: &Inbound<'_>,
        ctx: &mut Context<'_, RelayInfo>,
    ) -> Result<Option<String>, Refusal> {
        // Its own handle on the hub: the namespace is read while the topics change.
        let hub = Arc::clone(&self.hub);
        let topic = required(inbound.topic.as_deref(), "topic")?;
        let namespace = hub.namespaces.check(topic)?;
        self.may_subscribe(topic)?;
        let id = self.ack_id(inbound);
        if let Some(topics) = self.topics.as_deref_mut() {
            if topics.subscribed.contains_key(topic) {
                return Ok(id.map(|id| wire::ack(id, Some(topic))));
            }
            if let Some(&attempt) = topics.joining.get(topic) {
                // Answered with the waiting subscribe's outcome, when it
                // comes: acked now, it would be wrong if that one is refused.
                if let Some(id) = id {
                    let held = ctx.handle().outbox().hold(self.handling as usize);
                    let again = topics.again.entry(attempt).or_default();
                    again.push((After::Same(id.to_owned()), held));
                }
                return Ok(None);
            }
        }
        let topics = self.topics.as_deref();
        if topics.map_or(0, Topics::len) >= self.hub.limits.max_topics {
            let message = format!(
                "at most {} topics per connection",
                self.hub.limits.max_topics
            );
            return Err((ErrorCode::TooManyTopics, message));
        }
        let since = inbound.since.as_ref().map(position).transpose()?;
        let topic: Arc<str> = topic.into();
        let mut pending = self.hub.engine.subscribe(Subscribe {
            topic: topic.clone(),
            client: self.id.clone(),
            outbox: ctx.handle().outbox(),
            limit: namespace.max_subscribers,
            history: namespace.history(),
            since,
        });
        if let Some(result) = pending.ready_now() {
            return self.subscribed(&ctx.handle().outbox(), topic, result, id);
        }
        let attempt = self.topics().join(topic.clone());
        let handle = ctx.handle().clone();
        let id = id.map(ToOwned::to_owned);
        let held = handle.outbox().hold(self.handling as usize);
        tokio::spawn(async move {
            let result = pending.await;
            // A connection that has gone drops the subscription with the message.
            let info = RelayInfo::Subscribed {
                topic,
                attempt,
                id,
                result,
                held,
            };
            let _ = handle.send_own(info);
        });
        Ok(None)
    }

    /// Keeps the subscription the engine made, and says how it went.
    fn subscribed(
        &mut self,
        outbox: &Outbox,
        topic: Arc<str>,
        result: Result<Subscribed, SubscribeRefused>,
        id: Option<&RawValue>,
    ) -> Result<Option<String>, Refusal> {
        match result {
            // The token was refreshed while the subscribe waited, and no
            // longer allows it: the subscription goes as it came.
            Ok(_) if !self.permissions.may_subscribe(&topic) => {
                return Err((
                    ErrorCode::Forbidden,
                    format!("your token no longer allows subscribing to {topic:?}"),
                ));
            }
            Ok(Subscribed {
                subscription,
                resumed,
                start,
            }) => {
                let counted = Counted::new(&self.hub.metrics.subscriptions);
                self.topics()
                    .subscribed
                    .insert(topic.clone(), (subscription, counted));
                let ack = match resumed {
                    Some((resumed, position)) => {
                        match resumed {
                            wire::Resumed::Recovered(_) => self.hub.metrics.recovery(true),
                            wire::Resumed::Lost => self.hub.metrics.recovery(false),
                            wire::Resumed::NotAsked => {}
                        }
                        let at = position.as_ref().map(|p| At {
                            offset: p.offset,
                            epoch: &p.epoch,
                        });
                        id.map(|id| wire::ack_resume(id, &topic, resumed, at))
                    }
                    None => id.map(|id| wire::ack(id, Some(&topic))),
                };
                // The answer goes out before the subscription's frames: its
                // own join, what it replays, live messages.
                return Ok(match (ack, start) {
                    (ack, None) => ack,
                    (Some(ack), Some(start)) => {
                        self.answers.reply_then(outbox, ack, start);
                        None
                    }
                    (None, Some(start)) => {
                        start();
                        None
                    }
                });
            }
            Err(refused) => {
                if let Some(refusal) = refusal(&topic, &refused) {
                    return Err(refusal);
                }
            }
        }
        Ok(id.map(|id| wire::ack(id, Some(&topic))))
    }

    /// Handles `answer`, and the answers it held back: the engine's answers
    /// about one topic are handled in the order their subscribes came (an
    /// attempt called off can answer after the subscribe made again behind
    /// it, when it read history first, and its answers, and the ack of the
    /// unsubscribe behind it, would then have come last).
    fn in_order(&mut self, outbox: &Outbox, mut answer: Answer) -> Outcome {
        loop {
            let Some(topics) = self.topics.as_deref_mut() else {
                return Outcome::Continue;
            };
            if !topics.is_next(&answer.topic, answer.attempt) {
                topics.held_back.insert(answer.attempt, answer);
                return Outcome::Continue;
            }
            let Answer {
                topic,
                attempt,
                id,
                result,
                _held,
            } = answer;
            self.on_subscribed(outbox, topic.clone(), attempt, id, result);
            let Some(next) = self.topics().done(&topic) else {
                return Outcome::Continue;
            };
            answer = next;
        }
    }

    /// The engine's answer to a subscribe that waited: kept, or let go if the
    /// subscribe was called off while it waited (then it is answered as it
    /// would have been). The same subscribe sent again meanwhile gets the
    /// same outcome, after it.
    fn on_subscribed(
        &mut self,
        outbox: &Outbox,
        topic: Arc<str>,
        attempt: u64,
        id: Option<Box<RawValue>>,
        result: Result<Subscribed, SubscribeRefused>,
    ) {
        let (live, again) = self
            .topics
            .as_deref_mut()
            .map_or_else(Default::default, |topics| {
                let again = topics.again.remove(&attempt).unwrap_or_default();
                (topics.answered(&topic, attempt), again)
            });
        let outcome = if live {
            self.subscribed(outbox, topic.clone(), result, id.as_deref())
        } else {
            match &result {
                Err(refused) => refusal(&topic, refused).map_or(Ok(()), Err),
                Ok(_) => Ok(()),
            }
            .map(|()| id.as_deref().map(|id| wire::ack(id, Some(&topic))))
        };
        let (first, refused) = match outcome {
            Ok(reply) => (reply, None),
            Err(refusal) => {
                let error = self.refusal_text(&refusal, id.as_deref());
                (Some(error), Some(refusal))
            }
        };
        let again = again
            .into_iter()
            .map(|(after, _held)| match (after, &refused) {
                (After::Same(id), Some(refusal)) => self.refusal_text(refusal, Some(&id)),
                (After::Same(id), None) => wire::ack(&id, Some(&topic)),
                (After::Then(text), _) => text,
            });
        // Through the outbox, as a subscription's start goes: behind it.
        for text in first.into_iter().chain(again) {
            self.answers.send(outbox, text);
        }
    }

    fn unsubscribe(
        &mut self,
        inbound: &Inbound<'_>,
        ctx: &Context<'_, RelayInfo>,
    ) -> Result<Option<String>, Refusal> {
        let topic = required(inbound.topic.as_deref(), "topic")?;
        let ack = self.acked(inbound, |id| wire::ack(id, Some(topic)));
        let handling = self.handling as usize;
        let Some(topics) = self.topics.as_deref_mut() else {
            return Err(not_subscribed(&self.hub.namespaces, topic));
        };
        if topics.subscribed.remove(topic).is_some() {
            return Ok(ack);
        }
        // A subscribe still awaiting the engine is called off: its answer
        // finds the topic gone from `joining`, and lets the subscription go.
        // This ack follows that answer, so that the last word on the topic is
        // the unsubscribe's (sent now, it came before the subscribe's ack).
        let attempt = topics
            .joining
            .remove(topic)
            .ok_or_else(|| not_subscribed(&self.hub.namespaces, topic))?;
        if let Some(ack) = ack {
            let held = ctx.handle().outbox().hold(handling);
            let after = topics.again.entry(attempt).or_default();
            after.push((After::Then(ack), held));
        }
        Ok(None)
    }

    fn publish(
        &self,
        inbound: &Inbound<'_>,
        ctx: &Context<'_, RelayInfo>,
    ) -> Result<Option<String>, Refusal> {
        let (topic, namespace) = self.topic(inbound)?;
        let payload = required(inbound.payload, "payload")?;
        if !namespace.client_publish {
            return Err((
                ErrorCode::Forbidden,
                format!("only the server publishes to {topic:?}"),
            ));
        }
        if !self.permissions.may_publish(topic) {
            return Err((
                ErrorCode::Forbidden,
                format!("your token does not allow publishing to {topic:?}"),
            ));
        }
        let topic: Arc<str> = topic.into();
        let pending =
            self.hub
                .engine
                .publish(topic.clone(), namespace.history(), self.message(payload));
        self.answer(self.ack_id(inbound), ctx, pending, move |published, id| {
            id.map(|id| wire::ack_publish(id, &topic, published.subscribers, published.offset))
        })
    }

    fn presence(
        &mut self,
        inbound: &Inbound<'_>,
        ctx: &Context<'_, RelayInfo>,
    ) -> Result<Option<String>, Refusal> {
        let (topic, namespace) = self.topic(inbound)?;
        // Who is in a topic is for those who may be in it.
        self.may_subscribe(topic)?;
        if !namespace.presence {
            return Err((
                ErrorCode::PresenceDisabled,
                format!("presence is off for {topic:?}"),
            ));
        }
        let page = self.presence_page(inbound)?;
        // The answer, not the question, is what a presence query may weigh:
        // a page of ids, and with Redis a page can exceed its limit (a compact
        // hash comes whole: docs/cluster.md asks for hash-max-listpack-entries
        // of at most 1,000). It holds a full page against the budget while it
        // waits, so that queries piled up behind a slow store stop the
        // reading before their answers can outgrow it.
        let most = engine::PRESENCE_PAGE * engine::PRESENCE_ID_BYTES;
        self.handling = self.handling.max(u32::try_from(most).unwrap_or(u32::MAX));
        let topic: Arc<str> = topic.into();
        let pending = self.hub.engine.presence(topic.clone(), page);
        self.answer(inbound.id, ctx, pending, move |presence, id| {
            let members: Vec<(&str, usize)> =
                presence.clients.iter().map(|(c, n)| (&**c, *n)).collect();
            let next = presence.next.as_deref();
            Some(wire::presence_reply(id, &topic, &members, next))
        })
    }

    /// The page a presence query asks for: `cursor` (a string) and `limit`
    /// (an integer), checked.
    fn presence_page(&self, inbound: &Inbound<'_>) -> Result<PresencePage, Refusal> {
        // `null` is as good as absent.
        fn given(raw: Option<&RawValue>) -> Option<&RawValue> {
            raw.filter(|raw| raw.get() != "null")
        }
        let wrong = |field: &str, what: &str| {
            let message = format!("\"{field}\" must be {what}");
            (ErrorCode::InvalidMessage, message)
        };
        let limit = given(inbound.limit)
            .map(|raw| serde_json::from_str::<u64>(raw.get()))
            .transpose()
            .map_err(|_| wrong("limit", "an integer"))?;
        let cursor = given(inbound.cursor)
            .map(|raw| serde_json::from_str::<String>(raw.get()))
            .transpose()
            .map_err(|_| wrong("cursor", "a string"))?;
        PresencePage::asked(&*self.hub.engine, cursor.as_deref(), limit).map_err(|e| match e {
            PageRefused::Limit(message) => (ErrorCode::InvalidMessage, message),
            PageRefused::Cursor(message) => (ErrorCode::InvalidCursor, message),
        })
    }

    fn status(
        &self,
        inbound: &Inbound<'_>,
        ctx: &Context<'_, RelayInfo>,
    ) -> Result<Option<String>, Refusal> {
        let clients = self.targets(inbound.clients.as_ref(), "clients")?;
        // Whether a client is online is for those who may send to it.
        self.may_send(&clients)?;
        let clients: Vec<ClientId> = clients.into_iter().map(ClientId::from).collect();
        let pending = self.hub.engine.connections(clients.clone());
        self.answer(inbound.id, ctx, pending, move |connections, id| {
            let online: Vec<(&str, bool)> = clients
                .iter()
                .zip(connections)
                .map(|(c, n)| (&**c, n > 0))
                .collect();
            Some(wire::status_reply(id, &online))
        })
    }

    fn refresh(
        &mut self,
        inbound: &Inbound<'_>,
        ctx: &mut Context<'_, RelayInfo>,
    ) -> Result<Option<String>, Refusal> {
        let token = required(inbound.token.as_deref(), "token")?;
        let Some(jwt) = &self.hub.jwt else {
            return Err((
                ErrorCode::InvalidToken,
                "this server does not use tokens".into(),
            ));
        };
        let identity = jwt.verify(token).map_err(|e| {
            self.hub.metrics.auth_failed(e.reason());
            if e == TokenError::UnknownKey && jwt.would_refetch() {
                // The issuer may have rotated its keys: fetch them, so that
                // the client's next refresh with this token is accepted. Not
                // when that fetch would not run: a flood of forged key ids
                // would only pile up tasks, each holding its token.
                let (hub, token) = (self.hub.clone(), token.to_owned());
                tokio::spawn(async move {
                    if let Some(jwt) = &hub.jwt {
                        let _ = jwt.verify_fresh(&token, &hub.metrics).await;
                    }
                });
            }
            (ErrorCode::InvalidToken, e.to_string())
        })?;
        if identity.client != self.id {
            self.hub.metrics.auth_failed("wrong_subject");
            return Err((
                ErrorCode::InvalidToken,
                "the token is for another client".into(),
            ));
        }
        self.permissions = identity.permissions;
        let handle = ctx.handle().clone();
        self.schedule_expiry(identity.expires_at, &handle);
        // A token is what a connection may do now, not what it once could:
        // subscriptions the new one does not allow end, before the ack (a
        // subscribe still waiting is refused when its answer comes).
        for topic in self.revoke_subscriptions() {
            let message = format!("your token no longer allows subscribing to {topic:?}");
            ctx.push(Message::text(wire::unsubscribed(
                &topic,
                ErrorCode::Forbidden,
                &message,
            )));
        }
        Ok(self.acked(inbound, |id| wire::ack(id, None)))
    }

    /// Ends the subscriptions whose topics the token does not allow; returns
    /// their topics.
    fn revoke_subscriptions(&mut self) -> Vec<Arc<str>> {
        let Some(topics) = self.topics.as_deref_mut() else {
            return Vec::new();
        };
        let revoked: Vec<Arc<str>> = topics
            .subscribed
            .keys()
            .filter(|topic| !self.permissions.may_subscribe(topic))
            .cloned()
            .collect();
        for topic in &revoked {
            topics.subscribed.remove(topic);
        }
        revoked
    }

    /// Checks a list of client ids: present, not too long, each valid, deduplicated.
    /// Refuses unless the token allows sending to every one of `ids`.
    fn may_send(&self, ids: &[&str]) -> Result<(), Refusal> {
        match ids.iter().find(|id| !self.permissions.may_send(id)) {
            Some(forbidden) => Err((
                ErrorCode::Forbidden,
                format!("your token does not allow sending to {forbidden:?}"),
            )),
            None => Ok(()),
        }
    }

    /// Refuses unless the token allows subscribing to `topic`.
    fn may_subscribe(&self, topic: &str) -> Result<(), Refusal> {
        if self.permissions.may_subscribe(topic) {
            return Ok(());
        }
        let mut message = format!("your token does not allow subscribing to {topic:?}");
        if topic == CLIENT_EVENTS {
            message += ": it tells every client id's status, so the token's send claim must \
                        allow every id (\"*\") too";
        }
        Err((ErrorCode::Forbidden, message))
    }

    fn targets<'t>(
        &self,
        list: Option<&'t TargetList<'_>>,
        field: &str,
    ) -> Result<crate::ids::Targets<'t>, Refusal> {
        let list = required(list, field)?;
        if list.len() > self.hub.limits.max_targets {
            let message = format!(
                "{} {field}; at most {} are allowed",
                list.len(),
                self.hub.limits.max_targets
            );
            return Err((ErrorCode::TooManyTargets, message));
        }
        crate::ids::unique(list.iter()).map_err(|bad| {
            let message = format!("invalid client id {bad:?}: {}", crate::ids::InvalidId);
            (ErrorCode::InvalidTarget, message)
        })
    }

    /// The message's topic, checked, with its namespace.
    fn topic<'m>(&self, inbound: &'m Inbound<'_>) -> Result<(&'m str, &Namespace), Refusal> {
        let topic = required(inbound.topic.as_deref(), "topic")?;
        Ok((topic, self.hub.namespaces.check(topic)?))
    }

    /// The message's id when it asked for an ack (envelope mode with an `"id"`).
    fn ack_id<'m>(&self, inbound: &Inbound<'m>) -> Option<&'m RawValue> {
        inbound.id.filter(|_| self.mode == Mode::Envelope)
    }

    /// The ack built by `ack`, when the message asked for one.
    fn acked(
        &self,
        inbound: &Inbound<'_>,
        ack: impl FnOnce(&RawValue) -> String,
    ) -> Option<String> {
        self.ack_id(inbound).map(ack)
    }

    fn refuse(&self, refusal: Refusal, id: Option<&RawValue>) -> Outcome {
        self.answers.reply(self.refusal_text(&refusal, id))
    }

    /// The error frame's text for `refusal` of the message `id`.
    fn refusal_text(&self, (code, message): &Refusal, id: Option<&RawValue>) -> String {
        tracing::debug!(client = %self.id, ?code, message, "refused a client message");
        wire::error(*code, message, id)
    }
}

/// What a client is told of a subscribe the engine refused (`None`: it was
/// subscribed already, which is acked as a subscribe).
fn refusal(topic: &str, refused: &SubscribeRefused) -> Option<Refusal> {
    Some(match refused {
        SubscribeRefused::PubSub(SubscribeError::Full) => (
            ErrorCode::TopicFull,
            format!("{topic:?} has reached its subscriber limit"),
        ),
        SubscribeRefused::PubSub(SubscribeError::AlreadySubscribed) => return None,
        SubscribeRefused::Ahead { asked, top } => (
            ErrorCode::InvalidSince,
            format!("since is ahead of {topic:?} (offset {asked} > {top})"),
        ),
        SubscribeRefused::Unavailable(e) => (ErrorCode::Unavailable, e.to_string()),
    })
}

/// A position a client sent, checked: an epoch of 1-32 letters and digits.
fn position(since: &Since<'_>) -> Result<Position, Refusal> {
    let epoch = &since.epoch;
    if !(1..=32).contains(&epoch.len()) || !epoch.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err((
            ErrorCode::InvalidSince,
            format!(
                "invalid since epoch {epoch:?}: 1-32 letters and digits, as deliveries give it"
            ),
        ));
    }
    Ok(Position {
        epoch: Arc::from(&**epoch),
        offset: since.offset,
    })
}

/// A connection's topics: those it is subscribed to, and those whose
/// subscribe awaits the engine's answer.
#[derive(Default)]
struct Topics {
    /// Each counted in the metrics' subscriptions while it lives.
    subscribed: HashMap<Arc<str>, (Registration, Counted)>,
    /// Each with the number of its attempt: an answer to an attempt called
    /// off (unsubscribed, then subscribed again) is told from the new one's.
    joining: HashMap<Arc<str>, u64>,
    /// What is answered after an attempt, by attempt, in the order the
    /// client asked: each held against the outbound budget until then.
    again: HashMap<u64, Vec<(After, Held)>>,
    /// The attempts the engine has yet to answer, by topic, oldest first
    /// (called off ones too): their answers are handled in that order.
    unanswered: HashMap<Arc<str>, VecDeque<u64>>,
    /// Answers that came before an older attempt's, by attempt.
    held_back: HashMap<u64, Answer>,
    attempts: u64,
}

/// The engine's answer to one attempt to subscribe.
struct Answer {
    topic: Arc<str>,
    attempt: u64,
    id: Option<Box<RawValue>>,
    result: Result<Subscribed, SubscribeRefused>,
    /// Held against the outbound budget until handled.
    _held: Held,
}

impl Topics {
    /// How many topics count against the connection's limit.
    fn len(&self) -> usize {
        self.subscribed.len() + self.joining.len()
    }

    /// Notes a subscribe that waits for the engine; returns its attempt.
    fn join(&mut self, topic: Arc<str>) -> u64 {
        self.attempts += 1;
        let unanswered = self.unanswered.entry(topic.clone()).or_default();
        unanswered.push_back(self.attempts);
        self.joining.insert(topic, self.attempts);
        self.attempts
    }

    /// Whether `attempt` is the oldest of `topic`'s that the engine has yet
    /// to answer.
    fn is_next(&self, topic: &str, attempt: u64) -> bool {
        self.unanswered
            .get(topic)
            .is_none_or(|attempts| attempts.front() == Some(&attempt))
    }

    /// The oldest unanswered attempt of `topic` has been handled: the next
    /// one's answer, if it came already.
    fn done(&mut self, topic: &str) -> Option<Answer> {
        let attempts = self.unanswered.get_mut(topic)?;
        attempts.pop_front();
        let Some(next) = attempts.front().copied() else {
            self.unanswered.remove(topic);
            return None;
        };
        self.held_back.remove(&next)
    }

    /// Whether the engine's answer is to the live attempt for `topic`; it
    /// stops waiting if so.
    fn answered(&mut self, topic: &str, attempt: u64) -> bool {
        let live = self.joining.get(topic) == Some(&attempt);
        if live {
            self.joining.remove(topic);
        }
        live
    }
}

/// An answer that waits for a subscribe's attempt.
enum After {
    /// The same subscribe sent again (this is its id): it gets the
    /// attempt's outcome.
    Same(Box<RawValue>),
    /// The ack of an unsubscribe that called the attempt off.
    Then(String),
}

/// Why an unsubscribe finds no subscription: a topic no subscribe could
/// have taken gets the error that subscribe would have had.
fn not_subscribed(namespaces: &Namespaces, topic: &str) -> Refusal {
    if let Err(refusal) = namespaces.check(topic) {
        return refusal;
    }
    (
        ErrorCode::NotSubscribed,
        format!("not subscribed to {topic:?}"),
    )
}

/// Whether a message type needs `switchboard.v1` (its answers are typed frames).
fn is_envelope_only(kind: &str) -> bool {
    matches!(
        kind,
        "subscribe" | "unsubscribe" | "publish" | "presence" | "status" | "refresh"
    )
}

fn required<T>(value: Option<T>, field: &str) -> Result<T, Refusal> {
    value.ok_or_else(|| {
        (
            ErrorCode::InvalidMessage,
            format!("missing field `{field}`"),
        )
    })
}

impl Drop for Relay {
    /// A handler that panicked is not told how its connection ended: the
    /// driver closed it with 1011. Its token's expiry timer goes with it, or
    /// its task would sleep until the token expires, once per connection
    /// ended (its upgrade failed, or it closed) before then.
    fn drop(&mut self) {
        if let Some(timer) = self.expiry_timer.take() {
            timer.cancel();
        }
        if self.counted == (true, false) {
            self.hub.metrics.closed_with_code(1011);
            self.hub.closes.record_code(&self.id, 1011);
        }
    }
}

impl Handler for Relay {
    type Info = RelayInfo;

    /// The upgrade went through: the connection counts as opened (a relay
    /// made for an upgrade that failed after the 101 never gets here).
    fn init(&mut self, _ctx: &mut Context<'_, RelayInfo>) -> Outcome {
        self.hub.metrics.opened.add(1);
        self.counted.0 = true;
        Outcome::Continue
    }

    fn handle_in(&mut self, message: Message, ctx: &mut Context<'_, RelayInfo>) -> Outcome {
        let (frame, len) = match &message {
            Message::Text(text) => (Frame::Message, text.len()),
            // Refused below: it counts, but starts no count of strikes again.
            Message::Binary(data) => (Frame::Other, data.len()),
            _ => (Frame::Other, 0),
        };
        match self.limiter.check(&self.hub.limits, frame, len) {
            Verdict::Accept => {}
            Verdict::Refuse => {
                self.hub.metrics.rate_limited();
                let refusal = (
                    ErrorCode::RateLimited,
                    "slow down: over the message or byte rate".into(),
                );
                // Read for its id alone, so the sender can tell which message
                // was refused (a client library settles that message's promise).
                let id = match &message {
                    Message::Text(text) => wire::id_of(text),
                    _ => None,
                };
                return self.refuse(refusal, id);
            }
            Verdict::Disconnect => return Outcome::stop(CloseCode::POLICY, "rate limit exceeded"),
        }
        match message {
            Message::Text(text) => self.on_text(&text, ctx),
            _ => self.refuse(
                (
                    ErrorCode::BinaryNotSupported,
                    "binary frames are not supported: send JSON as text".into(),
                ),
                None,
            ),
        }
    }

    /// Pings and pongs count against the rate limits as messages do: a ping
    /// costs the server a read and (coalesced) a pong. Over the limit there is no
    /// error to answer a ping with; the strike counts, and enough of them in a
    /// row close the connection as for messages.
    fn handle_control(&mut self, message: Message, _ctx: &mut Context<'_, RelayInfo>) -> Outcome {
        let len = match &message {
            Message::Ping(data) | Message::Pong(data) => data.len(),
            _ => 0,
        };
        match self.limiter.check(&self.hub.limits, Frame::Other, len) {
            Verdict::Accept | Verdict::Refuse => Outcome::Continue,
            Verdict::Disconnect => Outcome::stop(CloseCode::POLICY, "rate limit exceeded"),
        }
    }

    fn handle_info(&mut self, info: RelayInfo, ctx: &mut Context<'_, RelayInfo>) -> Outcome {
        match info {
            RelayInfo::TokenExpired(generation) if generation == self.token_generation => {
                Outcome::stop(CloseCode(TOKEN_EXPIRED), "token expired")
            }
            RelayInfo::TokenExpired(_) => Outcome::Continue,
            RelayInfo::Subscribed {
                topic,
                attempt,
                id,
                result,
                held,
            } => {
                let answer = Answer {
                    topic,
                    attempt,
                    id,
                    result,
                    _held: held,
                };
                self.in_order(&ctx.handle().outbox(), answer)
            }
        }
    }

    fn terminate(&mut self, reason: &TerminateReason) {
        self.hub.metrics.closed(reason);
        self.hub.closes.record(&self.id, reason);
        self.counted.1 = true;
    }
}
