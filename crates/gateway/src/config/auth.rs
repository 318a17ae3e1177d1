//! `[auth.NAME]`: authentication policies (JWT, API key).

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::error::ConfigError;

use super::{
    JWKS_REFETCH_MIN_INTERVAL_MS_DEFAULT, JWKS_REFRESH_MS_DEFAULT, JWT_LEEWAY_S_DEFAULT,
    REVOCATIONS_REFRESH_MS_DEFAULT, REVOKED_ENTRIES_MAX_DEFAULT, TIMEOUT_MS_CEILING,
    TOKEN_CACHE_ENTRIES_DEFAULT, header_name, invalid, range,
};

/// `[auth.NAME]`: an authentication policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AuthConfig {
    /// Bearer JWTs.
    Jwt(JwtConfig),
    /// Static API keys in a header.
    ApiKey(ApiKeyConfig),
}

/// A JWT policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// A JWKS document URL (`http://` only: the gateway has no TLS client).
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// JWKS refresh interval, milliseconds.
    #[serde(default = "default_jwks_refresh_ms")]
    pub jwks_refresh_ms: u64,
    /// Minimum time between fetches caused by unknown `kid`s, milliseconds.
    #[serde(default = "default_jwks_refetch_ms")]
    pub jwks_refetch_min_interval_ms: u64,
    /// Static keys.
    #[serde(default)]
    pub keys: Vec<StaticKeyConfig>,
    /// Accepted `iss` values; unchecked when empty.
    #[serde(default)]
    pub issuers: Vec<String>,
    /// Accepted `aud` values; unchecked when empty.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Clock skew tolerated on `exp`/`nbf`, seconds.
    #[serde(default = "default_leeway_s")]
    pub leeway_s: u64,
    /// Claim name → request header sent upstream. Client-sent copies are always stripped.
    #[serde(default)]
    pub claims_to_headers: BTreeMap<String, String>,
    /// Verified tokens cached.
    #[serde(default = "default_token_cache_entries")]
    pub token_cache_entries: usize,
    /// A revocation feed URL (`http://`): polled every `revocations_refresh_ms`; a token
    /// whose `jti` it lists is refused until it expires. With a feed, tokens must carry `jti`.
    /// The feed answers `GET URL?after=CURSOR` (no `after` at first) with
    /// `{"revoked": [{"jti": "…", "exp": UNIX_SECONDS}], "next": "CURSOR", "more": BOOL}`.
    #[serde(default)]
    pub revocations_url: Option<String>,
    /// Revocation feed poll interval, milliseconds: how long a revoked token may still pass.
    #[serde(default = "default_revocations_refresh_ms")]
    pub revocations_refresh_ms: u64,
    /// Most revoked tokens remembered; beyond it the feed's newest are dropped and logged
    /// (a revoked token may then pass until it expires).
    #[serde(default = "default_revoked_entries_max")]
    pub revoked_entries_max: usize,
}

fn default_jwks_refresh_ms() -> u64 {
    JWKS_REFRESH_MS_DEFAULT
}
fn default_jwks_refetch_ms() -> u64 {
    JWKS_REFETCH_MIN_INTERVAL_MS_DEFAULT
}
fn default_leeway_s() -> u64 {
    JWT_LEEWAY_S_DEFAULT
}
fn default_token_cache_entries() -> usize {
    TOKEN_CACHE_ENTRIES_DEFAULT
}
fn default_revocations_refresh_ms() -> u64 {
    REVOCATIONS_REFRESH_MS_DEFAULT
}
fn default_revoked_entries_max() -> usize {
    REVOKED_ENTRIES_MAX_DEFAULT
}

/// One static JWT verification key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticKeyConfig {
    /// The `kid` tokens name; a token without `kid` is tried with a policy's only key.
    #[serde(default)]
    pub kid: Option<String>,
    /// `RS256`, `ES256`, `EdDSA` or `HS256`. The key is used with this algorithm only.
    pub alg: String,
    /// PEM public key, inline.
    #[serde(default)]
    pub pem: Option<String>,
    /// PEM public key, from a file (relative to the working directory).
    #[serde(default)]
    pub pem_file: Option<String>,
    /// HS256 shared secret (UTF-8 bytes).
    #[serde(default)]
    pub secret: Option<String>,
}

/// An API-key policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Header carrying the key; it is not forwarded upstream.
    #[serde(default = "default_api_key_header")]
    pub header: String,
    /// Key id (sent upstream as the identity) → key.
    pub keys: BTreeMap<String, String>,
    /// Header the key id is sent upstream in; client-sent copies are stripped.
    #[serde(default = "default_api_key_identity_header")]
    pub identity_header: String,
}

