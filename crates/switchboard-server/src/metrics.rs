//! Prometheus metrics, served as text at `GET /metrics` (docs/operations.md).
//!
//! Two kinds of figures. Counters of events a connection has a few of (opens,
//! closes, refusals) are the `prometheus` crate's, registered here. Figures on
//! the message path (messages, deliveries, bytes, history appends) are kept in
//! sharded counters ([`ShardedCounter`], [`switchboard::Stats`]) that no two
//! cores write in one cache line, and are read only when scraped, with the
//! gauges, into families of their own ([`Live`]).

use std::collections::BTreeMap;
use std::time::Duration;

use axum::http::StatusCode;
use prometheus::core::Collector;
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use switchboard::{ShardedCounter, StatsSnapshot, TerminateReason};

/// Every metric's name starts with this.
const PREFIX: &str = "switchboard";

/// The node's metrics that are counted as events happen.
pub struct Metrics {
    registry: Registry,
    /// Connections opened (upgraded).
    pub opened: ShardedCounter,
    /// Messages appended to inboxes and topic streams.
    pub appends: ShardedCounter,
    /// Subscriptions held now (a gauge: added to and taken from).
    pub subscriptions: ShardedCounter,
    closed: IntCounterVec,
    handshake_failures: IntCounterVec,
    slow_consumer_closes: IntCounter,
    /// Sharded: a flood of refused messages is a hot path too.
    rate_limited: ShardedCounter,
    auth_failures: IntCounterVec,
    recoveries: IntCounterVec,
    redis_command_seconds: Histogram,
    redis_reconnects: IntCounter,
    /// Cluster mode: the channels the node's delivery task keeps state for.
    pub redis_channels: IntGauge,
    /// Cluster mode: pub/sub notices dropped over the node's backlog bound.
    pub redis_pubsub_dropped: IntCounter,
    /// Pub/sub connections made again after one was lost or went silent.
    pub redis_pubsub_reconnects: IntCounter,
    jwks_fetches: IntCounterVec,
    tls_reloads: IntCounterVec,
}

/// What a scrape reads at that moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Live {
    /// Open WebSocket connections on this node.
    pub connections: u64,
    /// This node's traffic counters.
    pub traffic: StatsSnapshot,
    /// The engine's counts: client ids with a live connection, topics with a
    /// subscriber, nodes (the cluster's, in cluster mode); `None` when Redis
    /// cannot be reached.
    pub counts: Option<[u64; 3]>,
}

/// The `result` label of an attempt that keeps the last good state on failure.
fn result(ok: bool) -> &'static str {
    if ok { "ok" } else { "error" }
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace(PREFIX)
}

