//! The relay's wire protocol (docs/protocol.md is the reference).
//!
//! Clients send `{"targets":[...],"payload":<any JSON>}`. Plain clients receive
//! the payload's JSON text as it was sent. Clients that ask for the
//! `switchboard.v1` subprotocol receive envelopes (`{"type":"message",...}`),
//! acks for messages that carry an `"id"`, and typed errors.

use std::borrow::Cow;

use serde::{Deserialize, Deserializer, Serialize, de};

pub use crate::errors::ErrorCode;
use serde_json::value::RawValue;
use switchboard::{Format, PreparedMessage, PresenceChange};

use crate::ids::TargetList;

/// The envelope subprotocol.
pub const PROTOCOL: &str = "switchboard.v1";

/// How a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The seed protocol: deliveries are the bare payload.
    Raw,
    /// `switchboard.v1`: typed envelopes, acks and errors.
    Envelope,
}

impl Mode {
    /// The mode for the agreed subprotocol.
    pub fn for_protocol(protocol: Option<&str>) -> Self {
        if protocol == Some(PROTOCOL) {
            Self::Envelope
        } else {
            Self::Raw
        }
    }

    /// The registry format, so a message is rendered once per mode.
    pub fn format(self) -> Format {
        match self {
            Self::Raw => Format(0),
            Self::Envelope => Format(1),
        }
    }
}

/// A message from a client. Unknown fields are ignored, for forward compatibility.
#[derive(Debug, Deserialize)]
pub struct Inbound<'a> {
    /// `"send"` (or absent: the seed format), `"subscribe"`, `"unsubscribe"`,
    /// `"publish"`, `"presence"`, `"status"` or `"refresh"`.
    #[serde(rename = "type", default, borrow)]
    pub kind: Option<Cow<'a, str>>,
    /// A client-chosen id (any JSON value) that asks for an ack.
    #[serde(default, borrow, deserialize_with = "present")]
    pub id: Option<&'a RawValue>,
    /// The client ids to deliver to (`send`).
    #[serde(default, borrow)]
    pub targets: Option<TargetList<'a>>,
    /// Any JSON value, passed through without being re-serialised.
    #[serde(default, borrow, deserialize_with = "present")]
    pub payload: Option<&'a RawValue>,
    /// The topic (`subscribe`, `unsubscribe`, `publish`, `presence`).
    #[serde(default, borrow)]
    pub topic: Option<Cow<'a, str>>,
    /// The client ids to ask about (`status`).
    #[serde(default, borrow)]
    pub clients: Option<TargetList<'a>>,
    /// A fresh token (`refresh`).
    #[serde(default, borrow)]
    pub token: Option<Cow<'a, str>>,
    /// Where to resume a topic from (`subscribe`).
    #[serde(default, borrow, deserialize_with = "object")]
    pub since: Option<Since<'a>>,
    /// Where a page starts: the `next` of the page before (`presence`).
    /// Kept raw, as `limit` is: checked only by the messages that take it, so
    /// that other messages still ignore fields they do not know.
    #[serde(default, borrow, deserialize_with = "present")]
    pub cursor: Option<&'a RawValue>,
    /// The most items to answer (`presence`).
    #[serde(default, borrow, deserialize_with = "present")]
    pub limit: Option<&'a RawValue>,
}

/// A stream position as a client sends it: `{"epoch":"k3x9ab12","offset":9}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Since<'a> {
    /// The stream's epoch, as deliveries gave it.
    #[serde(borrow)]
    pub epoch: Cow<'a, str>,
    /// The last offset the client saw.
    pub offset: u64,
}

/// A struct read only from a JSON object: serde's derive also takes an array
/// of its fields in order (`["k3x9ab12",9]`), which is not the protocol.
/// `null` is no value, as it is for `cursor` and `limit`.
fn object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    let raw = <&RawValue>::deserialize(d)?;
    if raw.get() == "null" {
        return Ok(None);
    }
    if !raw.get().starts_with('{') {
        return Err(de::Error::custom("expected a JSON object"));
    }
    serde_json::from_str(raw.get())
        .map(Some)
        .map_err(de::Error::custom)
}

