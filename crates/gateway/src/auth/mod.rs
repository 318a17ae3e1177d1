//! Authentication: JWT (static keys or a JWKS URL, with a cache of verified tokens) and API
//! keys. Produces an [`Identity`] whose headers the proxy sends upstream.
//!
//! Algorithm confusion is impossible by construction: every key carries the one algorithm it
//! was configured (or published) with, a token is verified only with the algorithm of the key
//! its `kid` names, and a token whose header names another algorithm is rejected before any
//! signature check. `alg: none` is not an algorithm jsonwebtoken knows, so such a token fails
//! to parse.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, header};
use http_body_util::{BodyExt, Limited};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde_json::{Map, Value};
use tokio::time::Instant;

use crate::body::empty;
use crate::config::{ApiKeyConfig, JwtConfig};
use crate::error::ConfigError;
use crate::upstream::HttpClient;

/// Time a JWKS fetch may take.
const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS document accepted, bytes.
const JWKS_BYTES_MAX: usize = 1024 * 1024;
/// Shards of the verified-token cache (spreads lock contention).
const TOKEN_CACHE_SHARDS: usize = 16;
/// Longest token considered, bytes (longer ones are rejected unverified).
const TOKEN_BYTES_MAX: usize = 8 * 1024;

/// Who the caller is, once authenticated.
#[derive(Debug, Clone, Default)]
pub(crate) struct Identity {
    /// JWT `sub`, or the API key's id.
    pub(crate) subject: Option<String>,
    /// The API key's id, when authenticated by key.
    pub(crate) api_key_id: Option<String>,
    scopes: Vec<String>,
    roles: Vec<String>,
    /// Headers sent upstream.
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
}

impl Identity {
    /// The first required scope the identity lacks (all are required).
    pub(crate) fn missing_scope<'a>(&self, required: &'a [String]) -> Option<&'a str> {
        required
            .iter()
            .find(|s| !self.scopes.contains(s))
            .map(String::as_str)
    }

    /// Whether the identity has one of `roles` (or `roles` is empty).
    pub(crate) fn has_any_role(&self, roles: &[String]) -> bool {
        roles.is_empty() || roles.iter().any(|r| self.roles.contains(r))
    }
}

/// The result of one policy's check.
#[derive(Debug)]
pub(crate) enum AuthOutcome {
    Authenticated(Arc<Identity>),
    /// The request carries no credential of this kind.
    Missing,
    /// A credential is there but is not valid; the reason is safe to show.
    Invalid(String),
}

/// A named authentication policy.
#[derive(Debug)]
pub(crate) enum AuthPolicy {
    Jwt(Arc<JwtPolicy>),
    ApiKey(ApiKeyPolicy),
}

impl AuthPolicy {
    pub(crate) async fn authenticate(&self, headers: &HeaderMap) -> AuthOutcome {
        match self {
            Self::Jwt(p) => p.authenticate(headers).await,
            Self::ApiKey(p) => p.authenticate(headers),
        }
    }

    /// Headers this policy sets upstream; client-sent copies are stripped on every request.
    pub(crate) fn identity_headers(&self) -> Vec<HeaderName> {
        match self {
            Self::Jwt(p) => p.claims_to_headers.iter().map(|(_, h)| h.clone()).collect(),
            Self::ApiKey(p) => vec![p.identity_header.clone()],
        }
    }

    /// Credential headers not forwarded upstream.
    pub(crate) fn credential_header(&self) -> Option<&HeaderName> {
        match self {
            Self::Jwt(_) => None,
            Self::ApiKey(p) => Some(&p.header),
        }
    }

    /// The `WWW-Authenticate` scheme of this policy.
    pub(crate) fn scheme(&self) -> &'static str {
        match self {
            Self::Jwt(_) => "Bearer",
            Self::ApiKey(_) => "ApiKey",
        }
    }
}

/// API keys in a header.
#[derive(Debug)]
pub(crate) struct ApiKeyPolicy {
    header: HeaderName,
    identity_header: HeaderName,
    keys: HashMap<String, Arc<Identity>>,
}

