//! The opening handshake (RFC 6455 §4): key checks, the accept key, and header
//! token lists. HTTP types stay out of this crate; callers pass header values.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha1::{Digest, Sha1};

/// The GUID that RFC 6455 §1.3 appends to the client's key.
const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The `Sec-WebSocket-Accept` value for a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(GUID);
    STANDARD.encode(sha.finalize())
}

/// Whether `key` is a valid `Sec-WebSocket-Key`: base64 of 16 bytes (§4.1).
pub fn is_valid_key(key: &[u8]) -> bool {
    key.len() == 24 && STANDARD.decode(key).is_ok_and(|raw| raw.len() == 16)
}

/// Whether a comma-separated header value contains `token`, case-insensitively
/// (`Connection: keep-alive, Upgrade`).
pub fn has_token(value: &str, token: &str) -> bool {
    value
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The client's `Sec-WebSocket-Key` for a request, from 16 bytes of entropy.
pub fn client_key(entropy: [u8; 16]) -> String {
    STANDARD.encode(entropy)
}

/// A `Sec-WebSocket-Key` from the OS's random source, as RFC 6455 §4.1 asks
/// ("randomly selected", nonce).
///
/// # Panics
///
/// If the operating system has no random source to offer (see
/// [`crate::mask::random_key`]).
pub fn random_client_key() -> String {
    let mut entropy = [0; 16];
    getrandom::fill(&mut entropy).expect("the OS random source is available");
    client_key(entropy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc_example() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn key_and_token_checks() {
        assert!(is_valid_key(b"dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(!is_valid_key(b"short"));
        assert!(!is_valid_key(b"dGhlIHNhbXBsZSBub25j!!=="));
        assert!(has_token("keep-alive, Upgrade", "upgrade"));
        assert!(!has_token("keep-alive", "upgrade"));
    }
}
