//! The admin dashboard (docs/operations.md, "Admin dashboard"): its page at
//! `/admin`, embedded in the binary, and the stream of the cluster's state it
//! reads, `GET /api/v1/admin/stream`, one server-sent event a second. The
//! page's actions are the HTTP API's own calls, with the same API key.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::http::header;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use crate::closes::Close;
use crate::engine::{NodeTraffic, Unavailable, total};
use crate::hub::Hub;
use crate::streams::now_ms;

/// How often the stream sends the state.
const EVERY: Duration = Duration::from_secs(1);

/// Most topics in one state, the biggest first.
const TOPICS: usize = 50;

/// Most client ids listed per topic.
const MEMBERS: usize = 20;

/// The page is data-free, so it is served to anyone; everything it shows
/// comes through the API with the operator's key. Its policy allows only this
/// origin's scripts, styles and connections: nothing is fetched from outside.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self'; form-action 'none'; frame-ancestors 'none'; \
    base-uri 'none'";

/// `/admin` and its two files.
pub fn pages<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let asset = |body: &'static str, kind: &'static str| {
        get(move || async move {
            (
                [
                    (header::CONTENT_TYPE, kind),
                    (header::CONTENT_SECURITY_POLICY, POLICY),
                    (header::CACHE_CONTROL, "no-cache"),
                    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                ],
                body,
            )
        })
    };
    Router::new()
        .route(
            "/admin",
            asset(
                include_str!("../assets/admin/index.html"),
                "text/html; charset=utf-8",
            ),
        )
        .route(
            "/admin/admin.js",
            asset(
                include_str!("../assets/admin/admin.js"),
                "text/javascript; charset=utf-8",
            ),
        )
        .route(
            "/admin/admin.css",
            asset(
                include_str!("../assets/admin/admin.css"),
                "text/css; charset=utf-8",
            ),
        )
}

/// `GET /api/v1/admin/stream`: the state now, then again every second, as
/// server-sent events, until the client goes or the server shuts down.
pub fn stream(hub: &Arc<Hub>) -> Response {
    let feed = hub.admin.subscribe(hub);
    let events = futures_util::stream::unfold(feed, |mut feed| async move {
        // Ends when the feed does: at shutdown (a stream that never ended
        // would hold the graceful stop for its whole drain time).
        loop {
            feed.changed().await.ok()?;
            // None: the feed has only just started, and has no state yet.
            let state = feed.borrow_and_update().clone();
            if let Some(state) = state {
                return Some((Ok::<_, Infallible>(Event::default().data(&*state)), feed));
            }
        }
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// The state, computed once a second for all the open streams, and only
/// while one is open: a dashboard left open in ten tabs costs the node (and
/// Redis) what one does.
#[derive(Debug, Default)]
pub struct Feed(Mutex<Option<watch::Receiver<Option<Arc<str>>>>>);

impl Feed {
    /// A receiver of the states, the latest one (if any) marked as new.
    fn subscribe(&self, hub: &Arc<Hub>) -> watch::Receiver<Option<Arc<str>>> {
        let mut slot = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(feed) = slot.as_ref() {
            let mut feed = feed.clone();
            feed.mark_changed();
            return feed;
        }
        let (states, feed) = watch::channel(None);
        tokio::spawn(produce(hub.clone(), states));
        *slot = Some(feed.clone());
        feed
    }
}

async fn produce(hub: Arc<Hub>, states: watch::Sender<Option<Arc<str>>>) {
    let mut ticks = tokio::time::interval(EVERY);
    // After a slow Redis call, the next state comes a second later, not in a burst.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        ticks.tick().await;
        {
            // Under the lock that subscribing takes, so no stream joins a
            // feed that is ending. The one receiver left is the slot's own.
            let mut slot = hub.admin.0.lock().unwrap_or_else(PoisonError::into_inner);
            if hub.shutdown.is_triggered() || states.receiver_count() <= 1 {
                *slot = None;
                return;
            }
        }
        let json = match state(&hub).await {
            Ok(state) => serde_json::to_string(&state),
            Err(unavailable) => serde_json::to_string(&Failed {
                at: now_ms(),
                error: format!("the cluster's state is unavailable: {unavailable}"),
            }),
        }
        .expect("the state serializes");
        states.send_replace(Some(json.into()));
    }
}

/// What the dashboard shows, as one event.
#[derive(Serialize)]
struct Overview {
    /// Server time, in milliseconds since the Unix epoch.
    at: u64,
    /// The node serving this stream.
    node: Arc<str>,
    cluster: Cluster,
    /// This node first.
    nodes: Vec<NodeTraffic>,
    topics: Vec<Topic>,
    topics_total: usize,
    /// This node's closes since it started, by code.
    closes: BTreeMap<String, u64>,
    /// This node's latest closes, newest first.
    recent_closes: Vec<Close>,
}

#[derive(Serialize)]
struct Cluster {
    nodes: usize,
    client_ids: usize,
    topics: usize,
    #[serde(flatten)]
    traffic: crate::engine::Traffic,
}

#[derive(Serialize)]
struct Topic {
    topic: Arc<str>,
    subscribers: usize,
    clients: Vec<Member>,
}

#[derive(Serialize)]
struct Member {
    id: String,
    connections: usize,
}

/// An event in place of the state, when Redis cannot be reached.
#[derive(Serialize)]
struct Failed {
    at: u64,
    error: String,
}

async fn state(hub: &Hub) -> Result<Overview, Unavailable> {
    // The memory engine visits every topic to find the biggest: off the
    // threads that serve connections.
    let engine = hub.engine.clone();
    let topics = tokio::task::spawn_blocking(move || engine.topics(TOPICS, MEMBERS))
        .await
        .map_err(|e| Unavailable(format!("listing the topics failed: {e}")))?;
    let (counts, nodes, topics) =
        tokio::try_join!(hub.engine.counts(), hub.engine.nodes(hub.traffic()), topics,)?;
    let topics_total = topics.total;
    let topics = topics
        .topics
        .into_iter()
        .map(|(topic, presence)| Topic {
            topic,
            subscribers: presence.subscribers,
            clients: presence
                .clients
                .into_iter()
                .map(|(id, connections)| Member {
                    id: id.to_string(),
                    connections,
                })
                .collect(),
        })
        .collect();
    Ok(Overview {
        at: now_ms(),
        node: nodes[0].id.clone(),
        cluster: Cluster {
            nodes: counts.nodes,
            client_ids: counts.clients,
            topics: counts.topics,
            traffic: total(&nodes),
        },
        nodes,
        topics,
        topics_total,
        closes: hub.metrics.closes_by_code(),
        recent_closes: hub.closes.latest(),
    })
}
