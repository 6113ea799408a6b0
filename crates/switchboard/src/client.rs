//! A WebSocket client on the same driver as the server.
//!
//! [`Connector`] holds what every connection it makes shares (options,
//! subprotocols, extra headers, TLS); [`Connector::connect`] opens a `ws://` or
//! `wss://` URL, does the handshake (RFC 6455 §4.1), and runs a [`Handler`] in
//! the client role, in a task of its own, exactly as the server runs one: the
//! same callbacks, the same [`ConnHandle`], the same limits and backpressure.
//! Client frames are masked with keys from the OS's random source.
//!
//! # Examples
//!
//! ```no_run
//! use switchboard::client::Connector;
//! use switchboard::{Context, Handler, Message, Outcome};
//!
//! struct Print;
//!
//! impl Handler for Print {
//!     type Info = ();
//!     fn handle_in(&mut self, message: Message, _ctx: &mut Context<'_, ()>) -> Outcome {
//!         println!("{message:?}");
//!         Outcome::Continue
//!     }
//! }
//!
//! # async fn run() -> Result<(), switchboard::client::ConnectError> {
//! let client = Connector::new()
//!     .protocol("switchboard.v1")
//!     .connect("ws://127.0.0.1:4000/ws?id=1", Print)
//!     .await?;
//! client.handle().push(Message::text(r#"{"targets":[2],"payload":"hi"}"#)).ok();
//! client.finished().await;
//! # Ok(())
//! # }
//! ```

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use switchboard_proto::deflate::{self, ClientAgreement};
use switchboard_proto::handshake::{accept_key, has_token, random_client_key};
use switchboard_proto::{ProtocolError, Role};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::rustls::pki_types::ServerName;

use crate::driver::{self, Setup};
use crate::handle::{ConnHandle, ConnId};
use crate::handler::Handler;
use crate::mailbox::Mailbox;
use crate::options::Options;

/// The TLS library `wss://` runs on, for building a [`Connector::tls`]
/// configuration.
pub use tokio_rustls::rustls;

/// Most bytes of a handshake response's head.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// Most header lines of a handshake response.
const MAX_RESPONSE_HEADERS: usize = 64;

/// What every connection a [`Connector`] makes shares.
#[derive(Debug, Clone)]
#[must_use]
pub struct Connector {
    options: Options,
    protocols: Vec<String>,
    headers: HeaderMap,
    tls: Option<Arc<rustls::ClientConfig>>,
    timeout: Duration,
}

impl Default for Connector {
    /// Default [`Options`] (permessage-deflate offered), no subprotocol, no
    /// extra header, no TLS configuration, and 10 s for connecting and the handshake.
    fn default() -> Self {
        Self {
            options: Options::default(),
            protocols: Vec::new(),
            headers: HeaderMap::new(),
            tls: None,
            timeout: Duration::from_secs(10),
        }
    }
}

impl Connector {
    /// A connector with the defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// The connection's options: limits, timeouts, backpressure, and whether
    /// to offer permessage-deflate (`compression`).
    pub fn options(mut self, options: Options) -> Self {
        self.options = options;
        self
    }

    /// Offers a subprotocol, after those offered before. A name that is not
    /// an RFC 6455 token (visible ASCII without separators such as `,`) fails
    /// the connect with [`ConnectError::Protocol`].
    pub fn protocol(mut self, protocol: impl Into<String>) -> Self {
        self.protocols.push(protocol.into());
        self
    }

