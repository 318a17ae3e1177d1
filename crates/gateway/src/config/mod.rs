//! The gateway's TOML configuration: what the file may say, its defaults and limits, and the
//! start-up validation that names the bad key.
//!
//! Parsing (`toml` + serde with `deny_unknown_fields`) catches misspelt keys and wrong types;
//! [`Config::validate`] then checks what serde cannot: references between sections (a route's
//! cluster, auth and rate-limit policies exist), ranges (every limit has a floor and a ceiling)
//! and syntax inside strings (addresses, header names, path templates). Every error carries the
//! dotted key path, for example `routes[2].cluster`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;

use crate::error::ConfigError;

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
}

/// `[server]`: the listener and the limits it enforces on clients.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on, `ip:port`.
    pub listen: String,
    /// Time a client has to send its request headers (slowloris defence), milliseconds.
    pub header_read_timeout_ms: u64,
    /// Largest total size of request headers, bytes.
    pub header_bytes_max: usize,
    /// Most request headers.
    pub header_count_max: usize,
    /// Default request body limit, bytes.
    pub body_bytes_max: u64,
    /// Default route timeout, milliseconds: from the request to the upstream's response
    /// headers, retries included.
    pub timeout_ms: u64,
    /// Default time the upstream has to send the whole response body once its headers
    /// arrived, milliseconds. When it passes (or the idle timeout below does), the response,
    /// already started, cannot change status: the client connection is aborted (HTTP/1.1) or
    /// the stream reset (HTTP/2), the upstream connection is dropped, and
    /// `trellis_gateway_upstream_body_timeouts_total` counts it.
    pub response_body_timeout_ms: u64,
    /// Default longest pause between two pieces of the upstream response body, milliseconds.
    pub response_body_idle_timeout_ms: u64,
    /// Time in-flight requests get on shutdown, milliseconds.
    pub shutdown_grace_ms: u64,
    /// Most concurrent HTTP/2 streams per client connection.
    pub h2_streams_max: u32,
    /// Most client connections open at once, across every worker thread. At the limit the
    /// gateway stops accepting: new connections wait in the kernel's listen backlog (which
    /// refuses them once it is full) and are served as open ones close.
    /// `trellis_gateway_connections_open` shows the count and
    /// `trellis_gateway_connection_limit_reached_total` how often accepting had to wait.
    pub max_connections: usize,
    /// Serve the admin endpoints `/healthz`, `/readyz` and `/metrics`. Without
    /// `admin_listen` they are served on the public listener, to anyone who can reach it
    /// (kept for compatibility; set `admin_listen` to keep them private).
    pub admin_endpoints: bool,
    /// A separate operator listener, `ip:port` (e.g. `127.0.0.1:9080`). When set, the admin
    /// endpoints are served only there ([`Gateway::serve_admin`](crate::Gateway::serve_admin);
    /// [`run`](crate::run) binds it) and the public listener answers 404 for their paths.
    /// Needs `admin_endpoints = true`.
    pub admin_listen: Option<String>,
    /// Worker threads of [`run`](crate::run), each with its own single-threaded runtime and
    /// upstream connection pool; 0 = one per CPU.
    pub worker_threads: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: LISTEN_DEFAULT.to_owned(),
            header_read_timeout_ms: HEADER_READ_TIMEOUT_MS_DEFAULT,
            header_bytes_max: HEADER_BYTES_MAX_DEFAULT,
            header_count_max: HEADER_COUNT_MAX_DEFAULT,
            body_bytes_max: BODY_BYTES_MAX_DEFAULT,
            timeout_ms: ROUTE_TIMEOUT_MS_DEFAULT,
            response_body_timeout_ms: RESPONSE_BODY_TIMEOUT_MS_DEFAULT,
            response_body_idle_timeout_ms: RESPONSE_BODY_IDLE_TIMEOUT_MS_DEFAULT,
            shutdown_grace_ms: SHUTDOWN_GRACE_MS_DEFAULT,
            h2_streams_max: H2_STREAMS_MAX_DEFAULT,
            max_connections: CONNECTIONS_MAX_DEFAULT,
            admin_endpoints: true,
            admin_listen: None,
            worker_threads: 0,
        }
    }
}

