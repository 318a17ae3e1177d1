//! The routing table built from a [`Config`], and the per-request pipeline: admin endpoints,
//! routing, limits, auth, rate limiting, the upstream call with retries, and the answer.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use metrics::{Counter, Histogram};
use tokio::time::Instant;
use trellis_resilience::RetryBudget;
use trellis_telemetry::metrics::PrometheusHandle;

use crate::auth::{ApiKeyPolicy, AuthOutcome, AuthPolicy, Identity, JwtPolicy};
use crate::body::{BodyTimeoutReport, BoxError, GatewayBody, TimedBody, full};
use crate::config::{AuthConfig, Config, UpstreamProtocol};
use crate::error::{ConfigError, ProxyError, json_error};
use crate::hooks::{GatewayHooks, HookDecision, RequestCtx};
use crate::rate_limit::{RateLimitHeaders, RouteLimiter, Verdict};
use crate::route::Matcher;
use crate::upstream::{Cluster, Endpoint, Pick, spawn_health_checks};

/// Longest `x-request-id` kept from a client, bytes.
const REQUEST_ID_BYTES_MAX: usize = 128;
/// How often idle rate-limit keys are evicted.
const RATE_LIMIT_EVICT_INTERVAL: Duration = Duration::from_secs(30);
/// Retries banked in a route's retry budget at start, and at most.
const RETRY_BUDGET_BANKED: u32 = 10;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
    header::UPGRADE,
];

#[derive(Debug)]
struct RetryRule {
    attempts: u32,
    statuses: Vec<StatusCode>,
    budget: RetryBudget,
}

#[derive(Debug)]
struct RouteMetrics {
    by_class: [Counter; 5],
    duration: Histogram,
    body_timeouts: Counter,
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

    fn record(&self, status: StatusCode, elapsed: Duration) {
        let index = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.by_class[index].increment(1);
        self.duration.record(elapsed.as_secs_f64());
    }
}

/// One compiled route.
#[derive(Debug)]
pub(crate) struct Route {
    name: Arc<str>,
    matcher: Matcher,
    cluster: Arc<Cluster>,
    timeout: Duration,
    response_body_timeout: Duration,
    response_body_idle_timeout: Duration,
    body_bytes_max: u64,
    retry: Option<RetryRule>,
    auth: Vec<Arc<AuthPolicy>>,
    required_scopes: Vec<String>,
    required_roles: Vec<String>,
    limiter: Option<Arc<RouteLimiter>>,
    metrics: RouteMetrics,
}

/// Everything built from one configuration; swapped whole on reload.
#[derive(Debug)]
pub(crate) struct Table {
    routes: Vec<Route>,
    clusters: BTreeMap<String, Arc<Cluster>>,
    /// Headers the gateway sets from identities: client-sent copies are always removed.
    identity_headers: Vec<HeaderName>,
    /// Credential headers (API keys) not forwarded.
    credential_headers: Vec<HeaderName>,
    unrouted: RouteMetrics,
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
        });
        for cluster in table.clusters.values() {
            spawn_health_checks(cluster);
        }
        spawn_limiter_eviction(&table);
        Ok(table)
    }

    fn find(&self, parts: &http::request::Parts) -> Option<&Route> {
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

/// State shared by every connection.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) table: arc_swap::ArcSwap<Table>,
    pub(crate) hooks: Arc<dyn GatewayHooks>,
    pub(crate) metrics: Option<PrometheusHandle>,
    pub(crate) admin: AdminPlacement,
}

/// Where the admin endpoints (`/healthz`, `/readyz`, `/metrics`) are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AdminPlacement {
    /// Nowhere: their paths are routed like any other.
    Off,
    /// On the public listener (`admin_endpoints = true` without `admin_listen`).
    Public,
    /// Only on the operator listener; the public one answers 404 for their paths.
    Operator,
}

impl AdminPlacement {
    pub(crate) fn from_config(server: &crate::config::ServerConfig) -> Self {
        match (server.admin_endpoints, server.admin_listen.is_some()) {
            (false, _) => Self::Off,
            (true, false) => Self::Public,
            (true, true) => Self::Operator,
        }
    }
}

