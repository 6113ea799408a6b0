//! Run with `cargo run --release -p switchboard --example presence_walk`
//!
//! Measures what presence costs a topic of 1,000, 10,000 and 100,000 client
//! ids: subscribing each (one connection per id), walking every member in
//! pages of 1,000 as `GET /api/v1/presence/{topic}` pages it, and
//! unsubscribing them all (docs/performance.md quotes its figures).

use std::time::{Duration, Instant};

use switchboard::testing::Harness;
use switchboard::{ClientId, Context, Format, Handler, Message, Outcome, PubSub};

struct Quiet;

impl Handler for Quiet {
    type Info = ();
    fn handle_in(&mut self, _message: Message, _ctx: &mut Context<'_, ()>) -> Outcome {
        Outcome::Continue
    }
}

fn per(total: Duration, n: usize) -> Duration {
    total / u32::try_from(n).expect("a small count")
}

fn main() {
    for members in [1_000, 10_000, 100_000] {
        let pubsub = PubSub::new();
        let outboxes: Vec<_> = (0..members)
            .map(|_| Harness::new(Quiet).handle().outbox())
            .collect();
        let started = Instant::now();
        let held: Vec<_> = outboxes
            .iter()
            .enumerate()
            .map(|(n, outbox)| {
                let client = ClientId::from(format!("id{n:07}"));
                pubsub
                    .subscribe("room", client, outbox, Format::default(), None)
                    .expect("a new subscription")
            })
            .collect();
        let subscribed = started.elapsed();
        let started = Instant::now();
        let (mut after, mut listed, mut pages) = (None::<ClientId>, 0, 0);
        loop {
            let (page, more) = pubsub.presence_page("room", after.as_deref(), 1000);
            listed += page.len();
            pages += 1;
            after = page.last().map(|(client, _)| client.clone());
            if !more {
                break;
            }
        }
        let walked = started.elapsed();
        assert_eq!(listed, members, "every member listed once");
        let started = Instant::now();
        drop(held);
        let unsubscribed = started.elapsed();
        println!(
            "{members} members: subscribe {:?} each, walk in {pages} pages {walked:?} ({:?} a page), unsubscribe {:?} each",
            per(subscribed, members),
            per(walked, pages),
            per(unsubscribed, members),
        );
    }
}
