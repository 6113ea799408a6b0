//! Authentication: JWTs for clients, API keys for backends.
//!
//! A client's token (HS256 with a shared secret, or RS256/ES256 with public keys
//! from PEM files or a JWKS file) names the client in `sub`; `exp`, `nbf`, `aud`
//! and `iss` are checked when configured. A `switchboard` claim may restrict what
//! the client may do:
//!
//! ```json
//! {"sub": "42", "exp": 1767225600,
//!  "switchboard": {"subscribe": ["chat:*"], "publish": ["chat:42:*"], "send": ["support"]}}
//! ```
//!
//! Each list holds patterns where `*` matches any run of characters; a missing
//! list allows everything. Tokens are never logged.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::Deserialize;
use subtle::ConstantTimeEq;
use switchboard::ClientId;

use crate::ids;
use crate::jwks::{JwksUrl, RemoteKeys};
use crate::metrics::Metrics;
use crate::topics::CLIENT_EVENTS;

/// A `*` glob over topic names or client ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    /// Whether `text` matches.
    pub fn matches(&self, text: &str) -> bool {
        glob(self.0.as_bytes(), text.as_bytes())
    }
}

fn glob(pattern: &[u8], text: &[u8]) -> bool {
    // Iterative wildcard matching with one backtrack point: linear in practice.
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|b| *b == b'*')
}

/// What a token allows. One pointer, null for a token without the
/// `switchboard` claim (most of them): every connection keeps its permissions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions(Option<Box<Lists>>);

/// The claim's lists; `None` lists allow everything.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Lists {
    subscribe: Option<Vec<Pattern>>,
    publish: Option<Vec<Pattern>>,
    send: Option<Vec<Pattern>>,
}

impl Permissions {
    /// Whether `name` is allowed by the list `pick` takes from the claim.
    fn allows(&self, pick: impl Fn(&Lists) -> &Option<Vec<Pattern>>, name: &str) -> bool {
        self.0
            .as_deref()
            .and_then(|lists| pick(lists).as_ref())
            .is_none_or(|patterns| patterns.iter().any(|p| p.matches(name)))
    }

    /// May the client subscribe to `topic`? The client events
    /// ([`CLIENT_EVENTS`]) tell every id's status, so they need `send` to
    /// allow every id as well, as a `status` of every id would.
    pub fn may_subscribe(&self, topic: &str) -> bool {
        self.allows(|lists| &lists.subscribe, topic)
            && (topic != CLIENT_EVENTS || self.may_send_to_anyone())
    }

    /// May the client publish to `topic`?
    pub fn may_publish(&self, topic: &str) -> bool {
        self.allows(|lists| &lists.publish, topic)
    }

    /// May the client send to `target`?
    pub fn may_send(&self, target: &str) -> bool {
        self.allows(|lists| &lists.send, target)
    }

    /// May the client send to every id (no `send` list, or a `*` in it)?
    /// No id holds a `*`, so only a pattern of stars alone matches the text.
    fn may_send_to_anyone(&self) -> bool {
        self.allows(|lists| &lists.send, "*")
    }
}

/// Who a verified token says the client is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The `sub` claim.
    pub client: ClientId,
    /// The `exp` claim, in seconds since the epoch.
    pub expires_at: Option<u64>,
    /// The `switchboard` claim.
    pub permissions: Permissions,
}

/// Why a token was refused. The messages never contain the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No token where one is required.
    #[error(
        "a token is required: send Authorization: Bearer <jwt>, ?token=<jwt>, or subprotocol bearer.<jwt>"
    )]
    Missing,
    /// `exp` has passed.
    #[error("the token has expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("the token is not valid yet")]
    NotYetValid,
    /// The signature does not verify, or the algorithm is not one the key allows.
    #[error("the token's signature or algorithm is not accepted")]
    BadSignature,
    /// `aud` is not the configured audience.
    #[error("the token is for another audience")]
    WrongAudience,
    /// `iss` is not the configured issuer.
    #[error("the token is from another issuer")]
    WrongIssuer,
    /// Not a JWT, or its claims are malformed (including a `sub` that is not a valid id).
    #[error("malformed token: {0}")]
    Malformed(String),
    /// Its `kid` names no key of the JWKS URL's set, even fetched again.
    #[error("the token's key id is not one of the issuer's keys")]
    UnknownKey,
}

