//! Run with `cargo run --example chat -- 127.0.0.1:4002`
//!
//! A multi-room chat in one small file. Connect to `/chat/{room}?name={name}`;
//! every text message goes to everyone in the room as `name: text`, and joins
//! and leaves are announced. Rooms are a [`Registry`] keyed by room name: each
//! message is encoded once and the same frame is queued on every member.

use std::collections::HashMap;

use axum::Router;
use axum::extract::{Path, Query};
use axum::routing::get;
use switchboard::{
    Broker, Context, Handler, Message, Outcome, PreparedMessage, Registration, Registry,
    TerminateReason, WebSocketUpgrade,
};

struct Member {
    room: String,
    name: String,
    rooms: Registry,
    membership: Option<Registration>,
}

impl Member {
    fn broadcast(&self, text: String) {
        let frame = PreparedMessage::text(text);
        self.rooms.push(&self.room, &|_| frame.clone());
    }
}

impl Handler for Member {
    type Info = ();

    fn init(&mut self, ctx: &mut Context<'_, ()>) -> Outcome {
        self.membership = Some(self.rooms.register(
            self.room.as_str().into(),
            ctx.handle().outbox(),
            Default::default(),
        ));
        self.broadcast(format!("* {} joined {}", self.name, self.room));
        Outcome::Continue
    }

    fn handle_in(&mut self, message: Message, _ctx: &mut Context<'_, ()>) -> Outcome {
        if let Message::Text(text) = message {
            self.broadcast(format!("{}: {}", self.name, &*text));
        }
        Outcome::Continue
    }

    fn terminate(&mut self, _reason: &TerminateReason) {
        // Leave first, so the announcement goes only to those who stay.
        self.membership = None;
        self.broadcast(format!("* {} left", self.name));
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:4002".into());
    let rooms = Registry::new();
    let app = Router::new().route(
        "/chat/{room}",
        get(
            move |Path(room): Path<String>,
                  Query(query): Query<HashMap<String, String>>,
                  upgrade: WebSocketUpgrade| async move {
                let name = query
                    .get("name")
                    .cloned()
                    .unwrap_or_else(|| "anonymous".into());
                let member = Member {
                    room,
                    name,
                    rooms: rooms.clone(),
                    membership: None,
                };
                upgrade.on_upgrade(member)
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    switchboard::serve(listener, app, std::future::pending()).await;
    Ok(())
}