/// The admin endpoints' paths.
const ADMIN_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// Handles one request from a client. Never fails: every problem becomes an answer.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Response<GatewayBody> {
    let started = Instant::now();
    let (mut parts, body) = request.into_parts();
    // Everything after this line (admin endpoints, routing, hooks, the upstream request) sees
    // the canonical path only, so what matched is what is forwarded.
    if let Err(error) = normalize_target(&mut parts) {
        let mut response = error.to_response();
        finish_response(&mut response, &request_id(&parts.headers), None);
        shared
            .table
            .load()
            .unrouted
            .record(response.status(), started.elapsed());
        return response;
    }
    match shared.admin {
        AdminPlacement::Public => {
            if let Some(response) = admin(&shared, &parts) {
                return response;
            }
        }
        // Not forwarded either: a catch-all route must not hand them to an upstream.
        AdminPlacement::Operator if ADMIN_PATHS.contains(&parts.uri.path()) => {
            let mut response = ProxyError::NoRoute.to_response();
            finish_response(&mut response, &request_id(&parts.headers), None);
            shared
                .table
                .load()
                .unrouted
                .record(response.status(), started.elapsed());
            return response;
        }
        AdminPlacement::Operator | AdminPlacement::Off => {}
    }
    let table = shared.table.load_full();
    let request_id = request_id(&parts.headers);

    let Some(route) = table.find(&parts) else {
        let mut response = ProxyError::NoRoute.to_response();
        finish_response(&mut response, &request_id, None);
        table.unrouted.record(response.status(), started.elapsed());
        return response;
    };
    let mut ctx = RequestCtx {
        request_id,
        route: Arc::clone(&route.name),
        peer,
        subject: None,
    };
    let mut rate_headers = None;
    let outcome = match shared.hooks.request_filter(&mut ctx, &mut parts) {
        HookDecision::Respond(response) => Ok(response),
        HookDecision::Continue => {
            proxy(
                &shared,
                &table,
                route,
                &mut ctx,
                parts,
                body,
                &mut rate_headers,
            )
            .await
        }
    };
    let mut response = match outcome {
        Ok(response) => response,
        Err(error) => {
            if error.source_kind() != crate::error::ErrorSource::Downstream {
                tracing::warn!(route = %route.name, request_id = %ctx.request_id, error = %error, source = error.source_kind().as_str(), "request failed");
            }
            error.to_response()
        }
    };
    finish_response(&mut response, &ctx.request_id, rate_headers);
    let elapsed = started.elapsed();
    route.metrics.record(response.status(), elapsed);
    shared.hooks.logging(&ctx, response.status());
    tracing::info!(
        target: "trellis_gateway::access",
        route = %route.name,
        request_id = %ctx.request_id,
        peer = %peer,
        status = response.status().as_u16(),
        duration_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
        subject = ctx.subject.as_deref().unwrap_or(""),
    );
    response
}

fn finish_response(
    response: &mut Response<GatewayBody>,
    request_id: &str,
    rate_limit: Option<RateLimitHeaders>,
) {
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert(X_REQUEST_ID, v);
    }
    if let Some(rate_limit) = rate_limit {
        headers.insert("ratelimit-limit", HeaderValue::from(rate_limit.limit));
        headers.insert(
            "ratelimit-remaining",
            HeaderValue::from(rate_limit.remaining),
        );
        headers.insert("ratelimit-reset", HeaderValue::from(rate_limit.reset_s));
    }
}

/// Handles one request on the operator listener: the admin endpoints, 404 for anything else.
pub(crate) fn handle_admin(shared: &Shared, request: Request<Incoming>) -> Response<GatewayBody> {
    let (mut parts, _body) = request.into_parts();
    let found = match normalize_target(&mut parts) {
        Ok(()) => admin(shared, &parts).ok_or(ProxyError::NoRoute),
        Err(error) => Err(error),
    };
    let mut response = found.unwrap_or_else(|error| error.to_response());
    finish_response(&mut response, &request_id(&parts.headers), None);
    response
}

