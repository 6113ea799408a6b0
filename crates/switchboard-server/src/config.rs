//! Settings: embedded defaults, then a TOML file, then `SWITCHBOARD_*`
//! environment variables, then command-line flags; each layer overrides the last.
//!
//! Every setting has the same name in all three places: `max_message_size` in
//! TOML is `SWITCHBOARD_MAX_MESSAGE_SIZE` and `--max-message-size`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use switchboard::proto::deflate::DeflateOptions;
use switchboard::{CloseCode, Options, ReceiveBudget, SlowConsumerPolicy};

use crate::auth::{ApiKeys, JwtConfig};
use crate::peers::PeerLimit;
use crate::tls::Certificate;
use crate::topics::Namespace;

/// The most clock skew `jwt_leeway_secs` may allow: a day.
const MAX_LEEWAY_SECS: u64 = 86_400;

/// Settings that say one thing two ways: one given in a layer (env or
/// flags) overrides the other from the file below, as a single setting would.
const EITHER_OF: [[&str; 2]; 1] = [["jwt_hs256_secret", "jwt_hs256_secret_file"]];

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// How the worker threads share connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scheduler {
    /// One tokio runtime whose workers take any connection's work (work stealing).
    WorkStealing,
    /// A single-threaded runtime and a listening socket (SO_REUSEPORT) per
    /// worker: a connection stays on the thread that accepted it.
    ThreadPerCore,
}

/// Where client ids, topics and their streams live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// In this process (one node; history saved to the data directory on a graceful stop).
    Memory,
    /// In Redis 7, shared by every node that uses the same Redis: cluster mode (docs/cluster.md).
    Redis,
}

/// Who may read `GET /metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum MetricsAuth {
    /// Whoever may call the HTTP API: an API key (none needed on a loopback listener without keys).
    ApiKey,
    /// Anyone who reaches the API listener (keep it on a private network).
    None,
}

