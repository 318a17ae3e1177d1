//! The Ed25519 keys that sign tokens: generated on first start, kept in the database,
//! rotated, and published as a JWKS.
//!
//! # Rotation
//! A key is stored with the time it starts signing (`created_at`, Unix ms). A rotation stores
//! a new key that starts signing [`KEY_ACTIVATION_DELAY_S`] later (or when the admin says),
//! and the JWKS publishes it at once: every verifier (the gateway's periodic JWKS refresh,
//! every replica of this service, which reloads its signing key every
//! [`KEYS_RELOAD_INTERVAL`]) has seen the key before any token names it. The key it replaces
//! stays published for [`KEY_OVERLAP_S`] after the new one starts signing, so the tokens it
//! signed stay valid until they expire; then it is no longer published and its seed is
//! deleted. A key older than [`KEY_ROTATE_AFTER_S`] is rotated by the service itself.
//! `retire_previous` (for a key that leaked) stops publishing every older key at once.
//!
//! The JWKS is read from the database on every request (the gateway asks a few times a
//! minute), so every replica publishes the same keys the moment one of them rotates.

use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{Jwk, ThumbprintHash};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use trellis_service::Db;

use crate::Error;
use crate::store::{self, StoredKey, User};

/// The `iss` claim of every token.
pub const ISSUER: &str = "trellis-shop";
/// The `aud` claim of every token.
pub const AUDIENCE: &str = "trellis-shop";
/// How long an access token is valid, seconds: short, because a refresh token gets the next
/// one and a stolen access token is useful only this long (or until its session is revoked).
pub const TOKEN_LIFETIME_S: u64 = 900;
/// Clock skew a verifier may tolerate on `exp`, seconds (at least the gateway's default of
/// 30 s): an old key stays published this much longer than its last token's lifetime.
pub const TOKEN_LEEWAY_S: u64 = 60;
/// How long a replaced key stays published after its successor starts signing, seconds.
pub const KEY_OVERLAP_S: u64 = TOKEN_LIFETIME_S + TOKEN_LEEWAY_S;
/// Default delay between storing (and publishing) a new key and signing with it, seconds:
/// longer than every replica's reload interval and the gateway's JWKS refresh.
pub const KEY_ACTIVATION_DELAY_S: u64 = 120;
/// Age at which the service rotates its signing key by itself, seconds (30 days).
pub const KEY_ROTATE_AFTER_S: u64 = 30 * 24 * 3600;
/// How often every replica reloads its signing key, rotates an old one and drops expired
/// revocations and sessions.
pub const KEYS_RELOAD_INTERVAL: Duration = Duration::from_secs(10);

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
    /// The token's own id: what a logout revokes.
    pub(crate) jti: String,
    /// The session (refresh-token family) the token belongs to.
    pub(crate) sid: String,
}

/// PKCS#8 v1 prefix of an Ed25519 private key (RFC 8410): what jsonwebtoken's DER
/// constructor expects before the 32-byte seed.
const PKCS8_ED25519_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// The key a replica signs with.
struct Signing {
    kid: String,
    encoding: EncodingKey,
}

/// The signing key of this replica; the published set is read from the database.
pub(crate) struct KeyRing {
    db: Db,
    signing: RwLock<Arc<Signing>>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("kid", &self.signing_kid())
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

fn decode_seed(key: &StoredKey) -> Result<[u8; 32], Error> {
    URL_SAFE_NO_PAD
        .decode(&key.seed)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
        .ok_or_else(|| Error::SigningKey(format!("stored key {} is not a 32-byte seed", key.kid)))
}

/// A fresh seed from OS randomness and its kid.
fn generate() -> Result<(String, [u8; 32]), Error> {
    let mut seed = [0_u8; 32];
    getrandom::fill(&mut seed).map_err(|e| Error::SigningKey(format!("no OS randomness: {e}")))?;
    let (kid, _) = public_jwk(&seed)?;
    Ok((kid, seed))
}

fn db_error(what: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |source| Error::Database { what, source }
}

/// When `keys[i]` stops being published (Unix ms): [`KEY_OVERLAP_S`] after the first later
/// key that has started signing; `None` while no later key signs.
fn retires_at_ms(keys: &[StoredKey], i: usize, now_ms: i64) -> Option<i64> {
    keys[i + 1..]
        .iter()
        .map(|k| k.created_at_ms)
        .find(|&active_from| active_from <= now_ms)
        .map(|active_from| active_from.saturating_add(secs_to_ms(KEY_OVERLAP_S)))
}

fn secs_to_ms(s: u64) -> i64 {
    i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX)
}

