//! Error codes: one set for the WebSocket protocol and the HTTP API.
//!
//! Both surfaces answer with a code and a message, from this one enum: a bad
//! topic, too many targets and a namespace nobody serves have the same code on
//! both. One condition keeps a code of each surface's own, as their documented
//! contracts give it: a target that is not a client id is `invalid_target` on
//! the WebSocket and `invalid_id` in the API. docs/protocol.md and docs/api.md
//! list when each is sent.

use serde::Serialize;

/// A stable error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The text is not JSON.
    InvalidJson,
    /// JSON, but not a message: not an object, a field of the wrong type, or a missing field.
    InvalidMessage,
    /// A target or client is not a valid client id.
    InvalidTarget,
    /// More targets than the server allows in one message.
    TooManyTargets,
    /// A `"type"` the server does not know.
    UnknownType,
    /// A binary frame: the relay speaks JSON text.
    BinaryNotSupported,
    /// A topic operation from a client without the `switchboard.v1` subprotocol.
    EnvelopeRequired,
    /// A topic name that breaks the naming rules.
    InvalidTopic,
    /// A topic outside every configured namespace.
    UnknownNamespace,
    /// The topic has reached its subscriber limit.
    TopicFull,
    /// The connection has reached its topic limit.
    TooManyTopics,
    /// Unsubscribing from a topic the connection is not subscribed to.
    NotSubscribed,
    /// Presence is off in the topic's namespace.
    PresenceDisabled,
    /// The token's claims or the namespace do not allow this.
    Forbidden,
    /// Over the connection's message or byte rate.
    RateLimited,
    /// A `refresh` token that does not verify or names another client.
    InvalidToken,
    /// A `since` that is not a position this stream gave (ahead of its last).
    InvalidSince,
    /// A `cursor` not of the shape the engine's pages give as `next`.
    InvalidCursor,
    /// History was asked of a topic whose namespace keeps none.
    HistoryDisabled,
    /// The cluster's store (Redis) cannot be reached, or did not answer in
    /// time; try again (an answer lost may hide a call that ran).
    Unavailable,

    // The HTTP API's own (docs/api.md).
    /// A request body of the wrong shape, or a value out of range.
    InvalidRequest,
    /// An `id` or target of a request that is not a valid client id.
    InvalidId,
    /// More operations in one batch than allowed.
    TooManyOperations,
    /// A missing or wrong API key.
    Unauthorized,
    /// A body that is not `application/json`.
    UnsupportedMediaType,
    /// A body over the size limit.
    PayloadTooLarge,
    /// A body that did not arrive whole within the read timeout.
    RequestTimeout,
    /// A route that does not exist.
    NotFound,
    /// A route that exists, with another method.
    MethodNotAllowed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_serialize_as_their_wire_names() {
        let names = [
            (ErrorCode::InvalidJson, "invalid_json"),
            (ErrorCode::UnknownNamespace, "unknown_namespace"),
            (ErrorCode::PayloadTooLarge, "payload_too_large"),
        ];
        for (code, name) in names {
            assert_eq!(serde_json::to_value(code).unwrap(), name);
        }
    }
}