impl TokenError {
    /// A short word for the reason, as metrics label it.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::BadSignature => "bad_signature",
            Self::WrongAudience => "wrong_audience",
            Self::WrongIssuer => "wrong_issuer",
            Self::Malformed(_) => "malformed",
            Self::UnknownKey => "unknown_key",
        }
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    /// RFC 7519 dates may have a fraction (`Date.now() / 1000 + 3600`).
    #[serde(default, deserialize_with = "whole_seconds")]
    exp: Option<u64>,
    #[serde(default)]
    switchboard: Option<PermissionClaims>,
}

/// A NumericDate as whole seconds, rounded as the JWT library rounds it when
/// it checks the token: the connection's expiry is the one it checked.
fn whole_seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let Some(number) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    let whole = number.as_u64().or_else(|| {
        let float = number.as_f64()?;
        // Saturating: a date past u64 is as good as never.
        (float >= 0.0).then(|| float.round() as u64)
    });
    whole
        .map(Some)
        .ok_or_else(|| serde::de::Error::custom(format_args!("exp {number} is not a date")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PermissionClaims {
    #[serde(default)]
    subscribe: Option<Vec<String>>,
    #[serde(default)]
    publish: Option<Vec<String>>,
    #[serde(default)]
    send: Option<Vec<String>>,
}

/// One key a token may be signed with.
pub(crate) struct VerifyKey {
    pub(crate) kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

/// What the JWT verifier is built from.
#[derive(Clone, Default)]
pub struct JwtConfig {
    /// The HS256 shared secret.
    pub hs256_secret: Option<String>,
    /// PEM files with RSA (RS256) or EC P-256 (ES256) public keys.
    pub public_keys: Vec<std::path::PathBuf>,
    /// A JWKS file.
    pub jwks: Option<std::path::PathBuf>,
    /// A JWKS URL, fetched and refetched.
    pub jwks_url: Option<JwksUrl>,
    /// Required `aud`, if any.
    pub audience: Option<String>,
    /// Required `iss`, if any.
    pub issuer: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
}

impl std::fmt::Debug for JwtConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtConfig")
            .field(
                "hs256_secret",
                &self.hs256_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("public_keys", &self.public_keys)
            .field("jwks", &self.jwks)
            .field("jwks_url", &self.jwks_url)
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .field("leeway_secs", &self.leeway_secs)
            .finish()
    }
}

/// Verifies client tokens.
pub struct JwtVerifier {
    keys: Vec<VerifyKey>,
    /// Keys from a JWKS URL, as last fetched.
    remote: Option<Arc<RemoteKeys>>,
    audience: Option<String>,
    issuer: Option<String>,
    leeway_secs: u64,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    /// A verifier for `config`, or `None` when no key is configured.
    pub fn from_config(config: &JwtConfig) -> anyhow::Result<Option<Self>> {
        let mut keys = Vec::new();
        if let Some(secret) = &config.hs256_secret {
            if secret.len() < 32 {
                bail!(
                    "the HS256 secret is {} bytes, and must be at least 32 (RFC 7518 §3.2): give a \
                     longer --jwt-hs256-secret, for example the output of `openssl rand -hex 32`",
                    secret.len()
                );
            }
            keys.push(VerifyKey {
                kid: None,
                algorithm: Algorithm::HS256,
                key: DecodingKey::from_secret(secret.as_bytes()),
            });
        }
        for path in &config.public_keys {
            keys.push(pem_key(path)?);
        }
        if let Some(path) = &config.jwks {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading JWKS {}", path.display()))?;
            keys.extend(jwks_keys(&text, &path.display().to_string())?);
        }
        let remote = match &config.jwks_url {
            Some(url) => Some(Arc::new(RemoteKeys::new(url.clone())?)),
            None => None,
        };
        if keys.is_empty() && remote.is_none() {
            return Ok(None);
        }
        Ok(Some(Self {
            keys,
            remote,
            audience: config.audience.clone(),
            issuer: config.issuer.clone(),
            leeway_secs: config.leeway_secs,
        }))
    }

    /// The clock skew allowed on `exp` and `nbf`, in seconds.
    pub fn leeway_secs(&self) -> u64 {
        self.leeway_secs
    }

    /// Starts fetching the keys of a JWKS URL, if there is one (on the
    /// current runtime).
    pub fn start(&self, metrics: Arc<Metrics>) {
        if let Some(remote) = &self.remote {
            remote.start(metrics);
        }
    }

    /// Whether a token with an unknown key id would make the keys be
    /// fetched again now: no fetch is under way, and none began within
    /// `jwks::REFETCH_GAP`.
    pub fn would_refetch(&self) -> bool {
        self.remote.as_ref().is_some_and(|r| r.would_refetch())
    }

    /// Checks `token` as [`JwtVerifier::verify`] does, and when no key it has
    /// verifies it and it names a key id the JWKS URL's keys lack, again
    /// after fetching them (at most once per [`crate::jwks::REFETCH_GAP`]).
    /// A token a configured key verifies waits for no fetch.
    pub async fn verify_fresh(
        &self,
        token: &str,
        metrics: &Arc<Metrics>,
    ) -> Result<Identity, TokenError> {
        let verified = self.verify(token);
        if let Err(TokenError::UnknownKey | TokenError::BadSignature) = verified
            && let (Some(remote), Ok(header)) = (&self.remote, decode_header(token))
            && let Some(kid) = &header.kid
            && !remote.has(kid)
        {
            remote.refetch_for(kid, metrics).await;
            return self.verify(token);
        }
        verified
    }

    /// Checks `token` and returns who it names.
    pub fn verify(&self, token: &str) -> Result<Identity, TokenError> {
        let header = decode_header(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
        let remote = self.remote.as_ref().map(|r| r.keys());
        let keys = self.keys.iter().chain(remote.iter().flat_map(|k| k.iter()));
        let mut candidates = keys
            .filter(|k| {
                k.algorithm == header.alg
                    && (header.kid.is_none() || k.kid.is_none() || k.kid == header.kid)
            })
            .peekable();
        if header.kid.is_some() && self.remote.is_some() && candidates.peek().is_none() {
            return Err(TokenError::UnknownKey);
        }
        let mut last = TokenError::BadSignature;
        for key in candidates {
            match decode::<Claims>(token, &key.key, &self.validation(key.algorithm)) {
                Ok(data) => return identity(data.claims),
                // A key that cannot verify this algorithm (an EC key of
                // another curve) is not the one: the next may be.
                Err(e) if is_unusable_key(&e) => continue,
                Err(e) => last = token_error(e),
            }
            if last != TokenError::BadSignature {
                break;
            }
        }
        Err(last)
    }

    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut validation = Validation::new(algorithm);
        validation.leeway = self.leeway_secs;
        validation.validate_nbf = true;
        // Every token must expire: one without `exp` would be valid forever.
        validation.set_required_spec_claims(&["sub", "exp"]);
        validation.validate_aud = self.audience.is_some();
        if let Some(audience) = &self.audience {
            validation.set_audience(&[audience]);
            validation.required_spec_claims.insert("aud".into());
        }
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
            validation.required_spec_claims.insert("iss".into());
        }
        validation
    }
}

fn identity(claims: Claims) -> Result<Identity, TokenError> {
    let client = ids::parse(&claims.sub).map_err(|e| TokenError::Malformed(format!("sub: {e}")))?;
    let patterns = |list: Option<Vec<String>>| list.map(|l| l.into_iter().map(Pattern).collect());
    let permissions = Permissions(claims.switchboard.map(|p| {
        Box::new(Lists {
            subscribe: patterns(p.subscribe),
            publish: patterns(p.publish),
            send: patterns(p.send),
        })
    }));
    Ok(Identity {
        client,
        expires_at: claims.exp,
        permissions,
    })
}

fn is_unusable_key(error: &jsonwebtoken::errors::Error) -> bool {
    use jsonwebtoken::errors::ErrorKind;
    matches!(
        error.kind(),
        ErrorKind::InvalidEcdsaKey | ErrorKind::InvalidRsaKey(_) | ErrorKind::InvalidKeyFormat
    )
}

fn token_error(error: jsonwebtoken::errors::Error) -> TokenError {
    use jsonwebtoken::errors::ErrorKind;
    match error.kind() {
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        ErrorKind::InvalidAudience => TokenError::WrongAudience,
        ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
        ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm => TokenError::BadSignature,
        _ => TokenError::Malformed(error.to_string()),
    }
}

fn pem_key(path: &Path) -> anyhow::Result<VerifyKey> {
    let pem =
        std::fs::read(path).with_context(|| format!("reading public key {}", path.display()))?;
    let (algorithm, key) = match DecodingKey::from_rsa_pem(&pem) {
        Ok(key) => (Algorithm::RS256, key),
        Err(_) => (
            Algorithm::ES256,
            DecodingKey::from_ec_pem(&pem).with_context(|| {
                format!(
                    "{} is neither an RSA nor an EC P-256 public key in PEM",
                    path.display()
                )
            })?,
        ),
    };
    Ok(VerifyKey {
        kid: None,
        algorithm,
        key,
    })
}

/// The RSA and EC P-256 keys of a JWKS document (`text`, from `source`).
/// A key this server cannot use (another type or curve, a malformed one) is
/// skipped with a warning: issuers publish sets with keys for other
/// verifiers, and one of them must not make the whole set unusable.
pub(crate) fn jwks_keys(text: &str, source: &str) -> anyhow::Result<Vec<VerifyKey>> {
    /// The set with each key left unparsed, to be read one by one.
    #[derive(Deserialize)]
    struct Set {
        keys: Vec<Box<serde_json::value::RawValue>>,
    }
    let set: Set = serde_json::from_str(text).with_context(|| format!("parsing JWKS {source}"))?;
    let mut keys = Vec::new();
    let mut skipped = Vec::new();
    for (i, raw) in set.keys.iter().enumerate() {
        match jwk_key(raw.get()) {
            Ok(key) => keys.push(key),
            Err(reason) => skipped.push(format!("keys[{i}]: {reason}")),
        }
    }
    if keys.is_empty() {
        bail!(
            "{source} holds no RSA or EC P-256 key this server can use{}",
            if skipped.is_empty() {
                String::new()
            } else {
                format!(" ({})", skipped.join("; "))
            }
        );
    }
    if !skipped.is_empty() {
        tracing::warn!(
            source,
            skipped = skipped.join("; "),
            "keys of the JWKS skipped"
        );
    }
    Ok(keys)
}

/// One JWK as a key, or why it cannot be used.
fn jwk_key(text: &str) -> Result<VerifyKey, String> {
    let jwk: Jwk = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let algorithm = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
            Algorithm::ES256
        }
        AlgorithmParameters::EllipticCurve(ec) => {
            return Err(format!("curve {:?}: ES256 needs P-256", ec.curve));
        }
        _ => return Err("not an RSA or EC key".into()),
    };
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| e.to_string())?;
    Ok(VerifyKey {
        kid: jwk.common.key_id.clone(),
        algorithm,
        key,
    })
}

/// The API keys backends present as `Authorization: Bearer <key>`.
#[derive(Clone, Default)]
pub struct ApiKeys(Vec<Vec<u8>>);

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.0.len())
    }
}

impl ApiKeys {
    /// These keys; several allow rotation.
    pub fn new(keys: &[String]) -> Self {
        Self(
            keys.iter()
                .filter(|k| !k.is_empty())
                .map(|k| k.as_bytes().to_vec())
                .collect(),
        )
    }

    /// Whether any key is configured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `presented` is one of the keys. Every key is compared, each in
    /// constant time, so timing reveals neither which key matched nor how much.
    pub fn accepts(&self, presented: &str) -> bool {
        self.0.iter().fold(false, |found, key| {
            found | bool::from(key.as_slice().ct_eq(presented.as_bytes()))
        })
    }
}

/// The credentials of an `Authorization: Bearer <credentials>` header. The
/// scheme name is case-insensitive and may be followed by more than one space
/// (RFC 7235 §2.1), as clients send it either way.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, credentials) = value.split_once(' ')?;
    let credentials = credentials.trim_start_matches(' ');
    (scheme.eq_ignore_ascii_case("bearer") && !credentials.is_empty()).then_some(credentials)
}

#[cfg(test)]
mod tests;
