//! Thin wrappers over private hot-path pieces, for `benches/hot_path.rs`.

use std::sync::Arc;

use http::{HeaderMap, Method};

use crate::auth::JwtPolicy;
use crate::config::{AuthConfig, Config};
use crate::route::Matcher;

/// The route matchers of a configuration, matched the way the proxy matches them.
#[derive(Debug)]
pub struct RouteMatchers {
    matchers: Vec<Matcher>,
}

impl RouteMatchers {
    /// Compiles every route of `config`.
    ///
    /// # Errors
    /// A route that does not compile.
    pub fn from_config(config: &Config) -> Result<Self, String> {
        let matchers = config
            .routes
            .iter()
            .map(|r| Matcher::from_rule(&r.match_rule()))
            .collect::<Result<_, _>>()?;
        Ok(Self { matchers })
    }

    /// The index of the first matching route, and the rewritten path's length. The path is
    /// normalised first, as the proxy does; `None` when it is refused.
    pub fn find(
        &self,
        method: &Method,
        host: Option<&str>,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<(usize, usize)> {
        let path = crate::path::normalize(path).ok()?;
        let path = path.as_ref();
        self.matchers
            .iter()
            .position(|m| m.matches(method, host, path, headers))
            .map(|i| (i, self.matchers[i].rewrite(path).len()))
    }
}

/// One JWT policy of a configuration.
#[derive(Debug)]
pub struct JwtVerifier {
    policy: Arc<JwtPolicy>,
}

impl JwtVerifier {
    /// Builds the JWT policy named `name` from `config` (static keys only: no JWKS fetch).
    ///
    /// # Errors
    /// When there is no such JWT policy or it cannot be built.
    pub async fn from_config(config: &Config, name: &str) -> Result<Self, String> {
        let Some(AuthConfig::Jwt(jwt)) = config.auth.get(name) else {
            return Err(format!("no jwt policy `{name}`"));
        };
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(hyper_util::client::legacy::connect::HttpConnector::new());
        let policy = JwtPolicy::new(name, jwt, client)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Self { policy })
    }

    /// Whether `token` is in the verified-token cache (the synchronous hot path).
    pub fn is_cached(&self, token: &str) -> bool {
        self.policy.cached(token).is_some()
    }

    /// Verifies `token` (from the cache after the first success).
    pub async fn verify(&self, token: &str) -> bool {
        self.policy.verify(token).await.is_ok()
    }
}
