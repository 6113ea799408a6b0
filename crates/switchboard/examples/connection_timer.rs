//! Run with `cargo run --example connection_timer -- 127.0.0.1:4001 [ALERT_SECS]`
//!
//! The seed system's ConnectionTimer. Connect to `/ws/connection_timer/{name}`:
//! send `request_timer` and the server answers with how long the connection has
//! been open; every ALERT_SECS (default 15) it pushes an alert unasked, using
//! `send_after` the way the Elixir original uses `Process.send_after`.

use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Path;
use axum::routing::get;
use switchboard::{Context, Handler, Message, Outcome, WebSocketUpgrade};

struct ConnectionTimer {
    name: String,
    opened: Instant,
    alert_every: Duration,
}

/// The only info message: time for the periodic alert.
struct Alert;

impl Handler for ConnectionTimer {
    type Info = Alert;

    fn init(&mut self, ctx: &mut Context<'_, Alert>) -> Outcome {
        let _ = ctx.handle().send_after(Alert, self.alert_every);
        Outcome::push(Message::text(format!("connected as {}", self.name)))
    }

    fn handle_in(&mut self, message: Message, _ctx: &mut Context<'_, Alert>) -> Outcome {
        match message {
            Message::Text(text) if text.trim() == "request_timer" => {
                let elapsed = self.opened.elapsed().as_millis();
                Outcome::push(Message::text(format!(
                    "{}: connection open for {elapsed} ms",
                    self.name
                )))
            }
            _ => Outcome::push(Message::text("unknown request: send request_timer")),
        }
    }

    fn handle_info(&mut self, _alert: Alert, ctx: &mut Context<'_, Alert>) -> Outcome {
        let _ = ctx.handle().send_after(Alert, self.alert_every);
        let secs = self.opened.elapsed().as_secs();
        Outcome::push(Message::text(format!(
            "alert: {} has been connected for {secs} s",
            self.name
        )))
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:4001".into());
    let alert_secs: f64 = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(15.0);
    let alert_every = Duration::from_secs_f64(alert_secs);
    let app = Router::new().route(
        "/ws/connection_timer/{name}",
        get(
            move |Path(name): Path<String>, upgrade: WebSocketUpgrade| async move {
                let handler = ConnectionTimer {
                    name,
                    opened: Instant::now(),
                    alert_every,
                };
                upgrade.on_upgrade(handler)
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    switchboard::serve(listener, app, std::future::pending()).await;
    Ok(())
}
