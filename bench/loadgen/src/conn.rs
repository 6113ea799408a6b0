//! One WebSocket client connection over tokio TCP, with `switchboard-proto` as the
//! codec ([`Role::Client`]).
//!
//! [`connect`] does the opening handshake and returns the connection split in two:
//! a [`Reader`] that decodes whole messages and a [`Writer`] that encodes masked
//! frames into a buffer and writes them in one go. A scenario can drive both halves
//! from one task (echo) or write many connections from one scheduler task while
//! each reader runs in its own (relay, fanout).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use bytes::BytesMut;
use switchboard_proto::deflate::{self, DeflateOptions, DeflateParams, PeerContext};
use switchboard_proto::handshake::{accept_key, client_key};
use switchboard_proto::message::MessageEncoder;
use switchboard_proto::{Limits, Message, MessageDecoder, Role};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpSocket;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

use crate::rng::Rng;

/// Largest handshake response accepted, in bytes.
const MAX_RESPONSE_HEAD: usize = 8 * 1024;

/// Free buffer space a read starts with. Idle connections (up to ~20k of them)
/// should cost little; a connection whose reads fill the space gets double, up to
/// [`MAX_READ_CHUNK`], so that a burst of deliveries takes few syscalls.
const MIN_READ_CHUNK: usize = 4 * 1024;
const MAX_READ_CHUNK: usize = 256 * 1024;

/// How long one handshake (TCP connect plus `101`) may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and how to connect.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The server's address.
    pub server: SocketAddr,
    /// Request path and query, e.g. `/ws?id=3`.
    pub path: &'a str,
    /// `Sec-WebSocket-Protocol` to ask for.
    pub subprotocol: Option<&'a str>,
    /// Offer permessage-deflate, and fail unless the server accepts it.
    pub deflate: bool,
    /// Speak TLS (wss://), trusting what this trusts.
    pub tls: Option<&'a Tls>,
}

/// How to speak TLS to the server: trust one CA (the bench makes its own), and
/// name the server by its IP address.
#[derive(Clone)]
pub struct Tls(TlsConnector);

impl Tls {
    /// Trusts the PEM certificates in `ca_file` only.
    pub fn trusting(ca_file: &std::path::Path) -> anyhow::Result<Self> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca_file)
            .with_context(|| format!("reading {}", ca_file.display()))?
        {
            roots.add(cert?)?;
        }
        let config = ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self(TlsConnector::from(std::sync::Arc::new(config))))
    }
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls")
    }
}

/// Either half of a plain or a TLS stream.
type ReadHalf = Box<dyn AsyncRead + Unpin>;
type WriteHalf = Box<dyn AsyncWrite + Unpin>;

/// The receiving half: socket, input buffer and decoder.
pub struct Reader {
    half: ReadHalf,
    buf: BytesMut,
    /// Free space to have before the next read.
    chunk: usize,
    decoder: MessageDecoder,
}

/// The sending half: socket, encoder (masking) and output buffer.
pub struct Writer {
    half: WriteHalf,
    encoder: MessageEncoder,
    buf: BytesMut,
}

/// Opens a TCP connection from `source` (any port) and does the opening handshake,
/// all within [`HANDSHAKE_TIMEOUT`].
///
/// Binding to one of many 127.0.0.x source addresses is how the idle and storm
/// scenarios get past the ~28k ephemeral ports of one address pair.
pub async fn connect(
    target: Target<'_>,
    source: IpAddr,
    rng: &mut Rng,
) -> anyhow::Result<(Reader, Writer)> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(target, source, rng))
        .await
        .context("handshake timed out")?
}

async fn handshake(
    target: Target<'_>,
    source: IpAddr,
    rng: &mut Rng,
) -> anyhow::Result<(Reader, Writer)> {
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket
        .bind(SocketAddr::new(source, 0))
        .with_context(|| format!("binding {source}"))?;
    let mut tcp = socket.connect(target.server).await.context("connecting")?;
    tcp.set_nodelay(true)?;
    // A plain stream is split into its owned halves, as before TLS came: no
    // lock between the reading and the writing task.
    let (read_half, write_half, (buf, deflate)): (ReadHalf, WriteHalf, _) = match target.tls {
        Some(Tls(connector)) => {
            let name = ServerName::IpAddress(target.server.ip().into());
            let mut tls = connector
                .connect(name, tcp)
                .await
                .context("TLS handshake")?;
            let upgraded = upgrade(&mut tls, target, rng).await?;
            let (read, write) = tokio::io::split(tls);
            (Box::new(read), Box::new(write), upgraded)
        }
        None => {
            let upgraded = upgrade(&mut tcp, target, rng).await?;
            let (read, write) = tcp.into_split();
            (Box::new(read), Box::new(write), upgraded)
        }
    };
    let limits = Limits {
        max_frame_size: 64 << 20,
        max_message_size: 64 << 20,
    };
    let reader = Reader {
        half: read_half,
        buf,
        chunk: MIN_READ_CHUNK,
        decoder: MessageDecoder::new(
            Role::Client,
            limits,
            // Whatever the server answered, a compressor that keeps its context
            // is read correctly by an inflater that keeps it too.
            deflate.map(|_| PeerContext::Kept),
        ),
    };
    let writer = Writer {
        half: write_half,
        encoder: MessageEncoder::new(Role::Client, deflate),
        buf: BytesMut::new(),
    };
    Ok((reader, writer))
}

