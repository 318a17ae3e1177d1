//! The routing table built from a [`Config`]: clusters (with their health checks), auth
//! policies, rate limiters and compiled routes, swapped whole on reload.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use http::header::{self, HeaderName};
use metrics::{Counter, Histogram};
use trellis_resilience::RetryBudget;

use crate::auth::{ApiKeyPolicy, AuthPolicy, JwtPolicy};
use crate::config::{AuthConfig, Config};
use crate::error::ConfigError;
use crate::rate_limit::RouteLimiter;
use crate::route::Matcher;
use crate::upstream::{Cluster, spawn_health_checks};

/// How often idle rate-limit keys are evicted.
const RATE_LIMIT_EVICT_INTERVAL: Duration = Duration::from_secs(30);
/// Retries banked in a route's retry budget at start, and at most.
const RETRY_BUDGET_BANKED: u32 = 10;

#[derive(Debug)]
pub(super) struct RetryRule {
    pub(super) attempts: u32,
    pub(super) statuses: Vec<StatusCode>,
    pub(super) budget: RetryBudget,
}

#[derive(Debug)]
pub(super) struct RouteMetrics {
    by_class: [Counter; 5],
    duration: Histogram,
    pub(super) body_timeouts: Counter,
}

impl RouteMetrics {
    fn new(route: &str) -> Self {
        let class = |c: &'static str| metrics::counter!("trellis_gateway_requests_total", "route" => route.to_owned(), "status_class" => c);
        Self {
            by_class: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            duration: metrics::histogram!("trellis_gateway_request_duration_seconds", "route" => route.to_owned()),
            body_timeouts: metrics::counter!("trellis_gateway_upstream_body_timeouts_total", "route" => route.to_owned()),
        }
    }

    pub(super) fn record(&self, status: StatusCode, elapsed: Duration) {
        let index = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.by_class[index].increment(1);
        self.duration.record(elapsed.as_secs_f64());
    }
}

/// One compiled route.
#[derive(Debug)]
pub(crate) struct Route {
    pub(super) name: Arc<str>,
    pub(super) matcher: Matcher,
    pub(super) cluster: Arc<Cluster>,
    pub(super) timeout: Duration,
    pub(super) response_body_timeout: Duration,
    pub(super) response_body_idle_timeout: Duration,
    pub(super) body_bytes_max: u64,
    pub(super) retry: Option<RetryRule>,
    pub(super) auth: Vec<Arc<AuthPolicy>>,
    pub(super) required_scopes: Vec<String>,
    pub(super) required_roles: Vec<String>,
    pub(super) limiter: Option<Arc<RouteLimiter>>,
    pub(super) metrics: RouteMetrics,
}

/// Everything built from one configuration; swapped whole on reload.
#[derive(Debug)]
pub(crate) struct Table {
    routes: Vec<Route>,
    clusters: BTreeMap<String, Arc<Cluster>>,
    /// Headers the gateway sets from identities: client-sent copies are always removed.
    pub(super) identity_headers: Vec<HeaderName>,
    /// Credential headers (API keys) not forwarded.
    pub(super) credential_headers: Vec<HeaderName>,
    pub(super) unrouted: RouteMetrics,
    /// `[cors]`, when cross-origin access is configured.
    pub(super) cors: Option<super::cors::Cors>,
}

