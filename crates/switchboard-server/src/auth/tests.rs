//! Token checks: each way a token can be wrong, and the ways it can be right.

use std::path::PathBuf;

use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::{Value, json};

use super::*;

const SECRET: &str = "a-test-secret-that-is-32-bytes-long!";

fn keys_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/keys")
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn hs256(claims: Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn verifier(config: JwtConfig) -> JwtVerifier {
    JwtVerifier::from_config(&config)
        .unwrap()
        .expect("a key is configured")
}

fn hs256_verifier() -> JwtVerifier {
    verifier(JwtConfig {
        hs256_secret: Some(SECRET.into()),
        ..JwtConfig::default()
    })
}

#[test]
fn a_valid_hs256_token_names_its_client() {
    let identity = hs256_verifier()
        .verify(&hs256(json!({"sub": "42", "exp": now() + 60})))
        .unwrap();
    assert_eq!(&*identity.client, "42");
    assert_eq!(identity.permissions, Permissions::default());
}

#[test]
fn an_expired_token_is_refused() {
    let token = hs256(json!({"sub": "42", "exp": now() - 10}));
    assert_eq!(hs256_verifier().verify(&token), Err(TokenError::Expired));
}

#[test]
fn a_token_without_exp_is_refused() {
    let token = hs256(json!({"sub": "42"}));
    assert!(matches!(
        hs256_verifier().verify(&token),
        Err(TokenError::Malformed(_))
    ));
}

#[test]
fn a_token_not_yet_valid_is_refused() {
    let token = hs256(json!({"sub": "42", "exp": now() + 600, "nbf": now() + 300}));
    assert_eq!(
        hs256_verifier().verify(&token),
        Err(TokenError::NotYetValid)
    );
}

#[test]
fn a_wrong_signature_is_refused() {
    let token = encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "42", "exp": now() + 60}),
        &EncodingKey::from_secret(b"another-secret-that-is-32-bytes-long"),
    )
    .unwrap();
    assert_eq!(
        hs256_verifier().verify(&token),
        Err(TokenError::BadSignature)
    );
}

#[test]
fn alg_none_is_refused() {
    use base64::Engine;
    let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let token = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT"})),
        b64(json!({"sub": "42", "exp": now() + 60}))
    );
    assert!(matches!(
        hs256_verifier().verify(&token),
        Err(TokenError::Malformed(_))
    ));
}

#[test]
fn an_hs256_token_signed_with_the_rsa_public_key_is_refused() {
    // Algorithm confusion: the attacker knows the public key and uses it as an HMAC secret.
    let public_pem = std::fs::read(keys_dir().join("rsa_public.pem")).unwrap();
    let token = encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "42", "exp": now() + 60}),
        &EncodingKey::from_secret(&public_pem),
    )
    .unwrap();
    let rs256 = verifier(JwtConfig {
        public_keys: vec![keys_dir().join("rsa_public.pem")],
        ..JwtConfig::default()
    });
    assert_eq!(rs256.verify(&token), Err(TokenError::BadSignature));
}

#[test]
fn audience_and_issuer_are_checked_when_configured() {
    let strict = verifier(JwtConfig {
        hs256_secret: Some(SECRET.into()),
        audience: Some("switchboard".into()),
        issuer: Some("https://auth.example".into()),
        ..JwtConfig::default()
    });
    let good =
        json!({"sub": "1", "exp": now() + 60, "aud": "switchboard", "iss": "https://auth.example"});
    assert!(strict.verify(&hs256(good)).is_ok());
    let wrong_aud =
        json!({"sub": "1", "exp": now() + 60, "aud": "other", "iss": "https://auth.example"});
    assert_eq!(
        strict.verify(&hs256(wrong_aud)),
        Err(TokenError::WrongAudience)
    );
    let wrong_iss =
        json!({"sub": "1", "exp": now() + 60, "aud": "switchboard", "iss": "https://evil.example"});
    assert_eq!(
        strict.verify(&hs256(wrong_iss)),
        Err(TokenError::WrongIssuer)
    );
    let no_aud = json!({"sub": "1", "exp": now() + 60, "iss": "https://auth.example"});
    assert!(strict.verify(&hs256(no_aud)).is_err());
}

