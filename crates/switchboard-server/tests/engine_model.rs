//! A model-based test of the memory engine's inboxes: random sequences of
//! sends, connects (resuming from what the client saw), disconnects, graceful
//! restarts (through the snapshot) and crashes, against a simple model of
//! each inbox. Every client's received sequence must be its inbox: no gap, no
//! duplicate, no reordering, except after a welcome that says
//! `"recovered": false`, which the model allows only when something was
//! really lost (a crash).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use serde_json::Value;
use switchboard::testing::Harness;
use switchboard::{Context, Handler, Message, Outcome, PubSub, Registration, Registry};
use switchboard_server::engine::{self, Engine, InboxRetention, MemoryEngine};
use switchboard_server::metrics::Metrics;
use switchboard_server::snapshot::Loaded;
use switchboard_server::streams::Position;
use switchboard_server::wire::Mode;

const CLIENTS: [&str; 3] = ["a", "b", "c"];

struct Quiet;

impl Handler for Quiet {
    type Info = ();
    fn handle_in(&mut self, _message: Message, _ctx: &mut Context<'_, ()>) -> Outcome {
        Outcome::Continue
    }
}

#[derive(Debug, Clone)]
enum Op {
    Send { to: usize, payload: u32 },
    Connect(usize),
    Disconnect(usize),
    Drain(usize),
    Restart,
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..CLIENTS.len(), any::<u32>()).prop_map(|(to, payload)| Op::Send { to, payload }),
        2 => (0..CLIENTS.len()).prop_map(Op::Connect),
        1 => (0..CLIENTS.len()).prop_map(Op::Disconnect),
        2 => (0..CLIENTS.len()).prop_map(Op::Drain),
        1 => Just(Op::Restart),
        1 => Just(Op::Crash),
    ]
}

/// The memory engine's answer, which is always ready.
fn now<F: std::future::Future>(future: F) -> F::Output {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(future).poll(&mut cx) {
        std::task::Poll::Ready(answer) => answer,
        std::task::Poll::Pending => panic!("the memory engine answers at once"),
    }
}

fn engine(snapshot: Option<Loaded>) -> MemoryEngine {
    let retention = InboxRetention {
        size: 10_000,
        ttl: Duration::from_secs(3600),
    };
    MemoryEngine::new(
        Registry::new(),
        PubSub::new(),
        retention,
        64 << 20,
        64 << 20,
        snapshot,
        Arc::new(Metrics::new()),
    )
}

/// One client as the test drives it: its live connection, if any, and the
/// last position it saw.
#[derive(Default)]
struct Client {
    live: Option<(Harness<Quiet>, Registration)>,
    seen: Option<Position>,
}

/// What each inbox holds: its payloads by offset (from 1), since the last crash.
#[derive(Default)]
struct Model {
    inboxes: HashMap<&'static str, Vec<u32>>,
}

fn frames(harness: &mut Harness<Quiet>) -> Vec<Value> {
    harness.deliver_infos();
    harness
        .take_pushed()
        .into_iter()
        .map(|message| match message {
            Message::Text(text) => serde_json::from_str(&text).unwrap(),
            other => panic!("unexpected {other:?}"),
        })
        .collect()
}

/// Checks deliveries against the model: each is the next offset of the
/// client's inbox, in its epoch, with the model's payload.
fn check_deliveries(client: &mut Client, model: &Model, id: &'static str, deliveries: &[Value]) {
    for delivery in deliveries {
        assert_eq!(delivery["type"], "message", "{delivery}");
        let seen = client.seen.as_mut().expect("a welcome came first");
        let offset = delivery["offset"].as_u64().unwrap();
        assert_eq!(delivery["epoch"], &*seen.epoch, "one epoch: {delivery}");
        assert_eq!(offset, seen.offset + 1, "no gap, no duplicate: {delivery}");
        let expected = model.inboxes[id][usize::try_from(offset).unwrap() - 1];
        assert_eq!(delivery["payload"], expected, "the message at that offset");
        seen.offset = offset;
    }
}

