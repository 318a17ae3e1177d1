//! The gateway's TOML configuration: what the file may say, its defaults and limits, and the
//! start-up validation that names the bad key.
//!
//! Parsing (`toml` + serde with `deny_unknown_fields`) catches misspelt keys and wrong types;
//! [`Config::validate`] then checks what serde cannot: references between sections (a route's
//! cluster, auth and rate-limit policies exist), ranges (every limit has a floor and a ceiling)
//! and syntax inside strings (addresses, header names, path templates). Every error carries the
//! dotted key path, for example `routes[2].cluster`.
//!
//! Each section's types sit in their own file next to their checks: `server`, `cluster`
//! (with health checks, outlier ejection and the breaker), `auth`, `rate_limit` and `routes`.
//! [`Config::validate`] runs them section by section; a route's path syntax is judged by the
//! routing module (`crate::route::MatchRule::validate`), which knows nothing of this file.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::error::ConfigError;

mod auth;
mod cluster;
mod cors;
mod rate_limit;
mod routes;
mod server;

pub use auth::{ApiKeyConfig, AuthConfig, JwtConfig, StaticKeyConfig};
pub use cluster::{
    BreakerConfig, ClusterConfig, HealthCheckConfig, LoadBalancing, OutlierConfig, UpstreamProtocol,
};
pub use cors::CorsConfig;
pub use rate_limit::RateLimitConfig;
pub use routes::{RetryConfig, RouteConfig};
pub use server::{ServerConfig, TlsConfig};

/// Default listen address.
pub const LISTEN_DEFAULT: &str = "127.0.0.1:8080";
/// Default time a client has to send a request's headers, in milliseconds. Also bounds how
/// long an idle HTTP/1.1 keep-alive connection is kept (hyper restarts the timer while idle).
pub const HEADER_READ_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// Default upper bound on the total size of a request's headers, in bytes.
pub const HEADER_BYTES_MAX_DEFAULT: usize = 16 * 1024;
/// Default upper bound on the number of request headers.
pub const HEADER_COUNT_MAX_DEFAULT: usize = 100;
/// Default request body limit, in bytes (a route may set its own).
pub const BODY_BYTES_MAX_DEFAULT: u64 = 1024 * 1024;
/// Hard ceiling on any body limit, in bytes.
pub const BODY_BYTES_MAX_CEILING: u64 = 1024 * 1024 * 1024;
/// Default time from request to upstream response headers, in milliseconds (a route may set
/// its own), retries included.
pub const ROUTE_TIMEOUT_MS_DEFAULT: u64 = 30_000;
/// Default time an upstream has to deliver a whole response body once its headers arrived,
/// in milliseconds (a route may set its own). Long enough for large downloads; a route that
/// streams for longer (server-sent events) sets more, up to [`TIMEOUT_MS_CEILING`].
pub const RESPONSE_BODY_TIMEOUT_MS_DEFAULT: u64 = 300_000;
/// Default longest pause between two pieces of an upstream response body, in milliseconds
/// (a route may set its own).
pub const RESPONSE_BODY_IDLE_TIMEOUT_MS_DEFAULT: u64 = 30_000;
/// Ceiling for every `*_ms` timeout, in milliseconds (one hour).
pub const TIMEOUT_MS_CEILING: u64 = 3_600_000;
/// Default time in-flight requests get to finish on shutdown, in milliseconds.
pub const SHUTDOWN_GRACE_MS_DEFAULT: u64 = 10_000;
/// Default most client connections open at once (every worker thread and listener of one
/// gateway together).
pub const CONNECTIONS_MAX_DEFAULT: usize = 10_000;
/// Ceiling on `server.max_connections`.
pub const CONNECTIONS_MAX_CEILING: usize = 1_000_000;
/// Default HTTP/2 concurrent streams per client connection.
pub const H2_STREAMS_MAX_DEFAULT: u32 = 256;
/// Most worker threads.
pub const WORKER_THREADS_MAX: usize = 256;
/// Default upstream connect timeout, in milliseconds.
pub const CONNECT_TIMEOUT_MS_DEFAULT: u64 = 2_000;
/// Default idle upstream connections kept per endpoint.
pub const POOL_IDLE_PER_HOST_DEFAULT: usize = 256;
/// Default time an idle pooled upstream connection is kept, in milliseconds.
pub const POOL_IDLE_TIMEOUT_MS_DEFAULT: u64 = 90_000;
/// Most endpoints one cluster may list.
pub const ENDPOINTS_MAX: usize = 1024;
/// Most retry attempts a route may ask for (first attempt included).
pub const RETRY_ATTEMPTS_MAX: u32 = 5;
/// Default number of keys a rate limiter tracks; beyond it, unknown keys share one overflow
/// bucket.
pub const RATE_LIMIT_KEYS_MAX_DEFAULT: usize = 100_000;
/// Default longest wait for the shared rate-limit store per request, in milliseconds.
pub const REDIS_TIMEOUT_MS_DEFAULT: u64 = 20;
/// Default number of verified tokens a JWT policy caches.
pub const TOKEN_CACHE_ENTRIES_DEFAULT: usize = 10_000;
/// Default clock skew tolerated on `exp` and `nbf`, in seconds.
pub const JWT_LEEWAY_S_DEFAULT: u64 = 30;
/// Default JWKS refresh interval, in milliseconds.
pub const JWKS_REFRESH_MS_DEFAULT: u64 = 300_000;
/// Default minimum time between two JWKS fetches caused by unknown `kid`s, in milliseconds.
pub const JWKS_REFETCH_MIN_INTERVAL_MS_DEFAULT: u64 = 10_000;
/// Default `Strict-Transport-Security` max-age under TLS, seconds (one year).
pub const HSTS_MAX_AGE_S_DEFAULT: u64 = 31_536_000;
/// Default time a browser may cache a CORS preflight answer, seconds.
pub const CORS_MAX_AGE_S_DEFAULT: u64 = 600;
/// Default revocation feed poll interval, in milliseconds.
pub const REVOCATIONS_REFRESH_MS_DEFAULT: u64 = 1_000;
/// Default most revoked tokens remembered per policy.
pub const REVOKED_ENTRIES_MAX_DEFAULT: usize = 1_000_000;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listener and client-side limits.
    #[serde(default)]
    pub server: ServerConfig,
    /// Upstream clusters by name.
    #[serde(default)]
    pub clusters: BTreeMap<String, ClusterConfig>,
    /// Authentication policies by name.
    #[serde(default)]
    pub auth: BTreeMap<String, AuthConfig>,
    /// Rate-limit policies by name.
    #[serde(default)]
    pub rate_limits: BTreeMap<String, RateLimitConfig>,
    /// Routes, tried in order; the first match wins.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Cross-origin access for browsers; none when absent.
    #[serde(default)]
    pub cors: Option<CorsConfig>,
}