/// Replaces the request's path with its canonical form ([`crate::path::normalize`]), keeping
/// the query exactly as sent.
fn normalize_target(parts: &mut http::request::Parts) -> Result<(), ProxyError> {
    let path = match crate::path::normalize(parts.uri.path()) {
        Ok(std::borrow::Cow::Borrowed(_)) => return Ok(()),
        Ok(std::borrow::Cow::Owned(path)) => path,
        Err(crate::path::InvalidPath(why)) => return Err(ProxyError::InvalidPath(why)),
    };
    let path_and_query = match parts.uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    // Cannot fail: the path is printable ASCII without `?` or `#`, and the query was accepted
    // once already.
    uri.path_and_query = Some(
        path_and_query
            .parse()
            .map_err(|_| ProxyError::InvalidPath("the normalised target is not a valid URI"))?,
    );
    parts.uri = http::Uri::from_parts(uri)
        .map_err(|_| ProxyError::InvalidPath("the normalised target is not a valid URI"))?;
    Ok(())
}

fn admin(shared: &Shared, request: &http::request::Parts) -> Option<Response<GatewayBody>> {
    if request.method != Method::GET {
        return None;
    }
    let (status, content_type, body) = match request.uri.path() {
        "/healthz" => (
            StatusCode::OK,
            "application/json",
            Bytes::from_static(b"{\"status\":\"ok\"}"),
        ),
        "/readyz" => {
            if shared.table.load().ready() {
                (
                    StatusCode::OK,
                    "application/json",
                    Bytes::from_static(b"{\"status\":\"ready\"}"),
                )
            } else {
                return Some(json_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not_ready",
                    "a cluster has no endpoint that can take traffic",
                ));
            }
        }
        "/metrics" => match &shared.metrics {
            Some(handle) => (
                StatusCode::OK,
                trellis_telemetry::metrics::CONTENT_TYPE,
                Bytes::from(handle.render()),
            ),
            None => return None,
        },
        _ => return None,
    };
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    Some(response)
}

fn request_id(headers: &HeaderMap) -> String {
    match headers.get(X_REQUEST_ID).and_then(|v| v.to_str().ok()) {
        Some(id)
            if !id.is_empty()
                && id.len() <= REQUEST_ID_BYTES_MAX
                && id.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            id.to_owned()
        }
        _ => new_request_id(),
    }
}

/// A UUIDv7 (time-ordered) request id. The random bits come from `fastrand`'s thread-local
/// generator rather than the OS (`Uuid::now_v7` asks the kernel on every call): a request id
/// must be unique, not unpredictable.
fn new_request_id() -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let random = fastrand::u128(..).to_le_bytes();
    let mut bytes = [0u8; 10];
    bytes.copy_from_slice(&random[..10]);
    uuid::Builder::from_unix_timestamp_millis(millis, &bytes)
        .into_uuid()
        .to_string()
}

/// Removes hop-by-hop headers, including those the `Connection` header names. `TE: trailers`
/// is kept (gRPC needs it end to end).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    if headers
        .get(header::TE)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(header::TE);
    }
    headers.remove(header::TRANSFER_ENCODING);
}