impl Table {
    /// Builds clusters (with their health checks), auth policies and routes.
    pub(crate) async fn build(config: &Config) -> Result<Arc<Self>, ConfigError> {
        config.validate()?;
        let mut clusters = BTreeMap::new();
        for (name, c) in &config.clusters {
            clusters.insert(
                name.clone(),
                Cluster::new(name, c, resolve_workers(config.server.worker_threads))?,
            );
        }
        // The JWKS client: any cluster's client will do (it is a plain pooled HTTP client);
        // build a dedicated one so a cluster's HTTP/2-only setting cannot apply to it.
        let jwks_client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(hyper_util::client::legacy::connect::HttpConnector::new());
        let mut policies: BTreeMap<String, Arc<AuthPolicy>> = BTreeMap::new();
        for (name, a) in &config.auth {
            let policy = match a {
                AuthConfig::Jwt(j) => {
                    AuthPolicy::Jwt(JwtPolicy::new(name, j, jwks_client.clone()).await?)
                }
                AuthConfig::ApiKey(k) => AuthPolicy::ApiKey(ApiKeyPolicy::new(name, k)?),
            };
            policies.insert(name.clone(), Arc::new(policy));
        }
        let mut identity_headers: Vec<HeaderName> = Vec::new();
        let mut credential_headers: Vec<HeaderName> = Vec::new();
        for p in policies.values() {
            for h in p.identity_headers() {
                if !identity_headers.contains(&h) {
                    identity_headers.push(h);
                }
            }
            if let Some(h) = p.credential_header()
                && !credential_headers.contains(h)
            {
                credential_headers.push(h.clone());
            }
        }
        let mut routes = Vec::with_capacity(config.routes.len());
        for (i, r) in config.routes.iter().enumerate() {
            let key = format!("routes[{i}]");
            let matcher =
                Matcher::from_rule(&r.match_rule()).map_err(|message| ConfigError::Invalid {
                    key: key.clone(),
                    message,
                })?;
            let cluster =
                clusters
                    .get(&r.cluster)
                    .cloned()
                    .ok_or_else(|| ConfigError::Invalid {
                        key: format!("{key}.cluster"),
                        message: format!("no cluster named `{}`", r.cluster),
                    })?;
            let limiter = match &r.rate_limit {
                Some(name) => {
                    let policy =
                        config
                            .rate_limits
                            .get(name)
                            .ok_or_else(|| ConfigError::Invalid {
                                key: format!("{key}.rate_limit"),
                                message: format!("no rate-limit policy named `{name}`"),
                            })?;
                    Some(Arc::new(RouteLimiter::new(name, &r.name, policy)?))
                }
                None => None,
            };
            let retry = r
                .retry
                .as_ref()
                .filter(|x| x.attempts > 1)
                .map(|x| RetryRule {
                    attempts: x.attempts,
                    statuses: x
                        .on_statuses
                        .iter()
                        .filter_map(|s| StatusCode::from_u16(*s).ok())
                        .collect(),
                    budget: RetryBudget::new(
                        x.budget_ratio,
                        RETRY_BUDGET_BANKED,
                        RETRY_BUDGET_BANKED,
                    ),
                });
            routes.push(Route {
                name: Arc::from(r.name.as_str()),
                matcher,
                cluster,
                timeout: Duration::from_millis(r.timeout_ms.unwrap_or(config.server.timeout_ms)),
                response_body_timeout: Duration::from_millis(
                    r.response_body_timeout_ms
                        .unwrap_or(config.server.response_body_timeout_ms),
                ),
                response_body_idle_timeout: Duration::from_millis(
                    r.response_body_idle_timeout_ms
                        .unwrap_or(config.server.response_body_idle_timeout_ms),
                ),
                body_bytes_max: r.body_bytes_max.unwrap_or(config.server.body_bytes_max),
                retry,
                auth: r
                    .auth
                    .iter()
                    .filter_map(|a| policies.get(a).cloned())
                    .collect(),
                required_scopes: r.required_scopes.clone(),
                required_roles: r.required_roles.clone(),
                limiter,
                metrics: RouteMetrics::new(&r.name),
            });
        }
        let table = Arc::new(Self {
            routes,
            clusters,
            identity_headers,
            credential_headers,
            unrouted: RouteMetrics::new("_unrouted"),
            cors: config.cors.as_ref().map(super::cors::Cors::new),
        });
        for cluster in table.clusters.values() {
            spawn_health_checks(cluster);
        }
        spawn_limiter_eviction(&table);
        Ok(table)
    }

    pub(super) fn find(&self, parts: &http::request::Parts) -> Option<&Route> {
        let host = parts
            .uri
            .host()
            .or_else(|| {
                parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .map(strip_port);
        let path = parts.uri.path();
        self.routes
            .iter()
            .find(|r| r.matcher.matches(&parts.method, host, path, &parts.headers))
    }

    /// Whether every cluster has an endpoint that can take traffic.
    pub(crate) fn ready(&self) -> bool {
        self.clusters.values().all(|c| c.any_available())
    }
}

fn spawn_limiter_eviction(table: &Arc<Table>) {
    let limiters: Vec<std::sync::Weak<RouteLimiter>> = table
        .routes
        .iter()
        .filter_map(|r| r.limiter.as_ref().map(Arc::downgrade))
        .collect();
    if limiters.is_empty() {
        return;
    }
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(RATE_LIMIT_EVICT_INTERVAL).await;
            let mut alive = false;
            for l in limiters.iter().filter_map(std::sync::Weak::upgrade) {
                l.evict_idle();
                alive = true;
            }
            if !alive {
                return;
            }
        }
    });
}

/// The number of worker threads `server.worker_threads` asks for (0: one per CPU).
pub(crate) fn resolve_workers(configured: usize) -> usize {
    if configured == 0 {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    } else {
        configured
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_once(']').map_or(host, |(h, _)| &h[1..]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:80"), "::1");
    }
}