impl Config {
    /// Reads and validates a configuration file.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, and the key when the problem is one value.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::from_toml(&text)
    }

    /// Parses and validates configuration text.
    ///
    /// # Errors
    /// [`ConfigError`] naming the bad key.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks cross-references, ranges and the syntax inside strings, one section at a time
    /// (each section's checks sit next to its type).
    ///
    /// # Errors
    /// The first problem found, with its key path.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate()?;
        for (name, cluster) in &self.clusters {
            cluster.validate(&format!("clusters.{name}"))?;
        }
        for (name, policy) in &self.auth {
            policy.validate(&format!("auth.{name}"))?;
        }
        for (name, policy) in &self.rate_limits {
            policy.validate(&format!("rate_limits.{name}"))?;
        }
        if let Some(cors) = &self.cors {
            cors.validate()?;
        }
        if self.routes.is_empty() {
            return Err(invalid("routes", "define at least one [[routes]]"));
        }
        for (i, route) in self.routes.iter().enumerate() {
            route.validate(&format!("routes[{i}]"), self)?;
        }
        Ok(())
    }
}

fn invalid(key: &str, message: &str) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        message: message.to_owned(),
    }
}

fn range(key: &str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(invalid(key, &format!("{value} is outside {min}..={max}")));
    }
    Ok(())
}

fn header_name(key: &str, value: &str) -> Result<(), ConfigError> {
    http::HeaderName::from_bytes(value.as_bytes())
        .map(|_| ())
        .map_err(|_| invalid(key, &format!("`{value}` is not a valid header name")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [clusters.app]
        endpoints = ["127.0.0.1:9000"]
        [[routes]]
        name = "all"
        cluster = "app"
    "#;

    #[test]
    fn a_minimal_config_is_valid_with_defaults() {
        let config = Config::from_toml(MINIMAL).expect("valid");
        assert_eq!(config.server.listen, LISTEN_DEFAULT);
        assert_eq!(config.routes[0].cluster, "app");
    }

    #[test]
    fn an_unknown_cluster_is_reported_with_its_key() {
        let text = MINIMAL.replace("cluster = \"app\"", "cluster = \"nope\"");
        let error = Config::from_toml(&text).expect_err("invalid").to_string();
        assert!(error.contains("routes[0].cluster"), "{error}");
        assert!(error.contains("nope"), "{error}");
    }

    #[test]
    fn a_misspelt_key_is_reported_by_name() {
        let text = MINIMAL.replace("endpoints", "endpoint");
        let error = Config::from_toml(&text).expect_err("invalid").to_string();
        assert!(error.contains("endpoint"), "{error}");
    }
}