    /// Adds a header to the handshake request (`Authorization`, `Origin`, ...).
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.append(name, value);
        self
    }

    /// The TLS configuration for `wss://` URLs: its root certificates decide
    /// which servers are trusted. Without one, `wss://` fails with
    /// [`ConnectError::TlsNotConfigured`]. Its ALPN list is replaced by
    /// `http/1.1` alone: a config shared with an HTTP client may offer `h2`,
    /// and a server that chose it could not take the upgrade.
    pub fn tls(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        let mut config = Arc::unwrap_or_clone(config);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        self.tls = Some(Arc::new(config));
        self
    }

    /// How long connecting, TLS and the handshake may take together.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Connects to `url` (`ws://` or `wss://`), and once the handshake is done
    /// runs `handler` in a task of its own; `init` runs first.
    ///
    /// # Errors
    ///
    /// A [`ConnectError`] for a URL that is not a WebSocket URL, a failed TCP
    /// connection or TLS handshake, a server that does not answer 101 or whose
    /// answer breaks RFC 6455 §4.1 (a wrong `Sec-WebSocket-Accept`, a
    /// subprotocol or extension that was not offered), or the timeout.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it completes closes the TCP connection; no
    /// handler has run yet.
    pub async fn connect<H: Handler>(
        &self,
        url: &str,
        handler: H,
    ) -> Result<Client<H::Info>, ConnectError> {
        let target = Target::parse(url)?;
        if let Some(bad) = self.protocols.iter().find(|p| !is_token(p)) {
            return Err(ConnectError::Protocol(bad.clone()));
        }
        let handshake = async {
            let mut io = self.open(&target).await?;
            let agreed = self.handshake(&mut io, &target).await?;
            Ok::<_, ConnectError>((io, agreed))
        };
        let (io, agreed) = tokio::time::timeout(self.timeout, handshake)
            .await
            .map_err(|_| ConnectError::Timeout(self.timeout))??;
        let mailbox = Arc::new(Mailbox::new(ConnId::next(), &self.options));
        let handle = ConnHandle::new(mailbox.clone());
        let setup = Setup {
            role: Role::Client,
            deflate: agreed.deflate.map(|d| d.params),
            peer_context: agreed.deflate.map(|d| d.server_context),
            protocol: agreed.protocol.clone(),
            options: self.options.clone(),
            shutdown: None,
            on_failed: None,
        };
        let task = tokio::spawn(driver::run(io, handler, mailbox, setup, agreed.early));
        Ok(Client {
            handle,
            protocol: agreed.protocol,
            compressed: agreed.deflate.is_some(),
            task,
        })
    }

    async fn open(&self, target: &Target) -> Result<Box<dyn Io>, ConnectError> {
        let tcp = TcpStream::connect((target.connect_host(), target.port))
            .await
            .map_err(ConnectError::Connect)?;
        // Frames are written whole; waiting to coalesce them only adds latency.
        tcp.set_nodelay(true).map_err(ConnectError::Connect)?;
        if !target.tls {
            return Ok(Box::new(tcp));
        }
        let config = self.tls.clone().ok_or(ConnectError::TlsNotConfigured)?;
        let name = ServerName::try_from(target.connect_host().to_owned())
            .map_err(|_| ConnectError::Url(target.url.clone(), "not a TLS server name"))?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(ConnectError::Tls)?;
        Ok(Box::new(tls))
    }

    async fn handshake(
        &self,
        io: &mut Box<dyn Io>,
        target: &Target,
    ) -> Result<Agreed, ConnectError> {
        let key = random_client_key();
        let mut request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n",
            target.path, target.host_header
        )
        .into_bytes();
        if !self.protocols.is_empty() {
            request.extend_from_slice(
                format!("Sec-WebSocket-Protocol: {}\r\n", self.protocols.join(", ")).as_bytes(),
            );
        }
        if self.options.compression.is_some() {
            request.extend_from_slice(
                format!("Sec-WebSocket-Extensions: {}\r\n", deflate::client_offer()).as_bytes(),
            );
        }
        for (name, value) in &self.headers {
            request.extend_from_slice(name.as_str().as_bytes());
            request.extend_from_slice(b": ");
            request.extend_from_slice(value.as_bytes());
            request.extend_from_slice(b"\r\n");
        }
        request.extend_from_slice(b"\r\n");
        io.write_all(&request)
            .await
            .map_err(ConnectError::Connect)?;
        io.flush().await.map_err(ConnectError::Connect)?;

        let mut buf = BytesMut::with_capacity(1024);
        let response = loop {
            // httparse takes bare LF line ends too (RFC 9112 §2.2).
            if let Some((response, head_len)) = Response::parse(&buf)? {
                buf.advance(head_len);
                break response;
            }
            if buf.len() >= MAX_RESPONSE_HEAD {
                return Err(ConnectError::Handshake("response head over 16 KiB".into()));
            }
            if io.read_buf(&mut buf).await.map_err(ConnectError::Connect)? == 0 {
                return Err(ConnectError::Handshake(
                    "the server closed the connection during the handshake".into(),
                ));
            }
        };
        if response.status != 101 {
            return Err(ConnectError::Status(response.status));
        }
        let header = |name: &str| response.header(name);
        // "websocket" itself, not a list that holds it (RFC 6455 §4.1).
        if !header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")) {
            return Err(ConnectError::Handshake("no `Upgrade: websocket`".into()));
        }
        if !header("connection").is_some_and(|v| has_token(&v, "upgrade")) {
            return Err(ConnectError::Handshake("no `Connection: upgrade`".into()));
        }
        if header("sec-websocket-accept").as_deref() != Some(accept_key(key.as_bytes()).as_str()) {
            return Err(ConnectError::Handshake("wrong Sec-WebSocket-Accept".into()));
        }
        let protocol = header("sec-websocket-protocol");
        if let Some(chosen) = &protocol
            && !self.protocols.iter().any(|p| p == chosen)
        {
            return Err(ConnectError::Handshake(format!(
                "the server chose subprotocol {chosen:?}, which was not offered"
            )));
        }
        let extensions = header("sec-websocket-extensions");
        let deflate = match (&self.options.compression, extensions.as_deref()) {
            (_, None) => None,
            (None, Some(other)) => {
                return Err(ConnectError::Handshake(format!(
                    "the server agreed to extension {other:?}, which was not offered"
                )));
            }
            (Some(options), answer) => deflate::client_accept(answer, options).map_err(|e| {
                ConnectError::Handshake(format!("{e}: {:?}", answer.unwrap_or_default()))
            })?,
        };
        Ok(Agreed {
            protocol,
            deflate,
            early: buf.freeze(),
        })
    }
}