/// How a cluster picks an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancing {
    /// Each available endpoint in turn.
    #[default]
    RoundRobin,
    /// The available endpoint with the fewest requests in flight.
    LeastOutstanding,
    /// Two random available endpoints; the one with the lower EWMA latency × (in flight + 1).
    P2cEwma,
}

/// The HTTP version spoken to a cluster's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with keep-alive.
    #[default]
    Http1,
    /// HTTP/2 over cleartext with prior knowledge.
    H2c,
}

/// `[clusters.NAME]`: a set of interchangeable upstream endpoints.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// `host:port` of each endpoint.
    pub endpoints: Vec<String>,
    /// Endpoint selection.
    #[serde(default)]
    pub load_balancing: LoadBalancing,
    /// Protocol to the endpoints.
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// Connect timeout, milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Idle pooled connections kept per endpoint.
    #[serde(default = "default_pool_idle_per_host")]
    pub pool_idle_per_host: usize,
    /// Time an idle pooled connection is kept, milliseconds.
    #[serde(default = "default_pool_idle_timeout_ms")]
    pub pool_idle_timeout_ms: u64,
    /// Active health checking; off when absent.
    #[serde(default)]
    pub health_check: Option<HealthCheckConfig>,
    /// Passive outlier ejection.
    #[serde(default)]
    pub outlier: OutlierConfig,
    /// The circuit breaker each endpoint gets.
    #[serde(default)]
    pub breaker: BreakerConfig,
}

fn default_connect_timeout_ms() -> u64 {
    CONNECT_TIMEOUT_MS_DEFAULT
}
fn default_pool_idle_per_host() -> usize {
    POOL_IDLE_PER_HOST_DEFAULT
}
fn default_pool_idle_timeout_ms() -> u64 {
    POOL_IDLE_TIMEOUT_MS_DEFAULT
}

/// `[clusters.NAME.health_check]`: active checks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckConfig {
    /// Path requested with GET; a 2xx answer is healthy.
    pub path: String,
    /// Time between checks, milliseconds.
    pub interval_ms: u64,
    /// Time one check may take, milliseconds.
    pub timeout_ms: u64,
    /// Consecutive successes that mark an unhealthy endpoint healthy.
    pub healthy_threshold: u32,
    /// Consecutive failures that mark a healthy endpoint unhealthy.
    pub unhealthy_threshold: u32,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            path: "/healthz".to_owned(),
            interval_ms: 5_000,
            timeout_ms: 1_000,
            healthy_threshold: 2,
            unhealthy_threshold: 2,
        }
    }
}

/// `[clusters.NAME.outlier]`: passive ejection of endpoints that keep failing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierConfig {
    /// Consecutive 5xx answers or connect errors that eject an endpoint; 0 turns ejection off.
    pub consecutive_failures: u32,
    /// First ejection time, milliseconds; each further ejection doubles it.
    pub base_ejection_ms: u64,
    /// Longest ejection time, milliseconds.
    pub max_ejection_ms: u64,
    /// Most endpoints ejected at once, as a percentage of the cluster (at least one stays).
    pub max_ejected_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection_ms: 5_000,
            max_ejection_ms: 300_000,
            max_ejected_percent: 50,
        }
    }
}

/// `[clusters.NAME.breaker]`: the trellis-resilience circuit breaker of each endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Calls in the count window.
    pub window_calls: u32,
    /// Calls needed before the failure rate is judged.
    pub minimum_calls: u32,
    /// Failure rate (0..=1) that opens the breaker.
    pub failure_rate: f64,
    /// Time the breaker stays open, milliseconds.
    pub open_ms: u64,
    /// Trial calls admitted while half-open.
    pub half_open_calls: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            window_calls: 100,
            minimum_calls: 20,
            failure_rate: 0.5,
            open_ms: 10_000,
            half_open_calls: 5,
        }
    }
}

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

