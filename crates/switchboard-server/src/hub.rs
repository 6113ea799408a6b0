//! What every connection and API request of one server shares.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Extension;
use axum::extract::ConnectInfo;
use switchboard::{Options, PubSub, ReceiveBudget, Registry, Shutdown, Stats};

use crate::admin::Feed;
use crate::auth::{ApiKeys, JwtVerifier};
use crate::closes::RecentCloses;
use crate::config::Config;
use crate::config::{EngineKind, MetricsAuth};
use crate::engine::{Engine, InboxRetention, MemoryEngine, RedisEngine, RedisSettings, Traffic};
use crate::idempotency::Idempotency;
use crate::metrics::{Live, Metrics};
use crate::peers::{Admitted, PeerFull, PeerLimit, PeerSlot};
use crate::snapshot::Loaded;
use crate::topics::{Namespaces, PresenceEvents};

/// Per-connection limits on what clients send.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    /// Most targets (or clients in a `status` query) per message.
    pub max_targets: usize,
    /// Most topics per connection.
    pub max_topics: usize,
    /// Most connections per client id.
    pub max_connections: usize,
    /// Messages per second (0 unlimited).
    pub messages_per_sec: u32,
    /// Bytes per second (0 unlimited).
    pub bytes_per_sec: u64,
    /// Refusals in a row before closing with 1008.
    pub strikes: u32,
}

/// The server's shared state.
pub struct Hub {
    /// This node's live connections by client id.
    pub registry: Registry,
    /// Routing and inboxes for client ids.
    pub engine: Arc<dyn Engine>,
    /// Topic namespaces.
    pub namespaces: Arc<Namespaces>,
    /// Traffic counters.
    pub stats: Stats,
    /// Options for each client connection.
    pub options: Options,
    /// Limits on what clients send.
    pub limits: ClientLimits,
    /// Client token verification; `None` is `auth = none` (ids from `?id=`).
    pub jwt: Option<JwtVerifier>,
    /// Backend API keys.
    pub api_keys: ApiKeys,
    /// Browser origins allowed to connect; empty allows any.
    pub allowed_origins: Vec<String>,
    /// Without tokens: whether ids chosen by clients are taken from this host
    /// only ([`crate::local`]), as they are unless `--allow-insecure`.
    pub chosen_ids_from_this_host_only: bool,
    /// Closes every connection on shutdown.
    pub shutdown: Shutdown,
    /// What connections hold of partly received data, all together.
    pub receive_budget: ReceiveBudget,
    /// Results of recent API requests by `Idempotency-Key`.
    pub idempotency: Idempotency,
    /// WebSocket connections per client address.
    pub peers: Arc<PeerLimit>,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Who may read them.
    pub metrics_auth: MetricsAuth,
    /// The latest connection closes, for the admin dashboard.
    pub closes: RecentCloses,
    /// The admin dashboard's state, while a dashboard is open.
    pub admin: Feed,
}

/// This node's traffic now.
pub fn local_traffic(stats: &Stats, shutdown: &Shutdown, budget: &ReceiveBudget) -> Traffic {
    let counts = stats.snapshot();
    Traffic {
        connections: shutdown.connections() as u64,
        messages_in: counts.messages_in,
        messages_out: counts.messages_out,
        bytes_in: counts.bytes_in,
        bytes_out: counts.bytes_out,
        receive_buffered_bytes: budget.used() as u64,
        accept_errors: switchboard::accept_errors(),
    }
}

impl Hub {
    /// Lets a connection from `peer` in, if its address has room: its place
    /// (`None` when addresses are not limited), and its options, with which
    /// it holds what it partly receives against its address's share.
    pub fn admit(
        &self,
        peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    ) -> Result<(Option<PeerSlot>, Options), PeerFull> {
        Ok(match self.peers.admit_request(peer)? {
            Some(Admitted {
                slot,
                share: Some(share),
            }) => (Some(slot), self.options.clone().receive_budget(Some(share))),
            admitted => (admitted.map(|it| it.slot), self.options.clone()),
        })
    }

