//! The Ed25519 key that signs tokens: generated on first start, kept in the database, and
//! published as a JWKS.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{Jwk, ThumbprintHash};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use trellis_service::Db;

use crate::Error;
use crate::store::{self, User};

/// The `iss` claim of every token.
pub const ISSUER: &str = "trellis-shop";
/// The `aud` claim of every token.
pub const AUDIENCE: &str = "trellis-shop";
/// How long a token is valid, seconds.
pub const TOKEN_LIFETIME_S: u64 = 3600;

/// PKCS#8 v1 prefix of an Ed25519 private key (RFC 8410): what jsonwebtoken's DER
/// constructor expects before the 32-byte seed.
const PKCS8_ED25519_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// The claims of a shop token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Claims {
    pub(crate) sub: String,
    pub(crate) role: String,
    pub(crate) email: String,
    pub(crate) iss: String,
    pub(crate) aud: String,
    pub(crate) iat: u64,
    pub(crate) exp: u64,
}

/// The signing key and the published key set.
pub(crate) struct KeyRing {
    kid: String,
    encoding: EncodingKey,
    jwks: serde_json::Value,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// The public JWK of a seed and its RFC 7638 thumbprint (the kid).
fn public_jwk(seed: &[u8; 32]) -> Result<(String, serde_json::Value), Error> {
    let public = ed25519_dalek::SigningKey::from_bytes(seed)
        .verifying_key()
        .to_bytes();
    let x = URL_SAFE_NO_PAD.encode(public);
    let jwk: Jwk = serde_json::from_value(serde_json::json!({
        "kty": "OKP", "crv": "Ed25519", "x": x,
    }))
    .map_err(|e| Error::SigningKey(e.to_string()))?;
    let kid = jwk
        .thumbprint(ThumbprintHash::SHA256)
        .map_err(|e| Error::SigningKey(e.to_string()))?;
    let published = serde_json::json!({
        "kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA", "use": "sig",
    });
    Ok((kid, published))
}

fn decode_seed(kid: &str, text: &str) -> Result<[u8; 32], Error> {
    URL_SAFE_NO_PAD
        .decode(text)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
        .ok_or_else(|| Error::SigningKey(format!("stored key {kid} is not a 32-byte seed")))
}

impl KeyRing {
    /// Loads the stored keys; on first start generates one from OS randomness and stores it.
    /// Two instances starting together may both insert a key: both then sign with the oldest
    /// and publish every stored key, so tokens from either verify.
    pub(crate) async fn load_or_create(db: &Db) -> Result<Self, Error> {
        let db_error = |source| Error::Database {
            what: "loading the signing keys",
            source,
        };
        let mut stored = store::signing_keys(db).await.map_err(db_error)?;
        if stored.is_empty() {
            let mut seed = [0_u8; 32];
            getrandom::fill(&mut seed)
                .map_err(|e| Error::SigningKey(format!("no OS randomness: {e}")))?;
            let (kid, _) = public_jwk(&seed)?;
            store::insert_signing_key(db, &kid, &URL_SAFE_NO_PAD.encode(seed))
                .await
                .map_err(|source| Error::Database {
                    what: "storing the signing key",
                    source,
                })?;
            stored = store::signing_keys(db).await.map_err(db_error)?;
        }
        let mut keys = Vec::with_capacity(stored.len());
        let mut signing = None;
        for (kid, text) in &stored {
            let seed = decode_seed(kid, text)?;
            let (derived, published) = public_jwk(&seed)?;
            if &derived != kid {
                return Err(Error::SigningKey(format!(
                    "stored key {kid} does not match its seed"
                )));
            }
            if signing.is_none() {
                let mut der = PKCS8_ED25519_PREFIX.to_vec();
                der.extend_from_slice(&seed);
                signing = Some((kid.clone(), EncodingKey::from_ed_der(&der)));
            }
            keys.push(published);
        }
        let (kid, encoding) =
            signing.ok_or_else(|| Error::SigningKey("no key was stored".to_owned()))?;
        Ok(Self {
            kid,
            encoding,
            jwks: serde_json::json!({ "keys": keys }),
        })
    }

    /// The published key set.
    pub(crate) fn jwks(&self) -> &serde_json::Value {
        &self.jwks
    }

    /// Signs a token for `user`, valid from `now_s` for [`TOKEN_LIFETIME_S`].
    pub(crate) fn issue(
        &self,
        user: &User,
        now_s: u64,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let claims = Claims {
            sub: user.id.clone(),
            role: user.role.clone(),
            email: user.email.clone(),
            iss: ISSUER.to_owned(),
            aud: AUDIENCE.to_owned(),
            iat: now_s,
            exp: now_s + TOKEN_LIFETIME_S,
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.encoding)
    }
}
