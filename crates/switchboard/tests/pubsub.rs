//! Topics with real connections: encode-once publish to many subscribers,
//! presence by client id, and cleanup however a connection ends.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{RawClient, TIMEOUT, serve};
use switchboard::proto::OpCode;
use switchboard::{
    ClientId, Context, Format, Handler, Message, Outcome, PreparedMessage, PresenceChange,
    PresenceListener, PubSub, SubscribeError, Subscription,
};

/// Subscribes to "news" as the client named in the handshake path, on init.
struct Reader {
    pubsub: PubSub,
    client: ClientId,
    limit: Option<usize>,
    subscription: Option<Subscription>,
}

impl Handler for Reader {
    type Info = ();

    fn init(&mut self, ctx: &mut Context<'_, ()>) -> Outcome {
        let outbox = ctx.handle().outbox();
        match self
            .pubsub
            .subscribe("news", self.client.clone(), &outbox, Format(0), self.limit)
        {
            Ok(subscription) => {
                self.subscription = Some(subscription);
                Outcome::push(Message::text("subscribed"))
            }
            Err(error) => Outcome::push(Message::text(error.to_string())),
        }
    }

    /// Any message asks to subscribe again, which must be refused.
    fn handle_in(&mut self, _message: Message, ctx: &mut Context<'_, ()>) -> Outcome {
        let outbox = ctx.handle().outbox();
        let again = self
            .pubsub
            .subscribe("news", self.client.clone(), &outbox, Format(0), None);
        let answer = again.map_or_else(|e| e.to_string(), |_| "subscribed twice".into());
        Outcome::push(Message::text(answer))
    }
}

/// Serves readers; connections pair up under one client id: c0, c0, c1, c1...
async fn news_server(pubsub: &PubSub, limit: Option<usize>) -> std::net::SocketAddr {
    let pubsub = pubsub.clone();
    let next = Arc::new(AtomicUsize::new(0));
    serve(move |ws| {
        let n = next.fetch_add(1, Ordering::Relaxed) / 2;
        ws.on_upgrade(Reader {
            pubsub: pubsub.clone(),
            client: ClientId::from(format!("c{n}")),
            limit,
            subscription: None,
        })
    })
    .await
}

async fn eventually(mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition never held"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_thousand_subscribers_get_one_publish_exactly_once_rendered_once() {
    let pubsub = PubSub::new();
    let addr = news_server(&pubsub, None).await;
    let mut readers = Vec::new();
    for _ in 0..1000 {
        let mut reader = RawClient::connect(addr).await;
        assert_eq!(reader.recv().await.unwrap().1, b"subscribed");
        readers.push(reader);
    }
    assert_eq!(pubsub.subscribers("news"), 1000);
    assert_eq!(pubsub.presence("news").len(), 500);

    let renders = AtomicUsize::new(0);
    let reached = pubsub.publish("news", &|_format| {
        renders.fetch_add(1, Ordering::Relaxed);
        PreparedMessage::text("extra! extra!")
    });
    assert_eq!(reached, 1000);
    assert_eq!(
        renders.load(Ordering::Relaxed),
        1,
        "rendered once for one format"
    );

    let pings_and_deliveries = readers.iter_mut().map(|reader| async move {
        assert_eq!(
            reader.recv().await.unwrap(),
            (OpCode::Text, b"extra! extra!".to_vec())
        );
        // Exactly once: nothing else follows.
        let more = tokio::time::timeout(Duration::from_millis(50), reader.recv()).await;
        assert!(more.is_err(), "a second delivery: {more:?}");
    });
    futures_util::future::join_all(pings_and_deliveries).await;
}

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<(String, String, PresenceChange)>>>);

impl PresenceListener for Recorder {
    fn changed(&self, _: &PubSub, topic: &str, client: &ClientId, change: PresenceChange) {
        self.0
            .lock()
            .unwrap()
            .push((topic.into(), client.to_string(), change));
    }
}

#[tokio::test]
async fn a_second_tab_does_not_join_twice_and_the_last_one_leaves() {
    let recorder = Recorder::default();
    let pubsub = PubSub::with_listener(recorder.clone());
    let addr = news_server(&pubsub, None).await;
    let mut tab1 = RawClient::connect(addr).await;
    let mut tab2 = RawClient::connect(addr).await;
    tab1.recv().await;
    tab2.recv().await;
    assert_eq!(pubsub.presence("news"), vec![(ClientId::from("c0"), 2)]);
    drop(tab1);
    eventually(|| pubsub.subscribers("news") == 1).await;
    assert_eq!(pubsub.presence("news"), vec![(ClientId::from("c0"), 1)]);
    drop(tab2);
    eventually(|| pubsub.topics() == 0).await;
    let events = recorder.0.lock().unwrap().clone();
    assert_eq!(
        events,
        vec![
            ("news".into(), "c0".into(), PresenceChange::Joined),
            ("news".into(), "c0".into(), PresenceChange::Left),
        ]
    );
}