/// The settings of `switchboard serve`, each optional so that layers can be merged.
#[derive(Debug, Clone, Default, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Address to listen on [default: 127.0.0.1:4000]
    #[arg(long, env = "SWITCHBOARD_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// Log format [default: human]
    #[arg(long, env = "SWITCHBOARD_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,

    /// Log filter in RUST_LOG syntax, e.g. "info" or "switchboard=debug" [default: info]
    #[arg(long, env = "SWITCHBOARD_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,

    /// Largest message (and frame) a client may send, in bytes; larger ones close with 1009 [default: 1048576]
    #[arg(long, env = "SWITCHBOARD_MAX_MESSAGE_SIZE", value_name = "BYTES")]
    pub max_message_size: Option<usize>,

    /// Most targets in one message; more get error `too_many_targets` [default: 1000]
    #[arg(long, env = "SWITCHBOARD_MAX_TARGETS", value_name = "N")]
    pub max_targets: Option<usize>,

    /// Close connections (1001) that send nothing for this long; 0 never [default: 60]
    #[arg(long, env = "SWITCHBOARD_IDLE_TIMEOUT_SECS", value_name = "SECS")]
    pub idle_timeout_secs: Option<u64>,

    /// Ping every connection this often; 0 never [default: 25]
    #[arg(long, env = "SWITCHBOARD_PING_INTERVAL_SECS", value_name = "SECS")]
    pub ping_interval_secs: Option<u64>,

    /// Hibernate connections that send and receive no message for this long
    /// (new ones after 5 ms): their task ends and an idle connection holds
    /// about 40% less memory until a message reaches it. The server's pings
    /// and the pongs that answer them do not wake it. Plain TCP only, and with
    /// compression only when neither side keeps a context and the client
    /// leaves the server's window whole (see docs/operations.md); 0 never
    /// [default: 15]
    #[arg(long, env = "SWITCHBOARD_HIBERNATE_AFTER_SECS", value_name = "SECS")]
    pub hibernate_after_secs: Option<u64>,

    /// Accept permessage-deflate when clients offer it [default: true]
    #[arg(long, env = "SWITCHBOARD_COMPRESSION", value_name = "BOOL", action = clap::ArgAction::Set)]
    pub compression: Option<bool>,

    /// Most server-side messages queued for one connection's handler [default: 1024]
    #[arg(long, env = "SWITCHBOARD_MAILBOX_SIZE", value_name = "N")]
    pub mailbox_size: Option<usize>,

    /// Most bytes queued for one connection, whoever queued them (deliveries, acks, pongs). Over it
    /// the server stops reading from that client; a push that would exceed it closes the connection
    /// [default: 4194304]
    #[arg(long, env = "SWITCHBOARD_MAX_OUTBOUND_BYTES", value_name = "BYTES")]
    pub max_outbound_bytes: Option<usize>,

    /// Close code for slow consumers: 1008 (policy), 1013 (try again later), 4000 or 4002-4499
    /// [default: 1013]
    #[arg(
        long,
        env = "SWITCHBOARD_SLOW_CONSUMER_CLOSE_CODE",
        value_name = "CODE"
    )]
    pub slow_consumer_close_code: Option<u16>,

    /// How long a connection may stay over max_outbound_bytes (reading paused) before it is closed
    /// as a slow consumer [default: 30]
    #[arg(
        long,
        env = "SWITCHBOARD_SLOW_CONSUMER_TIMEOUT_SECS",
        value_name = "SECS"
    )]
    pub slow_consumer_timeout_secs: Option<u64>,

    /// On SIGTERM/SIGINT, how long to wait for connections to close before exiting [default: 10]
    #[arg(long, env = "SWITCHBOARD_SHUTDOWN_DRAIN_SECS", value_name = "SECS")]
    pub shutdown_drain_secs: Option<u64>,

    /// Threads that run connections: 0 is one per CPU this process may use (its CPU affinity and cgroup CPU limit); 1 runs everything on one thread, which costs the least CPU per message when the server has one core to itself (see docs/performance.md) [default: 0]
    #[arg(long, env = "SWITCHBOARD_WORKERS", value_name = "N")]
    pub workers: Option<usize>,

    /// How workers share connections: work-stealing (one tokio runtime; any worker runs any connection) or thread-per-core (a runtime and a listening socket per worker; a connection stays where it was accepted) [default: work-stealing]
    #[arg(long, env = "SWITCHBOARD_SCHEDULER", value_name = "KIND")]
    pub scheduler: Option<Scheduler>,

    /// Most connections one client id may hold; more get HTTP 429 [default: 100]
    #[arg(long, env = "SWITCHBOARD_MAX_CONNECTIONS_PER_CLIENT", value_name = "N")]
    pub max_connections_per_client: Option<usize>,

    /// Most topics one connection may subscribe to; more get `too_many_topics` [default: 100]
    #[arg(long, env = "SWITCHBOARD_MAX_TOPICS_PER_CONNECTION", value_name = "N")]
    pub max_topics_per_connection: Option<usize>,

    /// Messages a connection may send per second (bursts of twice that); 0 unlimited [default: 100]
    #[arg(
        long,
        env = "SWITCHBOARD_RATE_LIMIT_MESSAGES_PER_SEC",
        value_name = "N"
    )]
    pub rate_limit_messages_per_sec: Option<u32>,

    /// Bytes a connection may send per second (bursts of twice that); 0 unlimited [default: 1048576]
    #[arg(
        long,
        env = "SWITCHBOARD_RATE_LIMIT_BYTES_PER_SEC",
        value_name = "BYTES"
    )]
    pub rate_limit_bytes_per_sec: Option<u64>,

    /// Refused messages in a row after which the connection is closed with 1008 [default: 20]
    #[arg(long, env = "SWITCHBOARD_RATE_LIMIT_STRIKES", value_name = "N")]
    pub rate_limit_strikes: Option<u32>,

    /// Most bytes a second one connection may make the server inflate (compressed messages); past
    /// it the server stops reading from that client until the rate allows more; 0 no cap
    /// [default: 2097152]
    #[arg(
        long,
        env = "SWITCHBOARD_MAX_INFLATE_BYTES_PER_SEC",
        value_name = "BYTES"
    )]
    pub max_inflate_bytes_per_sec: Option<u64>,

    /// Most bytes all connections together may hold of messages and frames they have only partly
    /// received (inflated, when compressed); a connection that finds it spent is closed with 1013
    /// [default: 268435456]
    #[arg(long, env = "SWITCHBOARD_RECEIVE_BUDGET_BYTES", value_name = "BYTES")]
    pub receive_budget_bytes: Option<usize>,

    /// Most of receive_budget_bytes one connection may hold; over it the connection is closed with
    /// 1009. At least max_message_size plus 65536 [default: twice max_message_size, plus 65536]
    #[arg(
        long,
        env = "SWITCHBOARD_RECEIVE_BUDGET_PER_CONNECTION_BYTES",
        value_name = "BYTES"
    )]
    pub receive_budget_per_connection_bytes: Option<usize>,

    /// Most of receive_budget_bytes the connections of one IP address may hold together (as
    /// max_connections_per_ip counts them; not applied when that is 0); a connection that finds
    /// its address's share spent is closed with 1013. 0: no share [default: a quarter of
    /// receive_budget_bytes, at least receive_budget_per_connection_bytes; 0 when
    /// max_connections_per_ip is raised above its default, as behind a reverse proxy]
    #[arg(
        long,
        env = "SWITCHBOARD_RECEIVE_BUDGET_PER_IP_BYTES",
        value_name = "BYTES"
    )]
    pub receive_budget_per_ip_bytes: Option<usize>,

    /// Messages each client id's inbox keeps for it while it is offline (or to resume from) [default: 100]
    #[arg(long, env = "SWITCHBOARD_INBOX_SIZE", value_name = "N")]
    pub inbox_size: Option<usize>,

    /// How long an inbox keeps a message, in seconds [default: 600]
    #[arg(long, env = "SWITCHBOARD_INBOX_TTL_SECS", value_name = "SECS")]
    pub inbox_ttl_secs: Option<u64>,

    /// Most bytes of history (inboxes and topics) the memory engine holds; past it the oldest
    /// messages go first [default: 134217728]
    #[arg(long, env = "SWITCHBOARD_HISTORY_MAX_BYTES", value_name = "BYTES")]
    pub history_max_bytes: Option<usize>,

    /// Where the memory engine keeps its snapshot between a graceful stop and the next start
    /// [default: switchboard-data]
    #[arg(long, env = "SWITCHBOARD_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Keep history across a graceful restart: write a snapshot to the data directory on stop, and
    /// read it on start; false writes none (history then lives as long as the process), and moves
    /// aside a snapshot left in the data directory, which a run without it makes stale
    /// [default: true]
    #[arg(long, env = "SWITCHBOARD_PERSIST", value_name = "BOOL", action = clap::ArgAction::Set)]
    pub persist: Option<bool>,

    /// Start even if the snapshot in the data directory cannot be read: it is moved aside (never
    /// deleted) and history starts empty, so resuming clients are told recovered:false
    #[arg(long, env = "SWITCHBOARD_START_FRESH", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub start_fresh: Option<bool>,

    /// Where client ids, topics and history live: memory (one node) or redis (cluster mode: every
    /// node on the same Redis behaves as one) [default: memory]
    #[arg(long, env = "SWITCHBOARD_ENGINE", value_enum)]
    pub engine: Option<EngineKind>,

    /// Redis for --engine redis: redis://[:password@]host:port/db (plain TCP)
    /// [default: redis://127.0.0.1:6379/0]
    #[arg(
        long,
        env = "SWITCHBOARD_REDIS_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub redis_url: Option<String>,

    /// Cluster mode: how long a node's place in the cluster outlives its last heartbeat to Redis
    /// (five a lease). A crashed node's clients still count as online for this long after it died; a node
    /// cut off from Redis this long closes its clients with 1012; a pub/sub connection that
    /// leaves a command unanswered this long is replaced. 2 to 15 [default: 5]
    #[arg(long, env = "SWITCHBOARD_NODE_LEASE_SECS", value_name = "SECS")]
    pub node_lease_secs: Option<u64>,

    /// Cluster mode: messages the $clients topic keeps of client ids going online and offline
    /// (0: no events) [default: 1000]
    #[arg(long, env = "SWITCHBOARD_CLIENT_EVENTS_SIZE", value_name = "N")]
    pub client_events_size: Option<usize>,

    /// Cluster mode: most bytes of pub/sub notices a node holds while its delivery falls behind.
    /// Past it notices are dropped (counted in switchboard_redis_pubsub_dropped_total): messages
    /// with offsets are then read from their streams, join and leave events are lost. At least
    /// 4096 [default: 33554432, Redis's own pub/sub output limit]
    #[arg(
        long,
        env = "SWITCHBOARD_REDIS_PUBSUB_BACKLOG_BYTES",
        value_name = "BYTES"
    )]
    pub redis_pubsub_backlog_bytes: Option<usize>,

    /// Cluster mode: how long Redis keeps a stream's epoch and last offset after its last use (a
    /// write, a read, a connect or subscribe; a node renews those its clients are on), and so how
    /// late a client may resume and be told recovered:true. Raised to inbox_ttl_secs or the longest
    /// history_ttl_secs when one is longer [default: 86400]
    #[arg(long, env = "SWITCHBOARD_REDIS_POSITION_TTL_SECS", value_name = "SECS")]
    pub redis_position_ttl_secs: Option<u64>,

    /// Most WebSocket connections from one IP address; more get HTTP 429. Behind a reverse proxy
    /// every client has the proxy's address: raise it or set 0 (no limit) [default: 1000]
    #[arg(long, env = "SWITCHBOARD_MAX_CONNECTIONS_PER_IP", value_name = "N")]
    pub max_connections_per_ip: Option<usize>,

    /// API key for the HTTP API (repeat for rotation; env: comma-separated list)
    #[arg(
        long = "api-key",
        env = "SWITCHBOARD_API_KEYS",
        value_name = "KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Option<Vec<String>>,

    /// Serve the HTTP API on this address only, instead of on the main listener
    #[arg(long, env = "SWITCHBOARD_API_LISTEN", value_name = "ADDR")]
    pub api_listen: Option<SocketAddr>,

    /// PEM certificate chain (leaf first): serve TLS (wss://, https://) on the client and API
    /// listeners. Needs --tls-key. SIGHUP reads both files again; live connections stay
    #[arg(long, env = "SWITCHBOARD_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of --tls-cert
    #[arg(long, env = "SWITCHBOARD_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// Who may scrape GET /metrics (Prometheus text, on the API listener): api-key (as the HTTP
    /// API: Authorization: Bearer <api key>) or none (anyone who reaches the listener)
    /// [default: api-key]
    #[arg(long, env = "SWITCHBOARD_METRICS_AUTH", value_enum)]
    pub metrics_auth: Option<MetricsAuth>,

    /// Largest HTTP API request body, in bytes; larger gets 413 [default: 1048576]
    #[arg(long, env = "SWITCHBOARD_API_MAX_BODY_BYTES", value_name = "BYTES")]
    pub api_max_body_bytes: Option<usize>,

    /// Seconds an HTTP API request body may take to arrive whole; past it, 408 [default: 10]
    #[arg(long, env = "SWITCHBOARD_API_BODY_TIMEOUT_SECS", value_name = "SECS")]
    pub api_body_timeout_secs: Option<u64>,

    /// Shared secret for HS256 client tokens (at least 32 bytes)
    #[arg(
        long,
        env = "SWITCHBOARD_JWT_HS256_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub jwt_hs256_secret: Option<String>,

    /// File holding the HS256 secret (trailing whitespace is ignored)
    #[arg(long, env = "SWITCHBOARD_JWT_HS256_SECRET_FILE", value_name = "FILE")]
    pub jwt_hs256_secret_file: Option<PathBuf>,

    /// PEM file with an RSA (RS256) or EC P-256 (ES256) public key; repeatable
    #[arg(
        long = "jwt-public-key",
        env = "SWITCHBOARD_JWT_PUBLIC_KEYS",
        value_name = "FILE",
        value_delimiter = ','
    )]
    pub jwt_public_keys: Option<Vec<PathBuf>>,

    /// JWKS file with RSA or EC public keys (matched by `kid`)
    #[arg(long, env = "SWITCHBOARD_JWT_JWKS", value_name = "FILE")]
    pub jwt_jwks: Option<PathBuf>,

    /// JWKS URL (http:// or https://) with RSA or EC public keys, fetched at start, every
    /// --jwt-jwks-refresh-secs, and when a token names a key id it lacks (at most every 10 s);
    /// a failed fetch keeps the last good keys
    #[arg(long, env = "SWITCHBOARD_JWT_JWKS_URL", value_name = "URL")]
    pub jwt_jwks_url: Option<String>,

    /// How often the JWKS URL is fetched again [default: 300]
    #[arg(long, env = "SWITCHBOARD_JWT_JWKS_REFRESH_SECS", value_name = "SECS")]
    pub jwt_jwks_refresh_secs: Option<u64>,

    /// PEM certificates to trust for an https:// JWKS URL, besides Mozilla's roots (a private CA)
    #[arg(long, env = "SWITCHBOARD_JWT_JWKS_CA_FILE", value_name = "FILE")]
    pub jwt_jwks_ca_file: Option<PathBuf>,

    /// Required `aud` claim
    #[arg(long, env = "SWITCHBOARD_JWT_AUDIENCE", value_name = "AUD")]
    pub jwt_audience: Option<String>,

    /// Required `iss` claim
    #[arg(long, env = "SWITCHBOARD_JWT_ISSUER", value_name = "ISS")]
    pub jwt_issuer: Option<String>,

    /// Clock skew allowed on `exp` and `nbf`, in seconds [default: 30]
    #[arg(long, env = "SWITCHBOARD_JWT_LEEWAY_SECS", value_name = "SECS")]
    pub jwt_leeway_secs: Option<u64>,

    /// Browser origin allowed to connect (repeatable); others get 403. Unset: any origin
    #[arg(
        long = "allowed-origin",
        env = "SWITCHBOARD_ALLOWED_ORIGINS",
        value_name = "ORIGIN",
        value_delimiter = ','
    )]
    pub allowed_origins: Option<Vec<String>>,

    /// Without client authentication (ids chosen by clients): allow a non-loopback listen address,
    /// and requests forwarded by a proxy or naming another Host (otherwise refused with 403)
    #[arg(long, env = "SWITCHBOARD_ALLOW_INSECURE", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub allow_insecure: Option<bool>,

    /// Serve a WebSocket echo at this path (e.g. /echo), with the settings of /ws and no auth: for
    /// diagnostics and conformance runs [default: none]
    #[arg(long, env = "SWITCHBOARD_ECHO_PATH", value_name = "PATH")]
    pub echo_path: Option<String>,

    /// Topic namespaces (TOML only: [[namespaces]] tables; see docs/configuration.md)
    #[arg(skip)]
    pub namespaces: Option<Vec<Namespace>>,
}