/// The keys still published at `now_ms`, oldest first.
fn published(keys: &[StoredKey], now_ms: i64) -> impl Iterator<Item = &StoredKey> {
    keys.iter()
        .enumerate()
        .filter(move |(i, _)| retires_at_ms(keys, *i, now_ms).is_none_or(|at| at > now_ms))
        .map(|(_, k)| k)
}

/// The key that signs at `now_ms`: the newest that has started, or the oldest when none has.
fn signing_key(keys: &[StoredKey], now_ms: i64) -> Option<&StoredKey> {
    keys.iter()
        .rev()
        .find(|k| k.created_at_ms <= now_ms)
        .or_else(|| keys.first())
}

fn signing_from(key: &StoredKey) -> Result<Signing, Error> {
    let seed = decode_seed(key)?;
    let (derived, _) = public_jwk(&seed)?;
    if derived != key.kid {
        return Err(Error::SigningKey(format!(
            "stored key {} does not match its seed",
            key.kid
        )));
    }
    let mut der = PKCS8_ED25519_PREFIX.to_vec();
    der.extend_from_slice(&seed);
    Ok(Signing {
        kid: key.kid.clone(),
        encoding: EncodingKey::from_ed_der(&der),
    })
}

/// What a rotation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rotation {
    pub(crate) kid: String,
    pub(crate) active_from_ms: i64,
    pub(crate) retired: u64,
}

impl KeyRing {
    /// Loads the stored keys; on first start generates one from OS randomness and stores it.
    /// Two instances starting together may both insert a key: both then sign with the same
    /// one (the newest started) and publish both.
    pub(crate) async fn load_or_create(db: &Db) -> Result<Self, Error> {
        let now_ms = store::now_ms();
        let mut stored = store::signing_keys(db)
            .await
            .map_err(db_error("loading the signing keys"))?;
        if stored.is_empty() {
            let (kid, seed) = generate()?;
            store::insert_signing_key(db, &kid, &URL_SAFE_NO_PAD.encode(seed), now_ms)
                .await
                .map_err(db_error("storing the signing key"))?;
            stored = store::signing_keys(db)
                .await
                .map_err(db_error("loading the signing keys"))?;
        }
        let key = signing_key(&stored, now_ms)
            .ok_or_else(|| Error::SigningKey("no key was stored".to_owned()))?;
        Ok(Self {
            db: db.clone(),
            signing: RwLock::new(Arc::new(signing_from(key)?)),
        })
    }

