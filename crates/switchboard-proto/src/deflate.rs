//! RFC 7692 permessage-deflate: negotiation and the per-connection codec.
//!
//! [`negotiate`] picks the first acceptable offer of a `Sec-WebSocket-Extensions`
//! header and builds the response. [`Deflater`] and [`Inflater`] compress and
//! decompress message payloads; the inflater stops at a byte cap so that a
//! decompression bomb fails with close code 1009 instead of eating memory.
//!
//! Compression state costs memory (zlib's LZ77 window and hash tables, tens of
//! KiB), so no connection holds any it does not need: a side that resets its
//! context after each message has nothing to remember between messages, and
//! then one compressor per thread serves every connection (as uWebSockets'
//! shared compressor does; one per size class of message, see `mem_level_for`)
//! and inflaters are lent from a per-thread pool for the length of one message.
//! Only context takeover costs memory per connection.
//!
//! The codec is zlib-rs, through its own safe API rather than flate2's, which
//! cannot choose a compressor's memLevel.

use std::cell::RefCell;

use bytes::{Bytes, BytesMut};
use zlib_rs::{Deflate, DeflateConfig, DeflateFlush, Inflate, InflateFlush, Status};

use crate::error::ProtocolError;

/// The tail that a sync flush ends with and that RFC 7692 §7.2.1 strips.
const SYNC_TAIL: [u8; 4] = [0x00, 0x00, 0xFF, 0xFF];

/// Smallest LZ77 window zlib can produce a raw deflate stream for (2^9 bytes).
/// An offer that demands 8 is declined rather than answered with a larger window.
const MIN_WINDOW_BITS: u8 = 9;
const MAX_WINDOW_BITS: u8 = 15;

/// zlib's default memLevel. A compressor's symbol buffer holds 2^(memLevel + 6)
/// symbols, 7 bytes each with its output buffer, and zlib-rs clears the whole
/// buffer at the start of every block, that is at least once per message.
const DEFAULT_MEM_LEVEL: i32 = 8;

/// Bounds on the output room one inflate call is given (see `inflate_inner`).
const MIN_INFLATE_ROOM: usize = 1024;
const MAX_INFLATE_ROOM: usize = 16 * 1024;

/// What the server is willing to do; the defaults suit fan-out (see `prefer_no_context_takeover`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeflateOptions {
    /// Reset the compressor after each message even when the client does not ask.
    /// It costs some ratio and lets one compressed frame serve every recipient.
    pub prefer_no_context_takeover: bool,
    /// Ask clients to reset their compressor after each message
    /// (`client_no_context_takeover`, which RFC 7692 §7.1.1.2 lets a server
    /// require). It costs some ratio on client messages and saves holding an
    /// inflate window of 32 KiB per connection between messages.
    pub require_client_no_context_takeover: bool,
    /// Compression level, 0-9.
    pub level: u32,
    /// Messages shorter than this are sent uncompressed.
    pub min_size: usize,
}

impl Default for DeflateOptions {
    fn default() -> Self {
        Self {
            prefer_no_context_takeover: true,
            require_client_no_context_takeover: true,
            level: 6,
            min_size: 64,
        }
    }
}

/// The parameters agreed with one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeflateParams {
    /// The server resets its compressor after each message.
    pub server_no_context_takeover: bool,
    /// The client resets its compressor after each message.
    pub client_no_context_takeover: bool,
    /// The server's LZ77 window, as a power of two.
    pub server_max_window_bits: u8,
    /// The client's offer named `server_max_window_bits`: the answer names it
    /// too, even at 15 (RFC 7692 §7.1.2.1: a server accepts that parameter by
    /// answering with it, and a client may fail a connection whose answer
    /// lacks it).
    pub server_window_asked: bool,
    /// Compression level, 0-9.
    pub level: u32,
    /// Messages shorter than this are sent uncompressed.
    pub min_size: usize,
}

