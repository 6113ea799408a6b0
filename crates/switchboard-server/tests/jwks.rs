//! Keys from a JWKS URL (`--jwt-jwks-url`) against the real binary and a local
//! issuer that the tests control: rotation (a new key id is fetched for),
//! forged key ids (rate limited), a failing issuer (the last good keys stay),
//! and https with a private CA.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

const API_KEY: &str = "jwks-test-api-key";

fn keys_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keys")
}

/// The test RSA key's set, under key id `kid`.
fn key_set(kid: &str) -> String {
    let text = std::fs::read_to_string(keys_dir().join("jwks.json")).unwrap();
    let mut set: Value = serde_json::from_str(&text).unwrap();
    set["keys"][0]["kid"] = json!(kid);
    set.to_string()
}

/// A token for `sub` signed with the test RSA key, naming key id `kid`.
fn token(sub: &str, kid: &str) -> String {
    let pem = std::fs::read(keys_dir().join("rsa_private.pem")).unwrap();
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.into());
    let claims = json!({"sub": sub, "exp": get_current_timestamp() + 60});
    encode(&header, &claims, &EncodingKey::from_rsa_pem(&pem).unwrap()).unwrap()
}

/// What the issuer answers (status and body), and how many requests it had;
/// and whether it holds back the end of its answers (see [`Issuer::stall`]).
#[derive(Clone)]
struct Issuer(
    Arc<Mutex<(u16, String, usize)>>,
    Arc<tokio::sync::watch::Sender<bool>>,
);

impl Issuer {
    fn answer(&self, status: u16, body: String) {
        let mut state = self.0.lock().unwrap();
        (state.0, state.1) = (status, body);
    }

    fn requests(&self) -> usize {
        self.0.lock().unwrap().2
    }

    /// While `stalled`, answers send their head and half their body, then
    /// wait; once released, the rest comes in two parts 200 ms apart.
    fn stall(&self, stalled: bool) {
        self.1.send_replace(stalled);
    }

    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(&self, mut stream: S) {
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        let (status, body) = {
            let mut state = self.0.lock().unwrap();
            state.2 += 1;
            (state.0, state.1.clone())
        };
        let response = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let mut stalled = self.1.subscribe();
        if *stalled.borrow_and_update() {
            let (head, rest) = response.split_at(response.len() - body.len() / 2);
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stalled.wait_for(|stalled| !stalled).await;
            let (middle, end) = rest.split_at(rest.len() / 2);
            let _ = stream.write_all(middle.as_bytes()).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _ = stream.write_all(end.as_bytes()).await;
        } else {
            let _ = stream.write_all(response.as_bytes()).await;
        }
        let _ = stream.shutdown().await;
    }
}

/// A plain-HTTP issuer on a free port.
async fn issuer(set: String) -> (Issuer, SocketAddr) {
    let issuer = Issuer(
        Arc::new(Mutex::new((200, set, 0))),
        Arc::new(tokio::sync::watch::channel(false).0),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = issuer.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let serving = serving.clone();
            tokio::spawn(async move { serving.serve(stream).await });
        }
    });
    (issuer, addr)
}