/// `[rate_limits.NAME]`: a GCRA policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// What identifies a client: `ip`, `jwt_sub`, `api_key` or `header:NAME`.
    pub key: String,
    /// Sustained rate, requests per second.
    pub requests_per_second: u32,
    /// Burst size, requests.
    pub burst: u32,
    /// Most keys tracked. A full table forgets keys whose bucket has refilled (nothing is
    /// lost: they would start full anyway); until that frees room, keys it does not know
    /// share one overflow bucket with this policy's rate and burst, so a flood of new keys
    /// never hands out fresh bursts (`trellis_gateway_rate_limit_overflow_total` counts
    /// requests charged to that bucket).
    #[serde(default = "default_keys_max")]
    pub keys_max: usize,
    /// Share the limit across gateway replicas through this Redis (`redis://host:port/db`).
    /// The local limiter still answers when Redis fails or is slower than `redis_timeout_ms`.
    #[serde(default)]
    pub redis_url: Option<String>,
    /// Longest wait for Redis per request, milliseconds.
    #[serde(default = "default_redis_timeout_ms")]
    pub redis_timeout_ms: u64,
}

fn default_redis_timeout_ms() -> u64 {
    REDIS_TIMEOUT_MS_DEFAULT
}

fn default_keys_max() -> usize {
    RATE_LIMIT_KEYS_MAX_DEFAULT
}

/// `[[routes]]`: one route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Name used in metrics and logs.
    pub name: String,
    /// `Host` to match (without port); `*.example.com` matches subdomains. Any when absent.
    #[serde(default)]
    pub host: Option<String>,
    /// Exact path. Route paths and request paths are compared in canonical form (escapes of
    /// unreserved characters decoded, `//` merged, dot segments resolved; see the crate docs)
    /// and case-sensitively; a path that cannot be normalised is refused at start-up.
    #[serde(default)]
    pub path_exact: Option<String>,
    /// Path prefix, on segment boundaries (`/api` matches `/api` and `/api/x`, not `/apix`).
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// Path template, `{name}` matching one segment: `/api/orders/{id}`.
    #[serde(default)]
    pub path_template: Option<String>,
    /// Methods; any when empty.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Headers that must be present with these exact values.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Upstream cluster.
    pub cluster: String,
    /// Prefix removed from the path before forwarding.
    #[serde(default)]
    pub strip_prefix: Option<String>,
    /// Prefix put in front of the (stripped) path before forwarding.
    #[serde(default)]
    pub add_prefix: Option<String>,
    /// Route timeout, milliseconds: from the request to the upstream's response headers
    /// (retries included).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Time the upstream has to send the whole response body after its headers,
    /// milliseconds; `server.response_body_timeout_ms` when absent.
    #[serde(default)]
    pub response_body_timeout_ms: Option<u64>,
    /// Longest pause between two pieces of the upstream response body, milliseconds;
    /// `server.response_body_idle_timeout_ms` when absent.
    #[serde(default)]
    pub response_body_idle_timeout_ms: Option<u64>,
    /// Request body limit, bytes.
    #[serde(default)]
    pub body_bytes_max: Option<u64>,
    /// Retry policy; no retries when absent.
    #[serde(default)]
    pub retry: Option<RetryConfig>,
    /// Auth policies; any one succeeding admits the request. Open route when empty.
    #[serde(default)]
    pub auth: Vec<String>,
    /// Scopes (`scope`/`scp` claim) all required; 403 when one is missing.
    #[serde(default)]
    pub required_scopes: Vec<String>,
    /// Roles (`roles`/`role` claim), at least one required; 403 otherwise.
    #[serde(default)]
    pub required_roles: Vec<String>,
    /// Rate-limit policy.
    #[serde(default)]
    pub rate_limit: Option<String>,
}