/// Arguments of `switchboard serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (same names, snake_case)
    #[arg(long, env = "SWITCHBOARD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// The settings, each overriding the file.
    #[command(flatten)]
    pub settings: Settings,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter.
    pub log_level: String,
    /// Largest inbound message.
    pub max_message_size: usize,
    /// Most targets per message.
    pub max_targets: usize,
    /// Idle timeout, if any.
    pub idle_timeout: Option<Duration>,
    /// Ping interval, if any.
    pub ping_interval: Option<Duration>,
    /// Quiet time before a connection hibernates, if ever.
    pub hibernate_after: Option<Duration>,
    /// Whether permessage-deflate is offered.
    pub compression: bool,
    /// Mailbox size.
    pub mailbox_size: usize,
    /// Outbound byte limit.
    pub max_outbound_bytes: usize,
    /// Slow-consumer close code.
    pub slow_consumer_close_code: CloseCode,
    /// How long a connection may stay over `max_outbound_bytes`.
    pub slow_consumer_timeout: Duration,
    /// Shutdown drain time.
    pub shutdown_drain: Duration,
    /// Runtime worker threads (0: one per CPU this process may use).
    pub workers: usize,
    /// How the workers share connections.
    pub scheduler: Scheduler,
    /// Connections per client id.
    pub max_connections_per_client: usize,
    /// Topics per connection.
    pub max_topics_per_connection: usize,
    /// Rate limit: messages per second (0 unlimited).
    pub rate_limit_messages_per_sec: u32,
    /// Rate limit: bytes per second (0 unlimited).
    pub rate_limit_bytes_per_sec: u64,
    /// Refusals in a row before closing.
    pub rate_limit_strikes: u32,
    /// Inflated bytes a second per connection (0: no cap).
    pub max_inflate_bytes_per_sec: u64,
    /// Partly received bytes, all connections together.
    pub receive_budget_bytes: usize,
    /// Partly received bytes, one connection.
    pub receive_budget_per_connection_bytes: usize,
    /// Partly received bytes, the connections of one IP address (0: no share).
    pub receive_budget_per_ip_bytes: usize,
    /// WebSocket connections per IP address (0: no limit).
    pub max_connections_per_ip: usize,
    /// Messages per inbox.
    pub inbox_size: usize,
    /// How long an inbox keeps a message.
    pub inbox_ttl: Duration,
    /// Where client ids, topics and history live.
    pub engine: EngineKind,
    /// Redis, for the Redis engine.
    pub redis_url: String,
    /// A node's lease in cluster mode.
    pub node_lease: Duration,
    /// Messages the `$clients` topic keeps (0: no events).
    pub client_events_size: usize,
    /// Most bytes of pub/sub notices a node holds for its delivery task.
    pub redis_pubsub_backlog_bytes: usize,
    /// How long Redis keeps a stream's position after its last use.
    pub redis_position_ttl: Duration,
    /// History the memory engine holds, in bytes.
    pub history_max_bytes: usize,
    /// Where the snapshot is kept, when history is persisted.
    pub data_dir: Option<PathBuf>,
    /// The data directory of a run that does not persist (`persist = false`,
    /// or the Redis engine): a snapshot found there is moved aside at start.
    pub unused_data_dir: Option<PathBuf>,
    /// Whether to move an unreadable snapshot aside and start anyway.
    pub start_fresh: bool,
    /// API keys.
    pub api_keys: ApiKeys,
    /// Separate API listener, if any.
    pub api_listen: Option<SocketAddr>,
    /// The TLS certificate both listeners serve, if they speak TLS.
    pub tls: Option<Arc<Certificate>>,
    /// Who may read the metrics.
    pub metrics_auth: MetricsAuth,
    /// API body limit.
    pub api_max_body_bytes: usize,
    /// How long an API request body may take to arrive.
    pub api_body_timeout: Duration,
    /// JWT settings (no key: `auth = none`).
    pub jwt: JwtConfig,
    /// Allowed browser origins; empty allows any.
    pub allowed_origins: Vec<String>,
    /// Whether a public address without auth is allowed.
    pub allow_insecure: bool,
    /// Where the echo is served, if anywhere.
    pub echo_path: Option<String>,
    /// Topic namespaces.
    pub namespaces: Vec<Namespace>,
}