impl DeflateParams {
    /// The value of the `Sec-WebSocket-Extensions` response header.
    pub fn response_header(&self) -> String {
        let mut out = String::from("permessage-deflate");
        if self.server_no_context_takeover {
            out.push_str("; server_no_context_takeover");
        }
        if self.client_no_context_takeover {
            out.push_str("; client_no_context_takeover");
        }
        if self.server_window_asked || self.server_max_window_bits != MAX_WINDOW_BITS {
            out.push_str(&format!(
                "; server_max_window_bits={}",
                self.server_max_window_bits
            ));
        }
        out
    }

    /// Whether the client resets its compressor after each message.
    pub fn client_context(&self) -> PeerContext {
        if self.client_no_context_takeover {
            PeerContext::Reset
        } else {
            PeerContext::Kept
        }
    }

    /// Whether a frame compressed without context by [`compress_standalone`] with
    /// these settings is valid for this connection (so it can be shared).
    pub fn shares_standalone_frames(&self) -> bool {
        self.server_no_context_takeover && self.server_max_window_bits == MAX_WINDOW_BITS
    }
}

/// Whether a peer's compressor keeps its LZ77 window from one message to the next
/// (RFC 7692 context takeover). When it does not, the inflater holds no state
/// between messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerContext {
    /// Later messages may refer back to earlier ones.
    Kept,
    /// Every message is compressed on its own.
    Reset,
}

/// Picks the first permessage-deflate offer in `header` that can be accepted.
pub fn negotiate(header: &str, options: &DeflateOptions) -> Option<DeflateParams> {
    header
        .split(',')
        .filter_map(|offer| accept_offer(offer, options))
        .next()
}

fn accept_offer(offer: &str, options: &DeflateOptions) -> Option<DeflateParams> {
    let mut parts = offer.split(';').map(str::trim);
    if parts.next()? != "permessage-deflate" {
        return None;
    }
    let mut params = DeflateParams {
        server_no_context_takeover: options.prefer_no_context_takeover,
        client_no_context_takeover: options.require_client_no_context_takeover,
        server_max_window_bits: MAX_WINDOW_BITS,
        server_window_asked: false,
        level: options.level.min(9),
        min_size: options.min_size,
    };
    for (name, value) in parameters(parts)? {
        match (name, value) {
            ("server_no_context_takeover", None) => params.server_no_context_takeover = true,
            ("client_no_context_takeover", None) => params.client_no_context_takeover = true,
            ("server_max_window_bits", Some(bits)) => {
                params.server_max_window_bits = window_bits(bits)?;
                params.server_window_asked = true;
                if params.server_max_window_bits < MIN_WINDOW_BITS {
                    return None;
                }
            }
            // We inflate with the largest window, which reads any smaller one.
            ("client_max_window_bits", None) => {}
            ("client_max_window_bits", Some(bits)) => {
                window_bits(bits)?;
            }
            _ => return None,
        }
    }
    Some(params)
}

/// The `name[=value]` parameters of one extension, or `None` if a name is
/// repeated (RFC 7692 §7: that makes an offer, or an answer, invalid), or if
/// there are more than the four names RFC 7692 defines (one of them is then
/// unknown or repeated: invalid too, and each one read is compared with those
/// before it, so a header of thousands would cost millions of comparisons).
fn parameters<'a>(parts: impl Iterator<Item = &'a str>) -> Option<Vec<(&'a str, Option<&'a str>)>> {
    const DEFINED: usize = 4;
    let mut params: Vec<(&str, Option<&str>)> = Vec::new();
    for part in parts {
        if params.len() == DEFINED {
            return None;
        }
        let (name, value) = match part.split_once('=') {
            Some((name, value)) => (name.trim(), Some(value.trim().trim_matches('"'))),
            None => (part, None),
        };
        if params.iter().any(|(seen, _)| *seen == name) {
            return None;
        }
        params.push((name, value));
    }
    Some(params)
}

/// A window size parameter: 1*DIGIT without leading zeros (RFC 7692 §7.1.2.1),
/// from 8 to 15.
fn window_bits(value: &str) -> Option<u8> {
    if value.starts_with('0') || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let bits: u8 = value.parse().ok()?;
    (8..=MAX_WINDOW_BITS).contains(&bits).then_some(bits)
}