impl ApiKeyPolicy {
    pub(crate) fn new(name: &str, config: &ApiKeyConfig) -> Result<Self, ConfigError> {
        let key = format!("auth.{name}");
        let bad = |field: &str| ConfigError::Invalid {
            key: format!("{key}.{field}"),
            message: "not a valid header name".to_owned(),
        };
        let header = HeaderName::from_bytes(config.header.as_bytes()).map_err(|_| bad("header"))?;
        let identity_header = HeaderName::from_bytes(config.identity_header.as_bytes())
            .map_err(|_| bad("identity_header"))?;
        let mut keys = HashMap::new();
        for (id, value) in &config.keys {
            let id_value = HeaderValue::from_str(id).map_err(|_| ConfigError::Invalid {
                key: format!("{key}.keys.{id}"),
                message: "the key id must be a valid header value".to_owned(),
            })?;
            keys.insert(
                value.clone(),
                Arc::new(Identity {
                    subject: Some(id.clone()),
                    api_key_id: Some(id.clone()),
                    headers: vec![(identity_header.clone(), id_value)],
                    ..Identity::default()
                }),
            );
        }
        Ok(Self {
            header,
            identity_header,
            keys,
        })
    }

    fn authenticate(&self, headers: &HeaderMap) -> AuthOutcome {
        let Some(value) = headers.get(&self.header) else {
            return AuthOutcome::Missing;
        };
        match value.to_str().ok().and_then(|v| self.keys.get(v)) {
            Some(identity) => AuthOutcome::Authenticated(Arc::clone(identity)),
            None => AuthOutcome::Invalid("unknown API key".to_owned()),
        }
    }
}

/// One verification key and the only algorithm it is used with.
struct KeyEntry {
    algorithm: Algorithm,
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyEntry")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct KeySet {
    by_kid: HashMap<String, Arc<KeyEntry>>,
    /// The key used for tokens without `kid`, when the policy has exactly one key.
    only: Option<Arc<KeyEntry>>,
}

/// Checks shared by every key of a policy.
#[derive(Debug, Clone)]
struct Checks {
    issuers: Vec<String>,
    audiences: Vec<String>,
    leeway_s: u64,
}

impl Checks {
    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut v = Validation::new(algorithm);
        v.leeway = self.leeway_s;
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp"]);
        if !self.issuers.is_empty() {
            v.set_issuer(&self.issuers);
        }
        if self.audiences.is_empty() {
            v.validate_aud = false;
        } else {
            v.set_audience(&self.audiences);
        }
        v
    }
}

#[derive(Debug)]
struct Jwks {
    uri: http::Uri,
    client: HttpClient,
    refresh: Duration,
    refetch_min_interval: Duration,
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
}

/// A JWT policy.
#[derive(Debug)]
pub(crate) struct JwtPolicy {
    name: String,
    checks: Checks,
    static_keys: Vec<(Option<String>, Arc<KeyEntry>)>,
    keys: ArcSwap<KeySet>,
    jwks: Option<Jwks>,
    claims_to_headers: Vec<(String, HeaderName)>,
    cache: TokenCache,
}

