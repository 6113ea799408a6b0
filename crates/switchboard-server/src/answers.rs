//! A connection's answers, in the order of the messages they answer, though
//! some wait for the engine (a cluster's store) and others are ready at once.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use switchboard::{Message, Outbox, Outcome};
use tokio::sync::mpsc;

/// The queue of answers, the outbox its task sends to, and how many wait in it.
type AnswerQueue = (mpsc::UnboundedSender<Later>, Outbox, Arc<AtomicUsize>);

/// An answer to come: its text, if there is one to send.
pub(crate) type Later = Pin<Box<dyn Future<Output = Option<String>> + Send>>;

/// What must follow an answer (a subscription's start: its own join, what it
/// replays, live messages).
pub(crate) type Then = Box<dyn FnOnce() + Send>;

/// A connection's answers that wait for the engine, sent in the order of
/// their messages by one task; while any waits, answers that are ready go
/// behind them, so that a client sees its answers in order. (A subscribe's
/// answer comes once its subscription is in place, through `handle_info`.)
#[derive(Default)]
pub(crate) struct Answers {
    /// The queue, the outbox its task sends to, and how many answers wait in
    /// it. Made with the first answer that waits: most connections never
    /// have one, and an idle connection should hold as little as it can.
    /// Boxed, so that it is one pointer until then.
    queue: std::cell::OnceCell<Box<AnswerQueue>>,
}

impl Answers {
    /// Sends `text` now, or after the answers still waiting.
    pub(crate) fn reply(&self, text: String) -> Outcome {
        let Some((_, outbox, _)) = self.queue.get().map(Box::as_ref) else {
            return Outcome::push(Message::text(text));
        };
        self.in_turn(outbox, text, None);
        Outcome::Continue
    }

    /// Sends `text` through `outbox`, behind the answers still waiting: for
    /// answers that must follow what the handler pushed through it.
    pub(crate) fn send(&self, outbox: &Outbox, text: String) {
        self.in_turn(outbox, text, None);
    }

    /// Sends `text` as [`Self::reply`] does, then runs `then`, whose frames
    /// must follow it. Behind answers that wait, both wait: the queue's task
    /// pushes the answer and runs `then`.
    pub(crate) fn reply_then(&self, outbox: &Outbox, text: String, then: Then) {
        self.in_turn(outbox, text, Some(then));
    }

    /// Pushes `text` through `outbox` (behind what the queue's task pushed:
    /// the handler's own output could pass frames pushed since the driver
    /// last drained), then runs `then`; or, while answers wait, has the
    /// queue's task do both after them.
    fn in_turn(&self, outbox: &Outbox, text: String, then: Option<Then>) {
        let len = text.len();
        let send = move |outbox: &Outbox| {
            let _ = outbox.reply(Message::text(text));
            if let Some(then) = then {
                then();
            }
        };
        match self.queue.get().map(Box::as_ref) {
            Some((queue, _, waiting)) if waiting.load(Ordering::Acquire) > 0 => {
                waiting.fetch_add(1, Ordering::AcqRel);
                // Held until it is pushed, as the answers it waits behind
                // are: a client that floods refusals behind a slow answer
                // stops being read instead of piling them up.
                let held = outbox.hold(len);
                let outbox = outbox.clone();
                let _ = queue.send(Box::pin(async move {
                    drop(held);
                    send(&outbox);
                    None
                }));
            }
            _ => send(outbox),
        }
    }

    /// Queues an answer to come; the queue's task starts with the first.
    pub(crate) fn later(&self, outbox: &Outbox, answer: Later) {
        let (queue, _, waiting) = &**self.queue.get_or_init(|| {
            let (queue, mut answers) = mpsc::unbounded_channel::<Later>();
            let waiting = Arc::new(AtomicUsize::new(0));
            let (task_outbox, task_waiting) = (outbox.clone(), waiting.clone());
            tokio::spawn(async move {
                while let Some(answer) = answers.recv().await {
                    if let Some(text) = answer.await {
                        let _ = task_outbox.reply(Message::text(text));
                    }
                    task_waiting.fetch_sub(1, Ordering::AcqRel);
                }
            });
            Box::new((queue, outbox.clone(), waiting))
        });
        waiting.fetch_add(1, Ordering::AcqRel);
        let _ = queue.send(answer);
    }
}

#[cfg(test)]
mod tests {
    use switchboard::testing::Harness;
    use switchboard::{Context, Handler};
    use tokio::sync::oneshot;

    use super::*;

    struct Quiet;

    impl Handler for Quiet {
        type Info = ();
        fn handle_in(&mut self, _: Message, _: &mut Context<'_, ()>) -> Outcome {
            Outcome::Continue
        }
    }

    fn pushed(harness: &mut Harness<Quiet>) -> Vec<String> {
        harness.deliver_infos();
        let texts = harness
            .take_pushed()
            .into_iter()
            .map(|message| match message {
                Message::Text(text) => text.to_string(),
                other => panic!("unexpected {other:?}"),
            });
        texts.collect()
    }

    /// What follows a subscribe's answer (its join, its replay).
    fn join(outbox: &Outbox) -> Then {
        let outbox = outbox.clone();
        Box::new(move || {
            let _ = outbox.reply(Message::text("join"));
        })
    }

    /// Regression: once a connection had an answer that waited, a
    /// subscribe's answer was pushed after the frames its start pushed, and
    /// the JS client dropped those (a topic's frames before its ack).
    #[tokio::test]
    async fn an_answer_and_what_follows_it_wait_behind_an_earlier_answer() {
        let mut harness = Harness::new(Quiet);
        let outbox = harness.handle().outbox();
        let answers = Answers::default();
        let (sent, answer) = oneshot::channel::<String>();
        answers.later(&outbox, Box::pin(async move { answer.await.ok() }));
        answers.reply_then(&outbox, "ack".into(), join(&outbox));
        assert!(matches!(answers.reply("error".into()), Outcome::Continue));
        tokio::task::yield_now().await;
        assert!(pushed(&mut harness).is_empty(), "all wait for the first");
        sent.send("sent".into()).unwrap();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(pushed(&mut harness), ["sent", "ack", "join", "error"]);
        // Nothing waits now: at once, and in the same order.
        answers.reply_then(&outbox, "ack".into(), join(&outbox));
        assert_eq!(pushed(&mut harness), ["ack", "join"]);
    }

    #[tokio::test]
    async fn without_an_answer_that_waited_the_answer_still_comes_first() {
        let mut harness = Harness::new(Quiet);
        let outbox = harness.handle().outbox();
        let answers = Answers::default();
        answers.reply_then(&outbox, "ack".into(), join(&outbox));
        assert_eq!(pushed(&mut harness), ["ack", "join"]);
        assert!(matches!(
            answers.reply("x".into()),
            Outcome::PushOne(_) | Outcome::Push(_)
        ));
    }
}