/// The `Sec-WebSocket-Extensions` offers of a client, in order of preference
/// (RFC 7692 §5): first permessage-deflate with the server resetting its
/// compressor after each message, so the client holds no inflate window
/// between messages; then without that, for servers that keep their context.
/// Both say the client resets its own compressor (`client_no_context_takeover`,
/// a promise it keeps: see [`client_accept`]), which servers that share one
/// compressed frame among recipients require, and leave the server to cap its
/// window (`client_max_window_bits`), as RFC 7692 §7.1.2.2 says a client should.
pub fn client_offer() -> &'static str {
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
     client_max_window_bits, permessage-deflate; client_no_context_takeover; client_max_window_bits"
}

/// What a client agreed to from the server's answer to [`client_offer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAgreement {
    /// This side's compression, in the terms [`crate::message::MessageEncoder`] reads
    /// (its `server_*` fields mean "this side's").
    pub params: DeflateParams,
    /// How the server compresses, for the decoder.
    pub server_context: PeerContext,
}

/// Reads the server's `Sec-WebSocket-Extensions` answer to [`client_offer`].
/// `Ok(None)`: no extension was agreed.
///
/// # Errors
///
/// [`ProtocolError::BadExtension`] for an answer the client must fail the
/// connection for (RFC 7692 §5 and §7): an extension it did not offer, a
/// second permessage-deflate, an unknown or repeated parameter, or a window
/// size out of range.
pub fn client_accept(
    answer: Option<&str>,
    options: &DeflateOptions,
) -> Result<Option<ClientAgreement>, ProtocolError> {
    let Some(answer) = answer.map(str::trim).filter(|a| !a.is_empty()) else {
        return Ok(None);
    };
    if answer.contains(',') {
        return Err(ProtocolError::BadExtension);
    }
    let mut parts = answer.split(';').map(str::trim);
    if parts.next() != Some("permessage-deflate") {
        return Err(ProtocolError::BadExtension);
    }
    let mut params = DeflateParams {
        // The offer said this side resets its compressor after every message,
        // whether or not the answer repeats it (RFC 7692 §7.1.1.2).
        server_no_context_takeover: true,
        client_no_context_takeover: false,
        server_max_window_bits: MAX_WINDOW_BITS,
        server_window_asked: false,
        level: options.level.min(9),
        min_size: options.min_size,
    };
    let mut server_context = PeerContext::Kept;
    for (name, value) in parameters(parts).ok_or(ProtocolError::BadExtension)? {
        match (name, value) {
            ("server_no_context_takeover", None) => server_context = PeerContext::Reset,
            // Our inflater reads any window up to the largest.
            ("server_max_window_bits", Some(bits)) => {
                window_bits(bits).ok_or(ProtocolError::BadExtension)?;
            }
            ("client_no_context_takeover", None) => {}
            // zlib cannot keep a raw deflate stream within a 256-byte window:
            // a server that demands 8 cannot be served, and is refused.
            ("client_max_window_bits", Some(bits)) => {
                params.server_max_window_bits = window_bits(bits)
                    .filter(|bits| *bits >= MIN_WINDOW_BITS)
                    .ok_or(ProtocolError::BadExtension)?;
            }
            _ => return Err(ProtocolError::BadExtension),
        }
    }
    Ok(Some(ClientAgreement {
        params,
        server_context,
    }))
}

/// Compresses outgoing messages for one connection.
pub struct Deflater {
    level: u32,
    window_bits: u8,
    min_size: usize,
    /// The connection's own compressor, kept only with context takeover and
    /// made on the first message worth compressing.
    own: Option<Box<Deflate>>,
    keep_context: bool,
}

impl std::fmt::Debug for Deflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deflater").finish_non_exhaustive()
    }
}

impl Deflater {
    /// A compressor for the server side of `params`.
    pub fn new(params: &DeflateParams) -> Self {
        Self {
            level: params.level,
            window_bits: params.server_max_window_bits,
            min_size: params.min_size,
            own: None,
            keep_context: !params.server_no_context_takeover,
        }
    }

    /// Whether a payload of this size is worth compressing.
    pub fn wants(&self, len: usize) -> bool {
        len >= self.min_size
    }