/// What the handshake settled.
struct Agreed {
    protocol: Option<String>,
    deflate: Option<ClientAgreement>,
    /// Frames the server sent right behind its response.
    early: bytes::Bytes,
}

/// A byte stream the client runs over: TCP, or TLS over TCP.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A connected client: the connection's handle, and its task.
#[derive(Debug)]
pub struct Client<I> {
    handle: ConnHandle<I>,
    protocol: Option<String>,
    compressed: bool,
    task: JoinHandle<()>,
}

impl<I: Send + 'static> Client<I> {
    /// The connection's handle: send it infos, push frames, close it.
    pub fn handle(&self) -> &ConnHandle<I> {
        &self.handle
    }

    /// The subprotocol the server chose, if any.
    pub fn protocol(&self) -> Option<&str> {
        self.protocol.as_deref()
    }

    /// Whether permessage-deflate was agreed.
    pub fn compressed(&self) -> bool {
        self.compressed
    }

    /// Waits until the connection has ended and `terminate` has run.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future leaves the connection running (it
    /// goes on in its own task).
    pub async fn finished(self) {
        // The task ends only by finishing: a handler's panic is caught inside it.
        let _ = self.task.await;
    }
}

/// Why a client could not connect.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// Not a `ws://` or `wss://` URL with a host.
    #[error("invalid WebSocket URL {0:?}: {1}")]
    Url(String, &'static str),
    /// The TCP connection failed, or broke during the handshake.
    #[error("connection failed: {0}")]
    Connect(#[source] std::io::Error),
    /// The TLS handshake failed (an untrusted certificate, for one).
    #[error("TLS handshake failed: {0}")]
    Tls(#[source] std::io::Error),
    /// A `wss://` URL without [`Connector::tls`].
    #[error("wss:// needs a TLS configuration (Connector::tls)")]
    TlsNotConfigured,
    /// The server answered with this HTTP status instead of 101.
    #[error("the server answered HTTP {0}, not 101 Switching Protocols")]
    Status(u16),
    /// The server's 101 answer breaks RFC 6455 §4.1 or RFC 7692.
    #[error("invalid handshake response (RFC6455§4.1): {0}")]
    Handshake(String),
    /// Connecting and the handshake took longer than [`Connector::timeout`].
    #[error("no handshake within {0:?}")]
    Timeout(Duration),
    /// A subprotocol name that is not an RFC 6455 token.
    #[error("invalid subprotocol {0:?}: visible ASCII without separators (RFC 6455 §4.1)")]
    Protocol(String),
}

/// Whether `name` is an RFC 7230 token, as RFC 6455 asks of subprotocols.
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
}

impl From<ProtocolError> for ConnectError {
    fn from(error: ProtocolError) -> Self {
        Self::Handshake(error.to_string())
    }
}

/// Where a URL points.
struct Target {
    url: String,
    tls: bool,
    host: String,
    port: u16,
    host_header: String,
    path: String,
}

impl Target {
    fn parse(url: &str) -> Result<Self, ConnectError> {
        let bad = |why| ConnectError::Url(url.to_owned(), why);
        // RFC 6455 §3: a WebSocket URI has no fragment, and one with `#` is
        // refused rather than cut (§4.1).
        if url.contains('#') {
            return Err(bad("a fragment (#) is not allowed"));
        }
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        // Schemes are case-insensitive (RFC 3986 §3.1).
        let tls = match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
            Some("ws") => false,
            Some("wss") => true,
            _ => return Err(bad("the scheme must be ws or wss")),
        };
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("user information is not allowed"));
        }
        let host = authority.host().to_owned();
        if host.is_empty() {
            return Err(bad("no host"));
        }
        // Read here: `http` gives no port for one out of range, which would
        // then connect to the default port.
        let written = authority.as_str().strip_prefix(authority.host());
        // An empty port is the scheme's (RFC 3986 §3.2.3); a port is digits.
        let port = match written.and_then(|rest| rest.strip_prefix(':')) {
            None | Some("") if tls => 443,
            None | Some("") => 80,
            Some(port) if port.bytes().all(|b| b.is_ascii_digit()) => match port.parse::<u16>() {
                Ok(port) if port > 0 => port,
                _ => return Err(bad("the port must be 1 to 65535")),
            },
            Some(_) => return Err(bad("the port must be 1 to 65535")),
        };
        // `ws://host?x=1` has a query and no path: the request line needs `/`.
        let path = match uri.path_and_query().map(|p| p.as_str()) {
            Some(path) if path.starts_with('/') => path.to_owned(),
            Some(query) => format!("/{query}"),
            None => "/".to_owned(),
        };
        Ok(Self {
            url: url.to_owned(),
            tls,
            host_header: authority.as_str().to_owned(),
            path,
            host,
            port,
        })
    }

    /// The host without the brackets of an IPv6 literal.
    fn connect_host(&self) -> &str {
        self.host.trim_start_matches('[').trim_end_matches(']')
    }
}