#[tokio::test]
async fn subscriber_limits_and_double_subscriptions_are_refused() {
    let pubsub = PubSub::new();
    let addr = news_server(&pubsub, Some(2)).await;
    let mut a = RawClient::connect(addr).await;
    let mut b = RawClient::connect(addr).await;
    let mut c = RawClient::connect(addr).await;
    assert_eq!(a.recv().await.unwrap().1, b"subscribed");
    assert_eq!(b.recv().await.unwrap().1, b"subscribed");
    let refused = c.recv().await.unwrap().1;
    assert_eq!(refused, SubscribeError::Full.to_string().as_bytes());
    assert_eq!(pubsub.subscribers("news"), 2);
    a.send(&RawClient::frame(true, OpCode::Text, b"again"))
        .await;
    let answer = a.recv().await.unwrap().1;
    assert_eq!(
        answer,
        SubscribeError::AlreadySubscribed.to_string().as_bytes()
    );
    assert_eq!(pubsub.subscribers("news"), 2);
}

#[tokio::test]
async fn publishing_to_an_empty_topic_reaches_no_one() {
    let pubsub = PubSub::new();
    assert_eq!(
        pubsub.publish("nobody-here", &|_| unreachable!("nothing to render for")),
        0
    );
}

/// Records every presence change, in the order the listener hears them.
struct History(Arc<Mutex<Vec<switchboard::PresenceChange>>>);

impl switchboard::PresenceListener for History {
    fn changed(
        &self,
        _pubsub: &PubSub,
        _topic: &str,
        _client: &switchboard::ClientId,
        change: switchboard::PresenceChange,
    ) {
        self.0.lock().unwrap().push(change);
    }
}

/// A handler that does nothing: a connection to subscribe.
struct Quiet;

impl Handler for Quiet {
    type Info = ();
    fn handle_in(&mut self, _m: Message, _ctx: &mut Context<'_, ()>) -> Outcome {
        Outcome::Continue
    }
}

/// Regression (issue 14: 12 to 56 of 3,000 flips out of order per run): two
/// tabs of one client flip their subscription on two threads; the joins and
/// leaves the listener hears must alternate, as the transitions did. Without
/// the ordered event queue this failed in about half the runs here (2 of 4).
#[test]
fn presence_events_come_out_in_the_order_of_the_transitions() {
    use switchboard::PresenceChange::{Joined, Left};
    use switchboard::testing::Harness;

    let history = Arc::new(Mutex::new(Vec::new()));
    let pubsub = PubSub::with_listener(History(history.clone()));
    let tabs: Vec<_> = (0..2)
        .map(|_| Harness::new(Quiet).handle().outbox())
        .collect();
    std::thread::scope(|scope| {
        for outbox in &tabs {
            let pubsub = &pubsub;
            scope.spawn(move || {
                for _ in 0..20_000 {
                    let subscription = pubsub
                        .subscribe("room", "same".into(), outbox, Format::default(), None)
                        .unwrap();
                    drop(subscription);
                }
            });
        }
    });
    let history = history.lock().unwrap();
    assert!(
        history.len() >= 2 && history.len() % 2 == 0,
        "{}",
        history.len()
    );
    let out_of_order = history
        .iter()
        .enumerate()
        .filter(|(i, change)| **change != if i % 2 == 0 { Joined } else { Left })
        .count();
    assert_eq!(out_of_order, 0, "of {} events", history.len());
}

#[test]
fn biggest_gives_the_topics_with_most_subscribers_first_then_by_name() {
    use switchboard::testing::Harness;

    let pubsub = PubSub::new();
    let conns: Vec<_> = (0..4)
        .map(|_| Harness::new(Quiet).handle().outbox())
        .collect();
    // Each topic gets its number of subscribers, connections of two ids.
    let mut held = Vec::new();
    for (topic, subscribers) in [("a", 1), ("b", 3), ("c", 2), ("d", 3), ("e", 1), ("f", 4)] {
        for (i, outbox) in conns.iter().take(subscribers).enumerate() {
            let client = ClientId::from(if i % 2 == 0 { "ann" } else { "bob" });
            held.push(
                pubsub
                    .subscribe(topic, client, outbox, Format::default(), None)
                    .unwrap(),
            );
        }
    }
    let biggest = pubsub.biggest(4, 1);
    let names: Vec<(&str, usize)> = biggest.iter().map(|t| (&*t.topic, t.subscribers)).collect();
    assert_eq!(names, [("f", 4), ("b", 3), ("d", 3), ("c", 2)]);
    assert!(biggest.iter().all(|t| t.members.len() == 1));
    let f = pubsub.biggest(1, 10);
    let mut members = f[0].members.clone();
    members.sort();
    assert_eq!(
        members,
        [(ClientId::from("ann"), 2), (ClientId::from("bob"), 2)]
    );
    // "a" and "e" tie for the last place: the name decides.
    let five = pubsub.biggest(5, 0);
    let five: Vec<&str> = five.iter().map(|t| &*t.topic).collect();
    assert_eq!(five, ["f", "b", "d", "c", "a"]);
    assert!(pubsub.biggest(0, 10).is_empty());
    assert_eq!(pubsub.biggest(100, 0).len(), 6);
}