    /// Compresses one message payload, returning the frame payload to send with RSV1.
    pub fn compress(&mut self, payload: &[u8]) -> Bytes {
        if !self.keep_context {
            return compress_alone(payload, self.level, self.window_bits);
        }
        let (level, bits) = (self.level, self.window_bits);
        let own = self
            .own
            .get_or_insert_with(|| Box::new(compressor(level, bits, DEFAULT_MEM_LEVEL)));
        deflate_into(own, payload)
    }
}

/// Compresses `payload` with a fresh window-15 context: the same bytes serve every
/// connection whose [`DeflateParams::shares_standalone_frames`] is true.
pub fn compress_standalone(payload: &[u8], level: u32) -> Bytes {
    compress_alone(payload, level, MAX_WINDOW_BITS)
}

/// Compresses `payload` as a message of its own, with this thread's compressor
/// for these settings: the state is reset after every use, so it can be shared.
/// A thread keeps at most one per memLevel (eight) for each level and window in
/// use; zlib-rs allocates each about 256 KiB plus its symbol buffer.
fn compress_alone(payload: &[u8], level: u32, window_bits: u8) -> Bytes {
    type Compressors = Vec<((u32, u8, i32), Deflate)>;
    thread_local! {
        static COMPRESSORS: RefCell<Compressors> = const { RefCell::new(Vec::new()) };
    }
    let key = (level, window_bits, mem_level_for(payload.len()));
    COMPRESSORS.with(|cell| {
        let mut compressors = cell.borrow_mut();
        let index = match compressors.iter().position(|(k, _)| *k == key) {
            Some(index) => index,
            None => {
                compressors.push((key, compressor(key.0, key.1, key.2)));
                compressors.len() - 1
            }
        };
        let compress = &mut compressors[index].1;
        let out = deflate_into(compress, payload);
        compress.reset();
        out
    })
}

/// The smallest memLevel whose symbol buffer holds a message of `len` bytes in
/// one block, as the default's does for any message up to 16 KiB: the same
/// output, with less to clear per message (for 1 KiB, 6 KiB instead of 48).
fn mem_level_for(len: usize) -> i32 {
    let mut mem_level = 1;
    while mem_level < DEFAULT_MEM_LEVEL && (1usize << (mem_level + 6)) <= len {
        mem_level += 1;
    }
    mem_level
}

fn compressor(level: u32, window_bits: u8, mem_level: i32) -> Deflate {
    Deflate::new_with_config(DeflateConfig {
        level: level.min(9) as i32,
        // Negative: a raw deflate stream, without zlib's header and checksum.
        window_bits: -i32::from(window_bits),
        mem_level,
        ..DeflateConfig::default()
    })
}

fn deflate_into(compress: &mut Deflate, mut input: &[u8]) -> Bytes {
    let mut out = vec![0; input.len() / 2 + 64];
    let mut filled = 0;
    loop {
        if out.len() - filled < 64 {
            out.resize(out.len() * 2, 0);
        }
        let (before_in, before_out) = (compress.total_in(), compress.total_out());
        compress
            .compress(input, &mut out[filled..], DeflateFlush::SyncFlush)
            .expect("deflate cannot fail on valid state");
        input = &input[(compress.total_in() - before_in) as usize..];
        filled += (compress.total_out() - before_out) as usize;
        // The sync flush is complete once all input is taken and output space is left over.
        if input.is_empty() && filled < out.len() {
            break;
        }
    }
    out.truncate(filled);
    if out.ends_with(&SYNC_TAIL) {
        out.truncate(out.len() - SYNC_TAIL.len());
    }
    // A flush with nothing new since the last one (a second empty message in a
    // row, with context takeover) makes our zlib-rs backend emit nothing (C zlib
    // emits an empty stored block), and an empty payload does not inflate: the
    // receiver's appended tail alone is no valid block. Send the empty block of
    // RFC 7692 §7.2.3.6 instead.
    if out.is_empty() {
        out.push(0x00);
    }
    Bytes::from(out)
}

/// Decompresses incoming messages for one connection.
pub struct Inflater {
    decompress: Inflate,
    /// Compressed bytes have arrived for the message in progress.
    fed: bool,
}

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflater").finish_non_exhaustive()
    }
}

impl Default for Inflater {
    fn default() -> Self {
        Self::new()
    }
}

