//! Sans-I/O WebSocket protocol core for Switchboard.
//!
//! Nothing in this crate touches a socket or a runtime: bytes go in through a
//! [`bytes::BytesMut`] and frames or messages come out, so the same code serves
//! the server, a client, the fuzzer and tests that split input at every byte.
//!
//! The modules follow the RFCs' concerns:
//!
//! - [`frame`]: RFC 6455 §5.2 frame header decoding and encoding.
//! - [`mask`]: the client-to-server masking transform (§5.3).
//! - [`utf8`]: incremental UTF-8 validation of text messages (§8.1).
//! - [`close`]: close codes and close frame payloads (§7.4).
//! - [`message`]: reassembly of fragments into messages, with size limits (§5.4).
//! - [`deflate`]: RFC 7692 permessage-deflate negotiation and codec.
//! - [`handshake`]: the opening handshake's key and header helpers (§4).
//! - [`prepared`]: server messages encoded once and shared by every recipient.
//! - [`error`]: protocol errors, each mapped to the close code it sends.

pub mod close;
pub mod deflate;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod mask;
pub mod message;
pub mod prepared;
pub mod utf8;

pub use close::{CloseCode, CloseReason};
pub use error::ProtocolError;
pub use frame::{Frame, FrameDecoder, OpCode, Role};
pub use message::{Limits, Message, MessageDecoder};
pub use prepared::PreparedMessage;
pub use utf8::Utf8Bytes;