#[allow(clippy::too_many_arguments)]
async fn proxy(
    shared: &Shared,
    table: &Table,
    route: &Route,
    ctx: &mut RequestCtx,
    mut parts: http::request::Parts,
    body: Incoming,
    rate_headers: &mut Option<RateLimitHeaders>,
) -> Result<Response<GatewayBody>, ProxyError> {
    // Body size: refuse a declared oversize body before reading any of it.
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > route.body_bytes_max) {
        return Err(ProxyError::BodyTooLarge {
            limit: route.body_bytes_max,
        });
    }

    // Identity headers come only from the gateway.
    for h in &table.identity_headers {
        parts.headers.remove(h);
    }

    let identity = authenticate(route, &parts.headers).await?;
    if let Some(identity) = &identity {
        ctx.subject.clone_from(&identity.subject);
        for (name, value) in &identity.headers {
            parts.headers.insert(name.clone(), value.clone());
        }
    }
    for h in &table.credential_headers {
        parts.headers.remove(h);
    }

    if let Some(limiter) = &route.limiter {
        match limiter
            .check(ctx.peer.ip(), identity.as_deref(), &parts.headers)
            .await
        {
            Verdict::Allowed(headers) => *rate_headers = Some(headers),
            Verdict::Limited { retry_after, limit } => {
                return Err(ProxyError::RateLimited { retry_after, limit });
            }
        }
    }

    // The upstream request head.
    let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    strip_hop_by_hop(&mut parts.headers);
    let path = route.matcher.rewrite(parts.uri.path());
    let path_and_query = match parts.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.into_owned(),
    };
    if let Ok(v) = HeaderValue::from_str(&ctx.request_id) {
        parts.headers.insert(X_REQUEST_ID, v);
    }
    let peer_ip = ctx.peer.ip().to_string();
    let forwarded_for = match parts
        .headers
        .get(X_FORWARDED_FOR)
        .and_then(|v| v.to_str().ok())
    {
        Some(prior) => format!("{prior}, {peer_ip}"),
        None => peer_ip,
    };
    if let Ok(v) = HeaderValue::from_str(&forwarded_for) {
        parts.headers.insert(X_FORWARDED_FOR, v);
    }
    parts
        .headers
        .insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    if let Some(host) = &original_host {
        parts.headers.insert(X_FORWARDED_HOST, host.clone());
        parts.headers.insert(header::HOST, host.clone());
    }
    if let Some(traceparent) = trellis_telemetry::propagation::current_traceparent()
        && let Ok(v) = HeaderValue::from_str(&traceparent)
    {
        parts.headers.insert(TRACEPARENT, v);
    }
    parts.version = match route.cluster.protocol() {
        UpstreamProtocol::Http1 => Version::HTTP_11,
        UpstreamProtocol::H2c => Version::HTTP_2,
    };

    // Retries need a body that can be sent again: only bodiless requests are retried.
    let bodiless = body.is_end_stream();
    let idempotent = matches!(
        parts.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    );
    let attempts = match &route.retry {
        Some(rule) if bodiless => {
            rule.budget.deposit();
            rule.attempts
        }
        _ => 1,
    };
    let limit = usize::try_from(route.body_bytes_max).unwrap_or(usize::MAX);
    let mut body: Option<GatewayBody> = Some(if bodiless {
        crate::body::empty()
    } else {
        Limited::new(body, limit).map_err(BoxError::from).boxed()
    });

    let mut parts = Some(parts);
    let deadline = Instant::now() + route.timeout;
    let cluster = &route.cluster;
    let mut last: Option<Arc<Endpoint>> = None;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let last_attempt = attempt >= attempts;
        let pick: Pick<'_> =
            cluster
                .pick(last.as_ref())
                .map_err(|e| ProxyError::NoHealthyUpstream {
                    cluster: cluster.name.clone(),
                    retry_after: e.retry_after,
                })?;
        let uri = Cluster::uri(pick.endpoint, &path_and_query)
            .map_err(|_| ProxyError::BadRequest("the request target cannot be forwarded"))?;
        // The last attempt takes the head; earlier ones (retries possible) send a copy.
        let mut head = if last_attempt {
            match parts.take() {
                Some(p) => p,
                None => return Err(ProxyError::Internal("request head used twice".to_owned())),
            }
        } else {
            match parts.as_ref() {
                Some(p) => clone_head(p),
                None => return Err(ProxyError::Internal("request head used twice".to_owned())),
            }
        };
        head.uri = uri;
        shared.hooks.upstream_request_filter(ctx, &mut head);
        let this_body = if last_attempt {
            body.take().unwrap_or_else(crate::body::empty)
        } else {
            crate::body::empty()
        };
        let sent = tokio::time::timeout_at(
            deadline,
            cluster
                .client()
                .request(Request::from_parts(head, this_body)),
        )
        .await;
        let can_retry = |rule: &Option<RetryRule>| {
            !last_attempt
                && Instant::now() < deadline
                && rule.as_ref().is_some_and(|r| r.budget.try_withdraw())
        };
        match sent {
            Ok(Ok(response)) => {
                let status = response.status();
                let failed = status.is_server_error();
                let endpoint = Arc::clone(pick.endpoint);
                cluster.finish(pick, failed);
                if failed
                    && route
                        .retry
                        .as_ref()
                        .is_some_and(|r| r.statuses.contains(&status))
                    && can_retry(&route.retry)
                {
                    last = Some(endpoint);
                    continue;
                }
                let (mut head, incoming) = response.into_parts();
                strip_hop_by_hop(&mut head.headers);
                shared.hooks.response_filter(ctx, &mut head);
                // The route timeout covered the head; these bound the body, so an upstream
                // that sends headers and then stalls or trickles cannot hold the client's
                // connection (and this one) forever.
                let body = TimedBody::new(
                    incoming,
                    route.response_body_timeout,
                    route.response_body_idle_timeout,
                    BodyTimeoutReport {
                        route: Arc::clone(&route.name),
                        request_id: ctx.request_id.clone(),
                        timeouts: route.metrics.body_timeouts.clone(),
                    },
                );
                return Ok(Response::from_parts(head, body.boxed()));
            }
            Ok(Err(error)) => {
                if body_limit_exceeded(&error) {
                    cluster.finish(pick, false);
                    return Err(ProxyError::BodyTooLarge {
                        limit: route.body_bytes_max,
                    });
                }
                let endpoint = Arc::clone(pick.endpoint);
                cluster.finish(pick, true);
                // A connect error means nothing was sent: safe to retry any method. Otherwise
                // only idempotent methods are retried.
                if (error.is_connect() || idempotent) && can_retry(&route.retry) {
                    last = Some(endpoint);
                    continue;
                }
                return Err(if error.is_connect() {
                    ProxyError::UpstreamConnect {
                        cluster: cluster.name.clone(),
                        message: error_chain(&error),
                    }
                } else {
                    ProxyError::UpstreamBroken {
                        cluster: cluster.name.clone(),
                        message: error_chain(&error),
                    }
                });
            }
            Err(_elapsed) => {
                cluster.finish(pick, true);
                return Err(ProxyError::UpstreamTimeout {
                    cluster: cluster.name.clone(),
                    timeout: route.timeout,
                });
            }
        }
    }
}

