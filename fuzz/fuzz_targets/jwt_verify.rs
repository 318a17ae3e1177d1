//! The gateway's JWT verification (the `JwtVerifier` over a policy with two static keys:
//! `rsa` for RS256, `hs` for HS256) on arbitrary tokens and on tokens built to attack it: any
//! `alg` (`none`, a confused RS256/HS256, unknown ones), any `kid`, arbitrary claims, signed
//! by the right key, the wrong key, the RSA public key used as an HMAC secret, or not at all,
//! then tampered with.
//!
//! Properties: never panics; a token it accepts carries a header naming RS256 or HS256 whose
//! signature checks, independently, with that algorithm's configured key over the exact
//! header and payload bytes; its `iss` is the configured issuer, its `aud` includes the
//! configured audience and it has not expired. So no unsigned, forged or re-targeted token
//! gets through.
#![no_main]

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use arbitrary::Arbitrary;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::crypto;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};
use trellis_gateway::Config;
use trellis_gateway::bench::JwtVerifier;

const RSA_PUBLIC: &str = include_str!("../../crates/gateway/tests/it/keys/rsa_public.pem");
const RSA_PRIVATE: &str = include_str!("../../crates/gateway/tests/it/keys/rsa_private.pem");
const SECRET: &str = "0123456789abcdef0123456789abcdef-fuzz";
const ISSUER: &str = "trellis-users";
const AUDIENCE: &str = "trellis-shop";

struct Fixture {
    runtime: tokio::runtime::Runtime,
    verifier: JwtVerifier,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let text = format!(
            r#"
[clusters.app]
endpoints = ["127.0.0.1:1"]

[auth.users]
type = "jwt"
issuers = ["{ISSUER}"]
audiences = ["{AUDIENCE}"]
keys = [
  {{ kid = "rsa", alg = "RS256", pem = """{RSA_PUBLIC}""" }},
  {{ kid = "hs", alg = "HS256", secret = "{SECRET}" }},
]

[[routes]]
name = "api"
cluster = "app"
path_prefix = "/api"
auth = ["users"]
"#
        );
        let config = Config::from_toml(&text).expect("the fuzz configuration is valid");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let verifier = runtime
            .block_on(JwtVerifier::from_config(&config, "users"))
            .expect("the JWT policy builds");
        Fixture { runtime, verifier }
    })
}

#[derive(Debug, Arbitrary)]
enum Alg {
    Rs256,
    Hs256,
    None,
    NoneUpper,
    Es256,
    EdDsa,
    Missing,
    Other(String),
}

#[derive(Debug, Arbitrary)]
enum Kid {
    Rsa,
    Hs,
    Missing,
    Other(String),
}

#[derive(Debug, Arbitrary)]
enum Signer {
    Rsa,
    Hs,
    /// The classic confusion: the RSA public key as an HMAC secret.
    RsaPublicAsHmac,
    OtherSecret(Vec<u8>),
    Empty,
    Bytes(Vec<u8>),
}

#[derive(Debug, Arbitrary)]
enum Tamper {
    None,
    Header(u16, u8),
    Payload(u16, u8),
    Signature(u16, u8),
    Truncate(u16),
    Append(String),
}

#[derive(Debug, Arbitrary)]
struct Claims {
    issuer: u8,
    audience: u8,
    exp_offset_s: i32,
    sub: Option<String>,
    extra: Vec<(String, String)>,
}

/// The input: a first byte of 0 makes the rest the token as it is (so the corpus can hold
/// real tokens); otherwise the rest describes a token to build.
#[derive(Debug, Arbitrary)]
struct Built {
    alg: Alg,
    kid: Kid,
    claims: Claims,
    signer: Signer,
    tamper: Tamper,
}

fn now() -> i64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock");
    i64::try_from(since.as_secs()).expect("seconds fit")
}