fn default_api_key_header() -> String {
    "x-api-key".to_owned()
}
fn default_api_key_identity_header() -> String {
    "x-api-key-id".to_owned()
}

impl AuthConfig {
    /// `key` is `auth.NAME`.
    pub(super) fn validate(&self, key: &str) -> Result<(), ConfigError> {
        match self {
            Self::Jwt(jwt) => jwt.validate(key),
            Self::ApiKey(api_key) => api_key.validate(key),
        }
    }
}

impl JwtConfig {
    /// `key` is `auth.NAME`.
    fn validate(&self, key: &str) -> Result<(), ConfigError> {
        if self.jwks_url.is_none() && self.keys.is_empty() {
            return Err(invalid(key, "a jwt policy needs `jwks_url` or `keys`"));
        }
        for (field, url) in [
            ("jwks_url", &self.jwks_url),
            ("revocations_url", &self.revocations_url),
        ] {
            let Some(url) = url else { continue };
            let ok = url
                .parse::<http::Uri>()
                .ok()
                .is_some_and(|u| u.scheme_str() == Some("http") && u.authority().is_some());
            if !ok {
                return Err(invalid(
                    &format!("{key}.{field}"),
                    "expected an http:// URL (the gateway has no TLS client)",
                ));
            }
        }
        range(
            &format!("{key}.revocations_refresh_ms"),
            self.revocations_refresh_ms,
            100,
            TIMEOUT_MS_CEILING,
        )?;
        range(
            &format!("{key}.revoked_entries_max"),
            self.revoked_entries_max as u64,
            1,
            100_000_000,
        )?;
        for (i, static_key) in self.keys.iter().enumerate() {
            static_key.validate(&format!("{key}.keys[{i}]"))?;
        }
        range(&format!("{key}.leeway_s"), self.leeway_s, 0, 600)?;
        range(
            &format!("{key}.jwks_refresh_ms"),
            self.jwks_refresh_ms,
            1_000,
            TIMEOUT_MS_CEILING * 24,
        )?;
        range(
            &format!("{key}.jwks_refetch_min_interval_ms"),
            self.jwks_refetch_min_interval_ms,
            0,
            TIMEOUT_MS_CEILING,
        )?;
        range(
            &format!("{key}.token_cache_entries"),
            self.token_cache_entries as u64,
            0,
            10_000_000,
        )?;
        for (claim, header) in &self.claims_to_headers {
            header_name(&format!("{key}.claims_to_headers.{claim}"), header)?;
        }
        Ok(())
    }
}

impl StaticKeyConfig {
    /// `key` is `auth.NAME.keys[I]`.
    fn validate(&self, key: &str) -> Result<(), ConfigError> {
        let sources = usize::from(self.pem.is_some())
            + usize::from(self.pem_file.is_some())
            + usize::from(self.secret.is_some());
        if sources != 1 {
            return Err(invalid(
                key,
                "set exactly one of `pem`, `pem_file`, `secret`",
            ));
        }
        match self.alg.as_str() {
            "HS256" if self.secret.is_none() => {
                return Err(invalid(&format!("{key}.secret"), "HS256 needs `secret`"));
            }
            "RS256" | "ES256" | "EdDSA" if self.secret.is_some() => {
                return Err(invalid(
                    &format!("{key}.alg"),
                    "an asymmetric algorithm needs a PEM public key",
                ));
            }
            "HS256" | "RS256" | "ES256" | "EdDSA" => {}
            other => {
                return Err(invalid(
                    &format!("{key}.alg"),
                    &format!("`{other}` is not one of RS256, ES256, EdDSA, HS256"),
                ));
            }
        }
        if let Some(secret) = &self.secret
            && secret.len() < 32
        {
            return Err(invalid(
                &format!("{key}.secret"),
                "an HS256 secret needs at least 32 bytes",
            ));
        }
        Ok(())
    }
}

impl ApiKeyConfig {
    /// `key` is `auth.NAME`.
    fn validate(&self, key: &str) -> Result<(), ConfigError> {
        header_name(&format!("{key}.header"), &self.header)?;
        header_name(&format!("{key}.identity_header"), &self.identity_header)?;
        if self.keys.is_empty() {
            return Err(invalid(&format!("{key}.keys"), "list at least one key"));
        }
        for (id, value) in &self.keys {
            if value.len() < 16 {
                return Err(invalid(
                    &format!("{key}.keys.{id}"),
                    "an API key needs at least 16 characters",
                ));
            }
            http::HeaderValue::from_str(id).map_err(|_| {
                invalid(
                    &format!("{key}.keys.{id}"),
                    "the key id must be a valid header value",
                )
            })?;
        }
        Ok(())
    }
}