impl Config {
    /// Merges the layers and checks the result.
    pub fn load(args: &ServeArgs) -> anyhow::Result<Self> {
        let mut table = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?;
                toml::from_str::<toml::Table>(&text).map_err(|e| {
                    anyhow::anyhow!(
                        "parsing config file {}: {}",
                        path.display(),
                        one_line(&e, &text)
                    )
                })?
            }
            None => toml::Table::new(),
        };
        // Unset options serialise to nothing, so only what was given overrides the file.
        let given = toml::Table::try_from(&args.settings).map_err(|_| too_large(&args.settings))?;
        for pair in EITHER_OF {
            for (this, other) in [(pair[0], pair[1]), (pair[1], pair[0])] {
                if given.contains_key(this) {
                    table.remove(other);
                }
            }
        }
        table.extend(given);
        let settings: Settings = table.clone().try_into().map_err(|e| invalid(&table, &e))?;
        let config = Self::resolve(settings)?;
        config.check_exposure()?;
        if config.engine == EngineKind::Redis {
            // Before binding, with the other configuration errors.
            crate::engine::redis::client(&config.redis_url)?;
        }
        // The keys are read and checked now, so that a bad one stops the service
        // before it binds or says it is listening.
        crate::auth::JwtVerifier::from_config(&config.jwt)?;
        Ok(config)
    }

    fn resolve(s: Settings) -> anyhow::Result<Self> {
        const MAX_CONNECTIONS_PER_IP: usize = 1000;
        check_durations(&s)?;
        if let Some(filter) = &s.log_level {
            check_log_level(filter)?;
        }
        let at_least_one = [
            ("api_max_body_bytes", s.api_max_body_bytes.map(|n| n as u64)),
            ("api_body_timeout_secs", s.api_body_timeout_secs),
            ("rate_limit_strikes", s.rate_limit_strikes.map(u64::from)),
            ("jwt_jwks_refresh_secs", s.jwt_jwks_refresh_secs),
        ];
        if let Some((name, _)) = at_least_one.iter().find(|(_, value)| *value == Some(0)) {
            bail!("{name} must be at least 1");
        }
        let secs = |value: Option<u64>, default: u64| {
            Some(value.unwrap_or(default))
                .filter(|s| *s > 0)
                .map(Duration::from_secs)
        };
        let receive_budget_bytes = s.receive_budget_bytes.unwrap_or(256 << 20);
        let receive_budget_per_connection_bytes = s.receive_budget_per_connection_bytes.unwrap_or(
            s.max_message_size
                .unwrap_or(1 << 20)
                .saturating_mul(2)
                .saturating_add(RECEIVE_SLACK),
        );
        let data_dir = s
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("switchboard-data"));
        let persists = s.persist.unwrap_or(true) && s.engine != Some(EngineKind::Redis);
        let config = Self {
            listen: s
                .listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 4000))),
            log_format: s.log_format.unwrap_or(LogFormat::Human),
            log_level: s.log_level.unwrap_or_else(|| "info".into()),
            max_message_size: s.max_message_size.unwrap_or(1 << 20),
            max_targets: s.max_targets.unwrap_or(1000),
            idle_timeout: secs(s.idle_timeout_secs, 60),
            ping_interval: secs(s.ping_interval_secs, 25),
            hibernate_after: secs(s.hibernate_after_secs, 15),
            compression: s.compression.unwrap_or(true),
            mailbox_size: s.mailbox_size.unwrap_or(1024),
            max_outbound_bytes: s.max_outbound_bytes.unwrap_or(4 << 20),
            slow_consumer_close_code: CloseCode(s.slow_consumer_close_code.unwrap_or(1013)),
            slow_consumer_timeout: Duration::from_secs(s.slow_consumer_timeout_secs.unwrap_or(30)),
            shutdown_drain: Duration::from_secs(s.shutdown_drain_secs.unwrap_or(10)),
            workers: s.workers.unwrap_or(0),
            scheduler: s.scheduler.unwrap_or(Scheduler::WorkStealing),
            max_connections_per_client: s.max_connections_per_client.unwrap_or(100),
            max_topics_per_connection: s.max_topics_per_connection.unwrap_or(100),
            rate_limit_messages_per_sec: s.rate_limit_messages_per_sec.unwrap_or(100),
            rate_limit_bytes_per_sec: s.rate_limit_bytes_per_sec.unwrap_or(1 << 20),
            rate_limit_strikes: s.rate_limit_strikes.unwrap_or(20),
            max_inflate_bytes_per_sec: s.max_inflate_bytes_per_sec.unwrap_or(2 << 20),
            receive_budget_bytes,
            receive_budget_per_connection_bytes,
            // No share unless asked for where one address is expected to
            // carry many clients (max_connections_per_ip raised, as behind a
            // reverse proxy, or 0): a quarter for all of them would refuse
            // large messages a deployment took before.
            receive_budget_per_ip_bytes: s.receive_budget_per_ip_bytes.unwrap_or(
                match s.max_connections_per_ip.unwrap_or(MAX_CONNECTIONS_PER_IP) {
                    1..=MAX_CONNECTIONS_PER_IP => {
                        (receive_budget_bytes / 4).max(receive_budget_per_connection_bytes)
                    }
                    _ => 0,
                },
            ),
            max_connections_per_ip: s.max_connections_per_ip.unwrap_or(MAX_CONNECTIONS_PER_IP),
            inbox_size: s.inbox_size.unwrap_or(100),
            inbox_ttl: Duration::from_secs(s.inbox_ttl_secs.unwrap_or(600)),
            engine: s.engine.unwrap_or(EngineKind::Memory),
            redis_url: s
                .redis_url
                .unwrap_or_else(|| "redis://127.0.0.1:6379/0".into()),
            node_lease: match s.node_lease_secs.unwrap_or(5) {
                secs @ 2..=15 => Duration::from_secs(secs),
                other => bail!("node_lease_secs must be 2 to 15, not {other}"),
            },
            client_events_size: s.client_events_size.unwrap_or(1000),
            redis_pubsub_backlog_bytes: match s.redis_pubsub_backlog_bytes.unwrap_or(32 << 20) {
                bytes @ 4096.. => bytes,
                other => bail!("redis_pubsub_backlog_bytes must be at least 4096, not {other}"),
            },
            redis_position_ttl: match s.redis_position_ttl_secs.unwrap_or(24 * 3600) {
                0 => bail!("redis_position_ttl_secs must be at least 1"),
                secs => Duration::from_secs(secs),
            },
            history_max_bytes: s.history_max_bytes.unwrap_or(128 << 20),
            // The Redis engine keeps its streams in Redis: nothing to save here.
            data_dir: persists.then(|| data_dir.clone()),
            unused_data_dir: (!persists).then_some(data_dir),
            start_fresh: s.start_fresh.unwrap_or(false),
            // `SWITCHBOARD_API_KEYS="old, new"` means the key `new`.
            api_keys: ApiKeys::new(
                &s.api_keys
                    .unwrap_or_default()
                    .iter()
                    .map(|key| key.trim().to_owned())
                    .collect::<Vec<_>>(),
            ),
            api_listen: s.api_listen,
            tls: match (s.tls_cert, s.tls_key) {
                (Some(cert), Some(key)) => Some(Certificate::load(cert, key)?),
                (None, None) => None,
                _ => bail!("give tls_cert and tls_key together, or neither"),
            },
            metrics_auth: s.metrics_auth.unwrap_or(MetricsAuth::ApiKey),
            api_max_body_bytes: s.api_max_body_bytes.unwrap_or(1 << 20),
            api_body_timeout: Duration::from_secs(s.api_body_timeout_secs.unwrap_or(10)),
            jwt: JwtConfig {
                hs256_secret: match (s.jwt_hs256_secret, s.jwt_hs256_secret_file) {
                    (Some(_), Some(_)) => {
                        bail!("give jwt_hs256_secret or jwt_hs256_secret_file, not both")
                    }
                    (Some(secret), None) => Some(secret),
                    (None, Some(path)) => Some(
                        std::fs::read_to_string(&path)
                            .with_context(|| format!("reading {}", path.display()))?
                            .trim_end()
                            .to_owned(),
                    ),
                    (None, None) => None,
                },
                public_keys: s.jwt_public_keys.unwrap_or_default(),
                jwks: s.jwt_jwks,
                jwks_url: match s.jwt_jwks_url {
                    Some(url) => Some(crate::jwks::JwksUrl::parse(
                        &url,
                        Duration::from_secs(s.jwt_jwks_refresh_secs.unwrap_or(300)),
                        s.jwt_jwks_ca_file,
                    )?),
                    None => None,
                },
                audience: s.jwt_audience,
                issuer: s.jwt_issuer,
                leeway_secs: match s.jwt_leeway_secs.unwrap_or(30) {
                    leeway @ 0..=MAX_LEEWAY_SECS => leeway,
                    leeway => bail!(
                        "jwt_leeway_secs is {leeway}, and may be at most {MAX_LEEWAY_SECS} (a \
                         day): it allows for clocks that disagree, and tokens should expire"
                    ),
                },
            },
            allowed_origins: s
                .allowed_origins
                .unwrap_or_default()
                .iter()
                .map(|origin| normalize_origin(origin))
                .collect::<anyhow::Result<_>>()?,
            allow_insecure: s.allow_insecure.unwrap_or(false),
            echo_path: s.echo_path,
            namespaces: s.namespaces.unwrap_or_default(),
        };
        if config.max_message_size == 0 || config.max_targets == 0 || config.mailbox_size == 0 {
            bail!("max_message_size, max_targets and mailbox_size must be at least 1");
        }
        let most_bytes = config.rate_limit_bytes_per_sec.saturating_mul(2);
        if config.rate_limit_bytes_per_sec > 0 && most_bytes < config.max_message_size as u64 {
            bail!(
                "rate_limit_bytes_per_sec must be at least half of max_message_size (the \
                 allowance holds two seconds' worth, {most_bytes} bytes), or no message over \
                 that could ever be sent"
            );
        }
        if let (Some(ping), Some(idle)) = (config.ping_interval, config.idle_timeout)
            && ping >= idle
        {
            bail!(
                "ping_interval_secs must be less than idle_timeout_secs: a browser sends \
                 nothing of itself, so an idle one is kept only by answering pings, which must \
                 come before the timeout"
            );
        }
        if config.max_outbound_bytes < config.max_message_size {
            bail!(
                "max_outbound_bytes must be at least max_message_size, or no message of that size could be sent"
            );
        }
        if let Some(path) = &config.echo_path {
            check_echo_path(path)?;
        }
        let least = config.max_message_size.saturating_add(RECEIVE_SLACK);
        if config.receive_budget_per_connection_bytes < least {
            bail!(
                "receive_budget_per_connection_bytes must be at least max_message_size plus \
                 {RECEIVE_SLACK} ({least}): what a connection holds counts its frame headers \
                 and the rest of a read, and with less a message of the largest size could be \
                 closed with 1009 as it arrives"
            );
        }
        if config.receive_budget_bytes < config.receive_budget_per_connection_bytes {
            bail!("receive_budget_bytes must be at least receive_budget_per_connection_bytes");
        }
        if (1..config.receive_budget_per_connection_bytes)
            .contains(&config.receive_budget_per_ip_bytes)
        {
            bail!(
                "receive_budget_per_ip_bytes must be 0 (no share) or at least receive_budget_per_connection_bytes"
            );
        }
        // Not 4001, the token's expiry; and not 4500 up, which clients
        // (the JS one among them) take as "do not reconnect".
        if !matches!(
            config.slow_consumer_close_code.0,
            1008 | 1013 | 4000 | 4002..=4499
        ) {
            bail!(
                "slow_consumer_close_code must be 1008, 1013, 4000 or 4002-4499 (4001 says the \
                 token expired; from 4500 on, clients stop reconnecting)"
            );
        }
        if config.max_connections_per_client == 0 || config.max_topics_per_connection == 0 {
            bail!("max_connections_per_client and max_topics_per_connection must be at least 1");
        }
        for ns in &config.namespaces {
            if ns.max_subscribers == Some(0) {
                bail!(
                    "namespace {:?}: max_subscribers must be at least 1",
                    ns.prefix
                );
            }
        }
        Ok(config)
    }

    /// Whether client authentication (a JWT key) is configured.
    pub fn has_client_auth(&self) -> bool {
        self.jwt.hs256_secret.is_some()
            || !self.jwt.public_keys.is_empty()
            || self.jwt.jwks.is_some()
            || self.jwt.jwks_url.is_some()
    }

    /// Refuses to expose unauthenticated clients ids on a non-loopback address.
    pub fn check_exposure(&self) -> anyhow::Result<()> {
        if !self.listen.ip().is_loopback() && !self.has_client_auth() && !self.allow_insecure {
            bail!(
                "refusing to listen on {} without client authentication: anyone who can reach it \
                 could connect as any id. Configure --jwt-hs256-secret, --jwt-public-key, \
                 --jwt-jwks or --jwt-jwks-url, or pass --allow-insecure if that is what you want",
                self.listen
            );
        }
        Ok(())
    }

    /// The per-connection options for relay connections.
    pub fn connection_options(&self) -> Options {
        Options::default()
            .idle_timeout(self.idle_timeout)
            .ping_interval(self.ping_interval)
            .hibernate_after(self.hibernate_after)
            .compression(self.compression.then(DeflateOptions::default))
            .mailbox_size(self.mailbox_size)
            .max_outbound_bytes(self.max_outbound_bytes)
            .slow_consumer(SlowConsumerPolicy::Close(self.slow_consumer_close_code))
            .slow_consumer_timeout(self.slow_consumer_timeout)
            .max_message_size(self.max_message_size)
            .max_inflate_rate(Some(self.max_inflate_bytes_per_sec).filter(|rate| *rate > 0))
    }

    /// A new budget for what connections hold of partly received data; the
    /// server makes one and gives it to every connection (through its
    /// address's share, when there are shares).
    pub fn receive_budget(&self) -> ReceiveBudget {
        ReceiveBudget::new(
            self.receive_budget_bytes,
            self.receive_budget_per_connection_bytes,
        )
    }

    /// The limit on connections per address, which gives each address its
    /// share of `budget`.
    pub fn peer_limit(&self, budget: &ReceiveBudget) -> Arc<PeerLimit> {
        let shares = (self.receive_budget_per_ip_bytes > 0)
            .then(|| (budget.clone(), self.receive_budget_per_ip_bytes));
        PeerLimit::new(self.max_connections_per_ip, shares)
    }
}

