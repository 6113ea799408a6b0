//! Run with `cargo run --release --example echo -- 127.0.0.1:9001`
//!
//! Echoes every text and binary message on any path, with permessage-deflate
//! when the client offers it and a 64 MiB message limit: the server that the
//! Autobahn cases (`kosoku -m fuzzingclient`) run against. What waits to be
//! written is held to the default 4 MiB: a client that sends without reading
//! meets TCP backpressure, not a growing queue.

use axum::Router;
use axum::response::Response;
use switchboard::proto::deflate::DeflateOptions;
use switchboard::{Context, Handler, Message, Options, Outcome, WebSocketUpgrade};

struct Echo;

impl Handler for Echo {
    type Info = ();

    fn handle_in(&mut self, message: Message, _ctx: &mut Context<'_, ()>) -> Outcome {
        Outcome::push(message)
    }
}

async fn echo(upgrade: WebSocketUpgrade) -> Response {
    let options = Options::default()
        .idle_timeout(None)
        .ping_interval(None)
        .compression(Some(DeflateOptions {
            min_size: 0,
            ..DeflateOptions::default()
        }))
        .max_message_size(64 << 20);
    upgrade.options(options).on_upgrade(Echo)
}

fn main() -> std::io::Result<()> {
    // With one CPU to run on (bench/run.sh pins servers to one), tokio's
    // single-threaded scheduler, as the `switchboard` service picks: the
    // multi-threaded one with a single worker still pays for handing tasks
    // between threads.
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let mut runtime = if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    runtime.enable_all().build()?.block_on(serve())
}

async fn serve() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9001".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    // Sets TCP_NODELAY, and keeps sockets that pushes can write to directly.
    switchboard::serve(
        listener,
        Router::new().fallback(echo),
        std::future::pending(),
    )
    .await;
    Ok(())
}