/// Inflaters kept per thread for peers that reset their context: enough for the
/// messages one thread has in progress at once, without holding many windows.
const SPARE_INFLATERS: usize = 4;

thread_local! {
    static SPARES: RefCell<Vec<Inflater>> = const { RefCell::new(Vec::new()) };
}

impl Inflater {
    /// A decompressor with the largest window, which reads any client window size.
    pub fn new() -> Self {
        Self {
            decompress: Inflate::new(false, MAX_WINDOW_BITS),
            fed: false,
        }
    }

    /// A fresh inflater from this thread's spares, or a new one.
    pub fn lend() -> Box<Self> {
        let spare = SPARES.with(|spares| spares.borrow_mut().pop());
        Box::new(spare.unwrap_or_default())
    }

    /// Resets the inflater and keeps it for a later [`Inflater::lend`] on this thread.
    pub fn give_back(mut self: Box<Self>) {
        self.decompress.reset(false);
        self.fed = false;
        SPARES.with(|spares| {
            let mut spares = spares.borrow_mut();
            if spares.len() < SPARE_INFLATERS {
                spares.push(*self);
            }
        });
    }

    /// Inflates one frame's compressed bytes onto `out`, which may hold at most `limit` bytes.
    pub fn inflate(
        &mut self,
        input: &[u8],
        out: &mut BytesMut,
        limit: usize,
    ) -> Result<(), ProtocolError> {
        self.fed |= !input.is_empty();
        self.inflate_inner(input, out, limit)
    }

    /// Ends a message: feeds the stripped sync-flush tail (RFC 7692 §7.2.2).
    /// A message whose compressed payload was empty is an empty message: the
    /// tail alone would leave the inflater inside a stored block's header and
    /// break every later message of a peer that keeps its context.
    pub fn finish_message(
        &mut self,
        out: &mut BytesMut,
        limit: usize,
    ) -> Result<(), ProtocolError> {
        if !std::mem::take(&mut self.fed) {
            return Ok(());
        }
        self.inflate_inner(&SYNC_TAIL, out, limit)
    }