impl JwtPolicy {
    /// Builds the policy; with a JWKS URL, fetches it once (a failure is logged and retried
    /// later: tokens fail with 401 meanwhile) and starts the refresh task.
    pub(crate) async fn new(
        name: &str,
        config: &JwtConfig,
        client: HttpClient,
    ) -> Result<Arc<Self>, ConfigError> {
        let checks = Checks {
            issuers: config.issuers.clone(),
            audiences: config.audiences.clone(),
            leeway_s: config.leeway_s,
        };
        let mut static_keys = Vec::new();
        for (i, k) in config.keys.iter().enumerate() {
            let key_path = format!("auth.{name}.keys[{i}]");
            let fail = |message: String| ConfigError::Key {
                key: key_path.clone(),
                message,
            };
            let algorithm: Algorithm = k
                .alg
                .parse()
                .map_err(|_| fail(format!("unknown alg `{}`", k.alg)))?;
            let pem = match (&k.pem, &k.pem_file) {
                (Some(p), _) => Some(p.clone().into_bytes()),
                (None, Some(file)) => Some(
                    std::fs::read(file).map_err(|e| fail(format!("cannot read {file}: {e}")))?,
                ),
                (None, None) => None,
            };
            let key = match (algorithm, pem, &k.secret) {
                (Algorithm::HS256, None, Some(secret)) => {
                    DecodingKey::from_secret(secret.as_bytes())
                }
                (Algorithm::RS256, Some(pem), None) => {
                    DecodingKey::from_rsa_pem(&pem).map_err(|e| fail(e.to_string()))?
                }
                (Algorithm::ES256, Some(pem), None) => {
                    DecodingKey::from_ec_pem(&pem).map_err(|e| fail(e.to_string()))?
                }
                (Algorithm::EdDSA, Some(pem), None) => {
                    DecodingKey::from_ed_pem(&pem).map_err(|e| fail(e.to_string()))?
                }
                _ => {
                    return Err(fail(format!(
                        "algorithm {algorithm:?} does not fit this key material"
                    )));
                }
            };
            let validation = checks.validation(algorithm);
            static_keys.push((
                k.kid.clone(),
                Arc::new(KeyEntry {
                    algorithm,
                    key,
                    validation,
                }),
            ));
        }
        let jwks = match &config.jwks_url {
            Some(url) => Some(Jwks {
                uri: url.parse().map_err(|_| ConfigError::Invalid {
                    key: format!("auth.{name}.jwks_url"),
                    message: "not a URL".to_owned(),
                })?,
                client,
                refresh: Duration::from_millis(config.jwks_refresh_ms),
                refetch_min_interval: Duration::from_millis(config.jwks_refetch_min_interval_ms),
                last_fetch: tokio::sync::Mutex::new(None),
            }),
            None => None,
        };
        let mut claims_to_headers = Vec::new();
        for (claim, h) in &config.claims_to_headers {
            let header =
                HeaderName::from_bytes(h.as_bytes()).map_err(|_| ConfigError::Invalid {
                    key: format!("auth.{name}.claims_to_headers.{claim}"),
                    message: "not a valid header name".to_owned(),
                })?;
            claims_to_headers.push((claim.clone(), header));
        }
        let policy = Arc::new(Self {
            name: name.to_owned(),
            checks,
            static_keys,
            keys: ArcSwap::from_pointee(KeySet::default()),
            jwks,
            claims_to_headers,
            cache: TokenCache::new(config.token_cache_entries),
        });
        policy.install(Vec::new());
        if policy.jwks.is_some() {
            if let Err(e) = policy.fetch_jwks().await {
                tracing::warn!(policy = %policy.name, error = %e, "initial JWKS fetch failed; will retry");
            }
            spawn_refresh(&policy);
        }
        Ok(policy)
    }

    /// Replaces the key set: static keys plus `fetched`.
    fn install(&self, fetched: Vec<(Option<String>, Arc<KeyEntry>)>) {
        let mut set = KeySet::default();
        let all: Vec<_> = self.static_keys.iter().cloned().chain(fetched).collect();
        if all.len() == 1 {
            set.only = Some(Arc::clone(&all[0].1));
        }
        for (kid, entry) in all {
            if let Some(kid) = kid {
                set.by_kid.insert(kid, entry);
            }
        }
        self.keys.store(Arc::new(set));
    }

