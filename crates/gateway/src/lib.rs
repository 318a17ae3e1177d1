//! An API gateway for HTTP services: routing, JWT and API-key authentication, GCRA rate
//! limits, load balancing with health checks and outlier ejection, and a circuit breaker per
//! upstream endpoint.
//!
//! # Overview
//!
//! The gateway reads one TOML file ([`Config`]; `examples/gateway.toml` shows every section),
//! validates it at start-up (errors name the bad key, such as `routes[2].cluster`), and proxies
//! requests to upstream clusters with hyper's pooled client. Both sides speak HTTP/1.1 and
//! HTTP/2 over cleartext (h2c); bodies stream through without buffering.
//!
//! Per request, in order: path normalisation (see below; 400 `invalid_path` for a path that
//! cannot be normalised safely), the admin endpoints (`/healthz`, `/readyz`, `/metrics`),
//! routing (host, path exact/prefix/template, method, headers), [`GatewayHooks::request_filter`], the
//! declared body size (413), authentication (401 with `WWW-Authenticate`, 403 for a missing
//! scope or role), rate limiting (GCRA per client key, optionally shared across replicas through
//! Redis; 429 with `Retry-After` and `RateLimit-*`), then the upstream
//! call: an endpoint is picked (round robin, least outstanding, or power of two choices on
//! EWMA latency) among those that pass active health checks, are not ejected, and whose
//! breaker admits the call; idempotent or bodiless requests are retried within the route's
//! timeout and retry budget. Upstream failures become 502/503/504 with a JSON body naming the
//! cause. The route timeout (`timeout_ms`) bounds the wait for the response headers; the body
//! that follows is bounded by `response_body_timeout_ms` (whole body, default 5 minutes) and
//! `response_body_idle_timeout_ms` (longest pause, default 30 s), server-wide or per route.
//! When one passes mid-body the client's connection is aborted (the status is already sent)
//! and `trellis_gateway_upstream_body_timeouts_total` counts it. Every answer carries `x-request-id`; `traceparent` is continued through
//! trellis-telemetry.
//!
//! The admin endpoints are on the public listener by default (`admin_endpoints = true`),
//! where anyone who reaches the gateway can read `/metrics`. With `server.admin_listen` set
//! (e.g. `"127.0.0.1:9080"`) they move to a separate operator listener:
//! [`Gateway::bind_admin`] binds it (its `local_addr` is the bound address),
//! [`Gateway::serve_admin`] serves it, [`run`] does both; the public listener then answers
//! 404 `no_route` for `/healthz`, `/readyz` and `/metrics` and never forwards them.
//!
//! Client-side limits: `server.max_connections` connections open at once (beyond it the
//! gateway stops accepting until one closes; the kernel's backlog holds or refuses the rest),
//! `header_read_timeout_ms` for slow clients, header size and count, body size per route.
//!
//! [`Gateway::serve`] runs on the caller's tokio runtime (tests, embedding);
//! [`Gateway::serve_threads`] (what [`run`] uses) runs one single-threaded runtime per core,
//! each with its own upstream connection pool, sharing the routing table, breakers, rate
//! limiters and token caches. [`Gateway::reload`] swaps the whole table; requests in flight
//! finish on the one they started with. [`GatewayHooks`] is the extension point.
//!
//! # Paths
//!
//! Routes match the canonical form of the request path, and that form (not the bytes the
//! client sent) is what the upstream receives, with the query unchanged: escapes of
//! unreserved characters decoded (`%61` is `a`), other escapes in upper case, `//` merged,
//! `.` and `..` resolved. So `/public/../admin` and `//admin` are `/admin`, and need what the
//! `/admin` route needs. Spellings an upstream could read in more than one way are refused
//! with 400 `invalid_path`: `%2F`, `%5C`, `\`, an escaped dot segment (`%2e%2e`), a double
//! escape (`%252e`), a `;` (send `%3B`), control characters, malformed escapes, and `..`
//! above the root. Matching is case-sensitive (`/ADMIN` is not `/admin`); an upstream that
//! routes case-insensitively must not share a catch-all route with a protected prefix.
//!
//! Design notes: docs/decisions/0005-gateway-design.md; figures: docs/BENCHMARKS.md.
//!
//! # How it fits
//!
//! It uses [`trellis_resilience::CircuitBreaker`] (one per endpoint) and
//! [`trellis_resilience::RetryBudget`], and [`trellis_telemetry`]'s trace-context server layer
//! and Prometheus recorder. The `trellis gateway --config gateway.toml` command calls [`run`].
//! The shop's users service publishes the JWKS the gateway verifies tokens with.
//!
//! This crate has no cargo features.
//!
//! # Example
//!
//! ```
//! use trellis_gateway::{Config, Gateway};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config::from_toml(
//!     r#"
//!     [server]
//!     listen = "127.0.0.1:0"
//!
//!     [clusters.orders]
//!     endpoints = ["127.0.0.1:8104"]
//!     load_balancing = "p2c_ewma"
//!
//!     [[routes]]
//!     name = "orders"
//!     path_prefix = "/api/orders"
//!     cluster = "orders"
//!     timeout_ms = 2000
//!     "#,
//! )?;
//! let gateway = Gateway::from_config(config).await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! // Serves until the shutdown future completes (here: at once).
//! gateway.serve(listener, async {}).await?;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod auth;
mod body;
pub mod config;
mod error;
mod hooks;
mod metric_help;
mod path;
mod proxy;
mod rate_limit;
mod route;
mod server;
mod tls;
mod upstream;

pub use body::{BoxError, GatewayBody};
pub use config::Config;
pub use error::{ConfigError, ErrorSource, ProxyError};
pub use hooks::{GatewayHooks, HookDecision, NoHooks, RequestCtx};
pub use route::PathTemplate;
pub use server::{Gateway, GatewayError, run, run_on, shutdown_signal};

#[doc(hidden)]
pub mod bench {
    //! Hot-path entry points for the criterion benchmark; not a stable API.
    pub use crate::bench_support::*;
}

mod bench_support;