async fn authenticate(
    route: &Route,
    headers: &HeaderMap,
) -> Result<Option<Arc<Identity>>, ProxyError> {
    if route.auth.is_empty() {
        return Ok(None);
    }
    let mut reason: Option<String> = None;
    for policy in &route.auth {
        match policy.authenticate(headers).await {
            AuthOutcome::Authenticated(identity) => {
                if let Some(scope) = identity.missing_scope(&route.required_scopes) {
                    return Err(ProxyError::Forbidden(format!("missing scope `{scope}`")));
                }
                if !identity.has_any_role(&route.required_roles) {
                    return Err(ProxyError::Forbidden(format!(
                        "requires one of the roles {:?}",
                        route.required_roles
                    )));
                }
                return Ok(Some(identity));
            }
            AuthOutcome::Missing => {}
            AuthOutcome::Invalid(why) => {
                reason.get_or_insert(why);
            }
        }
    }
    let scheme = route.auth.first().map_or("Bearer", |p| p.scheme());
    Err(match reason {
        Some(why) => ProxyError::Unauthenticated {
            challenge: format!(
                "{scheme} realm=\"trellis\", error=\"invalid_token\", error_description=\"{why}\""
            ),
            reason: why,
        },
        None => ProxyError::Unauthenticated {
            challenge: format!("{scheme} realm=\"trellis\""),
            reason: "missing credentials".to_owned(),
        },
    })
}

fn clone_head(parts: &http::request::Parts) -> http::request::Parts {
    let mut builder = Request::builder()
        .method(parts.method.clone())
        .version(parts.version);
    if let Some(headers) = builder.headers_mut() {
        headers.clone_from(&parts.headers);
    }
    let (head, ()) = builder
        .body(())
        .unwrap_or_else(|_| Request::new(()))
        .into_parts();
    head
}

fn body_limit_exceeded(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("x-secret, keep-alive"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn te_trailers_survives_for_grpc() {
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h);
        assert!(h.contains_key(header::TE));
    }

    #[test]
    fn a_valid_request_id_is_kept_and_a_bad_one_replaced() {
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h), "abc-123");
        h.insert(X_REQUEST_ID, HeaderValue::from_static("has space"));
        assert_ne!(request_id(&h), "has space");
    }

    #[test]
    fn generated_request_ids_are_distinct_uuid_v7() {
        let a = new_request_id();
        let b = new_request_id();
        assert_ne!(a, b);
        let parsed = uuid::Uuid::parse_str(&a).expect("a UUID");
        assert_eq!(parsed.get_version_num(), 7);
    }

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:80"), "::1");
    }
}