    fn current(&self) -> Arc<Signing> {
        Arc::clone(&self.signing.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// The kid this replica signs with now.
    pub(crate) fn signing_kid(&self) -> String {
        self.current().kid.clone()
    }

    /// Picks the signing key again from the database (a rotation by another replica, a
    /// rotated key whose time has come) and deletes keys no longer published.
    pub(crate) async fn reload(&self) -> Result<(), Error> {
        let now_ms = store::now_ms();
        let stored = store::signing_keys(&self.db)
            .await
            .map_err(db_error("loading the signing keys"))?;
        let Some(key) = signing_key(&stored, now_ms) else {
            // Every key was deleted (a store emptied by hand): keep signing with the one we
            // have rather than invent one another replica would not know.
            tracing::error!("no signing key is stored; signing with the last one loaded");
            return Ok(());
        };
        if key.kid != self.signing_kid() {
            let signing = Arc::new(signing_from(key)?);
            tracing::info!(kid = %signing.kid, "signing with a new key");
            *self.signing.write().unwrap_or_else(PoisonError::into_inner) = signing;
        }
        let retired: Vec<&str> = stored
            .iter()
            .enumerate()
            .filter(|(i, _)| retires_at_ms(&stored, *i, now_ms).is_some_and(|at| at <= now_ms))
            .map(|(_, k)| k.kid.as_str())
            .collect();
        for kid in retired {
            store::delete_signing_key(&self.db, kid)
                .await
                .map_err(db_error("deleting a retired key"))?;
            tracing::info!(%kid, "retired signing key deleted");
        }
        Ok(())
    }

    /// Rotates when the newest stored key is older than [`KEY_ROTATE_AFTER_S`].
    pub(crate) async fn rotate_if_old(&self) -> Result<Option<Rotation>, Error> {
        let now_ms = store::now_ms();
        let stored = store::signing_keys(&self.db)
            .await
            .map_err(db_error("loading the signing keys"))?;
        let newest = stored.last().map_or(i64::MIN, |k| k.created_at_ms);
        if newest.saturating_add(secs_to_ms(KEY_ROTATE_AFTER_S)) > now_ms {
            return Ok(None);
        }
        let rotation = self
            .rotate(Duration::from_secs(KEY_ACTIVATION_DELAY_S), false)
            .await?;
        Ok(Some(rotation))
    }

    /// Stores a new key that starts signing after `activate_in` (published at once); with
    /// `retire_previous`, deletes every other key, so every token they signed is refused.
    pub(crate) async fn rotate(
        &self,
        activate_in: Duration,
        retire_previous: bool,
    ) -> Result<Rotation, Error> {
        let (kid, seed) = generate()?;
        let active_from_ms = store::now_ms()
            .saturating_add(i64::try_from(activate_in.as_millis()).unwrap_or(i64::MAX / 2));
        store::insert_signing_key(
            &self.db,
            &kid,
            &URL_SAFE_NO_PAD.encode(seed),
            active_from_ms,
        )
        .await
        .map_err(db_error("storing the new signing key"))?;
        let retired = if retire_previous {
            store::delete_signing_keys_except(&self.db, &kid)
                .await
                .map_err(db_error("retiring the previous keys"))?
        } else {
            0
        };
        tracing::warn!(%kid, active_from_ms, retired, "signing key rotated");
        self.reload().await?;
        Ok(Rotation {
            kid,
            active_from_ms,
            retired,
        })
    }

    /// The published key set, read from the database.
    pub(crate) async fn jwks(&self) -> Result<serde_json::Value, Error> {
        let stored = store::signing_keys(&self.db)
            .await
            .map_err(db_error("loading the signing keys"))?;
        let now_ms = store::now_ms();
        let keys = published(&stored, now_ms)
            .map(|k| {
                decode_seed(k)
                    .and_then(|seed| public_jwk(&seed))
                    .map(|(_, jwk)| jwk)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(serde_json::json!({ "keys": keys }))
    }

    /// Checks a token this service signed with a key still published: the claims, or why not.
    pub(crate) async fn verify(&self, token: &str) -> Result<Claims, String> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| "malformed token")?;
        let kid = header.kid.ok_or("the token names no key")?;
        let jwks = self.jwks().await.map_err(|e| e.to_string())?;
        let jwk = jwks["keys"]
            .as_array()
            .and_then(|keys| keys.iter().find(|k| k["kid"] == kid.as_str()))
            .ok_or("the token's key is not published")?;
        let jwk: Jwk = serde_json::from_value(jwk.clone()).map_err(|e| e.to_string())?;
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| e.to_string())?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = TOKEN_LEEWAY_S;
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map(|data| data.claims)
            .map_err(|e| format!("invalid token: {e}"))
    }

    /// Signs an access token for `user` in session `sid`, valid from `now_s` for
    /// [`TOKEN_LIFETIME_S`]; answers the token and its claims.
    pub(crate) fn issue(
        &self,
        user: &User,
        sid: &str,
        now_s: u64,
    ) -> Result<(String, Claims), jsonwebtoken::errors::Error> {
        let signing = self.current();
        let claims = Claims {
            sub: user.id.clone(),
            role: user.role.clone(),
            email: user.email.clone(),
            iss: ISSUER.to_owned(),
            aud: AUDIENCE.to_owned(),
            iat: now_s,
            exp: now_s + TOKEN_LIFETIME_S,
            jti: uuid::Uuid::now_v7().to_string(),
            sid: sid.to_owned(),
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(signing.kid.clone());
        let token = jsonwebtoken::encode(&header, &claims, &signing.encoding)?;
        Ok((token, claims))
    }
}

/// Every [`KEYS_RELOAD_INTERVAL`]: reloads the signing key, rotates an old one and drops
/// expired revocations and sessions, until `ring` is dropped (the service's router is gone).
pub(crate) fn spawn_upkeep(ring: &Arc<KeyRing>) {
    let weak: Weak<KeyRing> = Arc::downgrade(ring);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(KEYS_RELOAD_INTERVAL).await;
            let Some(ring) = weak.upgrade() else {
                return;
            };
            if let Err(error) = ring.rotate_if_old().await {
                tracing::warn!(%error, "could not rotate the signing key");
            }
            if let Err(error) = ring.reload().await {
                tracing::warn!(%error, "could not reload the signing keys");
            }
            if let Err(error) = store::prune_sessions(&ring.db, store::now_ms()).await {
                tracing::warn!(%error, "could not drop expired revocations and sessions");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(kid: &str, created_at_ms: i64) -> StoredKey {
        StoredKey {
            kid: kid.to_owned(),
            seed: String::new(),
            created_at_ms,
        }
    }

    fn kids<'a>(keys: impl Iterator<Item = &'a StoredKey>) -> Vec<&'a str> {
        keys.map(|k| k.kid.as_str()).collect()
    }

    #[test]
    fn a_rotated_key_is_published_before_it_signs_and_its_predecessor_after() {
        // Goal: the overlap rules of the module docs; method: two keys, the second starting at
        // t=1000 s, looked at before, during and after the overlap.
        let overlap_ms = secs_to_ms(KEY_OVERLAP_S);
        let keys = [key("old", 0), key("new", 1_000_000)];
        let before = 999_999;
        assert_eq!(kids(published(&keys, before)), ["old", "new"]);
        assert_eq!(signing_key(&keys, before).unwrap().kid, "old");
        let during = 1_000_000 + overlap_ms - 1;
        assert_eq!(kids(published(&keys, during)), ["old", "new"]);
        assert_eq!(signing_key(&keys, during).unwrap().kid, "new");
        let after = 1_000_000 + overlap_ms;
        assert_eq!(kids(published(&keys, after)), ["new"]);
    }

    #[test]
    fn a_key_not_yet_started_does_not_retire_its_predecessor() {
        // Goal: a second rotation does not unpublish the key that signs; method: a key
        // replaced long ago, the key that signs, and one that starts in the future.
        let keys = [key("a", 0), key("b", 10), key("c", i64::MAX / 2)];
        let now = 10 + secs_to_ms(KEY_OVERLAP_S) + 5;
        assert_eq!(kids(published(&keys, now)), ["b", "c"]);
        assert_eq!(signing_key(&keys, now).unwrap().kid, "b");
    }

    #[test]
    fn with_only_future_keys_the_oldest_signs() {
        let keys = [key("a", 100), key("b", 200)];
        assert_eq!(signing_key(&keys, 0).unwrap().kid, "a");
    }
}