#[test]
fn presence_pages_walk_every_member_once_in_order() {
    use switchboard::testing::Harness;

    let pubsub = PubSub::new();
    // 250 ids, every fifth with a second connection.
    let mut held = Vec::new();
    let mut expected = Vec::new();
    for n in 0..250 {
        let client = ClientId::from(format!("id{n:03}"));
        let tabs = if n % 5 == 0 { 2 } else { 1 };
        for _ in 0..tabs {
            let outbox = Harness::new(Quiet).handle().outbox();
            held.push(
                pubsub
                    .subscribe("room", client.clone(), &outbox, Format::default(), None)
                    .unwrap(),
            );
        }
        expected.push((client, tabs));
    }
    let mut walked = Vec::new();
    let mut after: Option<ClientId> = None;
    let mut pages = 0;
    loop {
        let (page, more) = pubsub.presence_page("room", after.as_deref(), 40);
        pages += 1;
        assert!(page.len() <= 40);
        assert_eq!(more, walked.len() + page.len() < 250, "page {pages}");
        after = page.last().map(|(id, _)| id.clone());
        walked.extend(page);
        if !more {
            break;
        }
    }
    assert_eq!(pages, 7);
    assert_eq!(walked, expected);

    // An id that joins behind the cursor is not listed; one ahead of it is.
    let (first, _) = pubsub.presence_page("room", None, 10);
    let cursor = first.last().unwrap().0.clone();
    for late in ["id000a", "zz"] {
        let outbox = Harness::new(Quiet).handle().outbox();
        held.push(
            pubsub
                .subscribe("room", late.into(), &outbox, Format::default(), None)
                .unwrap(),
        );
    }
    let (rest, more) = pubsub.presence_page("room", Some(&cursor), 1000);
    assert!(!more);
    assert_eq!(rest.len(), 250 - 10 + 1);
    assert_eq!(rest.last().unwrap().0.as_ref(), "zz");
    assert!(rest.iter().all(|(id, _)| id.as_ref() != "id000a"));
    assert_eq!(
        pubsub.presence_page("nowhere", None, 10),
        (Vec::new(), false)
    );
}

/// Hears only the topics whose names start with "loud".
struct Loud(Recorder);

impl PresenceListener for Loud {
    fn changed(&self, pubsub: &PubSub, topic: &str, client: &ClientId, change: PresenceChange) {
        self.0.changed(pubsub, topic, client, change);
    }

    fn wants(&self, topic: &str) -> bool {
        topic.starts_with("loud")
    }
}

/// A topic the listener does not want queues no change (its subscribes skip
/// the lock every emitter takes in turn); the others are heard as before.
#[test]
fn a_listener_hears_only_the_topics_it_wants() {
    use switchboard::testing::Harness;
    let recorder = Recorder::default();
    let pubsub = PubSub::with_listener(Loud(recorder.clone()));
    let outbox = Harness::new(Quiet).handle().outbox();
    let subscribe = |topic| pubsub.subscribe(topic, "ada".into(), &outbox, Format::default(), None);
    let (quiet, loud) = (subscribe("quiet").unwrap(), subscribe("loud").unwrap());
    drop((quiet, loud));
    let loud = |change| ("loud".to_owned(), "ada".to_owned(), change);
    assert_eq!(
        *recorder.0.lock().unwrap(),
        [loud(PresenceChange::Joined), loud(PresenceChange::Left)]
    );
}

/// Publishes each change to its topic's subscribers, as the service's
/// presence listener does.
struct Announcer;

impl PresenceListener for Announcer {
    fn changed(&self, pubsub: &PubSub, topic: &str, _: &ClientId, _: PresenceChange) {
        let event = PreparedMessage::text("change");
        pubsub.publish(topic, &|_| event.clone());
    }
}

/// Regression: the emitter held the event queue's lock while the listener
/// published (a `while let` keeps its scrutinee's guard for the whole body),
/// and an unsubscribe holding the topic's shard waited for that lock to
/// queue its change: a deadlock (seen once in a JS client test run, with a
/// gdb backtrace of the two threads). Two threads flip subscriptions to one
/// topic whose listener publishes to it; each must finish.
#[test]
fn a_listener_that_publishes_does_not_deadlock_subscribes_on_its_topic() {
    use switchboard::testing::Harness;
    let pubsub = PubSub::with_listener(Announcer);
    let (done, finished) = std::sync::mpsc::channel();
    for client in ["ada", "bob"] {
        let (pubsub, done) = (pubsub.clone(), done.clone());
        std::thread::spawn(move || {
            let outbox = Harness::new(Quiet).handle().outbox();
            for _ in 0..3_000 {
                let subscribed =
                    pubsub.subscribe("room", client.into(), &outbox, Format::default(), None);
                drop(subscribed);
            }
            let _ = done.send(());
        });
    }
    for _ in 0..2 {
        let finished = finished.recv_timeout(Duration::from_secs(30));
        assert!(finished.is_ok(), "the flipping threads deadlocked");
    }
}
