//! Token keys from a JWKS URL (`jwt_jwks_url`, docs/configuration.md).
//!
//! The set is fetched when the server starts, again every refresh interval,
//! and again when a token names a key id the set lacks (the issuer rotated its
//! keys), at most once per [`REFETCH_GAP`]: a stream of tokens with forged key
//! ids costs the issuer one request per gap. A fetch that fails keeps the last
//! good keys; it is logged and counted (`switchboard_jwks_fetches_total`).

use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http::{Request, Uri, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

use crate::auth::{VerifyKey, jwks_keys};
use crate::metrics::Metrics;

/// The least time between two fetches for unknown key ids.
pub const REFETCH_GAP: Duration = Duration::from_secs(10);
/// How long one fetch may take, connection included.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest key set read.
const MAX_BODY: usize = 1 << 20;
/// Until the first fetch succeeds, it is tried this often.
const FIRST_RETRY: Duration = Duration::from_secs(2);

/// Where the keys come from, and how often.
#[derive(Clone)]
pub struct JwksUrl {
    /// `http://` or `https://`.
    pub url: Uri,
    /// Fetched again this often.
    pub refresh: Duration,
    /// PEM certificates trusted for `https://` besides the web's roots.
    pub ca_file: Option<std::path::PathBuf>,
}

/// Shows the URL without its query (see [`JwksUrl::shown`]).
impl std::fmt::Debug for JwksUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksUrl")
            .field("url", &self.shown())
            .field("refresh", &self.refresh)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl JwksUrl {
    /// Checks `url` (http or https, with a host) and reads `ca_file`.
    pub fn parse(
        url: &str,
        refresh: Duration,
        ca_file: Option<std::path::PathBuf>,
    ) -> anyhow::Result<Self> {
        // Never quoted: a query may hold a token.
        let parsed: Uri = url.parse().context("jwt_jwks_url is not a URL")?;
        if !matches!(parsed.scheme_str(), Some("http" | "https")) || parsed.host().is_none() {
            bail!("jwt_jwks_url must be an http:// or https:// URL with a host");
        }
        if parsed.authority().is_some_and(|a| a.as_str().contains('@')) {
            bail!(
                "jwt_jwks_url may not carry credentials (user:password@): they would not be sent"
            );
        }
        let source = Self {
            url: parsed,
            refresh,
            ca_file,
        };
        source.tls()?;
        Ok(source)
    }

    /// The URL as logs and errors show it: without its query, which may
    /// hold a token.
    pub fn shown(&self) -> String {
        let (url, path) = (&self.url, self.url.path());
        let authority = url.authority().map_or("", |a| a.as_str());
        format!("{}://{authority}{path}", url.scheme_str().unwrap_or("http"))
    }

    fn tls(&self) -> anyhow::Result<TlsConnector> {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &self.ca_file {
            for cert in CertificateDer::pem_file_iter(path)
                .with_context(|| format!("reading jwt_jwks_ca_file {}", path.display()))?
            {
                let cert = cert.with_context(|| format!("a certificate in {}", path.display()))?;
                roots
                    .add(cert)
                    .with_context(|| format!("a certificate in {}", path.display()))?;
            }
        }
        let config = ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(TlsConnector::from(Arc::new(config)))
    }
}

/// The keys last fetched from a JWKS URL.
pub(crate) struct RemoteKeys {
    source: JwksUrl,
    tls: TlsConnector,
    keys: RwLock<Arc<[VerifyKey]>>,
    /// When the last fetch for an unknown key id began; held while it runs,
    /// so that handshakes waiting for the same new key share one fetch.
    /// Shared with the fetch's own task, which holds it (see `refetch_for`).
    refetched: Arc<Mutex<Option<Instant>>>,
}

impl RemoteKeys {
    /// No keys yet: [`RemoteKeys::start`] fetches them.
    pub(crate) fn new(source: JwksUrl) -> anyhow::Result<Self> {
        Ok(Self {
            tls: source.tls()?,
            source,
            keys: RwLock::new(Arc::from([])),
            refetched: Arc::default(),
        })
    }

    /// The keys now.
    pub(crate) fn keys(&self) -> Arc<[VerifyKey]> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether the set has a key with id `kid`.
    pub(crate) fn has(&self, kid: &str) -> bool {
        self.keys().iter().any(|k| k.kid.as_deref() == Some(kid))
    }

    /// Fetches now, and every refresh interval after, while `self` lives (on
    /// the current runtime).
    pub(crate) fn start(self: &Arc<Self>, metrics: Arc<Metrics>) {
        let keys = Arc::downgrade(self);
        tokio::spawn(refresh(keys, metrics));
    }

    /// Whether [`RemoteKeys::refetch_for`] would fetch now: none is under
    /// way and none began within [`REFETCH_GAP`]. A caller that would only
    /// wait, then give up, need not start (each such wait holds its token).
    pub(crate) fn would_refetch(&self) -> bool {
        self.refetched
            .try_lock()
            .is_ok_and(|last| !last.is_some_and(|at| at.elapsed() < REFETCH_GAP))
    }

    /// Fetches again for a key id the set lacks, unless a fetch for one began
    /// less than [`REFETCH_GAP`] ago. Whether the set now has `kid`.
    pub(crate) async fn refetch_for(self: &Arc<Self>, kid: &str, metrics: &Arc<Metrics>) -> bool {
        let mut last = self.refetched.clone().lock_owned().await;
        // Another handshake's fetch may have brought it while this one waited.
        if self.has(kid) {
            return true;
        }
        if last.is_some_and(|at| at.elapsed() < REFETCH_GAP) {
            return false;
        }
        *last = Some(Instant::now());
        // In a task of its own, which holds the lock: the handshake that
        // began it may be dropped while it waits (its client gave up), and a
        // fetch cancelled with it left the gap begun and no keys fetched, so
        // that tokens of a new key were refused until the gap passed.
        let (keys, metrics) = (self.clone(), metrics.clone());
        let fetch = tokio::spawn(async move {
            keys.fetch(&metrics).await;
            drop(last);
        });
        // A fetch that panicked left the keys as they were.
        let _ = fetch.await;
        self.has(kid)
    }

    /// Fetches the set; keeps the last good keys when that fails. Whether it worked.
    async fn fetch(&self, metrics: &Metrics) -> bool {
        let url = self.source.shown();
        match tokio::time::timeout(FETCH_TIMEOUT, self.download()).await {
            Ok(Ok(keys)) => {
                tracing::debug!(%url, keys = keys.len(), "fetched the JWKS");
                *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::from(keys);
                metrics.jwks_fetched(true);
                true
            }
            Ok(Err(error)) => {
                tracing::warn!(%url, error = format!("{error:#}"), "cannot fetch the JWKS; keeping the keys from the last fetch");
                metrics.jwks_fetched(false);
                false
            }
            Err(_) => {
                tracing::warn!(%url, "the JWKS took over {FETCH_TIMEOUT:?}; keeping the keys from the last fetch");
                metrics.jwks_fetched(false);
                false
            }
        }
    }

    async fn download(&self) -> anyhow::Result<Vec<VerifyKey>> {
        let url = &self.source.url;
        let host = url.host().context("no host")?;
        let https = url.scheme_str() == Some("https");
        let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
        let stream = TcpStream::connect((host.trim_matches(['[', ']']), port)).await?;
        let body = if https {
            let name = ServerName::try_from(host.trim_matches(['[', ']']).to_owned())?;
            get(self.tls.connect(name, stream).await?, url).await?
        } else {
            get(stream, url).await?
        };
        let text = std::str::from_utf8(&body).context("the JWKS is not UTF-8")?;
        jwks_keys(text, &self.source.shown())
    }
}

/// `GET url` over `io`, HTTP/1.1; the body of a 2xx answer.
async fn get<IO>(io: IO, url: &Uri) -> anyhow::Result<Bytes>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    let connection = tokio::spawn(connection);
    let path = url.path_and_query().map_or("/", |p| p.as_str());
    let request = Request::get(path)
        .header(header::HOST, url.authority().context("no host")?.as_str())
        .header(header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    if !response.status().is_success() {
        bail!("the issuer answered {}", response.status());
    }
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reading the JWKS: {e}"))?
        .to_bytes();
    connection.abort();
    Ok(body)
}

/// Fetches every refresh interval (every [`FIRST_RETRY`] until the first
/// fetch works), until the keys are dropped.
async fn refresh(keys: Weak<RemoteKeys>, metrics: Arc<Metrics>) {
    let mut fetched = false;
    loop {
        let Some(remote) = keys.upgrade() else { return };
        fetched |= remote.fetch(&metrics).await;
        let wait = if fetched {
            remote.source.refresh
        } else {
            FIRST_RETRY
        };
        drop(remote);
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refetch_is_wanted_only_when_none_runs_or_ran_within_the_gap() {
        let source = JwksUrl::parse("http://127.0.0.1:9/keys", REFETCH_GAP, None).unwrap();
        let keys = RemoteKeys::new(source).unwrap();
        assert!(keys.would_refetch(), "none has run");
        {
            let _fetching = keys.refetched.lock().await;
            assert!(!keys.would_refetch(), "one is under way");
        }
        *keys.refetched.lock().await = Some(Instant::now());
        assert!(!keys.would_refetch(), "one began within the gap");
        *keys.refetched.lock().await = Some(Instant::now() - REFETCH_GAP);
        assert!(keys.would_refetch(), "the gap has passed");
    }

    #[test]
    fn a_jwks_url_is_shown_without_its_query_and_never_quoted_in_errors() {
        let hour = Duration::from_secs(3600);
        let url = JwksUrl::parse("https://keys.example:8443/j.json?token=abc123", hour, None);
        assert_eq!(url.unwrap().shown(), "https://keys.example:8443/j.json");
        for bad in [
            "https://user:s3cret@keys.example/j",
            "ftp://keys.example/j?token=s3cret",
            "https://bad host/?token=s3cret",
        ] {
            let error = format!("{:#}", JwksUrl::parse(bad, hour, None).unwrap_err());
            assert!(
                error.contains("jwt_jwks_url") && !error.contains("s3cret"),
                "{error}"
            );
        }
    }
}