fn build(alg: Alg, kid: Kid, claims: Claims, signer: Signer, tamper: Tamper) -> String {
    let mut header = json!({ "typ": "JWT" });
    let alg = match alg {
        Alg::Rs256 => Some("RS256".to_owned()),
        Alg::Hs256 => Some("HS256".to_owned()),
        Alg::None => Some("none".to_owned()),
        Alg::NoneUpper => Some("NONE".to_owned()),
        Alg::Es256 => Some("ES256".to_owned()),
        Alg::EdDsa => Some("EdDSA".to_owned()),
        Alg::Missing => None,
        Alg::Other(alg) => Some(alg),
    };
    if let Some(alg) = alg {
        header["alg"] = Value::String(alg);
    }
    match kid {
        Kid::Rsa => header["kid"] = json!("rsa"),
        Kid::Hs => header["kid"] = json!("hs"),
        Kid::Missing => {}
        Kid::Other(kid) => header["kid"] = Value::String(kid),
    }
    let mut payload = json!({ "exp": now() + i64::from(claims.exp_offset_s) });
    match claims.issuer % 4 {
        0 => payload["iss"] = json!(ISSUER),
        1 => payload["iss"] = json!("someone-else"),
        2 => payload["iss"] = Value::Null,
        _ => {}
    }
    payload["aud"] = match claims.audience % 4 {
        0 => json!(AUDIENCE),
        1 => json!([AUDIENCE, "other"]),
        2 => json!("other"),
        _ => Value::Null,
    };
    if let Some(sub) = claims.sub {
        payload["sub"] = Value::String(sub);
    }
    for (name, value) in claims.extra.into_iter().take(8) {
        payload[name] = Value::String(value);
    }
    let mut head = URL_SAFE_NO_PAD.encode(header.to_string());
    let mut body = URL_SAFE_NO_PAD.encode(payload.to_string());
    let message = format!("{head}.{body}");
    let hmac = |secret: &[u8]| {
        crypto::sign(
            message.as_bytes(),
            &EncodingKey::from_secret(secret),
            Algorithm::HS256,
        )
        .expect("HMAC signs")
    };
    let mut signature = match signer {
        Signer::Rsa => crypto::sign(
            message.as_bytes(),
            &EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).expect("RSA key"),
            Algorithm::RS256,
        )
        .expect("RSA signs"),
        Signer::Hs => hmac(SECRET.as_bytes()),
        Signer::RsaPublicAsHmac => hmac(RSA_PUBLIC.as_bytes()),
        Signer::OtherSecret(secret) => hmac(&secret),
        Signer::Empty => String::new(),
        Signer::Bytes(bytes) => URL_SAFE_NO_PAD.encode(bytes),
    };
    let flip = |part: &mut String, at: u16, with: u8| {
        if part.is_empty() {
            return;
        }
        let mut bytes = std::mem::take(part).into_bytes();
        let i = usize::from(at) % bytes.len();
        bytes[i] = with;
        *part = String::from_utf8_lossy(&bytes).into_owned();
    };
    let mut token = match tamper {
        Tamper::Header(at, with) => {
            flip(&mut head, at, with);
            format!("{head}.{body}.{signature}")
        }
        Tamper::Payload(at, with) => {
            flip(&mut body, at, with);
            format!("{head}.{body}.{signature}")
        }
        Tamper::Signature(at, with) => {
            flip(&mut signature, at, with);
            format!("{head}.{body}.{signature}")
        }
        _ => format!("{head}.{body}.{signature}"),
    };
    match tamper {
        Tamper::Truncate(at) => {
            let mut cut = usize::from(at) % (token.len() + 1);
            while !token.is_char_boundary(cut) {
                cut -= 1;
            }
            token.truncate(cut);
        }
        Tamper::Append(extra) => token.push_str(&extra),
        _ => {}
    }
    token
}

/// What an accepted token must satisfy, checked without the gateway.
fn check_accepted(token: &str) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(
        parts.len(),
        3,
        "accepted a token without three parts: {token:?}"
    );
    let header: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(parts[0])
            .expect("accepted header is base64url"),
    )
    .expect("accepted header is JSON");
    let message = format!("{}.{}", parts[0], parts[1]);
    let signed = match header["alg"].as_str() {
        Some("RS256") => crypto::verify(
            parts[2],
            message.as_bytes(),
            &DecodingKey::from_rsa_pem(RSA_PUBLIC.as_bytes()).expect("RSA key"),
            Algorithm::RS256,
        ),
        Some("HS256") => crypto::verify(
            parts[2],
            message.as_bytes(),
            &DecodingKey::from_secret(SECRET.as_bytes()),
            Algorithm::HS256,
        ),
        other => panic!("accepted a token with alg {other:?}: {token:?}"),
    };
    assert!(
        matches!(signed, Ok(true)),
        "accepted a forged token: {token:?}"
    );
    let claims: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(parts[1])
            .expect("accepted payload is base64url"),
    )
    .expect("accepted payload is JSON");
    assert_eq!(claims["iss"], ISSUER, "accepted another issuer: {token:?}");
    let audience_ok = match &claims["aud"] {
        Value::String(aud) => aud == AUDIENCE,
        Value::Array(auds) => auds.iter().any(|a| a == AUDIENCE),
        _ => false,
    };
    assert!(audience_ok, "accepted another audience: {token:?}");
    let exp = claims["exp"]
        .as_f64()
        .expect("accepted token has a numeric exp");
    // The policy's leeway is at most a few minutes.
    assert!(
        exp + 600.0 >= now() as f64,
        "accepted an expired token: {token:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let token = if mode == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        let Ok(built) = Built::arbitrary_take_rest(arbitrary::Unstructured::new(rest)) else {
            return;
        };
        build(
            built.alg,
            built.kid,
            built.claims,
            built.signer,
            built.tamper,
        )
    };
    let fixture = fixture();
    if fixture.runtime.block_on(fixture.verifier.verify(&token)) {
        check_accepted(&token);
    }
});