/// The longest any `_secs` setting may be: ten years, far past any use, and
/// far from where a deadline (now plus the setting) overflows and panics.
const MAX_SECS: u64 = 10 * 365 * 24 * 3600;

/// Refuses a `log_level` that is no filter, or that names a target where a
/// level was meant: `warnn` is a valid filter (every event of a target
/// called "warnn"), and would have logged nothing at all, errors included.
fn check_log_level(filter: &str) -> anyhow::Result<()> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    tracing_subscriber::EnvFilter::builder()
        .parse(filter)
        .map_err(|e| anyhow::anyhow!("log_level {filter:?} is not a filter: {e}"))?;
    let directives = filter.split(',').map(str::trim).filter(|d| !d.is_empty());
    for directive in directives {
        let bare = !directive.contains(['=', '[']);
        if bare && !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(directive)) {
            bail!(
                "log_level {directive:?} is neither a level (off, error, warn, info, debug, trace) \
                 nor TARGET=LEVEL"
            );
        }
    }
    Ok(())
}

/// Refuses a duration over [`MAX_SECS`], naming the setting.
fn check_durations(s: &Settings) -> anyhow::Result<()> {
    let settings = [
        ("idle_timeout_secs", s.idle_timeout_secs),
        ("ping_interval_secs", s.ping_interval_secs),
        ("hibernate_after_secs", s.hibernate_after_secs),
        ("slow_consumer_timeout_secs", s.slow_consumer_timeout_secs),
        ("shutdown_drain_secs", s.shutdown_drain_secs),
        ("inbox_ttl_secs", s.inbox_ttl_secs),
        ("redis_position_ttl_secs", s.redis_position_ttl_secs),
        ("api_body_timeout_secs", s.api_body_timeout_secs),
        ("jwt_jwks_refresh_secs", s.jwt_jwks_refresh_secs),
    ];
    let namespaces = s.namespaces.iter().flatten();
    let ttls = namespaces.map(|ns| ("a namespace's history_ttl_secs", Some(ns.history_ttl_secs)));
    for (name, value) in settings.into_iter().chain(ttls) {
        if let Some(value) = value.filter(|v| *v > MAX_SECS) {
            bail!("{name} is {value}, and may be at most {MAX_SECS} (ten years)");
        }
    }
    Ok(())
}

