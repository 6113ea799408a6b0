//! Run with `cargo run --release --example autobahn_client -- 127.0.0.1:9001`
//!
//! Runs every case of an Autobahn fuzzing server (`kosoku -m fuzzingserver
//! 127.0.0.1:9001`) with `switchboard::client`, echoing each message as the
//! suite expects, then asks the server to write its reports. The client's
//! conformance run (`scripts/autobahn.sh`) is built on it.

use std::time::Duration;

use switchboard::client::{Client, Connector};
use switchboard::proto::deflate::DeflateOptions;
use switchboard::{CloseCode, Context, Handler, Message, Options, Outcome};
use tokio::sync::oneshot;

/// The agent name the reports are filed under.
const AGENT: &str = "switchboard";
/// Longest a case may take; the suite's slowest take seconds.
const CASE_TIMEOUT: Duration = Duration::from_secs(60);

/// Echoes every message, as the cases expect of the client under test.
struct Echo;

impl Handler for Echo {
    type Info = ();
    fn handle_in(&mut self, message: Message, _ctx: &mut Context<'_, ()>) -> Outcome {
        Outcome::push(message)
    }
}

/// Takes the first text message (the case count), then closes.
struct FirstText(Option<oneshot::Sender<String>>);

impl Handler for FirstText {
    type Info = ();
    fn handle_in(&mut self, message: Message, _ctx: &mut Context<'_, ()>) -> Outcome {
        if let (Message::Text(text), Some(reply)) = (message, self.0.take()) {
            let _ = reply.send(text.to_string());
        }
        Outcome::stop(CloseCode::NORMAL, "")
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9001".into());
    // As the echo example serves the server cases: large messages, no timers
    // of our own, and compression when the case agrees to it.
    let options = Options::default()
        .idle_timeout(None)
        .ping_interval(None)
        .max_message_size(64 << 20)
        .compression(Some(DeflateOptions {
            min_size: 0,
            ..DeflateOptions::default()
        }));
    let connector = Connector::new().options(options);

    let (count_tx, count_rx) = oneshot::channel();
    let counter = connector
        .connect(
            &format!("ws://{addr}/getCaseCount"),
            FirstText(Some(count_tx)),
        )
        .await?;
    let count: usize = count_rx.await?.trim().parse()?;
    counter.finished().await;

    for case in 1..=count {
        let url = format!("ws://{addr}/runCase?case={case}&agent={AGENT}");
        match connector.connect(&url, Echo).await {
            Ok(client) => finish(client, case).await,
            // Some cases refuse the handshake on purpose; the report says so.
            Err(error) => eprintln!("case {case}: {error}"),
        }
    }

    let reports = connector
        .connect(&format!("ws://{addr}/updateReports?agent={AGENT}"), Echo)
        .await?;
    reports.finished().await;
    println!("ran {count} cases");
    Ok(())
}

async fn finish(client: Client<()>, case: usize) {
    if tokio::time::timeout(CASE_TIMEOUT, client.finished())
        .await
        .is_err()
    {
        eprintln!("case {case}: still open after {CASE_TIMEOUT:?}");
    }
}