impl Metrics {
    /// Every metric at zero.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            let counter = IntCounter::with_opts(opts(name, help)).expect("a valid metric");
            registry
                .register(Box::new(counter.clone()))
                .expect("registered once");
            counter
        };
        let family = |name: &str, help: &str, label: &str| {
            let family =
                IntCounterVec::new(opts(name, help), &[label]).expect("a valid metric family");
            registry
                .register(Box::new(family.clone()))
                .expect("registered once");
            family
        };
        // From 0.5 ms to 4 s: a pipelined round trip on one host, to a store
        // in trouble, past the link's 3 s timeout.
        let buckets = prometheus::exponential_buckets(0.000_5, 2.0, 14).expect("valid buckets");
        let redis_command_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "redis_command_duration_seconds",
                "Time from sending a command to Redis to its answer (cluster mode).",
            )
            .namespace(PREFIX)
            .buckets(buckets),
        )
        .expect("a valid histogram");
        registry
            .register(Box::new(redis_command_seconds.clone()))
            .expect("registered once");
        Self {
            opened: ShardedCounter::new(),
            appends: ShardedCounter::new(),
            subscriptions: ShardedCounter::new(),
            closed: family(
                "connections_closed_total",
                "Connections closed, by close code (`error` for a protocol or I/O error).",
                "code",
            ),
            handshake_failures: family(
                "handshake_failures_total",
                "WebSocket handshakes refused, by HTTP status.",
                "status",
            ),
            slow_consumer_closes: counter(
                "slow_consumer_closes_total",
                "Connections closed because they did not read what was sent to them.",
            ),
            rate_limited: ShardedCounter::new(),
            auth_failures: family(
                "auth_failures_total",
                "Refused tokens and API keys, by reason.",
                "reason",
            ),
            recoveries: family(
                "recoveries_total",
                "Resumes of an inbox or a topic, by whether every missed message was recovered.",
                "recovered",
            ),
            redis_command_seconds,
            jwks_fetches: family(
                "jwks_fetches_total",
                "Fetches of the JWKS URL's keys, by result (ok or error: the last good keys stay).",
                "result",
            ),
            tls_reloads: family(
                "tls_reloads_total",
                "Reloads of the TLS certificate on SIGHUP, by result (ok or error: the last good one stays).",
                "result",
            ),
            redis_reconnects: counter(
                "redis_reconnects_total",
                "The link's connections to Redis (commands, heartbeats) made again after one was lost (cluster mode); the pub/sub connection has redis_pubsub_reconnects_total.",
            ),
            redis_pubsub_reconnects: counter(
                "redis_pubsub_reconnects_total",
                "Pub/sub connections to Redis made again after one was lost, or left a command unanswered for a lease (cluster mode). Each is followed by a read of every stream the node serves, so live messages come late, not never.",
            ),
            redis_pubsub_dropped: counter(
                "redis_pubsub_dropped_total",
                "Pub/sub notices dropped because the node's delivery task was redis_pubsub_backlog_bytes behind (cluster mode). Messages with offsets are read back from their streams; join and leave events, and messages of topics without history, are lost.",
            ),
            redis_channels: {
                let gauge = IntGauge::with_opts(opts(
                    "redis_channels",
                    "Pub/sub channels (client ids and topics) this node keeps delivery state for: those with a connection here or on its way (cluster mode).",
                ))
                .expect("a valid metric");
                registry
                    .register(Box::new(gauge.clone()))
                    .expect("registered once");
                gauge
            },
            registry,
        }
    }

    /// A connection ended for `reason`.
    pub fn closed(&self, reason: &TerminateReason) {
        if matches!(reason, TerminateReason::SlowConsumer(_)) {
            self.slow_consumer_closes.inc();
        }
        let code = match reason.close_code() {
            // A client picks its own codes from 3000 to 4999: one series for
            // them all, so that clients cannot make two thousand.
            Some(3000..=4999) if matches!(reason, TerminateReason::Remote(_)) => {
                "client-3000-4999".to_owned()
            }
            Some(code) => code.to_string(),
            None => "error".to_owned(),
        };
        self.closed.with_label_values(&[&code]).inc();
    }

    /// A connection ended with `code`, its handler not told why (it panicked).
    pub fn closed_with_code(&self, code: u16) {
        self.closed.with_label_values(&[&code.to_string()]).inc();
    }

    /// This node's closes since it started, by code (`error`: an error
    /// without one), as `connections_closed_total` counts them.
    pub fn closes_by_code(&self) -> BTreeMap<String, u64> {
        self.closed
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .filter_map(|metric| {
                let code = metric.get_label().first()?.value().to_owned();
                Some((code, metric.get_counter().get_value() as u64))
            })
            .collect()
    }

    /// A handshake was answered with `status` instead of 101.
    pub fn handshake_failed(&self, status: StatusCode) {
        self.handshake_failures
            .with_label_values(&[status.as_str()])
            .inc();
    }

    /// A message was refused with `rate_limited`.
    pub fn rate_limited(&self) {
        self.rate_limited.add(1);
    }

    /// A token or API key was refused, for `reason` (a short word).
    pub fn auth_failed(&self, reason: &str) {
        self.auth_failures.with_label_values(&[reason]).inc();
    }

    /// An inbox or topic resume was `recovered`, or not.
    pub fn recovery(&self, recovered: bool) {
        let label = if recovered { "true" } else { "false" };
        self.recoveries.with_label_values(&[label]).inc();
    }

    /// `count` Redis commands, sent together, were answered after `elapsed`.
    pub fn redis_commands(&self, elapsed: Duration, count: usize) {
        for _ in 0..count {
            self.redis_command_seconds.observe(elapsed.as_secs_f64());
        }
    }

    /// The JWKS URL was fetched, or failed to be.
    pub fn jwks_fetched(&self, ok: bool) {
        self.jwks_fetches.with_label_values(&[result(ok)]).inc();
    }

    /// The TLS certificate was reloaded, or failed to be.
    pub fn tls_reloaded(&self, ok: bool) {
        self.tls_reloads.with_label_values(&[result(ok)]).inc();
    }

    /// The link to Redis was made again.
    pub fn redis_reconnected(&self) {
        self.redis_reconnects.inc();
    }

    /// The Prometheus text format (version 0.0.4) of every metric, with `live`.
    pub fn render(&self, live: &Live) -> String {
        let mut families = self.registry.gather();
        families.extend(self.live(live));
        families.sort_by(|a, b| a.name().cmp(b.name()));
        let mut text = Vec::new();
        TextEncoder::new()
            .encode(&families, &mut text)
            .expect("text encoding into memory");
        String::from_utf8(text).expect("the text format is UTF-8")
    }

    fn live(&self, live: &Live) -> Vec<MetricFamily> {
        let counter = |name: &str, help: &str, value: u64| {
            let counter = IntCounter::with_opts(opts(name, help)).expect("a valid metric");
            counter.inc_by(value);
            counter.collect()
        };
        let gauge = |name: &str, help: &str, value: u64| {
            let gauge = IntGauge::with_opts(opts(name, help)).expect("a valid metric");
            gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
            gauge.collect()
        };
        let figures = live.traffic;
        let traffic = [
            gauge(
                "connections",
                "Open WebSocket connections.",
                live.connections,
            ),
            counter(
                "connections_opened_total",
                "WebSocket connections opened.",
                self.opened.get(),
            ),
            counter(
                "messages_received_total",
                "Text and binary messages received from clients.",
                figures.messages_in,
            ),
            counter(
                "deliveries_total",
                "Text and binary frames sent to clients: deliveries of messages and presence events, and the server's answers (welcomes, acks, errors).",
                figures.messages_out,
            ),
            counter(
                "bytes_received_total",
                "Payload bytes of the messages received (after decompression).",
                figures.bytes_in,
            ),
            counter(
                "bytes_sent_total",
                "Bytes of the frames sent, headers included (after compression).",
                figures.bytes_out,
            ),
            gauge(
                "connections_hibernating",
                "Open connections hibernating: quiet for hibernate_after_secs, held without a task until they next send or get something.",
                figures.hibernations.saturating_sub(figures.wakes),
            ),
            counter(
                "hibernations_total",
                "Times a connection hibernated.",
                figures.hibernations,
            ),
            counter(
                "rate_limited_total",
                "Messages refused with rate_limited.",
                self.rate_limited.get(),
            ),
            counter(
                "history_appends_total",
                "Messages appended to inboxes and topic streams.",
                self.appends.get(),
            ),
            gauge(
                "subscriptions",
                "Topic subscriptions of this node's connections.",
                self.subscriptions.get(),
            ),
        ];
        let counts = live.counts.map(|[clients, topics, nodes]| {
            [
                gauge(
                    "client_ids",
                    "Client ids with a live connection (the cluster's, in cluster mode).",
                    clients,
                ),
                gauge(
                    "topics",
                    "Topics with a subscriber (the cluster's, in cluster mode).",
                    topics,
                ),
                gauge(
                    "nodes",
                    "Nodes in the cluster (1 with the memory engine).",
                    nodes,
                ),
            ]
        });
        traffic
            .into_iter()
            .chain(counts.into_iter().flatten())
            .flatten()
            .collect()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Counts one subscription in [`Metrics::subscriptions`] while it lives.
pub struct Counted(ShardedCounter);

impl Counted {
    /// One more in `gauge`, until this is dropped.
    pub fn new(gauge: &ShardedCounter) -> Self {
        gauge.add(1);
        Self(gauge.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.sub(1);
    }
}

#[cfg(test)]
mod tests {
    use switchboard::{CloseCode, CloseReason};

    use super::*;

    #[test]
    fn the_codes_a_client_picks_for_itself_share_one_series() {
        let metrics = Metrics::new();
        let remote = |code| TerminateReason::Remote(Some(CloseReason::new(CloseCode(code), "")));
        for code in [3000, 3999, 4001, 4999, 1000] {
            metrics.closed(&remote(code));
        }
        // The server's own 4001 (a token's expiry) keeps its code.
        metrics.closed(&TerminateReason::Normal(CloseReason::new(
            CloseCode(4001),
            "",
        )));
        let closes = metrics.closes_by_code();
        let expected = [("1000", 1), ("4001", 1), ("client-3000-4999", 4)];
        assert_eq!(closes, expected.map(|(c, n)| (c.to_owned(), n)).into());
    }
}