/// Room a connection's receive share has beyond one message of the largest
/// size: frame headers, a read that ends inside the next message, and a
/// compressed fragment read while the ones before it are inflated.
const RECEIVE_SLACK: usize = 64 << 10;

/// Paths the service's own routes hold (app.rs, api.rs, admin.rs): the echo
/// may take none of them, nor a path under `/api/` or `/admin/`.
const RESERVED_PATHS: [&str; 7] = [
    "/",
    "/ws",
    "/healthz",
    "/client.js",
    "/metrics",
    "/api",
    "/admin",
];

/// Refuses an echo path the router would reject or that another route holds:
/// found only when the routes are built, after binding, it would stop the
/// start with a panic.
fn check_echo_path(path: &str) -> anyhow::Result<()> {
    let taken = RESERVED_PATHS.contains(&path)
        || ["/api/", "/admin/"]
            .iter()
            .any(|under| path.starts_with(under));
    // The router's syntax: `{..}` captures, `*` and a leading `:` are refused.
    let malformed = !path.starts_with('/')
        || path.contains(['?', '#', '{', '}', '*'])
        || path.split('/').any(|segment| segment.starts_with(':'));
    if taken || malformed {
        bail!(
            "echo_path must be a path of its own, such as /echo (not {}, or under /api/ or \
             /admin/): {path:?}",
            RESERVED_PATHS.join(", ")
        );
    }
    Ok(())
}

/// Settings whose values are secrets (a Redis URL may hold a password):
/// an error about one never shows its value.
const SECRETS: [&str; 3] = ["api_keys", "jwt_hs256_secret", "redis_url"];

/// The error for a merged configuration that does not deserialize, naming
/// the setting at fault: serde's message alone names only the value (`invalid
/// type: string "...", expected a sequence`), which may be a secret.
fn invalid(table: &toml::Table, error: &toml::de::Error) -> anyhow::Error {
    let wrong = table.iter().find_map(|(key, value)| {
        let alone = toml::Table::from_iter([(key.clone(), value.clone())]);
        Some(key).zip(alone.try_into::<Settings>().err())
    });
    match wrong {
        Some((key, _)) if SECRETS.contains(&key.as_str()) => anyhow::anyhow!(
            "invalid configuration: {key} is not of the type it takes (its value is a secret, \
             and is not shown)"
        ),
        Some((key, error)) => {
            anyhow::anyhow!("invalid configuration: {key}: {}", one_line(&error, ""))
        }
        None => anyhow::anyhow!("invalid configuration: {}", one_line(error, "")),
    }
}

/// The error for a flag or environment variable whose number a setting
/// cannot hold (over `i64::MAX`, TOML's largest), naming it.
fn too_large(settings: &Settings) -> anyhow::Error {
    let json = serde_json::to_value(settings).unwrap_or_default();
    let named = json.as_object().and_then(|fields| {
        fields
            .iter()
            .find(|(_, value)| value.as_u64().is_some_and(|n| i64::try_from(n).is_err()))
    });
    match named {
        Some((key, value)) => anyhow::anyhow!(
            "{key} is {value}, over the most any setting takes ({})",
            i64::MAX
        ),
        None => anyhow::anyhow!("a setting given as a flag or in the environment cannot be read"),
    }
}

/// A TOML error on one line, with its line and column in `text` when it has a
/// place there (the library's own rendering quotes the source over several lines).
fn one_line(error: &toml::de::Error, text: &str) -> String {
    let message = error
        .message()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    match error.span().filter(|span| span.start <= text.len()) {
        Some(span) => {
            let before = &text[..span.start];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("{message} (line {line}, column {column})")
        }
        None => message,
    }
}

