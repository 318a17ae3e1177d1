//! The JWT policy: static keys or a JWKS URL (fetched at start, refreshed periodically and
//! on an unknown `kid`), the checks shared by its keys, the claims it sends upstream, and an
//! optional revocation feed (polled; a listed `jti` is refused until it expires).
//!
//! When the JWKS URL does not answer, the keys fetched last stay in use (a stale JWKS), so
//! an issuer that is down does not lock every caller out; likewise a feed that does not
//! answer leaves the revocations known so far in force.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
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
use crate::config::JwtConfig;
use crate::error::ConfigError;
use crate::upstream::HttpClient;

use super::token_cache::TokenCache;
use super::{AuthOutcome, Identity, bearer};

/// Time a JWKS fetch may take.
const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS document accepted, bytes.
const JWKS_BYTES_MAX: usize = 1024 * 1024;
/// Longest token considered, bytes (longer ones are rejected unverified).
pub(super) const TOKEN_BYTES_MAX: usize = 8 * 1024;
/// Largest revocation feed page accepted, bytes.
const REVOCATIONS_BYTES_MAX: usize = 8 * 1024 * 1024;
/// Pages of the revocation feed read per poll at most (a feed that keeps saying `more` is
/// read on at the next poll).
const REVOCATION_PAGES_PER_POLL: usize = 16;

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
    /// With a revocation feed, a token without `jti` could never be revoked: refused.
    require_jti: bool,
}

