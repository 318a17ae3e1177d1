//! Authentication: JWT (static keys or a JWKS URL, with a cache of verified tokens) and API
//! keys. Produces an [`Identity`] whose headers the proxy sends upstream.
//!
//! Algorithm confusion is impossible by construction: every key carries the one algorithm it
//! was configured (or published) with, a token is verified only with the algorithm of the key
//! its `kid` names, and a token whose header names another algorithm is rejected before any
//! signature check. `alg: none` is not an algorithm jsonwebtoken knows, so such a token fails
//! to parse.

//!
//! Layout: this module holds the policy enum, the [`Identity`] it produces and the API-key
//! policy; `jwt` the JWT policy and its JWKS refresh; `token_cache` the cache of verified
//! tokens.

mod jwt;
mod token_cache;

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::config::ApiKeyConfig;
use crate::error::ConfigError;

pub(crate) use jwt::JwtPolicy;

/// Who the caller is, once authenticated.
#[derive(Debug, Clone, Default)]
pub(crate) struct Identity {
    /// JWT `sub`, or the API key's id.
    pub(crate) subject: Option<String>,
    /// JWT `jti`: what a revocation names.
    pub(crate) token_id: Option<Box<str>>,
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

fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read_case_insensitively() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer abc"), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
    }
}