/// A route's retry policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts in all, first included (2..=5).
    pub attempts: u32,
    /// Statuses that are retried (for any method when the body is empty); idempotent methods
    /// are also retried after connection errors.
    #[serde(default = "default_retry_statuses")]
    pub on_statuses: Vec<u16>,
    /// Retries allowed per request, as a ratio of requests (the retry budget).
    #[serde(default = "default_budget_ratio")]
    pub budget_ratio: f64,
}

fn default_retry_statuses() -> Vec<u16> {
    vec![502, 503, 504]
}
fn default_budget_ratio() -> f64 {
    0.2
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

    /// Checks cross-references, ranges and the syntax inside strings.
    ///
    /// # Errors
    /// The first problem found, with its key path.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        s.listen
            .parse::<SocketAddr>()
            .map_err(|_| invalid("server.listen", "expected ip:port, e.g. 127.0.0.1:8080"))?;
        if let Some(admin) = &s.admin_listen {
            admin.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    "server.admin_listen",
                    "expected ip:port, e.g. 127.0.0.1:9080",
                )
            })?;
            if !s.admin_endpoints {
                return Err(invalid(
                    "server.admin_listen",
                    "an operator listener needs `admin_endpoints = true`",
                ));
            }
        }
        range(
            "server.header_read_timeout_ms",
            s.header_read_timeout_ms,
            1,
            TIMEOUT_MS_CEILING,
        )?;
        range("server.timeout_ms", s.timeout_ms, 1, TIMEOUT_MS_CEILING)?;
        range(
            "server.response_body_timeout_ms",
            s.response_body_timeout_ms,
            1,
            TIMEOUT_MS_CEILING,
        )?;
        range(
            "server.response_body_idle_timeout_ms",
            s.response_body_idle_timeout_ms,
            1,
            TIMEOUT_MS_CEILING,
        )?;
        range(
            "server.shutdown_grace_ms",
            s.shutdown_grace_ms,
            0,
            TIMEOUT_MS_CEILING,
        )?;
        range(
            "server.header_bytes_max",
            s.header_bytes_max as u64,
            1024,
            1024 * 1024,
        )?;
        range(
            "server.header_count_max",
            s.header_count_max as u64,
            8,
            1000,
        )?;
        range(
            "server.body_bytes_max",
            s.body_bytes_max,
            0,
            BODY_BYTES_MAX_CEILING,
        )?;
        range(
            "server.h2_streams_max",
            u64::from(s.h2_streams_max),
            1,
            10_000,
        )?;
        range(
            "server.max_connections",
            s.max_connections as u64,
            1,
            CONNECTIONS_MAX_CEILING as u64,
        )?;
        range(
            "server.worker_threads",
            s.worker_threads as u64,
            0,
            WORKER_THREADS_MAX as u64,
        )?;

        for (name, c) in &self.clusters {
            let key = format!("clusters.{name}");
            if c.endpoints.is_empty() || c.endpoints.len() > ENDPOINTS_MAX {
                return Err(invalid(
                    &format!("{key}.endpoints"),
                    &format!("list 1 to {ENDPOINTS_MAX} endpoints"),
                ));
            }
            for (i, e) in c.endpoints.iter().enumerate() {
                let ok = e
                    .parse::<http::uri::Authority>()
                    .ok()
                    .is_some_and(|a| a.port_u16().is_some() && !e.contains('@'));
                if !ok {
                    return Err(invalid(
                        &format!("{key}.endpoints[{i}]"),
                        &format!("`{e}` is not host:port"),
                    ));
                }
            }
            range(
                &format!("{key}.connect_timeout_ms"),
                c.connect_timeout_ms,
                1,
                TIMEOUT_MS_CEILING,
            )?;
            range(
                &format!("{key}.pool_idle_timeout_ms"),
                c.pool_idle_timeout_ms,
                1,
                TIMEOUT_MS_CEILING,
            )?;
            range(
                &format!("{key}.pool_idle_per_host"),
                c.pool_idle_per_host as u64,
                0,
                65_536,
            )?;
            if let Some(h) = &c.health_check {
                let hk = format!("{key}.health_check");
                if !h.path.starts_with('/') || h.path.parse::<http::uri::PathAndQuery>().is_err() {
                    return Err(invalid(
                        &format!("{hk}.path"),
                        "expected a path starting with /",
                    ));
                }
                range(
                    &format!("{hk}.interval_ms"),
                    h.interval_ms,
                    10,
                    TIMEOUT_MS_CEILING,
                )?;
                range(
                    &format!("{hk}.timeout_ms"),
                    h.timeout_ms,
                    1,
                    TIMEOUT_MS_CEILING,
                )?;
                range(
                    &format!("{hk}.healthy_threshold"),
                    u64::from(h.healthy_threshold),
                    1,
                    100,
                )?;
                range(
                    &format!("{hk}.unhealthy_threshold"),
                    u64::from(h.unhealthy_threshold),
                    1,
                    100,
                )?;
            }
            let o = &c.outlier;
            range(
                &format!("{key}.outlier.consecutive_failures"),
                u64::from(o.consecutive_failures),
                0,
                1000,
            )?;
            range(
                &format!("{key}.outlier.base_ejection_ms"),
                o.base_ejection_ms,
                1,
                TIMEOUT_MS_CEILING,
            )?;
            range(
                &format!("{key}.outlier.max_ejection_ms"),
                o.max_ejection_ms,
                o.base_ejection_ms,
                TIMEOUT_MS_CEILING,
            )?;
            range(
                &format!("{key}.outlier.max_ejected_percent"),
                u64::from(o.max_ejected_percent),
                0,
                100,
            )?;
            let b = &c.breaker;
            range(
                &format!("{key}.breaker.window_calls"),
                u64::from(b.window_calls),
                1,
                10_000,
            )?;
            range(
                &format!("{key}.breaker.minimum_calls"),
                u64::from(b.minimum_calls),
                1,
                u64::from(b.window_calls),
            )?;
            if !(b.failure_rate > 0.0 && b.failure_rate <= 1.0) {
                return Err(invalid(
                    &format!("{key}.breaker.failure_rate"),
                    "expected a number in (0, 1]",
                ));
            }
            range(
                &format!("{key}.breaker.open_ms"),
                b.open_ms,
                1,
                TIMEOUT_MS_CEILING,
            )?;
            range(
                &format!("{key}.breaker.half_open_calls"),
                u64::from(b.half_open_calls),
                1,
                1000,
            )?;
        }

        for (name, a) in &self.auth {
            let key = format!("auth.{name}");
            match a {
                AuthConfig::Jwt(j) => {
                    if j.jwks_url.is_none() && j.keys.is_empty() {
                        return Err(invalid(&key, "a jwt policy needs `jwks_url` or `keys`"));
                    }
                    if let Some(url) = &j.jwks_url {
                        let ok = url.parse::<http::Uri>().ok().is_some_and(|u| {
                            u.scheme_str() == Some("http") && u.authority().is_some()
                        });
                        if !ok {
                            return Err(invalid(
                                &format!("{key}.jwks_url"),
                                "expected an http:// URL (the gateway has no TLS client)",
                            ));
                        }
                    }
                    for (i, k) in j.keys.iter().enumerate() {
                        let kk = format!("{key}.keys[{i}]");
                        let sources = usize::from(k.pem.is_some())
                            + usize::from(k.pem_file.is_some())
                            + usize::from(k.secret.is_some());
                        if sources != 1 {
                            return Err(invalid(
                                &kk,
                                "set exactly one of `pem`, `pem_file`, `secret`",
                            ));
                        }
                        match k.alg.as_str() {
                            "HS256" if k.secret.is_none() => {
                                return Err(invalid(
                                    &format!("{kk}.secret"),
                                    "HS256 needs `secret`",
                                ));
                            }
                            "RS256" | "ES256" | "EdDSA" if k.secret.is_some() => {
                                return Err(invalid(
                                    &format!("{kk}.alg"),
                                    "an asymmetric algorithm needs a PEM public key",
                                ));
                            }
                            "HS256" | "RS256" | "ES256" | "EdDSA" => {}
                            other => {
                                return Err(invalid(
                                    &format!("{kk}.alg"),
                                    &format!("`{other}` is not one of RS256, ES256, EdDSA, HS256"),
                                ));
                            }
                        }
                        if let Some(secret) = &k.secret
                            && secret.len() < 32
                        {
                            return Err(invalid(
                                &format!("{kk}.secret"),
                                "an HS256 secret needs at least 32 bytes",
                            ));
                        }
                    }
                    range(&format!("{key}.leeway_s"), j.leeway_s, 0, 600)?;
                    range(
                        &format!("{key}.jwks_refresh_ms"),
                        j.jwks_refresh_ms,
                        1_000,
                        TIMEOUT_MS_CEILING * 24,
                    )?;
                    range(
                        &format!("{key}.jwks_refetch_min_interval_ms"),
                        j.jwks_refetch_min_interval_ms,
                        0,
                        TIMEOUT_MS_CEILING,
                    )?;
                    range(
                        &format!("{key}.token_cache_entries"),
                        j.token_cache_entries as u64,
                        0,
                        10_000_000,
                    )?;
                    for (claim, header) in &j.claims_to_headers {
                        header_name(&format!("{key}.claims_to_headers.{claim}"), header)?;
                    }
                }
                AuthConfig::ApiKey(k) => {
                    header_name(&format!("{key}.header"), &k.header)?;
                    header_name(&format!("{key}.identity_header"), &k.identity_header)?;
                    if k.keys.is_empty() {
                        return Err(invalid(&format!("{key}.keys"), "list at least one key"));
                    }
                    for (id, value) in &k.keys {
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
                }
            }
        }

        for (name, r) in &self.rate_limits {
            let key = format!("rate_limits.{name}");
            match r.key.as_str() {
                "ip" | "jwt_sub" | "api_key" => {}
                other => match other.strip_prefix("header:") {
                    Some(h) => header_name(&format!("{key}.key"), h)?,
                    None => {
                        return Err(invalid(
                            &format!("{key}.key"),
                            &format!("`{other}` is not ip, jwt_sub, api_key or header:NAME"),
                        ));
                    }
                },
            }
            range(
                &format!("{key}.requests_per_second"),
                u64::from(r.requests_per_second),
                1,
                10_000_000,
            )?;
            range(&format!("{key}.burst"), u64::from(r.burst), 1, 10_000_000)?;
            if let Some(url) = &r.redis_url
                && !(url.starts_with("redis://") && redis::Client::open(url.as_str()).is_ok())
            {
                return Err(invalid(
                    &format!("{key}.redis_url"),
                    "expected redis://host:port[/db]",
                ));
            }
            range(
                &format!("{key}.redis_timeout_ms"),
                r.redis_timeout_ms,
                1,
                TIMEOUT_MS_CEILING,
            )?;
            range(
                &format!("{key}.keys_max"),
                r.keys_max as u64,
                1,
                100_000_000,
            )?;
        }

        if self.routes.is_empty() {
            return Err(invalid("routes", "define at least one [[routes]]"));
        }
        for (i, r) in self.routes.iter().enumerate() {
            let key = format!("routes[{i}]");
            if r.name.is_empty() {
                return Err(invalid(&format!("{key}.name"), "must not be empty"));
            }
            if !self.clusters.contains_key(&r.cluster) {
                return Err(invalid(
                    &format!("{key}.cluster"),
                    &format!("no cluster named `{}` in [clusters]", r.cluster),
                ));
            }
            let paths = usize::from(r.path_exact.is_some())
                + usize::from(r.path_prefix.is_some())
                + usize::from(r.path_template.is_some());
            if paths > 1 {
                return Err(invalid(
                    &key,
                    "set at most one of `path_exact`, `path_prefix`, `path_template`",
                ));
            }
            for (field, value) in [
                ("path_exact", &r.path_exact),
                ("path_prefix", &r.path_prefix),
                ("path_template", &r.path_template),
                ("strip_prefix", &r.strip_prefix),
                ("add_prefix", &r.add_prefix),
            ] {
                if let Some(v) = value
                    && !v.starts_with('/')
                {
                    return Err(invalid(&format!("{key}.{field}"), "must start with /"));
                }
                if field != "path_template"
                    && let Some(v) = value
                    && let Err(e) = crate::path::normalize(v)
                {
                    return Err(invalid(
                        &format!("{key}.{field}"),
                        &format!("cannot be normalised: {}", e.0),
                    ));
                }
            }
            if let Some(t) = &r.path_template {
                crate::route::PathTemplate::parse(t)
                    .map_err(|m| invalid(&format!("{key}.path_template"), &m))?;
            }
            for (j, m) in r.methods.iter().enumerate() {
                http::Method::from_bytes(m.as_bytes())
                    .map_err(|_| invalid(&format!("{key}.methods[{j}]"), "not an HTTP method"))?;
            }
            for (h, v) in &r.headers {
                header_name(&format!("{key}.headers.{h}"), h)?;
                http::HeaderValue::from_str(v).map_err(|_| {
                    invalid(&format!("{key}.headers.{h}"), "not a valid header value")
                })?;
            }
            for (field, value) in [
                ("timeout_ms", r.timeout_ms),
                ("response_body_timeout_ms", r.response_body_timeout_ms),
                (
                    "response_body_idle_timeout_ms",
                    r.response_body_idle_timeout_ms,
                ),
            ] {
                if let Some(t) = value {
                    range(&format!("{key}.{field}"), t, 1, TIMEOUT_MS_CEILING)?;
                }
            }
            if let Some(b) = r.body_bytes_max {
                range(
                    &format!("{key}.body_bytes_max"),
                    b,
                    0,
                    BODY_BYTES_MAX_CEILING,
                )?;
            }
            if let Some(retry) = &r.retry {
                range(
                    &format!("{key}.retry.attempts"),
                    u64::from(retry.attempts),
                    1,
                    u64::from(RETRY_ATTEMPTS_MAX),
                )?;
                if !(0.0..=1.0).contains(&retry.budget_ratio) {
                    return Err(invalid(
                        &format!("{key}.retry.budget_ratio"),
                        "expected a number in [0, 1]",
                    ));
                }
                for (j, s) in retry.on_statuses.iter().enumerate() {
                    range(
                        &format!("{key}.retry.on_statuses[{j}]"),
                        u64::from(*s),
                        500,
                        599,
                    )?;
                }
            }
            for (j, a) in r.auth.iter().enumerate() {
                if !self.auth.contains_key(a) {
                    return Err(invalid(
                        &format!("{key}.auth[{j}]"),
                        &format!("no auth policy named `{a}` in [auth]"),
                    ));
                }
            }
            if (!r.required_scopes.is_empty() || !r.required_roles.is_empty()) && r.auth.is_empty()
            {
                return Err(invalid(
                    &format!("{key}.required_scopes"),
                    "scopes and roles need an `auth` policy",
                ));
            }
            if let Some(rl) = &r.rate_limit
                && !self.rate_limits.contains_key(rl)
            {
                return Err(invalid(
                    &format!("{key}.rate_limit"),
                    &format!("no rate-limit policy named `{rl}` in [rate_limits]"),
                ));
            }
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