/// Keeps a field that is present, even as `null`, apart from a missing one.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Only the `id` of a client message.
#[derive(Deserialize)]
struct IdOnly<'a> {
    #[serde(default, borrow, deserialize_with = "present")]
    id: Option<&'a RawValue>,
}

/// The `id` of a message that is refused unread (over a rate limit), so its
/// error can still name it; `None` when it has none or is not a JSON object.
pub fn id_of(text: &str) -> Option<&RawValue> {
    serde_json::from_str::<IdOnly<'_>>(text).ok()?.id
}

/// Parses a client message, mapping failures to their error code.
pub fn parse(text: &str) -> Result<Inbound<'_>, (ErrorCode, String)> {
    if text.trim_start().starts_with('[') {
        // serde's derive would read an array as the fields in order.
        return Err(match serde_json::from_str::<de::IgnoredAny>(text) {
            Ok(_) => (
                ErrorCode::InvalidMessage,
                "a message is a JSON object".into(),
            ),
            Err(syntax) => (ErrorCode::InvalidJson, syntax.to_string()),
        });
    }
    serde_json::from_str(text).map_err(|e| {
        if e.classify() != serde_json::error::Category::Data {
            return (ErrorCode::InvalidJson, e.to_string());
        }
        // A wrong type can stop the parser before it reaches broken syntax
        // further on (`[1,`): only text that is JSON throughout is a message
        // of the wrong shape, and otherwise the syntax error is the one to name.
        match serde_json::from_str::<de::IgnoredAny>(text) {
            Ok(_) => (ErrorCode::InvalidMessage, e.to_string()),
            Err(syntax) => (ErrorCode::InvalidJson, syntax.to_string()),
        }
    })
}

/// Every server frame of `switchboard.v1`: one shape, fields present as needed,
/// in a fixed order with `payload` last.
#[derive(Serialize)]
struct Frame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    topic: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<ErrorCode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    delivered: Option<&'a [&'a str]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offline: Option<&'a [&'a str]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subscribers: Option<usize>,
    #[serde(rename = "clients", skip_serializing_if = "Option::is_none")]
    counts: Option<MapOf<'a, usize>>,
    #[serde(rename = "clients", skip_serializing_if = "Option::is_none")]
    online: Option<MapOf<'a, bool>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offsets: Option<MapOf<'a, u64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recovered: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    missed: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    epoch: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<&'a str>,
}

impl<'a> Frame<'a> {
    fn new(kind: &'static str) -> Self {
        Self {
            kind,
            id: None,
            topic: None,
            from: None,
            event: None,
            client: None,
            code: None,
            message: None,
            delivered: None,
            offline: None,
            subscribers: None,
            counts: None,
            online: None,
            offsets: None,
            recovered: None,
            missed: None,
            offset: None,
            epoch: None,
            payload: None,
            next: None,
        }
    }

    fn render(&self) -> String {
        serde_json::to_string(self).expect("frames of ids, strings and raw JSON always serialise")
    }
}

/// Pairs written as a JSON object.
struct MapOf<'a, V>(&'a [(&'a str, V)]);

impl<V: Serialize> Serialize for MapOf<'_, V> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

/// A delivery for plain clients: the payload's JSON text, as sent (checked
/// when it arrived).
pub fn raw_delivery(text: &str) -> PreparedMessage {
    PreparedMessage::text_copied(text)
}

/// Where a message stands in its stream: offset and epoch.
#[derive(Debug, Clone, Copy)]
pub struct At<'a> {
    /// The message's offset.
    pub offset: u64,
    /// The stream's epoch.
    pub epoch: &'a str,
}

/// A delivery for `switchboard.v1` clients, direct (no topic) or on a topic;
/// `from` is absent for messages the server API sends without a sender, `at`
/// for messages of a stream that keeps no history. `payload` is JSON text
/// that was checked when it arrived: it is written as it is, unparsed.
pub fn envelope_delivery(
    from: Option<&str>,
    topic: Option<&str>,
    payload: &str,
    at: Option<At<'_>>,
) -> PreparedMessage {
    let frame = Frame {
        from,
        topic,
        offset: at.map(|at| at.offset),
        epoch: at.map(|at| at.epoch),
        ..Frame::new("message")
    };
    // The envelope's fields besides the payload fit in this much, ids permitting.
    const ENVELOPE: usize = 64;
    let hint = ENVELOPE
        + payload.len()
        + from.map_or(0, str::len)
        + topic.map_or(0, str::len)
        + at.map_or(0, |at| 32 + at.epoch.len());
    PreparedMessage::text_with(hint, |buf| {
        serde_json::to_writer(&mut *buf, &frame)
            .expect("frames of ids, strings and raw JSON always serialise");
        // The payload goes last, as it is: the frame's closing brace makes way.
        buf.truncate(buf.len() - 1);
        buf.extend_from_slice(b",\"payload\":");
        buf.extend_from_slice(payload.as_bytes());
        buf.extend_from_slice(b"}");
    })
    .expect("frames and checked JSON are UTF-8")
}

/// Whether a connection that asked to resume did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resumed {
    /// It did not ask.
    NotAsked,
    /// It did: this many missed messages follow.
    Recovered(usize),
    /// It cannot: nothing follows but live messages.
    Lost,
}