/// The opening handshake over `stream`: returns whatever followed the
/// response's head (WebSocket data already) and the agreed compression.
async fn upgrade(
    stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    target: Target<'_>,
    rng: &mut Rng,
) -> anyhow::Result<(BytesMut, Option<DeflateParams>)> {
    let key = client_key(rng.bytes16());
    let mut request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n",
        target.path, target.server
    );
    if let Some(protocol) = target.subprotocol {
        request.push_str(&format!("Sec-WebSocket-Protocol: {protocol}\r\n"));
    }
    if target.deflate {
        request
            .push_str("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n");
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;
    stream.flush().await?;

    let mut buf = BytesMut::with_capacity(1024);
    let head_len = loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            break end + 4;
        }
        ensure!(
            buf.len() < MAX_RESPONSE_HEAD,
            "handshake response head too large"
        );
        if stream.read_buf(&mut buf).await? == 0 {
            bail!("connection closed during the handshake");
        }
    };
    let head = buf.split_to(head_len);
    let deflate = check_response(&head, &accept_key(key.as_bytes()))?;
    ensure!(
        deflate.is_some() == target.deflate,
        "permessage-deflate was {} but the server {}",
        if target.deflate {
            "offered"
        } else {
            "not offered"
        },
        if deflate.is_some() {
            "agreed to it"
        } else {
            "declined it"
        }
    );
    Ok((buf, deflate))
}

/// Checks the status line and `Sec-WebSocket-Accept` of a handshake response, and
/// returns the compression settings for this client's messages if the server
/// agreed to permessage-deflate.
fn check_response(head: &[u8], expected_accept: &str) -> anyhow::Result<Option<DeflateParams>> {
    let text = std::str::from_utf8(head).context("handshake response is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status = lines.next().unwrap_or_default();
    ensure!(
        status.starts_with("HTTP/1.1 101"),
        "expected 101 Switching Protocols, got {status:?}"
    );
    let headers: Vec<(&str, &str)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim(), value.trim()))
        .collect();
    let header = |wanted: &str| {
        headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(wanted))
            .map(|(_, value)| *value)
    };
    let accept = header("sec-websocket-accept");
    ensure!(
        accept == Some(expected_accept),
        "wrong Sec-WebSocket-Accept {accept:?}"
    );
    header("sec-websocket-extensions")
        .map(client_deflate)
        .transpose()
}

/// This client's compressor settings from the server's `permessage-deflate`
/// answer (RFC 7692 §7.1), read as `switchboard::client` reads it: the client
/// resets its compressor after every message, which any server accepts, and
/// keeps within `client_max_window_bits`; every message is compressed.
fn client_deflate(extensions: &str) -> anyhow::Result<DeflateParams> {
    let options = DeflateOptions {
        min_size: 0,
        ..DeflateOptions::default()
    };
    let agreed = deflate::client_accept(Some(extensions), &options)
        .with_context(|| format!("answer {extensions:?}"))?
        .context("no permessage-deflate in the answer")?;
    Ok(agreed.params)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

impl Reader {
    /// Decodes every complete message already buffered, then, if none was, reads
    /// once from the socket and decodes again. Returns `false` once the peer has
    /// closed the connection (EOF or a close frame).
    pub async fn read_batch(
        &mut self,
        mut on_message: impl FnMut(Message),
    ) -> anyhow::Result<bool> {
        if self.decode_buffered(&mut on_message)? {
            return Ok(true);
        }
        self.buf.reserve(self.chunk);
        let free = self.buf.capacity() - self.buf.len();
        let read = self.half.read_buf(&mut self.buf).await?;
        if read == 0 {
            return Ok(false);
        }
        if read == free {
            self.chunk = (self.chunk * 2).min(MAX_READ_CHUNK);
        }
        let mut closed = false;
        self.decode_buffered(&mut |message| match message {
            Message::Close(_) => closed = true,
            other => on_message(other),
        })?;
        Ok(!closed)
    }

    /// Hands buffered whole messages to `on_message`; true if there was any.
    fn decode_buffered(&mut self, on_message: &mut impl FnMut(Message)) -> anyhow::Result<bool> {
        let mut any = false;
        while let Some(message) = self.decoder.next(&mut self.buf)? {
            any = true;
            on_message(message);
        }
        Ok(any)
    }
}

impl Writer {
    /// Encodes `message` as one masked frame onto the output buffer.
    pub fn queue(&mut self, message: &Message) {
        self.encoder.encode(message, &mut self.buf);
    }

    /// Encodes a text message onto the output buffer.
    pub fn queue_text(&mut self, text: String) {
        self.queue(&Message::text(text));
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.half.write_all(&self.buf).await?;
            // A TLS stream holds the last record until flushed; TCP's flush is free.
            self.half.flush().await?;
            self.buf.clear();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_a_101_with_the_right_accept_key() {
        let head = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\
                     SEC-WEBSOCKET-ACCEPT: abc=\r\n\r\n";
        assert_eq!(check_response(head, "abc=").unwrap(), None);
        assert!(check_response(head, "xyz=").is_err());
        assert!(check_response(b"HTTP/1.1 400 Bad Request\r\n\r\n", "abc=").is_err());
    }

    #[test]
    fn reads_the_agreed_deflate_window() {
        let head = b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: a\r\n\
                     Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; \
                     client_max_window_bits=10\r\n\r\n";
        let params = check_response(head, "a").unwrap().unwrap();
        assert_eq!(params.server_max_window_bits, 10);
        assert!(
            params.server_no_context_takeover,
            "the client resets after each message"
        );
        assert_eq!(
            client_deflate("permessage-deflate")
                .unwrap()
                .server_max_window_bits,
            15
        );
        assert!(client_deflate("x-webkit-deflate-frame").is_err());
    }
}