    async fn fetch_jwks(&self) -> Result<usize, String> {
        let Some(jwks) = &self.jwks else {
            return Ok(0);
        };
        *jwks.last_fetch.lock().await = Some(Instant::now());
        let request = Request::get(jwks.uri.clone())
            .body(empty())
            .map_err(|e| e.to_string())?;
        let response = tokio::time::timeout(JWKS_FETCH_TIMEOUT, jwks.client.request(request))
            .await
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("status {}", response.status()));
        }
        let bytes: Bytes = tokio::time::timeout(
            JWKS_FETCH_TIMEOUT,
            Limited::new(response.into_body(), JWKS_BYTES_MAX).collect(),
        )
        .await
        .map_err(|_| "timed out reading the body".to_owned())?
        .map_err(|e| e.to_string())?
        .to_bytes();
        let set: JwkSet = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
        let mut fetched = Vec::new();
        for jwk in &set.keys {
            let algorithm = match (&jwk.common.key_algorithm, &jwk.algorithm) {
                (Some(a), _) => match Algorithm::try_from(*a) {
                    Ok(a @ (Algorithm::RS256 | Algorithm::ES256 | Algorithm::EdDSA)) => a,
                    _ => continue,
                },
                (None, AlgorithmParameters::RSA(_)) => Algorithm::RS256,
                (None, AlgorithmParameters::EllipticCurve(p)) if p.curve == EllipticCurve::P256 => {
                    Algorithm::ES256
                }
                (None, AlgorithmParameters::OctetKeyPair(p))
                    if p.curve == EllipticCurve::Ed25519 =>
                {
                    Algorithm::EdDSA
                }
                // Shared secrets do not belong in a published key set; other curves are not
                // supported.
                _ => continue,
            };
            let key = match (&jwk.algorithm, algorithm) {
                (AlgorithmParameters::RSA(_), Algorithm::RS256)
                | (AlgorithmParameters::EllipticCurve(_), Algorithm::ES256)
                | (AlgorithmParameters::OctetKeyPair(_), Algorithm::EdDSA) => {
                    match DecodingKey::from_jwk(jwk) {
                        Ok(k) => k,
                        Err(_) => continue,
                    }
                }
                _ => continue,
            };
            fetched.push((
                jwk.common.key_id.clone(),
                Arc::new(KeyEntry {
                    algorithm,
                    key,
                    validation: self.checks.validation(algorithm),
                }),
            ));
        }
        let count = fetched.len();
        self.install(fetched);
        tracing::debug!(policy = %self.name, keys = count, "JWKS fetched");
        Ok(count)
    }

    /// Refetches the JWKS for an unknown `kid`, at most once per `refetch_min_interval`.
    async fn refetch_for_unknown_kid(&self) {
        let Some(jwks) = &self.jwks else {
            return;
        };
        {
            let last = jwks.last_fetch.lock().await;
            if last.is_some_and(|at| at.elapsed() < jwks.refetch_min_interval) {
                return;
            }
        }
        if let Err(e) = self.fetch_jwks().await {
            tracing::warn!(policy = %self.name, error = %e, "JWKS refetch failed");
        }
    }

    async fn authenticate(&self, headers: &HeaderMap) -> AuthOutcome {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return AuthOutcome::Missing;
        };
        let token = match value.to_str().ok().and_then(bearer) {
            Some(t) => t,
            None => return AuthOutcome::Missing,
        };
        match self.verify(token).await {
            Ok(identity) => AuthOutcome::Authenticated(identity),
            Err(reason) => AuthOutcome::Invalid(reason),
        }
    }

    /// Verifies `token`, answering from the cache when it was verified before and has not
    /// expired since.
    pub(crate) async fn verify(&self, token: &str) -> Result<Arc<Identity>, String> {
        if token.len() > TOKEN_BYTES_MAX {
            return Err("token too long".to_owned());
        }
        if let Some(identity) = self.cached(token) {
            return Ok(identity);
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| "malformed token or unsupported algorithm".to_owned())?;
        let mut entry = self.find_key(header.kid.as_deref());
        if entry.is_none() && self.jwks.is_some() {
            self.refetch_for_unknown_kid().await;
            entry = self.find_key(header.kid.as_deref());
        }
        let Some(entry) = entry else {
            return Err("unknown signing key (kid)".to_owned());
        };
        if header.alg != entry.algorithm {
            return Err("token algorithm does not match its key".to_owned());
        }
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &entry.key, &entry.validation)
            .map_err(|e| {
                match e.kind() {
                    ErrorKind::ExpiredSignature => "token expired",
                    ErrorKind::ImmatureSignature => "token not yet valid",
                    ErrorKind::InvalidIssuer => "wrong issuer",
                    ErrorKind::InvalidAudience => "wrong audience",
                    ErrorKind::InvalidSignature => "bad signature",
                    ErrorKind::InvalidAlgorithm => "token algorithm does not match its key",
                    ErrorKind::MissingRequiredClaim(_) => "a required claim is missing",
                    _ => "invalid token",
                }
                .to_owned()
            })?;
        let claims = data.claims;
        let identity = Arc::new(self.identity(&claims));
        if let Some(exp) = claims.get("exp").and_then(Value::as_u64) {
            self.cache.insert(token, exp, Arc::clone(&identity));
        }
        Ok(identity)
    }

    /// The cached identity of an already verified, unexpired token (the hot path of
    /// [`verify`](Self::verify)).
    pub(crate) fn cached(&self, token: &str) -> Option<Arc<Identity>> {
        self.cache.get(token, unix_now(), self.checks.leeway_s)
    }

    fn find_key(&self, kid: Option<&str>) -> Option<Arc<KeyEntry>> {
        let set = self.keys.load();
        match kid {
            Some(kid) => set.by_kid.get(kid).cloned(),
            None => set.only.clone(),
        }
    }

    fn identity(&self, claims: &Map<String, Value>) -> Identity {
        let strings = |v: Option<&Value>, split: bool| -> Vec<String> {
            match v {
                Some(Value::String(s)) if split => {
                    s.split_whitespace().map(str::to_owned).collect()
                }
                Some(Value::String(s)) => vec![s.clone()],
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect(),
                _ => Vec::new(),
            }
        };
        let mut scopes = strings(claims.get("scope"), true);
        scopes.extend(strings(claims.get("scp"), true));
        let mut roles = strings(claims.get("roles"), false);
        roles.extend(strings(claims.get("role"), false));
        let headers = self
            .claims_to_headers
            .iter()
            .filter_map(|(claim, header)| {
                let text = match claims.get(claim)? {
                    Value::String(s) => s.clone(),
                    Value::Array(a) => a
                        .iter()
                        .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_owned))
                        .collect::<Vec<_>>()
                        .join(","),
                    other => other.to_string(),
                };
                HeaderValue::from_str(&text)
                    .ok()
                    .map(|v| (header.clone(), v))
            })
            .collect();
        Identity {
            subject: claims.get("sub").and_then(Value::as_str).map(str::to_owned),
            api_key_id: None,
            scopes,
            roles,
            headers,
        }
    }
}