/// What a `switchboard.v1` connection is told first: its client id and its
/// inbox's position, and, when it asked to resume, whether it did and how
/// many messages follow.
pub fn welcome(client: &str, at: At<'_>, resumed: Resumed) -> PreparedMessage {
    let (recovered, missed) = match resumed {
        Resumed::NotAsked => (None, None),
        Resumed::Recovered(missed) => (Some(true), Some(missed)),
        Resumed::Lost => (Some(false), None),
    };
    let frame = Frame {
        client: Some(client),
        recovered,
        missed,
        offset: Some(at.offset),
        epoch: Some(at.epoch),
        ..Frame::new("welcome")
    };
    PreparedMessage::text(frame.render())
}

/// The ack of a `send` that carried an `"id"`: which targets had a live
/// connection, and the offset each target's inbox gave the message.
pub fn ack_send(
    id: &RawValue,
    delivered: &[&str],
    offline: &[&str],
    offsets: &[(&str, u64)],
) -> String {
    Frame {
        id: Some(id),
        delivered: Some(delivered),
        offline: Some(offline),
        offsets: Some(MapOf(offsets)),
        ..Frame::new("ack")
    }
    .render()
}

/// The ack of a `subscribe`, `unsubscribe` or `refresh`.
pub fn ack(id: &RawValue, topic: Option<&str>) -> String {
    Frame {
        id: Some(id),
        topic,
        ..Frame::new("ack")
    }
    .render()
}

/// The ack of a `publish`: how many subscribers it reached, and its offset
/// when the topic keeps history.
pub fn ack_publish(id: &RawValue, topic: &str, subscribers: usize, offset: Option<u64>) -> String {
    Frame {
        id: Some(id),
        topic: Some(topic),
        subscribers: Some(subscribers),
        offset,
        ..Frame::new("ack")
    }
    .render()
}

/// The ack of a `subscribe` that asked to resume: whether it did, and the
/// topic's position (absent for a topic that keeps no history).
pub fn ack_resume(id: &RawValue, topic: &str, resumed: Resumed, at: Option<At<'_>>) -> String {
    let (recovered, missed) = match resumed {
        Resumed::NotAsked => (None, None),
        Resumed::Recovered(missed) => (Some(true), Some(missed)),
        Resumed::Lost => (Some(false), None),
    };
    Frame {
        id: Some(id),
        topic: Some(topic),
        recovered,
        missed,
        offset: at.map(|at| at.offset),
        epoch: at.map(|at| at.epoch),
        ..Frame::new("ack")
    }
    .render()
}

/// A join or leave, sent to a topic's subscribers.
pub fn presence_event(topic: &str, client: &str, change: PresenceChange) -> PreparedMessage {
    let event = match change {
        PresenceChange::Joined => "join",
        PresenceChange::Left => "leave",
    };
    let frame = Frame {
        topic: Some(topic),
        event: Some(event),
        client: Some(client),
        ..Frame::new("presence")
    };
    PreparedMessage::text(frame.render())
}

/// The answer to a `presence` query: client ids and their connection counts,
/// and where the next page starts when more may follow.
pub fn presence_reply(
    id: Option<&RawValue>,
    topic: &str,
    members: &[(&str, usize)],
    next: Option<&str>,
) -> String {
    Frame {
        id,
        topic: Some(topic),
        counts: Some(MapOf(members)),
        next,
        ..Frame::new("presence")
    }
    .render()
}