impl Checks {
    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut v = Validation::new(algorithm);
        v.leeway = self.leeway_s;
        v.validate_nbf = true;
        // jsonwebtoken checks `iss` and `aud` only when the token has them: a policy that names
        // issuers or audiences must also require the claims, or a token without them (or with
        // `null`) passes. Found by the jwt_verify fuzz target.
        let mut required = vec!["exp"];
        if !self.issuers.is_empty() {
            required.push("iss");
        }
        if !self.audiences.is_empty() {
            required.push("aud");
        }
        v.set_required_spec_claims(&required);
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

/// The revocation feed and what it listed: `jti` → `exp` (Unix seconds).
#[derive(Debug)]
struct Revocations {
    uri: http::Uri,
    client: HttpClient,
    refresh: Duration,
    entries_max: usize,
    revoked: ArcSwap<HashMap<Box<str>, u64>>,
    /// The feed's cursor after the last page read; `None` before the first.
    cursor: tokio::sync::Mutex<Option<String>>,
}

/// One page of a revocation feed.
#[derive(Debug, serde::Deserialize)]
struct FeedPage {
    revoked: Vec<FeedEntry>,
    next: String,
    #[serde(default)]
    more: bool,
}

#[derive(Debug, serde::Deserialize)]
struct FeedEntry {
    jti: String,
    exp: u64,
}

/// A JWT policy.
#[derive(Debug)]
pub(crate) struct JwtPolicy {
    name: String,
    checks: Checks,
    static_keys: Vec<(Option<String>, Arc<KeyEntry>)>,
    keys: ArcSwap<KeySet>,
    jwks: Option<Jwks>,
    revocations: Option<Revocations>,
    pub(super) claims_to_headers: Vec<(String, HeaderName)>,
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
            require_jti: config.revocations_url.is_some(),
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
                client: client.clone(),
                refresh: Duration::from_millis(config.jwks_refresh_ms),
                refetch_min_interval: Duration::from_millis(config.jwks_refetch_min_interval_ms),
                last_fetch: tokio::sync::Mutex::new(None),
            }),
            None => None,
        };
        let revocations = match &config.revocations_url {
            Some(url) => Some(Revocations {
                uri: url.parse().map_err(|_| ConfigError::Invalid {
                    key: format!("auth.{name}.revocations_url"),
                    message: "not a URL".to_owned(),
                })?,
                client,
                refresh: Duration::from_millis(config.revocations_refresh_ms),
                entries_max: config.revoked_entries_max,
                revoked: ArcSwap::from_pointee(HashMap::new()),
                cursor: tokio::sync::Mutex::new(None),
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
            revocations,
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
        if policy.revocations.is_some() {
            if let Err(e) = policy.poll_revocations().await {
                tracing::warn!(policy = %policy.name, error = %e, "initial revocation poll failed; will retry");
            }
            spawn_revocation_polls(&policy);
        }
        Ok(policy)
    }

    /// Reads the revocation feed from the last cursor on, merging what it lists into the
    /// revoked set and dropping entries whose tokens have expired; the entries added.
    async fn poll_revocations(&self) -> Result<usize, String> {
        let Some(feed) = &self.revocations else {
            return Ok(0);
        };
        let mut cursor = feed.cursor.lock().await;
        let mut added = 0;
        for _ in 0..REVOCATION_PAGES_PER_POLL {
            let uri = match cursor.as_deref() {
                None => feed.uri.clone(),
                Some(after) => with_query(&feed.uri, "after", after)?,
            };
            let page: FeedPage = fetch_json(&feed.client, uri, REVOCATIONS_BYTES_MAX).await?;
            let now = unix_now();
            let leeway = self.checks.leeway_s;
            let current = feed.revoked.load();
            let mut revoked: HashMap<Box<str>, u64> = current
                .iter()
                .filter(|(_, exp)| exp.saturating_add(leeway) >= now)
                .map(|(jti, exp)| (jti.clone(), *exp))
                .collect();
            let mut dropped = 0_usize;
            for entry in page.revoked {
                if entry.exp.saturating_add(leeway) < now
                    || revoked.contains_key(entry.jti.as_str())
                {
                    continue;
                }
                if revoked.len() >= feed.entries_max {
                    dropped += 1;
                    continue;
                }
                revoked.insert(entry.jti.into_boxed_str(), entry.exp);
                added += 1;
            }
            if dropped > 0 {
                tracing::error!(
                    policy = %self.name, dropped, limit = feed.entries_max,
                    "revoked_entries_max reached: some revoked tokens are accepted until they expire"
                );
            }
            feed.revoked.store(Arc::new(revoked));
            *cursor = Some(page.next);
            if !page.more {
                break;
            }
        }
        if added > 0 {
            tracing::debug!(policy = %self.name, added, "revocations polled");
        }
        Ok(added)
    }

    /// `identity`, unless the feed has revoked its token.
    fn unless_revoked(&self, identity: Arc<Identity>) -> Result<Arc<Identity>, String> {
        if let (Some(feed), Some(jti)) = (&self.revocations, identity.token_id.as_deref())
            && feed.revoked.load().contains_key(jti)
        {
            return Err("token revoked".to_owned());
        }
        Ok(identity)
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
        let previous = self.keys.swap(Arc::new(set));
        let current = self.keys.load();
        let key_gone = previous
            .by_kid
            .keys()
            .any(|kid| !current.by_kid.contains_key(kid))
            || (previous.only.is_some() && current.only.is_none());
        if key_gone {
            // A token verified with a key the issuer no longer publishes (a retired or leaked
            // key) must not keep passing from the cache until it expires.
            self.cache.clear();
            tracing::info!(policy = %self.name, "a signing key was withdrawn; verified tokens forgotten");
        }
    }

    async fn fetch_jwks(&self) -> Result<usize, String> {
        let Some(jwks) = &self.jwks else {
            return Ok(0);
        };
        *jwks.last_fetch.lock().await = Some(Instant::now());
        let set: JwkSet = fetch_json(&jwks.client, jwks.uri.clone(), JWKS_BYTES_MAX).await?;
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

    pub(super) async fn authenticate(&self, headers: &HeaderMap) -> AuthOutcome {
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
            return self.unless_revoked(identity);
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
        // jsonwebtoken checks only the registered claims it validates; `jti` is ours to check.
        if self.checks.require_jti && !claims.get("jti").is_some_and(Value::is_string) {
            return Err("a required claim is missing".to_owned());
        }
        let identity = Arc::new(self.identity(&claims));
        if let Some(exp) = claims.get("exp").and_then(Value::as_u64) {
            self.cache.insert(token, exp, Arc::clone(&identity));
        }
        self.unless_revoked(identity)
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
            token_id: claims.get("jti").and_then(Value::as_str).map(Into::into),
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

fn spawn_revocation_polls(policy: &Arc<JwtPolicy>) {
    let weak: Weak<JwtPolicy> = Arc::downgrade(policy);
    let Some(refresh) = policy.revocations.as_ref().map(|r| r.refresh) else {
        return;
    };
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(refresh).await;
            let Some(policy) = weak.upgrade() else {
                return;
            };
            if let Err(e) = policy.poll_revocations().await {
                tracing::warn!(policy = %policy.name, error = %e, "revocation poll failed");
            }
        }
    });
}

/// `GET uri` as JSON of type `T`: a 2xx answer within [`JWKS_FETCH_TIMEOUT`] (head and body
/// each) of at most `bytes_max` bytes; otherwise why not (for the log).
async fn fetch_json<T: serde::de::DeserializeOwned>(
    client: &HttpClient,
    uri: http::Uri,
    bytes_max: usize,
) -> Result<T, String> {
    let request = Request::get(uri).body(empty()).map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(JWKS_FETCH_TIMEOUT, client.request(request))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("status {}", response.status()));
    }
    let bytes: Bytes = tokio::time::timeout(
        JWKS_FETCH_TIMEOUT,
        Limited::new(response.into_body(), bytes_max).collect(),
    )
    .await
    .map_err(|_| "timed out reading the body".to_owned())?
    .map_err(|e| e.to_string())?
    .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

/// `uri` with `name=value` added to its query (`value` percent-encoded).
fn with_query(uri: &http::Uri, name: &str, value: &str) -> Result<http::Uri, String> {
    let mut encoded = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    let path = uri.path();
    let query = match uri.query() {
        Some(q) if !q.is_empty() => format!("{q}&{name}={encoded}"),
        _ => format!("{name}={encoded}"),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(
        format!("{path}?{query}")
            .parse()
            .map_err(|e: http::uri::InvalidUri| e.to_string())?,
    );
    http::Uri::from_parts(parts).map_err(|e| e.to_string())
}

pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