/// An origin as browsers send it: `scheme://host[:port]`, lowercase, no path.
/// A trailing `/` is dropped; any other path is an error, since it could never match.
fn normalize_origin(origin: &str) -> anyhow::Result<String> {
    let origin = origin.trim().trim_end_matches('/').to_ascii_lowercase();
    let rest = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .with_context(|| {
            format!("allowed origin {origin:?} must start with http:// or https://")
        })?;
    if rest.is_empty() || rest.contains('/') {
        bail!("allowed origin {origin:?} must be scheme://host[:port], without a path");
    }
    // Browsers leave the scheme's own port out of `Origin`.
    let default_port = if origin.starts_with("https://") {
        ":443"
    } else {
        ":80"
    };
    Ok(origin
        .strip_suffix(default_port)
        .map_or(origin.clone(), str::to_owned))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ServeArgs,
    }

    #[test]
    fn defaults_need_no_file() {
        let config = Config::load(&Cli::parse_from(["x"]).args).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:4000");
        assert_eq!(config.max_message_size, 1 << 20);
        assert_eq!(config.idle_timeout, Some(Duration::from_secs(60)));
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("switchboard.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:5000\"\nmax_targets = 5\nidle_timeout_secs = 0\n",
        )
        .unwrap();
        let cli = Cli::parse_from([
            "x",
            "--config",
            path.to_str().unwrap(),
            "--max-targets",
            "7",
        ]);
        let config = Config::load(&cli.args).unwrap();
        assert_eq!(config.listen.port(), 5000);
        assert_eq!(config.max_targets, 7);
        assert_eq!(config.idle_timeout, None);
    }

    #[test]
    fn origins_are_normalized_or_refused() {
        assert_eq!(
            normalize_origin("https://App.Example/").unwrap(),
            "https://app.example"
        );
        assert_eq!(
            normalize_origin("http://127.0.0.1:4000").unwrap(),
            "http://127.0.0.1:4000"
        );
        assert_eq!(
            normalize_origin("https://app.example:443").unwrap(),
            "https://app.example"
        );
        assert_eq!(
            normalize_origin("http://app.example:80").unwrap(),
            "http://app.example"
        );
        assert_eq!(
            normalize_origin("http://app.example:443").unwrap(),
            "http://app.example:443"
        );
        assert!(normalize_origin("app.example").is_err());
        assert!(normalize_origin("https://app.example/path").is_err());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "max_targetz = 5\n").unwrap();
        let cli = Cli::parse_from(["x", "--config", path.to_str().unwrap()]);
        let error = format!("{:#}", Config::load(&cli.args).unwrap_err());
        assert!(error.contains("max_targetz"), "{error}");
        for code in ["1000", "4001", "4500"] {
            let cli = Cli::parse_from(["x", "--slow-consumer-close-code", code]);
            assert!(Config::load(&cli.args).is_err(), "{code}");
        }
        let cli = Cli::parse_from(["x", "--slow-consumer-close-code", "4499"]);
        assert!(Config::load(&cli.args).is_ok());
    }

    #[test]
    fn a_wrong_value_names_its_setting_and_never_shows_a_secret() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("typed.toml");
        let file = |text: &str| {
            std::fs::write(&path, text).unwrap();
            let error = load(&["--config", path.to_str().unwrap()]).unwrap_err();
            format!("{error:#}")
        };
        let error = file("max_targets = 5\napi_keys = \"sup3r-s3cret-key\"\n");
        assert!(
            error.contains("api_keys") && !error.contains("sup3r"),
            "{error}"
        );
        let error = file("redis_url = [\"redis://:hunter2@db\"]\n");
        assert!(
            error.contains("redis_url") && !error.contains("hunter2"),
            "{error}"
        );
        let error = file("max_targets = \"five\"\n");
        assert!(
            error.contains("max_targets") && error.contains("five"),
            "{error}"
        );
        let error = format!(
            "{:#}",
            load(&["--history-max-bytes", &u64::MAX.to_string()]).unwrap_err()
        );
        assert!(error.contains("history_max_bytes"), "{error}");
    }

    #[test]
    fn a_redis_url_that_does_not_parse_is_a_configuration_error() {
        let bad = [
            "--engine",
            "redis",
            "--redis-url",
            "rediss//user:hunter2@db",
        ];
        let error = format!("{:#}", load(&bad).unwrap_err());
        assert!(
            error.contains("redis_url") && !error.contains("hunter2"),
            "{error}"
        );
        assert!(load(&["--engine", "redis", "--redis-url", "redis://db:6380/1"]).is_ok());
    }

    #[test]
    fn a_log_level_that_filters_nothing_meant_is_refused() {
        for bad in ["warnn", "info,swichboard", "x=notalevel"] {
            let error = format!("{:#}", load(&["--log-level", bad]).unwrap_err());
            assert!(error.contains("log_level"), "{bad}: {error}");
        }
        for good in [
            "warn",
            "INFO",
            "switchboard=debug,info",
            "off",
            "[conn]=debug",
        ] {
            assert!(load(&["--log-level", good]).is_ok(), "{good}");
        }
    }

    #[test]
    fn durations_past_ten_years_and_zeros_that_mean_nothing_are_refused() {
        let huge = i64::MAX.to_string();
        for flag in [
            "--shutdown-drain-secs",
            "--idle-timeout-secs",
            "--inbox-ttl-secs",
        ] {
            let error = format!("{:#}", load(&[flag, &huge]).unwrap_err());
            let name = flag.trim_start_matches("--").replace('-', "_");
            assert!(
                error.contains(&name) && error.contains("ten years"),
                "{error}"
            );
        }
        assert!(load(&["--shutdown-drain-secs", &MAX_SECS.to_string()]).is_ok());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ns.toml");
        let ttl = format!("[[namespaces]]\nprefix = \"a:\"\nhistory_ttl_secs = {huge}\n");
        std::fs::write(&path, ttl).unwrap();
        let error = format!(
            "{:#}",
            load(&["--config", path.to_str().unwrap()]).unwrap_err()
        );
        assert!(error.contains("history_ttl_secs"), "{error}");
        for flag in [
            "--api-max-body-bytes",
            "--api-body-timeout-secs",
            "--rate-limit-strikes",
            "--jwt-jwks-refresh-secs",
        ] {
            let error = format!("{:#}", load(&[flag, "0"]).unwrap_err());
            let name = flag.trim_start_matches("--").replace('-', "_");
            assert!(
                error.contains(&format!("{name} must be at least 1")),
                "{error}"
            );
        }
    }

    fn load(flags: &[&str]) -> anyhow::Result<Config> {
        Config::load(&Cli::parse_from(std::iter::once("x").chain(flags.iter().copied())).args)
    }

    #[test]
    fn settings_that_could_never_work_are_refused_with_the_reason() {
        let cases: [(&[&str], &str); 5] = [
            (&["--jwt-leeway-secs", "9999999999"], "at most 86400"),
            (
                &["--max-outbound-bytes", "1000", "--max-message-size", "1001"],
                "max_outbound_bytes must be at least max_message_size",
            ),
            (
                &["--rate-limit-bytes-per-sec", "262144"],
                "half of max_message_size",
            ),
            (
                &["--ping-interval-secs", "60"],
                "less than idle_timeout_secs",
            ),
            (
                &["--ping-interval-secs", "20", "--idle-timeout-secs", "20"],
                "less than",
            ),
        ];
        for (flags, reason) in cases {
            let error = format!("{:#}", load(flags).unwrap_err());
            assert!(error.contains(reason), "{flags:?}: {error}");
        }
        assert!(load(&["--rate-limit-bytes-per-sec", "524288"]).is_ok());
        assert!(
            load(&["--rate-limit-bytes-per-sec", "0"]).is_ok(),
            "unlimited"
        );
        assert!(load(&["--ping-interval-secs", "0"]).is_ok(), "no pings");
        assert!(load(&["--ping-interval-secs", "90", "--idle-timeout-secs", "0"]).is_ok());
        assert!(load(&["--jwt-leeway-secs", "86400"]).is_ok());
    }

    #[test]
    fn api_keys_are_trimmed() {
        let config = load(&["--api-key", " old , new"]).unwrap();
        assert!(config.api_keys.accepts("old") && config.api_keys.accepts("new"));
        assert!(!config.api_keys.accepts(" new"));
    }

    #[test]
    fn a_secret_given_one_way_overrides_the_other_way_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, format!("{}\n", "f".repeat(32))).unwrap();
        let path = dir.path().join("switchboard.toml");
        let file = format!("jwt_hs256_secret_file = {:?}\n", secret.to_str().unwrap());
        std::fs::write(&path, &file).unwrap();
        let config = load(&["--config", path.to_str().unwrap()]).unwrap();
        assert_eq!(config.jwt.hs256_secret, Some("f".repeat(32)));
        let flag = "e".repeat(32);
        let cli = [
            "--config",
            path.to_str().unwrap(),
            "--jwt-hs256-secret",
            &flag,
        ];
        assert_eq!(load(&cli).unwrap().jwt.hs256_secret, Some(flag.clone()));
        // Both in one layer still say one thing two ways.
        let both = format!("jwt_hs256_secret = {flag:?}\n{file}");
        std::fs::write(&path, both).unwrap();
        let error = format!(
            "{:#}",
            load(&["--config", path.to_str().unwrap()]).unwrap_err()
        );
        assert!(error.contains("not both"), "{error}");
    }

    #[test]
    fn cluster_mode_settings_are_checked_and_keep_no_data_dir() {
        let config = Config::load(&Cli::parse_from(["x", "--engine", "redis"]).args).unwrap();
        assert_eq!(config.engine, EngineKind::Redis);
        assert_eq!(config.data_dir, None, "the streams live in Redis");
        assert_eq!(config.node_lease, Duration::from_secs(5));
        for lease in ["1", "16"] {
            let cli = Cli::parse_from(["x", "--node-lease-secs", lease]);
            let error = format!("{:#}", Config::load(&cli.args).unwrap_err());
            assert!(error.contains("node_lease_secs must be 2 to 15"), "{error}");
        }
        assert_eq!(config.redis_pubsub_backlog_bytes, 32 << 20);
        assert_eq!(config.redis_position_ttl, Duration::from_secs(86400));
        assert!(load(&["--redis-position-ttl-secs", "0"]).is_err());
        let error = format!(
            "{:#}",
            load(&["--redis-pubsub-backlog-bytes", "4095"]).unwrap_err()
        );
        assert!(error.contains("at least 4096, not 4095"), "{error}");
        let config = load(&["--redis-pubsub-backlog-bytes", "4096"]).unwrap();
        assert_eq!(config.redis_pubsub_backlog_bytes, 4096);
    }

    #[test]
    fn a_jwks_url_must_be_http_or_https_and_counts_as_client_auth() {
        for bad in ["ftp://issuer/keys", "/keys", "not a url"] {
            let error = format!("{:#}", load(&["--jwt-jwks-url", bad]).unwrap_err());
            assert!(error.contains("jwt_jwks_url"), "{bad}: {error}");
        }
        let config = load(&["--jwt-jwks-url", "https://issuer.example/keys"]).unwrap();
        assert!(config.has_client_auth());
        let missing_ca = load(&[
            "--jwt-jwks-url",
            "https://issuer.example/keys",
            "--jwt-jwks-ca-file",
            "/nonexistent/ca.pem",
        ]);
        assert!(format!("{:#}", missing_ca.unwrap_err()).contains("jwt_jwks_ca_file"));
    }

    #[test]
    fn metrics_auth_is_the_api_key_unless_none_in_a_flag_or_the_file() {
        assert_eq!(load(&[]).unwrap().metrics_auth, MetricsAuth::ApiKey);
        let open = load(&["--metrics-auth", "none"]).unwrap();
        assert_eq!(open.metrics_auth, MetricsAuth::None);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("switchboard.toml");
        for (text, expected) in [
            ("metrics_auth = \"none\"\n", MetricsAuth::None),
            ("metrics_auth = \"api-key\"\n", MetricsAuth::ApiKey),
        ] {
            std::fs::write(&path, text).unwrap();
            let config = load(&["--config", path.to_str().unwrap()]).unwrap();
            assert_eq!(config.metrics_auth, expected, "{text}");
        }
        std::fs::write(&path, "metrics_auth = \"open\"\n").unwrap();
        assert!(load(&["--config", path.to_str().unwrap()]).is_err());
    }

    #[test]
    fn receive_limits_default_from_the_message_size_and_are_checked() {
        let config = load(&[]).unwrap();
        assert_eq!(config.receive_budget_bytes, 256 << 20);
        assert_eq!(
            config.receive_budget_per_connection_bytes,
            (2 << 20) + (64 << 10)
        );
        assert_eq!(config.max_inflate_bytes_per_sec, 2 << 20);
        assert_eq!(config.max_connections_per_ip, 1000);
        assert_eq!(config.receive_budget_per_ip_bytes, 64 << 20);
        let small = load(&["--receive-budget-bytes", &(5 << 20).to_string()]).unwrap();
        assert_eq!(
            small.receive_budget_per_ip_bytes, small.receive_budget_per_connection_bytes,
            "a quarter, but room for one connection's share"
        );
        let share_too_small = load(&["--receive-budget-per-ip-bytes", "1000"]);
        assert!(format!("{:#}", share_too_small.unwrap_err()).contains("per_ip"));
        assert_eq!(
            load(&["--receive-budget-per-ip-bytes", "0"])
                .unwrap()
                .receive_budget_per_ip_bytes,
            0
        );
        let proxied = load(&["--max-connections-per-ip", "100000"]).unwrap();
        assert_eq!(proxied.receive_budget_per_ip_bytes, 0, "raised: no share");
        let asked = ["--max-connections-per-ip", "100000"];
        let asked = load(&[&asked[..], &["--receive-budget-per-ip-bytes", "9999999"]].concat());
        assert_eq!(asked.unwrap().receive_budget_per_ip_bytes, 9_999_999);
        let config = load(&["--max-message-size", "1000"]).unwrap();
        assert_eq!(
            config.receive_budget_per_connection_bytes,
            2000 + (64 << 10)
        );
        let share_too_small = load(&["--receive-budget-per-connection-bytes", "1000"]);
        assert!(format!("{:#}", share_too_small.unwrap_err()).contains("max_message_size"));
        // One message of the largest size, with its header, must always fit.
        let exactly = ["--max-message-size", "100000"];
        let exactly = [
            &exactly[..],
            &["--receive-budget-per-connection-bytes", "100000"],
        ]
        .concat();
        assert!(format!("{:#}", load(&exactly).unwrap_err()).contains("165536"));
        let floor = ["--max-message-size", "100000"];
        let floor = [
            &floor[..],
            &["--receive-budget-per-connection-bytes", "165536"],
        ]
        .concat();
        assert_eq!(
            load(&floor).unwrap().receive_budget_per_connection_bytes,
            165_536
        );
        let budget_too_small = load(&["--receive-budget-bytes", "1000"]);
        assert!(format!("{:#}", budget_too_small.unwrap_err()).contains("receive_budget_bytes"));
    }

    #[test]
    fn the_echo_path_must_be_a_path_of_its_own() {
        assert_eq!(
            load(&["--echo-path", "/echo"])
                .unwrap()
                .echo_path
                .as_deref(),
            Some("/echo")
        );
        for taken in [
            "/",
            "/ws",
            "/healthz",
            "/api/v1/echo",
            "/api",
            "/admin",
            "/admin/admin.js",
            "/metrics",
            "/client.js",
            "/e/:x",
            "echo",
            "/e/{x}",
            "/e?x",
        ] {
            let error = format!("{:#}", load(&["--echo-path", taken]).unwrap_err());
            assert!(error.contains("echo_path"), "{taken}: {error}");
        }
    }
}
