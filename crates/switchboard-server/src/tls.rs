//! TLS for the client and API listeners: a certificate and key read from PEM
//! files, swapped on SIGHUP while live connections keep the session they
//! have (docs/operations.md, "TLS").

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use anyhow::{Context as _, bail};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, InconsistentKeys, ServerConfig, crypto::CryptoProvider};

use crate::metrics::Metrics;

/// The certificate every TLS handshake is answered with, and where it is read from.
pub struct Certificate {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl Certificate {
    /// Reads the chain (leaf first) from `cert_file` and its private key
    /// (PKCS#8, PKCS#1 or SEC1) from `key_file`, and checks that they match.
    pub fn load(cert_file: PathBuf, key_file: PathBuf) -> anyhow::Result<Arc<Self>> {
        let current = read(&cert_file, &key_file)?;
        Ok(Arc::new(Self {
            cert_file,
            key_file,
            current: RwLock::new(Arc::new(current)),
        }))
    }

    /// Reads the files again. New handshakes get the new certificate; a
    /// connection keeps the session it made. On an error the old one stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let fresh = read(&self.cert_file, &self.key_file)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(fresh);
        Ok(())
    }

    /// An acceptor that answers with whatever certificate is current, for
    /// HTTP/1.1 (the only protocol served; WebSocket upgrades need it).
    pub fn acceptor(self: &Arc<Self>) -> TlsAcceptor {
        let mut config = ServerConfig::builder()
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        TlsAcceptor::from(Arc::new(config))
    }

    /// Reloads on every SIGHUP until the process ends, logging and counting
    /// each attempt.
    pub fn reload_on_sighup(self: Arc<Self>, metrics: Arc<Metrics>) -> std::io::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = signal(SignalKind::hangup())?;
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                match self.reload() {
                    Ok(()) => {
                        metrics.tls_reloaded(true);
                        tracing::info!(
                            cert = %self.cert_file.display(),
                            "TLS certificate reloaded; new connections use it"
                        );
                    }
                    Err(error) => {
                        metrics.tls_reloaded(false);
                        tracing::error!(
                            error = format!("{error:#}"),
                            "TLS certificate not reloaded; the last good one stays"
                        );
                    }
                }
            }
        });
        Ok(())
    }
}

impl fmt::Debug for Certificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificate")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}

/// The process's crypto provider: the one built in (ring; see the
/// workspace's Cargo.toml), installed by the first builder that asks.
fn provider() -> Arc<CryptoProvider> {
    ServerConfig::builder().crypto_provider().clone()
}

fn read(cert_file: &Path, key_file: &Path) -> anyhow::Result<CertifiedKey> {
    let chain = CertificateDer::pem_file_iter(cert_file)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .with_context(|| format!("reading tls_cert {}", cert_file.display()))?;
    if chain.is_empty() {
        bail!("tls_cert {} holds no PEM certificate", cert_file.display());
    }
    let key = PrivateKeyDer::from_pem_file(key_file).with_context(|| {
        format!(
            "reading tls_key {} (a PEM private key, not encrypted)",
            key_file.display()
        )
    })?;
    // Three steps, each with its own message: one step said "does not fit"
    // for a key of a kind it cannot use and for a certificate it cannot read.
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .with_context(|| {
            format!(
                "tls_key {}: a key this server cannot use (it takes RSA of 2048 bits or \
                 more, ECDSA P-256 or P-384, and Ed25519)",
                key_file.display()
            )
        })?;
    let key = CertifiedKey::new(chain, signing);
    match key.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => Ok(key),
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => bail!(
            "tls_key {} does not fit tls_cert {}",
            key_file.display(),
            cert_file.display()
        ),
        Err(error) => Err(error).with_context(|| {
            format!(
                "tls_cert {}: its first certificate cannot be read",
                cert_file.display()
            )
        }),
    }
}
