//! The Redis engine in-process, on a real `redis-server`, where a test must
//! stand between two steps the relay takes: a node reaped by the cluster
//! while a connection's handshake is under way; a subscription dropped
//! before its start runs.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchboard::testing::Harness;
use switchboard::{Context, Handler, Message, Outcome, Registry};
use switchboard_server::engine::redis::{RedisEngine, RedisSettings};
use switchboard_server::engine::{Engine, Message as Sent, Subscribe, Traffic};
use switchboard_server::metrics::Metrics;
use switchboard_server::streams::Retention;
use switchboard_server::topics::Namespaces;
use switchboard_server::wire::Mode;

use common::redis::Redis;

struct Quiet;

impl Handler for Quiet {
    type Info = ();
    fn handle_in(&mut self, _message: Message, _ctx: &mut Context<'_, ()>) -> Outcome {
        Outcome::Continue
    }
}

fn engine(redis: &Redis) -> RedisEngine {
    let settings = RedisSettings {
        url: redis.url(),
        lease: Duration::from_secs(1),
        inbox: Retention {
            max_entries: 100,
            ttl: Duration::from_secs(60),
        },
        replay_budget: 1 << 20,
        client_events: 0,
        pubsub_backlog: 1 << 20,
        position_ttl: Duration::from_secs(3600),
    };
    RedisEngine::start(
        &settings,
        Registry::new(),
        Arc::new(Namespaces::new(Vec::new())),
        Arc::new(Traffic::default),
        Arc::new(Metrics::new()),
    )
    .unwrap()
}

/// The ids of the nodes in the cluster, once `ready` holds of them.
async fn nodes_once(
    redis: &mut redis::aio::MultiplexedConnection,
    ready: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let nodes: Vec<String> = redis::cmd("ZRANGE")
            .arg("sb:nodes")
            .arg(0)
            .arg(-1)
            .query_async(redis)
            .await
            .unwrap();
        if ready(&nodes) {
            return nodes;
        }
        assert!(Instant::now() < deadline, "the nodes stayed {nodes:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A Redis, a connection to it for the test, and an engine on it that has
/// joined the cluster (its id is the one node listed).
async fn in_the_cluster() -> (
    Redis,
    redis::aio::MultiplexedConnection,
    RedisEngine,
    Vec<String>,
) {
    let redis = Redis::start();
    let mut admin = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let engine = engine(&redis);
    let nodes = nodes_once(&mut admin, |nodes| nodes.len() == 1).await;
    (redis, admin, engine, nodes)
}

/// Regression: a connection counted under the node's old id, whose
/// handshake was still under way when the cluster reaped the node, missed
/// the close the reap sent to every connection, and stayed open, counted
/// nowhere (the reaper had undone its count).
#[tokio::test]
async fn a_handshake_under_way_as_the_node_is_reaped_is_closed_as_it_attaches() {
    let (_redis, mut admin, engine, first) = in_the_cluster().await;
    let counted = engine
        .connect("ann".into(), Mode::Envelope, None, 10)
        .await
        .unwrap();
    // Redis forgets the node (as after losing its data): its next beat is
    // told it was reaped, and it joins again under a new id.
    let () = redis::cmd("FLUSHALL")
        .query_async(&mut admin)
        .await
        .unwrap();
    nodes_once(&mut admin, |nodes| nodes.len() == 1 && nodes != first).await;
    let late = Harness::new(Quiet);
    let _late = counted.attach(late.handle().outbox());
    assert!(late.handle().is_closed(), "counted under the reaped id");
    // One counted under the new id stays open.
    let now = engine
        .connect("ann".into(), Mode::Envelope, None, 10)
        .await
        .unwrap();
    let open = Harness::new(Quiet);
    let _open = now.attach(open.handle().outbox());
    assert!(!open.handle().is_closed(), "counted under the current id");
}

/// A subscribe's answer that waits behind the connection's earlier answers
/// holds back its start (the answer comes first), so the start may run after
/// the subscription was dropped (an unsubscribe came meanwhile). Without the
/// subscription's stage, it attached the connection to the topic's channel
/// all the same, with nothing left to detach it: the connection got the
/// topic's messages, unsubscribed, for as long as it lived.
#[tokio::test]
async fn a_start_that_runs_after_its_subscription_was_dropped_does_nothing() {
    let (_redis, _admin, engine, _) = in_the_cluster().await;
    let subscribe = |harness: &Harness<Quiet>| {
        engine.subscribe(Subscribe {
            topic: "room".into(),
            client: "ann".into(),
            outbox: harness.handle().outbox(),
            limit: None,
            history: None,
            since: None,
        })
    };
    let (mut gone, mut kept) = (Harness::new(Quiet), Harness::new(Quiet));
    let late = subscribe(&gone).await.unwrap();
    drop(late.subscription);
    (late.start.expect("a start to run"))();
    let now = subscribe(&kept).await.unwrap();
    let _subscription = now.subscription;
    (now.start.expect("a start to run"))();
    let message = Sent {
        from: None,
        payload: "\"hi\"".into(),
        key: None,
    };
    engine.publish("room".into(), None, message).await.unwrap();
    // Both would be on the channel, and given the message in one pass.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        kept.deliver_infos();
        if !kept.take_pushed().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the kept subscription got nothing"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gone.deliver_infos();
    assert!(
        gone.take_pushed().is_empty(),
        "a dropped subscription got a message"
    );
}

/// Flushes Redis's script cache, then loads back only the script sends
/// run, as another node would between two calls of this node's batch:
/// sends run, and the calls of the other script are refused (NOSCRIPT).
async fn lose_the_scripts_but_the_storing_one(admin: &mut redis::aio::MultiplexedConnection) {
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(admin)
        .await
        .unwrap();
    let storing = concat!("#!lua\n", include_str!("../src/engine/redis/engine.lua"));
    let _: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(storing)
        .query_async(admin)
        .await
        .unwrap();
}

/// A message to `ann` (its offset), queued now.
fn send_to_ann(engine: &RedisEngine) -> impl Future<Output = u64> + use<> {
    let message = Sent {
        from: None,
        payload: "\"once\"".into(),
        key: None,
    };
    let sent = engine.send(&["ann"], message);
    async move { sent.await.unwrap().0[0].offset }
}

/// Regression: when Redis lost its script cache and some calls of a batch
/// still ran (their script loaded again by another node, between calls),
/// the link sent the whole batch again: a send that had run was appended
/// twice, under two offsets. Only a refused call after which nothing ran
/// goes again; one before a call that ran is answered unavailable (sent
/// again, it would swap with that call). Each pair is queued in one turn of
/// this single-threaded runtime: one pipeline.
#[tokio::test]
async fn after_a_script_cache_loss_only_the_refused_calls_go_again() {
    let (_redis, mut admin, engine, _) = in_the_cluster().await;
    lose_the_scripts_but_the_storing_one(&mut admin).await;
    let (sent, counted) =
        tokio::join!(send_to_ann(&engine), engine.connections(vec!["ann".into()]));
    assert_eq!(
        (sent, counted.unwrap()),
        (1, vec![0]),
        "the refused count went again"
    );
    lose_the_scripts_but_the_storing_one(&mut admin).await;
    let (counted, sent) =
        tokio::join!(engine.connections(vec!["ann".into()]), send_to_ann(&engine));
    assert!(
        counted.is_err(),
        "refused before a call that ran: not sent again"
    );
    assert_eq!(sent, 2);
    let top: u64 = redis::cmd("HGET")
        .arg("sb:m:i:ann")
        .arg("t")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(top, 2, "each send ran once");
}