fn spawn_refresh(policy: &Arc<JwtPolicy>) {
    let weak: Weak<JwtPolicy> = Arc::downgrade(policy);
    let Some(refresh) = policy.jwks.as_ref().map(|j| j.refresh) else {
        return;
    };
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(refresh).await;
            let Some(policy) = weak.upgrade() else {
                return;
            };
            if let Err(e) = policy.fetch_jwks().await {
                tracing::warn!(policy = %policy.name, error = %e, "JWKS refresh failed");
            }
        }
    });
}

fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One cached token: the whole token (compared on lookup), its expiry in Unix seconds, and
/// the identity it proved.
#[derive(Debug)]
struct CachedToken {
    token: Box<str>,
    exp: u64,
    identity: Arc<Identity>,
}

/// One shard of the token cache, keyed by the token's hash.
type Shard = HashMap<u64, CachedToken>;

/// Bytes at the end of a token that are hashed: the signature's tail, unique per token.
const TOKEN_HASHED_TAIL_BYTES: usize = 32;

/// Verified tokens until their expiry, bounded in entries.
///
/// Looked up by a keyed hash of the token's last [`TOKEN_HASHED_TAIL_BYTES`] bytes (the
/// signature: hashing 32 bytes instead of ~500 keeps a cache hit well under a microsecond),
/// and then confirmed by comparing the whole token, so no hash collision can make one token
/// pass as another (a collision is a miss: the token is verified again). Only verified tokens
/// are inserted, so a client cannot fill the cache with crafted colliding entries. Memory is
/// bounded by the entry limit times the longest accepted token ([`TOKEN_BYTES_MAX`]).
#[derive(Debug)]
struct TokenCache {
    shards: Vec<Mutex<Shard>>,
    per_shard: usize,
    hasher: RandomState,
}

