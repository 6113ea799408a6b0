//! The relay's wire protocol (docs/protocol.md is the reference).
//!
//! Clients send `{"targets":[...],"payload":<any JSON>}`. Plain clients receive
//! the payload's JSON text as it was sent. Clients that ask for the
//! `switchboard.v1` subprotocol receive envelopes (`{"type":"message",...}`),
//! acks for messages that carry an `"id"`, and typed errors.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use switchboard::{Format, PreparedMessage};

use crate::ids::Target;

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
    /// `"send"`, or absent (the seed format).
    #[serde(rename = "type", default, borrow)]
    pub kind: Option<std::borrow::Cow<'a, str>>,
    /// A client-chosen id (any JSON value) that asks for an ack.
    #[serde(default, borrow, deserialize_with = "present")]
    pub id: Option<&'a RawValue>,
    /// The client ids to deliver to.
    #[serde(default)]
    pub targets: Option<Vec<Target>>,
    /// Any JSON value, passed through without being re-serialised.
    #[serde(default, borrow, deserialize_with = "present")]
    pub payload: Option<&'a RawValue>,
}

/// Keeps a field that is present, even as `null`, apart from a missing one.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Stable error codes; docs/protocol.md lists when each is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The text is not JSON.
    InvalidJson,
    /// JSON, but not a message: not an object, a field of the wrong type, or a missing field.
    InvalidMessage,
    /// A target is not a valid client id.
    InvalidTarget,
    /// More targets than the server allows in one message.
    TooManyTargets,
    /// A `"type"` the server does not know.
    UnknownType,
    /// A binary frame: the relay speaks JSON text.
    BinaryNotSupported,
}

/// Parses a client message, mapping failures to their error code.
pub fn parse(text: &str) -> Result<Inbound<'_>, (ErrorCode, String)> {
    serde_json::from_str(text).map_err(|e| {
        let code = match e.classify() {
            serde_json::error::Category::Data => ErrorCode::InvalidMessage,
            _ => ErrorCode::InvalidJson,
        };
        (code, e.to_string())
    })
}

/// A delivery for plain clients: the payload's JSON text, as sent.
pub fn raw_delivery(payload: &RawValue) -> PreparedMessage {
    PreparedMessage::text(payload.get().to_owned())
}

/// A delivery for `switchboard.v1` clients.
pub fn envelope_delivery(from: &str, payload: &RawValue) -> PreparedMessage {
    #[derive(Serialize)]
    struct Delivery<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        from: &'a str,
        payload: &'a RawValue,
    }
    let text = serde_json::to_string(&Delivery {
        kind: "message",
        from,
        payload,
    })
    .expect("ids and raw JSON always serialise");
    PreparedMessage::text(text)
}

/// The ack for a message that carried an `"id"`.
pub fn ack(id: &RawValue, delivered: &[&str], offline: &[&str]) -> String {
    #[derive(Serialize)]
    struct Ack<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        id: &'a RawValue,
        delivered: &'a [&'a str],
        offline: &'a [&'a str],
    }
    serde_json::to_string(&Ack {
        kind: "ack",
        id,
        delivered,
        offline,
    })
    .expect("acks always serialise")
}

/// An error frame.
pub fn error(code: ErrorCode, message: &str, id: Option<&RawValue>) -> String {
    #[derive(Serialize)]
    struct Error<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        code: ErrorCode,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RawValue>,
    }
    serde_json::to_string(&Error {
        kind: "error",
        code,
        message,
        id,
    })
    .expect("errors always serialise")
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
    fn classifies_errors() {
        assert_eq!(parse("{nope").unwrap_err().0, ErrorCode::InvalidJson);
        assert_eq!(parse("").unwrap_err().0, ErrorCode::InvalidJson);
        assert_eq!(parse("[1,2]").unwrap_err().0, ErrorCode::InvalidMessage);
        assert_eq!(
            parse(r#"{"targets":"2"}"#).unwrap_err().0,
            ErrorCode::InvalidMessage
        );
    }

    #[test]
    fn builds_envelopes_acks_and_errors() {
        let payload = RawValue::from_string("{\"x\":1}".into()).unwrap();
        let m = envelope_delivery("1", &payload);
        assert_eq!(
            &m.payload()[..],
            br#"{"type":"message","from":"1","payload":{"x":1}}"#
        );
        let id = RawValue::from_string("7".into()).unwrap();
        assert_eq!(
            ack(&id, &["2"], &["3"]),
            r#"{"type":"ack","id":7,"delivered":["2"],"offline":["3"]}"#
        );
        assert_eq!(
            error(ErrorCode::InvalidTarget, "bad", None),
            r#"{"type":"error","code":"invalid_target","message":"bad"}"#
        );
    }
}