/// A parsed handshake response head.
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
}

impl Response {
    /// The response whose head starts `bytes`, and the head's length; `None`
    /// while the head is not all there.
    fn parse(bytes: &[u8]) -> Result<Option<(Self, usize)>, ConnectError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        let head_len = match response.parse(bytes) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(ConnectError::Handshake(format!("bad response head: {e}"))),
        };
        let status = response.code.unwrap_or_default();
        // An upgrade is HTTP/1.1's (RFC 6455 §4.1); another status keeps its
        // meaning whatever the version (a proxy's HTTP/1.0 403).
        if status == 101 && response.version != Some(1) {
            return Err(ConnectError::Handshake("not an HTTP/1.1 response".into()));
        }
        let headers = response
            .headers
            .iter()
            .map(|h| {
                let value = String::from_utf8_lossy(h.value).trim().to_owned();
                (h.name.to_ascii_lowercase(), value)
            })
            .collect();
        Ok(Some((Self { status, headers }, head_len)))
    }

    /// Every value of the header `name` (lowercase), joined as one list.
    fn header(&self, name: &str) -> Option<String> {
        let values: Vec<&str> = self
            .headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect();
        (!values.is_empty()).then(|| values.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_give_the_request_line_host_and_port_or_a_reason() {
        let target = Target::parse("ws://127.0.0.1:4000?token=abc").unwrap();
        assert_eq!((target.path.as_str(), target.port), ("/?token=abc", 4000));
        let target = Target::parse("WSS://Example.com/ws?id=1").unwrap();
        assert!(target.tls);
        assert_eq!((target.path.as_str(), target.port), ("/ws?id=1", 443));
        let target = Target::parse("ws://[::1]/").unwrap();
        assert_eq!(
            (target.connect_host(), target.port, target.path.as_str()),
            ("::1", 80, "/")
        );
        assert_eq!(Target::parse("ws://h").unwrap().path, "/");
        assert_eq!(Target::parse("ws://127.0.0.1:/x").unwrap().port, 80);
        for (url, reason) in [
            ("ws://h/p?q=1#frag", "fragment"),
            ("ws://:4000/x", "host"),
            ("ws://example.com:+80/", "port"),
            ("ws://example.com:65536/ws", "port"),
            ("wss://example.com:8443x/", "port"),
            ("ws://example.com:0/", "port"),
            ("http://example.com/", "scheme"),
            ("ws://user@example.com/", "user"),
        ] {
            let Err(ConnectError::Url(_, why)) = Target::parse(url) else {
                panic!("{url} was taken");
            };
            assert!(why.contains(reason), "{url}: {why}");
        }
    }

    #[test]
    fn a_tls_config_offers_http_1_1_alone() {
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let connector = Connector::new().tls(Arc::new(config));
        let alpn = &connector.tls.as_ref().unwrap().alpn_protocols;
        assert_eq!(alpn, &[b"http/1.1".to_vec()]);
    }

    #[test]
    fn subprotocols_must_be_tokens() {
        assert!(is_token("switchboard.v1") && is_token("bearer.abc-_~!"));
        for bad in ["", "a, b", "chat\r\nX-Injected: 1", "a b", "é"] {
            assert!(!is_token(bad), "{bad:?}");
        }
    }
}