    /// The Prometheus text of this node's metrics. The engine's counts may
    /// wait for Redis; when Redis cannot be reached they are left out, and the
    /// node's own figures are still there: that is when they are wanted.
    pub async fn metrics_text(&self) -> String {
        let counts = self.engine.counts().await.ok();
        let live = Live {
            connections: self.shutdown.connections() as u64,
            traffic: self.stats.snapshot(),
            counts: counts.map(|c| [c.clients, c.topics, c.nodes].map(|n| n as u64)),
        };
        self.metrics.render(&live)
    }

    /// This node's traffic now.
    pub fn traffic(&self) -> Traffic {
        local_traffic(&self.stats, &self.shutdown, &self.receive_budget)
    }

    /// The state for `config`, with its engine (the Redis engine starts
    /// connecting in the background: call this on a runtime).
    pub fn new(
        config: &Config,
        shutdown: Shutdown,
        snapshot: Option<Loaded>,
    ) -> anyhow::Result<Self> {
        let registry = Registry::new();
        // Client events are the Redis engine's (they need the cluster's counts).
        let events = match config.engine {
            EngineKind::Redis => config.client_events_size,
            EngineKind::Memory => 0,
        };
        let namespaces =
            Arc::new(Namespaces::new(config.namespaces.clone()).with_client_events(events));
        let snapshot = snapshot.map(|loaded| loaded.keeping_history_of(&namespaces));
        let stats = Stats::new();
        let metrics = Arc::new(Metrics::new());
        let pubsub = PubSub::with_listener(PresenceEvents(namespaces.clone()));
        let receive_budget = config.receive_budget();
        let peers = config.peer_limit(&receive_budget);
        let options = config
            .connection_options()
            .stats(stats.clone())
            .receive_budget(Some(receive_budget.clone()));
        let inbox = InboxRetention {
            size: config.inbox_size,
            ttl: config.inbox_ttl,
        };
        let engine: Arc<dyn Engine> = match config.engine {
            EngineKind::Memory => Arc::new(MemoryEngine::new(
                registry.clone(),
                pubsub,
                inbox,
                config.history_max_bytes,
                config.max_outbound_bytes / 2,
                snapshot,
                metrics.clone(),
            )),
            EngineKind::Redis => {
                let settings = RedisSettings {
                    url: config.redis_url.clone(),
                    lease: config.node_lease,
                    inbox: inbox.retention(),
                    replay_budget: config.max_outbound_bytes / 2,
                    client_events: config.client_events_size,
                    pubsub_backlog: config.redis_pubsub_backlog_bytes,
                    position_ttl: config.redis_position_ttl,
                };
                let (stats, shutdown, budget) =
                    (stats.clone(), shutdown.clone(), receive_budget.clone());
                let traffic = Arc::new(move || local_traffic(&stats, &shutdown, &budget));
                Arc::new(RedisEngine::start(
                    &settings,
                    registry.clone(),
                    namespaces.clone(),
                    traffic,
                    metrics.clone(),
                )?)
            }
        };
        Ok(Self {
            engine,
            registry,
            namespaces,
            stats,
            options,
            limits: ClientLimits {
                max_targets: config.max_targets,
                max_topics: config.max_topics_per_connection,
                max_connections: config.max_connections_per_client,
                messages_per_sec: config.rate_limit_messages_per_sec,
                bytes_per_sec: config.rate_limit_bytes_per_sec,
                strikes: config.rate_limit_strikes,
            },
            jwt: {
                let jwt = JwtVerifier::from_config(&config.jwt)?;
                if let Some(jwt) = &jwt {
                    jwt.start(metrics.clone());
                }
                jwt
            },
            api_keys: config.api_keys.clone(),
            allowed_origins: config.allowed_origins.clone(),
            chosen_ids_from_this_host_only: !config.allow_insecure,
            shutdown,
            receive_budget,
            idempotency: Idempotency::default(),
            peers,
            metrics,
            metrics_auth: config.metrics_auth,
            closes: RecentCloses::default(),
            admin: Feed::default(),
        })
    }
}