#[test]
fn rs256_es256_and_jwks_keys_verify_their_tokens() {
    let claims = json!({"sub": "7", "exp": now() + 60});
    let rsa_private = std::fs::read(keys_dir().join("rsa_private.pem")).unwrap();
    let ec_private = std::fs::read(keys_dir().join("ec_private.pem")).unwrap();
    let rs = encode(
        &Header::new(Algorithm::RS256),
        &claims,
        &EncodingKey::from_rsa_pem(&rsa_private).unwrap(),
    )
    .unwrap();
    let es = encode(
        &Header::new(Algorithm::ES256),
        &claims,
        &EncodingKey::from_ec_pem(&ec_private).unwrap(),
    )
    .unwrap();

    let pem = verifier(JwtConfig {
        public_keys: vec![
            keys_dir().join("rsa_public.pem"),
            keys_dir().join("ec_public.pem"),
        ],
        ..JwtConfig::default()
    });
    assert_eq!(&*pem.verify(&rs).unwrap().client, "7");
    assert_eq!(&*pem.verify(&es).unwrap().client, "7");

    let jwks = verifier(JwtConfig {
        jwks: Some(keys_dir().join("jwks.json")),
        ..JwtConfig::default()
    });
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("test-rsa-1".into());
    let with_kid = encode(
        &header,
        &claims,
        &EncodingKey::from_rsa_pem(&rsa_private).unwrap(),
    )
    .unwrap();
    assert!(jwks.verify(&with_kid).is_ok());
    header.kid = Some("unknown-kid".into());
    let unknown_kid = encode(
        &header,
        &claims,
        &EncodingKey::from_rsa_pem(&rsa_private).unwrap(),
    )
    .unwrap();
    assert_eq!(jwks.verify(&unknown_kid), Err(TokenError::BadSignature));
    // An ES256 token has no key in this JWKS.
    assert_eq!(jwks.verify(&es), Err(TokenError::BadSignature));
}

#[test]
fn keys_of_a_jwks_that_cannot_be_used_are_skipped_not_fatal() {
    let good: Value =
        serde_json::from_str(&std::fs::read_to_string(keys_dir().join("jwks.json")).unwrap())
            .unwrap();
    let good = &good["keys"][0];
    let padded = json!({"kty": "RSA", "kid": "padded", "n": "AQAB==", "e": "AQAB"});
    let others = [
        padded,
        json!({"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}),
        json!({"kty": "OKP", "crv": "X25519", "x": "hSDwCYkwp1R0i33ctD73Wg2_Og0mOBr066SpjqqbTmo"}),
        json!({"kty": "EC", "crv": "P-384", "kid": "p384",
               "x": "iA7lWQLzVrKGEFjfGMfMHfTEZ2KnLCKATkuTR4Ff26mRX_Qkm4pERx0_7vWx1qEI",
               "y": "4o2N3oXQzWWQt0hXvxXlEHBtcvUSP_CmDyhwhN1a5pXcMm3qI8JEyxGcTCAk3xSW"}),
        json!({"kty": "AKP", "alg": "ML-DSA-44", "pub": "AAAA"}),
        json!({"no": "kty"}),
    ];
    let set =
        json!({"keys": [others[0], others[1], good, others[2], others[3], others[4], others[5]]});
    let keys = jwks_keys(&set.to_string(), "test").unwrap();
    assert_eq!(keys.len(), 1, "the one usable key");
    assert_eq!(keys[0].kid.as_deref(), Some("test-rsa-1"));
    let none = json!({"keys": others});
    let Err(error) = jwks_keys(&none.to_string(), "test") else {
        panic!("no key to use");
    };
    let error = error.to_string();
    assert!(error.contains("no RSA or EC P-256 key"), "{error}");
    assert!(error.contains("keys[0]"), "{error}");
    assert!(
        error.contains("ES256 needs P-256"),
        "the P-384 key's reason: {error}"
    );
}

#[test]
fn an_ec_key_of_another_curve_does_not_stop_the_p256_key_verifying() {
    let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p384.pem");
    std::fs::write(&path, p384.public_key_pem()).unwrap();
    let ec_private = std::fs::read(keys_dir().join("ec_private.pem")).unwrap();
    let es = encode(
        &Header::new(Algorithm::ES256),
        &json!({"sub": "7", "exp": now() + 60}),
        &EncodingKey::from_ec_pem(&ec_private).unwrap(),
    )
    .unwrap();
    let both = verifier(JwtConfig {
        public_keys: vec![path, keys_dir().join("ec_public.pem")],
        ..JwtConfig::default()
    });
    assert_eq!(&*both.verify(&es).unwrap().client, "7");
}

#[test]
fn a_token_whose_exp_has_a_fraction_is_read_as_whole_seconds() {
    let exp = now() + 60;
    let token = hs256(json!({"sub": "42", "exp": exp as f64 + 0.75}));
    let identity = hs256_verifier().verify(&token).unwrap();
    assert_eq!(
        identity.expires_at,
        Some(exp + 1),
        "rounded, as the library checks it"
    );
    let token = hs256(json!({"sub": "42", "exp": exp as f64 + 0.25}));
    assert_eq!(
        hs256_verifier().verify(&token).unwrap().expires_at,
        Some(exp)
    );
    let expired = hs256(json!({"sub": "42", "exp": (now() - 10) as f64 + 0.5}));
    assert_eq!(hs256_verifier().verify(&expired), Err(TokenError::Expired));
}

#[test]
fn a_sub_that_is_not_a_valid_id_is_malformed() {
    let token = hs256(json!({"sub": "has space", "exp": now() + 60}));
    assert!(matches!(
        hs256_verifier().verify(&token),
        Err(TokenError::Malformed(_))
    ));
}

#[test]
fn claims_restrict_topics_and_targets() {
    let token = hs256(json!({
        "sub": "42", "exp": now() + 60,
        "switchboard": {"subscribe": ["chat:*", "news:eu"], "publish": ["chat:42:*"], "send": ["support", "agent-*"]}
    }));
    let p = hs256_verifier().verify(&token).unwrap().permissions;
    assert!(p.may_subscribe("chat:lobby") && p.may_subscribe("news:eu"));
    assert!(!p.may_subscribe("news:us"));
    assert!(p.may_publish("chat:42:notes") && !p.may_publish("chat:lobby"));
    assert!(p.may_send("support") && p.may_send("agent-7") && !p.may_send("ceo"));
}

#[test]
fn glob_patterns() {
    let m = |p: &str, t: &str| Pattern(p.into()).matches(t);
    assert!(m("*", "") && m("*", "anything"));
    assert!(m("a*c", "abc") && m("a*c", "ac") && m("a*b*c", "axxbyyc"));
    assert!(!m("a*c", "abd") && !m("abc", "abcd") && !m("", "x"));
}

/// `*` globbing by its definition: `*` takes any run of bytes, anything else
/// itself, tried every way (exponential, for short inputs only).
fn glob_by_definition(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|i| glob_by_definition(rest, &text[i..])),
        Some((c, rest)) => text.first() == Some(c) && glob_by_definition(rest, &text[1..]),
    }
}