/// The answer to a `status` query: whether each client id is online.
pub fn status_reply(id: Option<&RawValue>, clients: &[(&str, bool)]) -> String {
    Frame {
        id,
        online: Some(MapOf(clients)),
        ..Frame::new("status")
    }
    .render()
}

/// An error frame.
pub fn error(code: ErrorCode, message: &str, id: Option<&RawValue>) -> String {
    Frame {
        id,
        code: Some(code),
        message: Some(message),
        ..Frame::new("error")
    }
    .render()
}

/// A subscription the server ended: its topic, why (`code`), and a message
/// for people.
pub fn unsubscribed(topic: &str, code: ErrorCode, message: &str) -> String {
    Frame {
        topic: Some(topic),
        code: Some(code),
        message: Some(message),
        ..Frame::new("unsubscribed")
    }
    .render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_seed_format_and_keeps_payload_text() {
        let m = parse(r#"{"targets":[2,"3"],"payload":{"a": [1, 2]}}"#).unwrap();
        assert_eq!(m.targets.unwrap().len(), 2);
        assert_eq!(m.payload.unwrap().get(), r#"{"a": [1, 2]}"#);
        assert!(m.id.is_none() && m.kind.is_none());
    }

    #[test]
    fn null_payload_is_present_and_missing_payload_is_not() {
        assert_eq!(
            parse(r#"{"targets":[],"payload":null}"#)
                .unwrap()
                .payload
                .unwrap()
                .get(),
            "null"
        );
        assert!(parse(r#"{"targets":[]}"#).unwrap().payload.is_none());
    }

    #[test]
    fn a_field_given_twice_is_refused_and_unknown_keys_are_ignored() {
        for twice in [
            r#"{"id":1,"id":2,"targets":[],"payload":1}"#,
            r#"{"targets":[],"targets":["a"],"payload":1}"#,
            r#"{"type":"publish","type":"send","targets":[],"payload":1}"#,
        ] {
            let (code, message) = parse(twice).unwrap_err();
            assert_eq!(code, ErrorCode::InvalidMessage, "{twice}");
            assert!(message.contains("duplicate field"), "{message}");
        }
        assert!(parse(r#"{"x":1,"x":2,"targets":[],"payload":1}"#).is_ok());
    }

    #[test]
    fn classifies_errors() {
        assert_eq!(parse("{nope").unwrap_err().0, ErrorCode::InvalidJson);
        assert_eq!(parse("").unwrap_err().0, ErrorCode::InvalidJson);
        assert_eq!(parse("[1,2]").unwrap_err().0, ErrorCode::InvalidMessage);
        let (code, message) = parse("[1,").unwrap_err();
        assert_eq!(code, ErrorCode::InvalidJson);
        assert!(message.contains("EOF"), "names the syntax error: {message}");
        assert_eq!(
            parse(r#"{"targets":"2","#).unwrap_err().0,
            ErrorCode::InvalidJson
        );
        assert_eq!(
            parse(r#"{"targets":"2"}"#).unwrap_err().0,
            ErrorCode::InvalidMessage
        );
    }

    #[test]
    fn builds_envelopes_acks_and_errors() {
        let payload = "{\"x\": 1}";
        let at = At {
            offset: 17,
            epoch: "k3x9ab12",
        };
        let m = envelope_delivery(Some("1"), None, payload, Some(at));
        assert_eq!(
            m.payload(),
            br#"{"type":"message","from":"1","offset":17,"epoch":"k3x9ab12","payload":{"x": 1}}"#
        );
        let id = RawValue::from_string("7".into()).unwrap();
        assert_eq!(
            ack_send(&id, &["2"], &["3"], &[("2", 5), ("3", 1)]),
            r#"{"type":"ack","id":7,"delivered":["2"],"offline":["3"],"offsets":{"2":5,"3":1}}"#
        );
        let fresh = welcome("42", at, Resumed::NotAsked);
        assert_eq!(
            fresh.payload(),
            br#"{"type":"welcome","client":"42","offset":17,"epoch":"k3x9ab12"}"#
        );
        let resumed = welcome("42", at, Resumed::Recovered(3));
        assert_eq!(
            resumed.payload(),
            br#"{"type":"welcome","client":"42","recovered":true,"missed":3,"offset":17,"epoch":"k3x9ab12"}"#
        );
        let lost = welcome("42", at, Resumed::Lost);
        assert_eq!(
            lost.payload(),
            br#"{"type":"welcome","client":"42","recovered":false,"offset":17,"epoch":"k3x9ab12"}"#
        );
        assert_eq!(
            error(ErrorCode::InvalidTarget, "bad", None),
            r#"{"type":"error","code":"invalid_target","message":"bad"}"#
        );
        let topic = envelope_delivery(Some("1"), Some("chat:x"), payload, None);
        assert_eq!(
            topic.payload(),
            br#"{"type":"message","topic":"chat:x","from":"1","payload":{"x": 1}}"#
        );
        assert_eq!(
            presence_reply(Some(&id), "chat:x", &[("1", 2)], None),
            r#"{"type":"presence","id":7,"topic":"chat:x","clients":{"1":2}}"#
        );
        assert_eq!(
            presence_reply(Some(&id), "chat:x", &[("1", 2)], Some("1")),
            r#"{"type":"presence","id":7,"topic":"chat:x","clients":{"1":2},"next":"1"}"#
        );
        assert_eq!(
            status_reply(None, &[("1", true), ("2", false)]),
            r#"{"type":"status","clients":{"1":true,"2":false}}"#
        );
        let join = presence_event("chat:x", "9", PresenceChange::Joined);
        assert_eq!(
            join.payload(),
            br#"{"type":"presence","topic":"chat:x","event":"join","client":"9"}"#
        );
    }

    /// JSON text of any shape, with the field names of client messages
    /// more likely than others.
    fn json_value() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            "[a-z0-9:. ]{0,8}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            let key = prop_oneof![
                Just("type".to_owned()),
                Just("id".to_owned()),
                Just("targets".to_owned()),
                Just("payload".to_owned()),
                Just("topic".to_owned()),
                Just("clients".to_owned()),
                Just("token".to_owned()),
                "[a-z]{1,4}",
            ];
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map(key, inner, 0..6)
                    .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    /// Client text: JSON, JSON cut short, or any string at all.
    fn client_text() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            json_value().prop_map(|v| v.to_string()),
            (json_value(), any::<proptest::sample::Index>()).prop_map(|(v, cut)| {
                let text = v.to_string();
                let mut at = cut.index(text.len() + 1);
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                text[..at].to_owned()
            }),
            any::<String>(),
        ]
    }

    #[test]
    fn an_array_of_the_fields_is_not_a_message() {
        // serde's derive reads a struct from an array of its fields in order.
        let send = r#"[null,null,["2"],{"text":"hi"}]"#;
        assert_eq!(parse(send).unwrap_err().0, ErrorCode::InvalidMessage);
        assert_eq!(parse("[1,").unwrap_err().0, ErrorCode::InvalidJson);
        let since = r#"{"type":"subscribe","topic":"t","since":["k3x9ab12",9]}"#;
        assert_eq!(parse(since).unwrap_err().0, ErrorCode::InvalidMessage);
        let since = r#"{"type":"subscribe","topic":"t","since":{"epoch":"k3x9ab12","offset":9}}"#;
        assert_eq!(parse(since).unwrap().since.unwrap().offset, 9);
        let since = r#"{"type":"subscribe","topic":"t","since":null}"#;
        assert!(parse(since).unwrap().since.is_none());
    }

    proptest::proptest! {
        /// Whatever a client sends, parsing answers; `invalid_json` exactly
        /// when the text is not JSON, `invalid_message` for JSON of the wrong shape.
        #[test]
        fn every_text_gets_the_right_error_code(text in client_text()) {
            let json = serde_json::from_str::<de::IgnoredAny>(&text).is_ok();
            match parse(&text) {
                Ok(_) => proptest::prop_assert!(json, "parsed non-JSON {:?}", text),
                Err((code, _)) => proptest::prop_assert_eq!(
                    code == ErrorCode::InvalidJson,
                    !json,
                    "{:?} for {:?}",
                    code,
                    text
                ),
            }
        }
    }
}