impl TokenCache {
    fn new(entries: usize) -> Self {
        let shards = if entries == 0 { 0 } else { TOKEN_CACHE_SHARDS };
        Self {
            shards: (0..shards).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: entries.div_ceil(TOKEN_CACHE_SHARDS).max(1),
            hasher: RandomState::new(),
        }
    }

    /// The token's hash and its shard; `None` when caching is off.
    fn locate(&self, token: &str) -> Option<(u64, &Mutex<Shard>)> {
        if self.shards.is_empty() {
            return None;
        }
        let bytes = token.as_bytes();
        let tail = &bytes[bytes.len().saturating_sub(TOKEN_HASHED_TAIL_BYTES)..];
        let hash = self.hasher.hash_one(tail);
        let index = (hash as usize) % self.shards.len();
        self.shards.get(index).map(|shard| (hash, shard))
    }

    fn get(&self, token: &str, now: u64, leeway_s: u64) -> Option<Arc<Identity>> {
        let (hash, shard) = self.locate(token)?;
        let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
        let cached = shard.get(&hash)?;
        if *cached.token != *token {
            return None;
        }
        if now > cached.exp.saturating_add(leeway_s) {
            shard.remove(&hash);
            return None;
        }
        Some(Arc::clone(&cached.identity))
    }

    fn insert(&self, token: &str, exp: u64, identity: Arc<Identity>) {
        let Some((hash, shard)) = self.locate(token) else {
            return;
        };
        let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
        if shard.len() >= self.per_shard && !shard.contains_key(&hash) {
            let now = unix_now();
            shard.retain(|_, cached| cached.exp >= now);
            if shard.len() >= self.per_shard {
                // Still full of live tokens: drop an arbitrary one (it is re-verified if used).
                if let Some(victim) = shard.keys().next().copied() {
                    shard.remove(&victim);
                }
            }
        }
        shard.insert(
            hash,
            CachedToken {
                token: token.into(),
                exp,
                identity,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_cache_never_holds_more_than_its_bound() {
        let cache = TokenCache::new(32);
        let far = unix_now() + 3600;
        for i in 0..1000 {
            cache.insert(&format!("token-{i}"), far, Arc::new(Identity::default()));
        }
        let total: usize = cache
            .shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum();
        assert!(total <= 32 + TOKEN_CACHE_SHARDS, "{total}");
        assert!(cache.get("token-999", unix_now(), 0).is_some());
    }

    #[test]
    fn tokens_sharing_a_tail_never_answer_for_each_other() {
        let cache = TokenCache::new(8);
        let far = unix_now() + 3600;
        let tail = "x".repeat(TOKEN_HASHED_TAIL_BYTES);
        let admin = Identity {
            subject: Some("admin".to_owned()),
            ..Identity::default()
        };
        cache.insert(&format!("a.{tail}"), far, Arc::new(admin));
        assert!(cache.get(&format!("b.{tail}"), unix_now(), 0).is_none());
        let hit = cache
            .get(&format!("a.{tail}"), unix_now(), 0)
            .expect("cached");
        assert_eq!(hit.subject.as_deref(), Some("admin"));
    }

    #[test]
    fn an_expired_cached_token_is_not_served() {
        let cache = TokenCache::new(8);
        cache.insert("t", 100, Arc::new(Identity::default()));
        assert!(cache.get("t", 100, 0).is_some());
        assert!(cache.get("t", 131, 30).is_none());
    }

    #[test]
    fn bearer_tokens_are_read_case_insensitively() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer abc"), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
    }
}