fn run(ops: Vec<Op>) {
    let mut engine = engine(None);
    let mut model = Model::default();
    // Whether a crash has lost history since the client last saw its inbox.
    let mut lost: HashMap<&str, bool> = HashMap::new();
    let mut clients: Vec<Client> = CLIENTS.iter().map(|_| Client::default()).collect();
    for op in ops {
        match op {
            Op::Send { to, payload } => {
                let id = CLIENTS[to];
                let text = payload.to_string();
                let message = engine::Message {
                    from: None,
                    payload: text.into(),
                    key: None,
                };
                let sent = now(engine.send(&[id], message)).unwrap();
                let inbox = model.inboxes.entry(id).or_default();
                inbox.push(payload);
                assert_eq!(
                    sent.offsets(),
                    [(id, inbox.len() as u64)],
                    "offsets count from 1"
                );
            }
            Op::Connect(i) => {
                let id = CLIENTS[i];
                let client = &mut clients[i];
                if client.live.is_some() {
                    continue;
                }
                let mut harness = Harness::with_protocol(Quiet, Some("switchboard.v1"));
                let since = client.seen.clone();
                let joined =
                    now(engine.connect(id.into(), Mode::Envelope, since.clone(), usize::MAX));
                let registration = joined.unwrap().attach(harness.handle().outbox());
                let mut got = frames(&mut harness);
                let welcome = got.remove(0);
                assert_eq!(welcome["type"], "welcome", "{welcome}");
                let top = welcome["offset"].as_u64().unwrap();
                let epoch: &str = welcome["epoch"].as_str().unwrap();
                let have = model.inboxes.get(id).map_or(0, Vec::len) as u64;
                assert_eq!(top, have, "the welcome gives the inbox's last offset");
                match since {
                    None => {
                        client.seen = Some(Position {
                            epoch: epoch.into(),
                            offset: top,
                        })
                    }
                    Some(_) if welcome["recovered"] == true => {
                        assert!(
                            !lost.get(id).copied().unwrap_or(false),
                            "recovered after a crash: {welcome}"
                        );
                        assert_eq!(welcome["missed"].as_u64().unwrap() as usize, got.len());
                    }
                    Some(_) => {
                        assert_eq!(welcome["recovered"], false, "{welcome}");
                        assert!(
                            lost.get(id).copied().unwrap_or(false),
                            "not recovered, yet nothing was lost: {welcome}"
                        );
                        assert!(got.is_empty(), "nothing replayed after recovered:false");
                        client.seen = Some(Position {
                            epoch: epoch.into(),
                            offset: top,
                        });
                    }
                }
                lost.insert(id, false);
                check_deliveries(client, &model, id, &got);
                client.live = Some((harness, registration));
            }
            Op::Disconnect(i) => {
                clients[i].live = None;
            }
            Op::Drain(i) => {
                let id = CLIENTS[i];
                let client = &mut clients[i];
                if let Some((harness, _)) = client.live.as_mut() {
                    let got = frames(harness);
                    check_deliveries(client, &model, id, &got);
                }
            }
            Op::Restart => {
                // Clients take what was queued for them, and go; the streams
                // go through a snapshot, as the binary does on SIGTERM.
                for (i, client) in clients.iter_mut().enumerate() {
                    if let Some((mut harness, _)) = client.live.take() {
                        let got = frames(&mut harness);
                        check_deliveries(client, &model, CLIENTS[i], &got);
                    }
                }
                let dir = tempfile::tempdir().unwrap();
                engine.save(dir.path()).unwrap().unwrap();
                let loaded = switchboard_server::snapshot::open(dir.path(), false)
                    .unwrap()
                    .unwrap();
                switchboard_server::snapshot::consume(dir.path()).unwrap();
                engine = self::engine(Some(loaded));
            }
            Op::Crash => {
                for client in &mut clients {
                    client.live = None;
                }
                engine = self::engine(None);
                model = Model::default();
                for id in CLIENTS {
                    lost.insert(id, true);
                }
            }
        }
    }
}

#[test]
fn connections_on_their_way_count_against_the_limit() {
    let engine = engine(None);
    let connect = || now(engine.connect("crowd".into(), Mode::Envelope, None, 2));
    let first = connect().unwrap();
    let second = connect().unwrap();
    // Neither is registered yet: a third is over the limit all the same.
    assert!(matches!(
        connect(),
        Err(engine::ConnectError::Full { limit: 2 })
    ));
    // One given up before it attached frees its place; one attached keeps it.
    drop(first);
    let harness = Harness::with_protocol(Quiet, Some("switchboard.v1"));
    let _registration = second.attach(harness.handle().outbox());
    let third = connect().unwrap();
    assert!(connect().is_err());
    drop(third);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn every_client_receives_its_inbox_exactly(ops in prop::collection::vec(op(), 1..80)) {
        run(ops);
    }
}