proptest::proptest! {
    /// The one-backtrack matcher agrees with the definition, on the small
    /// alphabets where patterns and texts collide most.
    #[test]
    fn glob_matches_by_definition(pattern in "[ab*]{0,8}", text in "[ab]{0,10}") {
        proptest::prop_assert_eq!(
            Pattern(pattern.clone()).matches(&text),
            glob_by_definition(pattern.as_bytes(), text.as_bytes()),
            "{} against {}",
            pattern,
            text
        );
    }
}

#[test]
fn short_hs256_secrets_are_refused_at_startup() {
    let config = JwtConfig {
        hs256_secret: Some("short".into()),
        ..JwtConfig::default()
    };
    assert!(JwtVerifier::from_config(&config).is_err());
}

#[test]
fn api_keys_compare_every_key() {
    let keys = ApiKeys::new(&["old-key".into(), "new-key".into()]);
    assert!(keys.accepts("old-key") && keys.accepts("new-key"));
    assert!(!keys.accepts("new-ke") && !keys.accepts("") && !keys.accepts("new-key!"));
    assert!(!ApiKeys::default().accepts("anything"));
}

#[test]
fn the_bearer_scheme_is_case_insensitive_and_needs_credentials() {
    let header = |value: &str| {
        let mut headers = axum::http::HeaderMap::new();
        headers.insert(axum::http::header::AUTHORIZATION, value.parse().unwrap());
        headers
    };
    for (value, expected) in [
        ("Bearer abc", Some("abc")),
        ("bearer abc", Some("abc")),
        ("BEARER  abc", Some("abc")),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("Bearerabc", None),
    ] {
        assert_eq!(super::bearer(&header(value)), expected, "{value:?}");
    }
    assert_eq!(super::bearer(&axum::http::HeaderMap::new()), None);
}