fn start(url: &str, extra: &[&str]) -> Server {
    let mut args = vec![
        "--jwt-jwks-url",
        url,
        "--jwt-leeway-secs",
        "0",
        "--api-key",
        API_KEY,
    ];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// Waits until `check` holds (polled), or fails naming `what`.
async fn until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A sample of the server's /metrics (0 when the series has not appeared).
async fn metric(server: &Server, series: &str) -> f64 {
    let request = format!(
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {API_KEY}\r\nConnection: close\r\n\r\n"
    );
    let (status, text) = raw_http(server.next_addr(), &request).await;
    assert_eq!(status, 200, "{text}");
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

async fn connects(server: &Server, token: &str) -> bool {
    server
        .connect_request(&format!("/ws?token={token}"), &[])
        .await
        .is_ok()
}

#[tokio::test]
async fn a_rotated_key_is_fetched_for_and_forged_key_ids_cannot_hammer_the_issuer() {
    let (issuer, addr) = issuer(key_set("key-1")).await;
    let server = start(&format!("http://{addr}/keys"), &[]);
    until("the first fetch", async || issuer.requests() == 1).await;
    assert!(connects(&server, &token("ann", "key-1")).await);

    // The issuer rotates: a token with the new key id is fetched for, once.
    issuer.answer(200, key_set("key-2"));
    assert!(connects(&server, &token("ann", "key-2")).await);
    assert_eq!(issuer.requests(), 2);

    // Forged key ids within the next 10 s: refused, and no more fetches.
    for i in 0..20 {
        let forged = token("mallory", &format!("forged-{i}"));
        assert_eq!(
            server
                .refused_status(&format!("/ws?token={forged}"), &[])
                .await,
            401
        );
    }
    // The retired key id is refused too (and not fetched for either).
    assert_eq!(
        server
            .refused_status(&format!("/ws?token={}", token("ann", "key-1")), &[])
            .await,
        401
    );
    assert_eq!(
        issuer.requests(),
        2,
        "forged key ids made the server fetch again"
    );
    assert_eq!(
        metric(
            &server,
            r#"switchboard_auth_failures_total{reason="unknown_key"}"#
        )
        .await,
        21.0
    );
    assert_eq!(
        metric(&server, r#"switchboard_jwks_fetches_total{result="ok"}"#).await,
        2.0
    );
}

/// Regression: the fetch for a new key id ran in the handshake that asked
/// for it, and hyper drops a handshake whose client has gone: the fetch was
/// cancelled with it, after the refetch gap had begun, so every token of the
/// new key was refused for the next 10 s (and a client doing this every 10 s
/// held off a rotation until the periodic refresh).
#[tokio::test]
async fn a_fetch_for_a_new_key_finishes_though_the_handshake_that_began_it_is_gone() {
    let (issuer, addr) = issuer(key_set("key-1")).await;
    let server = start(&format!("http://{addr}/keys"), &[]);
    until("the first fetch", async || issuer.requests() == 1).await;
    issuer.answer(200, key_set("key-2"));
    issuer.stall(true);
    let mut gone = tokio::net::TcpStream::connect(server.next_addr())
        .await
        .unwrap();
    let request = format!(
        "GET /ws?token={} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        token("gone", "key-2")
    );
    gone.write_all(request.as_bytes()).await.unwrap();
    until("the fetch for key-2", async || issuer.requests() == 2).await;
    drop(gone);
    tokio::time::sleep(Duration::from_millis(100)).await;
    issuer.stall(false);
    // Well within the refetch gap (10 s): the fetch went on, and key-2 is known.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while !connects(&server, &token("ann", "key-2")).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new key was never fetched"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(issuer.requests(), 2, "one fetch, finished");
}

#[tokio::test]
async fn a_failing_issuer_keeps_the_last_good_keys_and_is_counted() {
    let (issuer, addr) = issuer(key_set("key-1")).await;
    let server = start(
        &format!("http://{addr}/keys"),
        &["--jwt-jwks-refresh-secs", "1"],
    );
    until("the first fetch", async || issuer.requests() >= 1).await;
    issuer.answer(500, "down".into());
    until("a failed refresh", async || {
        metric(&server, r#"switchboard_jwks_fetches_total{result="error"}"#).await >= 1.0
    })
    .await;
    assert!(
        connects(&server, &token("ann", "key-1")).await,
        "the last good keys were dropped"
    );
    // Back, with a new key: the refresh brings it.
    issuer.answer(200, key_set("key-2"));
    until("the refreshed keys", async || {
        connects(&server, &token("ann", "key-2")).await
    })
    .await;
}

#[tokio::test]
async fn an_https_issuer_is_trusted_through_a_private_ca() {
    // A CA and a certificate for localhost, made here.
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let dir = std::env::temp_dir().join(format!("sb-jwks-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();

    let tls = tokio_rustls::rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            tokio_rustls::rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let issuer = Issuer(
        Arc::new(Mutex::new((200, key_set("key-1"), 0))),
        Arc::new(tokio::sync::watch::channel(false).0),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let serving = issuer.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (serving, acceptor) = (serving.clone(), acceptor.clone());
            tokio::spawn(async move {
                if let Ok(stream) = acceptor.accept(stream).await {
                    serving.serve(stream).await;
                }
            });
        }
    });

    let url = format!("https://localhost:{port}/keys");
    let trusting = start(&url, &["--jwt-jwks-ca-file", ca_file.to_str().unwrap()]);
    until("the fetch over TLS", async || {
        connects(&trusting, &token("ann", "key-1")).await
    })
    .await;
    // Without the CA the certificate is not trusted: no keys, every token refused.
    let wary = start(&url, &[]);
    until("a failed fetch", async || {
        metric(&wary, r#"switchboard_jwks_fetches_total{result="error"}"#).await >= 1.0
    })
    .await;
    assert_eq!(
        wary.refused_status(&format!("/ws?token={}", token("ann", "key-1")), &[])
            .await,
        401
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_token_a_configured_key_verifies_waits_for_no_fetch() {
    let (issuer, addr) = issuer(key_set("key-1")).await;
    let public = keys_dir().join("rsa_public.pem");
    let server = start(
        &format!("http://{addr}/keys"),
        &["--jwt-public-key", public.to_str().unwrap()],
    );
    until("the first fetch", async || issuer.requests() == 1).await;
    // Signed with the PEM key, naming a key id the set lacks (an issuer's
    // own scheme): the PEM key verifies it, so the set is not fetched again.
    assert!(connects(&server, &token("ann", "not-in-the-set")).await);
    assert_eq!(
        issuer.requests(),
        1,
        "no fetch for a token already verified"
    );
    // A token no key verifies (ES256, which neither has) still is fetched for.
    let pem = std::fs::read(keys_dir().join("ec_private.pem")).unwrap();
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("key-9".into());
    let claims = json!({"sub": "bob", "exp": get_current_timestamp() + 60});
    let es = encode(&header, &claims, &EncodingKey::from_ec_pem(&pem).unwrap()).unwrap();
    assert!(!connects(&server, &es).await);
    assert_eq!(issuer.requests(), 2);
}
