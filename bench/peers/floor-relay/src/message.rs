//! A relay connection's messages: sends to ids, and topics for `switchboard.v1`.

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use serde_json::value::RawValue;

use crate::frame::{self, TEXT};
use crate::{Server, State};

/// What a client may send; strings are borrowed from the frame.
#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<&'a str>,
    #[serde(borrow, default)]
    targets: Vec<Target<'a>>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
    #[serde(borrow)]
    topic: Option<&'a str>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
}

/// A target id as the client wrote it: a number or a string.
enum Target<'a> {
    Number(u64),
    Text(&'a str),
}

impl<'de: 'a, 'a> Deserialize<'de> for Target<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Either<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for Either<'a> {
            type Value = Target<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a client id")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Self::Value, E> {
                Ok(Target::Number(n))
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Self::Value, E> {
                Ok(Target::Text(s))
            }
        }
        deserializer.deserialize_any(Either(std::marker::PhantomData))
    }
}

/// Handles one text message of connection `from`; its own answers go to `replies`.
pub fn handle(server: &mut Server, from: usize, text: &[u8], replies: &mut Vec<u8>) {
    let Ok(message) = serde_json::from_slice::<Incoming<'_>>(text) else {
        return;
    };
    match (message.kind, message.payload, message.topic) {
        (None | Some("send"), Some(payload), _) => {
            server.frame.clear();
            frame::encode(TEXT, payload.get().as_bytes(), &mut server.frame);
            let mut digits = [0; 20];
            for target in &message.targets {
                let id = match *target {
                    Target::Number(n) => decimal(n, &mut digits),
                    Target::Text(id) => id,
                };
                if let Some(conns) = server.clients.get(id) {
                    server.recipients.extend_from_slice(conns);
                }
            }
            server.deliver();
        }
        (Some("subscribe"), _, Some(topic)) => {
            let conn = server.conns[from].as_mut().expect("a live connection");
            if !conn.topics.iter().any(|t| &**t == topic) {
                conn.topics.push(topic.into());
                server.topics.entry(topic.into()).or_default().push(from);
            }
            let id = message.id.map_or("null", RawValue::get);
            // Topics and ids were borrowed from JSON, so they hold no escapes
            // and need only their quotes back.
            let ack = format!(r#"{{"type":"ack","id":{id},"topic":"{topic}"}}"#);
            frame::encode(TEXT, ack.as_bytes(), replies);
        }
        (Some("publish"), Some(payload), Some(topic)) => {
            let Some(State::Relay { id }) = server.conns[from].as_ref().map(|c| &c.state) else {
                return;
            };
            let text = &mut server.text;
            text.clear();
            text.extend_from_slice(br#"{"type":"message","topic":""#);
            text.extend_from_slice(topic.as_bytes());
            text.extend_from_slice(br#"","from":""#);
            text.extend_from_slice(id.as_bytes());
            text.extend_from_slice(br#"","payload":"#);
            text.extend_from_slice(payload.get().as_bytes());
            text.push(b'}');
            server.frame.clear();
            frame::encode(TEXT, &server.text, &mut server.frame);
            if let Some(subscribers) = server.topics.get(topic) {
                server.recipients.extend_from_slice(subscribers);
            }
            server.deliver();
        }
        _ => {}
    }
}

/// `n` in decimal, written at the end of `digits`.
fn decimal(mut n: u64, digits: &mut [u8; 20]) -> &str {
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&digits[at..]).expect("ASCII digits")
}