    fn inflate_inner(
        &mut self,
        mut input: &[u8],
        out: &mut BytesMut,
        limit: usize,
    ) -> Result<(), ProtocolError> {
        loop {
            // Inflate straight onto `out`, into zeroed room sized to what this
            // input likely yields (zeroing a fixed 16 KiB buffer per call cost more
            // than inflating a small message), and never more than one byte past
            // the limit, so that a bomb is caught with little memory spent.
            let start = out.len();
            let room = (input.len() * 4)
                .clamp(MIN_INFLATE_ROOM, MAX_INFLATE_ROOM)
                .min(limit.saturating_sub(start).saturating_add(1));
            out.resize(start + room, 0);
            let before_in = self.decompress.total_in();
            let before_out = self.decompress.total_out();
            let Ok(status) =
                self.decompress
                    .decompress(input, &mut out[start..], InflateFlush::SyncFlush)
            else {
                // The zeroed room must not stay behind as if it had been inflated
                // (found by fuzz/deflate: the output could end one byte over the cap).
                out.truncate(start);
                return Err(ProtocolError::BadDeflate);
            };
            let produced = (self.decompress.total_out() - before_out) as usize;
            let consumed = (self.decompress.total_in() - before_in) as usize;
            input = &input[consumed..];
            out.truncate(start + produced);
            if out.len() > limit {
                out.truncate(limit);
                return Err(ProtocolError::MessageTooLarge { limit });
            }
            if status == Status::StreamEnd {
                // A final block ends the deflate stream; the next message must start a new one.
                self.decompress.reset(false);
            }
            if input.is_empty() && produced < room {
                return Ok(());
            }
            if produced == 0 && consumed == 0 {
                // No progress with input left: the stream cannot be decoded further.
                return Err(ProtocolError::BadDeflate);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_that_does_not_inflate_leaves_no_room_behind() {
        let mut out = BytesMut::from(&b"before"[..]);
        let mut inflater = Inflater::new();
        let error = inflater.inflate(&[0xff; 16], &mut out, 100);
        assert_eq!(error, Err(ProtocolError::BadDeflate));
        assert_eq!(
            &out[..],
            b"before",
            "nothing was inflated, nothing is added"
        );
    }

    #[test]
    fn a_client_reads_what_the_server_agreed() {
        let options = DeflateOptions::default();
        let agreed = |answer| client_accept(Some(answer), &options);
        let plain = agreed("permessage-deflate").unwrap().unwrap();
        assert_eq!(plain.server_context, PeerContext::Kept);
        // The offer promised it: this side resets whatever the answer says.
        assert!(plain.params.server_no_context_takeover);
        assert_eq!(plain.params.server_max_window_bits, MAX_WINDOW_BITS);

        let strict = agreed(
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
             client_max_window_bits=10; server_max_window_bits=12",
        )
        .unwrap()
        .unwrap();
        assert_eq!(strict.server_context, PeerContext::Reset);
        // This side keeps within the window it was given.
        assert_eq!(strict.params.server_max_window_bits, 10);

        assert_eq!(client_accept(None, &options), Ok(None));
        for bad in [
            "x-webkit-deflate-frame",
            "permessage-deflate, permessage-deflate",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; client_max_window_bits=16",
            // zlib cannot keep within 256 bytes.
            "permessage-deflate; client_max_window_bits=8",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; unknown",
        ] {
            assert_eq!(agreed(bad), Err(ProtocolError::BadExtension), "{bad}");
        }
    }

    fn opts() -> DeflateOptions {
        DeflateOptions {
            prefer_no_context_takeover: false,
            require_client_no_context_takeover: false,
            ..DeflateOptions::default()
        }
    }

    /// The server side's parameters, compressing every message (no minimum size).
    fn server(no_context: bool, window_bits: u8, level: u32) -> DeflateParams {
        DeflateParams {
            server_no_context_takeover: no_context,
            client_no_context_takeover: false,
            server_max_window_bits: window_bits,
            server_window_asked: false,
            level,
            min_size: 0,
        }
    }

    #[test]
    fn negotiates_browser_offers() {
        // Chromium
        let p = negotiate("permessage-deflate; client_max_window_bits", &opts()).unwrap();
        assert_eq!(p.response_header(), "permessage-deflate");
        // Firefox
        assert!(negotiate("permessage-deflate", &opts()).is_some());
        let p = negotiate("permessage-deflate", &DeflateOptions::default()).unwrap();
        assert_eq!(
            p.response_header(),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
    }

    #[test]
    fn honours_parameters_and_falls_back_between_offers() {
        let header = "permessage-deflate; server_max_window_bits=8, \
                      permessage-deflate; server_max_window_bits=10; client_no_context_takeover, \
                      permessage-deflate";
        let p = negotiate(header, &opts()).unwrap();
        assert_eq!(p.server_max_window_bits, 10);
        assert_eq!(
            p.response_header(),
            "permessage-deflate; client_no_context_takeover; server_max_window_bits=10"
        );
        // Named in the offer, named in the answer, even at its default.
        let p = negotiate("permessage-deflate; server_max_window_bits=15", &opts()).unwrap();
        assert_eq!(
            p.response_header(),
            "permessage-deflate; server_max_window_bits=15"
        );
    }

    #[test]
    fn an_offer_with_more_parameters_than_defined_is_declined_at_the_fifth() {
        let known = "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
                     server_max_window_bits=12; client_max_window_bits";
        assert!(negotiate(known, &opts()).is_some());
        assert_eq!(negotiate(&format!("{known}; x"), &opts()), None);
        // Thousands of names are read up to the fifth, no further (each was
        // compared with every one before it: 64,000 of them took 11 s).
        let distinct: Vec<String> = (0..100_000).map(|i| format!("p{i}")).collect();
        let read = std::cell::Cell::new(0);
        let names = distinct.iter().map(|name| {
            read.set(read.get() + 1);
            name.as_str()
        });
        assert_eq!(parameters(names), None);
        assert_eq!(read.get(), 5);
    }

    #[test]
    fn declines_invalid_offers() {
        for header in [
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; client_max_window_bits=7",
            // 1*DIGIT without leading zeros (RFC 7692 §7.1.2.1).
            "permessage-deflate; server_max_window_bits=09",
            "permessage-deflate; server_max_window_bits=+9",
            "permessage-deflate; client_max_window_bits=010",
            "permessage-deflate; unknown",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "x-webkit-deflate-frame",
        ] {
            assert_eq!(negotiate(header, &opts()), None, "{header}");
        }
    }

    #[test]
    fn round_trips_with_and_without_context() {
        for no_context in [false, true] {
            let params = server(no_context, 15, 6);
            let mut deflater = Deflater::new(&params);
            let mut inflater = Inflater::new();
            for i in 0..5 {
                let text = format!("message {i} {}", "abc".repeat(i * 100));
                let compressed = deflater.compress(text.as_bytes());
                let mut out = BytesMut::new();
                inflater.inflate(&compressed, &mut out, 1 << 20).unwrap();
                inflater.finish_message(&mut out, 1 << 20).unwrap();
                assert_eq!(&out[..], text.as_bytes());
            }
            // Without context takeover the thread's shared compressor did the work.
            assert_eq!(deflater.own.is_some(), !no_context);
        }
    }

    #[test]
    fn empty_messages_in_a_row_keep_a_kept_context_decodable() {
        // Regression: the second empty message compressed to nothing, and the
        // peer's inflater then read the next message as the body of a stored block.
        let params = server(false, 15, 6);
        let mut deflater = Deflater::new(&params);
        let mut inflater = Inflater::new();
        for text in ["", "", "after two empty messages"] {
            let compressed = deflater.compress(text.as_bytes());
            assert!(!compressed.is_empty(), "an empty payload does not inflate");
            let mut out = BytesMut::new();
            inflater.inflate(&compressed, &mut out, 1 << 20).unwrap();
            inflater.finish_message(&mut out, 1 << 20).unwrap();
            assert_eq!(&out[..], text.as_bytes());
        }
    }

    #[test]
    fn an_empty_compressed_payload_is_an_empty_message() {
        // What a peer compressing with zlib-rs and context takeover sent for a
        // second empty message in a row; it must not break the messages after it.
        let params = server(false, 15, 6);
        let mut deflater = Deflater::new(&params);
        let mut inflater = Inflater::new();
        let mut out = BytesMut::new();
        inflater.inflate(&[], &mut out, 1 << 20).unwrap();
        inflater.finish_message(&mut out, 1 << 20).unwrap();
        assert!(out.is_empty());
        let compressed = deflater.compress(b"hello");
        inflater.inflate(&compressed, &mut out, 1 << 20).unwrap();
        inflater.finish_message(&mut out, 1 << 20).unwrap();
        assert_eq!(&out[..], b"hello");
    }

    #[test]
    fn standalone_frames_inflate_anywhere() {
        let frame = compress_standalone(b"hello hello hello hello", 6);
        for _ in 0..2 {
            let mut inflater = Inflater::new();
            let mut out = BytesMut::new();
            inflater.inflate(&frame, &mut out, 100).unwrap();
            inflater.finish_message(&mut out, 100).unwrap();
            assert_eq!(&out[..], b"hello hello hello hello");
        }
    }

    #[test]
    fn no_limit_at_all_is_a_limit_too() {
        let message = b"unbounded ".repeat(1000);
        let frame = Deflater::new(&server(true, 15, 6)).compress(&message);
        let mut out = BytesMut::new();
        let mut inflater = Inflater::new();
        inflater.inflate(&frame, &mut out, usize::MAX).unwrap();
        inflater.finish_message(&mut out, usize::MAX).unwrap();
        assert_eq!(&out[..], &message[..]);
    }

    #[test]
    fn a_decompression_bomb_stops_at_the_limit() {
        let params = server(true, 15, 9);
        let bomb = Deflater::new(&params).compress(&vec![0u8; 10 << 20]);
        assert!(bomb.len() < 20_000);
        let mut out = BytesMut::new();
        let err = Inflater::new()
            .inflate(&bomb, &mut out, 1 << 20)
            .unwrap_err();
        assert_eq!(err, ProtocolError::MessageTooLarge { limit: 1 << 20 });
        assert!(out.len() <= 1 << 20);
    }

    #[test]
    fn garbage_is_bad_deflate() {
        let mut out = BytesMut::new();
        let err = Inflater::new()
            .inflate(&[0xFF; 32], &mut out, 1 << 20)
            .unwrap_err();
        assert_eq!(err, ProtocolError::BadDeflate);
    }

    /// Payloads compression meets: repetitive text, random bytes, or empty.
    fn payload() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        prop_oneof![
            ("[a-c ]{1,8}", 0..600usize).prop_map(|(word, n)| word.repeat(n).into_bytes()),
            proptest::collection::vec(any::<u8>(), 0..3000),
        ]
    }

    /// Payloads from empty to past the default symbol buffer (16 Ki symbols).
    fn any_size_payload() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        prop_oneof![
            payload(),
            ("[a-z ]{1,40}", 0..800usize).prop_map(|(word, n)| word.repeat(n).into_bytes()),
            proptest::collection::vec(any::<u8>(), 15_000..20_000),
        ]
    }

    /// `Sec-WebSocket-Extensions` values: offers of permessage-deflate with
    /// parameters valid, repeated, out of range or unknown, or any text at all.
    fn offers() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let param = prop_oneof![
            Just("server_no_context_takeover".to_owned()),
            Just("client_no_context_takeover".to_owned()),
            Just("client_max_window_bits".to_owned()),
            (0u8..20).prop_map(|n| format!("server_max_window_bits={n}")),
            (0u8..20).prop_map(|n| format!("client_max_window_bits=\"{n}\"")),
            "[a-z_=0-9\"]{0,12}",
        ];
        let offer = (
            prop_oneof![Just("permessage-deflate"), Just("x-webkit-deflate-frame")],
            proptest::collection::vec(param, 0..4),
        )
            .prop_map(|(name, params)| {
                std::iter::once(name.to_owned())
                    .chain(params)
                    .collect::<Vec<_>>()
                    .join("; ")
            });
        prop_oneof![
            proptest::collection::vec(offer, 1..3).prop_map(|offers| offers.join(", ")),
            "[ -~]{0,80}",
        ]
    }

    proptest::proptest! {
        /// Every message comes back byte for byte, with or without context
        /// takeover, at every window size and level a client may ask for, and
        /// however the compressed bytes are split between reads.
        #[test]
        fn messages_round_trip_whatever_the_parameters(
            messages in proptest::collection::vec(payload(), 1..6),
            no_context in proptest::bool::ANY,
            window_bits in MIN_WINDOW_BITS..=MAX_WINDOW_BITS,
            level in 0u32..=9,
            split in proptest::num::usize::ANY,
        ) {
            let params = server(no_context, window_bits, level);
            let mut deflater = Deflater::new(&params);
            let mut inflater = Inflater::new();
            for message in &messages {
                let compressed = deflater.compress(message);
                let at = split % (compressed.len() + 1);
                let mut out = BytesMut::new();
                inflater.inflate(&compressed[..at], &mut out, 1 << 20).unwrap();
                inflater.inflate(&compressed[at..], &mut out, 1 << 20).unwrap();
                inflater.finish_message(&mut out, 1 << 20).unwrap();
                proptest::prop_assert_eq!(&out[..], &message[..]);
            }
        }

        /// Sizing the shared compressor to the message changes no byte of the
        /// output: the message still fits in one block, as with zlib's default.
        #[test]
        fn a_compressor_sized_to_the_message_makes_the_same_bytes(
            message in any_size_payload(),
            level in 0u32..=9,
        ) {
            let mut default = compressor(level, MAX_WINDOW_BITS, DEFAULT_MEM_LEVEL);
            proptest::prop_assert_eq!(
                compress_standalone(&message, level),
                deflate_into(&mut default, &message)
            );
        }

        /// Any header a client sends is answered, with parameters in range.
        #[test]
        fn any_offer_is_declined_or_accepted_in_range(header in offers()) {
            if let Some(params) = negotiate(&header, &opts()) {
                proptest::prop_assert!(
                    (MIN_WINDOW_BITS..=MAX_WINDOW_BITS).contains(&params.server_max_window_bits)
                );
                proptest::prop_assert!(params.response_header().starts_with("permessage-deflate"));
            }
        }
    }
}
