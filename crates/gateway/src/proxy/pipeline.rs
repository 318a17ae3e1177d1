//! The pipeline of a routed request, as named phases run in order by [`Exchange::run`]:
//!
//! 1. **body limit**: a declared oversize body is refused before any of it is read;
//! 2. **identity**: client-sent identity headers are removed, the route's auth policies run,
//!    the identity's headers are set and credential headers removed;
//! 3. **rate limit**: the route's limiter admits the request (its `RateLimit-*` values are
//!    kept for the answer) or refuses it with 429;
//! 4. **upstream head**: hop-by-hop headers go, the path is rewritten, `x-request-id`,
//!    `x-forwarded-*` and `traceparent` are set;
//! 5. **upstream call with retries**: an endpoint is picked and called within the route
//!    timeout; on a route with a retry policy, requests are retried within the route's retry
//!    budget: bodiless ones, and ones whose declared body is at most
//!    [`REPLAY_BODY_BYTES_MAX`] (read whole first, so it can be sent again).
//!
//! Each phase returns early with the [`ProxyError`] that answers the client.

use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::auth::{AuthOutcome, Identity};
use crate::body::{BodyTimeoutReport, BoxError, GatewayBody, TimedBody};
use crate::config::UpstreamProtocol;
use crate::error::ProxyError;
use crate::hooks::RequestCtx;
use crate::rate_limit::{RateLimitHeaders, Verdict};
use crate::upstream::{Cluster, Endpoint, Pick};

use super::table::{Route, Table};
use super::{Shared, X_REQUEST_ID};

/// Largest declared request body the gateway reads whole before forwarding, on a route with
/// a retry policy, so the request can be sent to another endpoint when the first refuses the
/// connection (a replica that died): an order's body is a few hundred bytes.
pub(crate) const REPLAY_BODY_BYTES_MAX: u64 = 64 * 1024;

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

/// One routed request on its way through the phases: what they read, and what they leave
/// behind for the answer.
#[derive(Debug)]
pub(super) struct Exchange<'a> {
    pub(super) shared: &'a Shared,
    pub(super) table: &'a Table,
    pub(super) route: &'a Route,
    /// What hooks and logs see of the request; the identity phase sets its subject.
    pub(super) ctx: RequestCtx,
    /// Set by the rate-limit phase; the answer carries it as `RateLimit-*` headers, also
    /// when a later phase fails.
    pub(super) rate_limit: Option<RateLimitHeaders>,
}

impl Exchange<'_> {
    /// Runs the phases in order and answers the upstream's response, or the error of the
    /// phase that stopped the request.
    pub(super) async fn run(
        &mut self,
        mut parts: http::request::Parts,
        body: Incoming,
    ) -> Result<Response<GatewayBody>, ProxyError> {
        self.check_body_limit(&parts.headers)?;
        let identity = self.identify(&mut parts.headers).await?;
        self.check_rate_limit(identity.as_deref(), &parts.headers)
            .await?;
        let path_and_query = self.upstream_head(&mut parts);
        self.call_upstream(parts, body, &path_and_query).await
    }

    /// Body limit: refuses a declared oversize body before reading any of it. (A body
    /// without a declared length is cut off at the limit while it streams upstream.)
    fn check_body_limit(&self, headers: &HeaderMap) -> Result<(), ProxyError> {
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.route.body_bytes_max) {
            return Err(ProxyError::BodyTooLarge {
                limit: self.route.body_bytes_max,
            });
        }
        Ok(())
    }

    /// Identity: identity headers come only from the gateway, so client-sent copies go;
    /// then the route's auth policies run, the identity's headers are set, and credential
    /// headers (API keys) are removed.
    async fn identify(
        &mut self,
        headers: &mut HeaderMap,
    ) -> Result<Option<Arc<Identity>>, ProxyError> {
        for h in &self.table.identity_headers {
            headers.remove(h);
        }
        let identity = authenticate(self.route, headers).await?;
        if let Some(identity) = &identity {
            self.ctx.subject.clone_from(&identity.subject);
            for (name, value) in &identity.headers {
                headers.insert(name.clone(), value.clone());
            }
        }
        for h in &self.table.credential_headers {
            headers.remove(h);
        }
        Ok(identity)
    }

    /// Rate limit: the route's limiter, if any, admits the request (keeping the values for
    /// the answer's `RateLimit-*` headers) or refuses it.
    async fn check_rate_limit(
        &mut self,
        identity: Option<&Identity>,
        headers: &HeaderMap,
    ) -> Result<(), ProxyError> {
        let Some(limiter) = &self.route.limiter else {
            return Ok(());
        };
        match limiter.check(self.ctx.peer.ip(), identity, headers).await {
            Verdict::Allowed(rate_limit) => {
                self.rate_limit = Some(rate_limit);
                Ok(())
            }
            Verdict::Limited { retry_after, limit } => {
                Err(ProxyError::RateLimited { retry_after, limit })
            }
        }
    }

    /// Upstream head: turns the client's request head into the upstream's, and answers the
    /// rewritten path and query to send it to.
    fn upstream_head(&self, parts: &mut http::request::Parts) -> String {
        let route = self.route;
        let ctx = &self.ctx;
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
        let proto = if self.shared.https { "https" } else { "http" };
        parts
            .headers
            .insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
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
        path_and_query
    }

    /// Upstream call with retries: picks an endpoint and calls it within the route timeout.
    /// A request can be sent again when it has no body or its declared body (at most
    /// [`REPLAY_BODY_BYTES_MAX`], on a route with a retry policy) was read whole; such
    /// requests are retried within the route's retry budget: after a connect error (nothing
    /// was sent: any method), after a retryable status (a bodiless or idempotent request),
    /// and after any other error (an idempotent method).
    async fn call_upstream(
        &self,
        parts: http::request::Parts,
        body: Incoming,
        path_and_query: &str,
    ) -> Result<Response<GatewayBody>, ProxyError> {
        let route = self.route;
        let ctx = &self.ctx;
        let shared = self.shared;
        let bodiless = body.is_end_stream();
        let limit = usize::try_from(route.body_bytes_max).unwrap_or(usize::MAX);
        // A small declared body on a route that retries is read whole, so it can be replayed.
        let replayable = !bodiless
            && route.retry.is_some()
            && body
                .size_hint()
                .exact()
                .is_some_and(|length| length <= REPLAY_BODY_BYTES_MAX);
        let (replay, mut body): (Option<bytes::Bytes>, Option<GatewayBody>) = if bodiless {
            (None, Some(crate::body::empty()))
        } else if replayable {
            let deadline = Instant::now() + route.timeout;
            let read = tokio::time::timeout_at(deadline, Limited::new(body, limit).collect()).await;
            match read {
                Ok(Ok(collected)) => (Some(collected.to_bytes()), None),
                Ok(Err(error))
                    if error
                        .downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some() =>
                {
                    return Err(ProxyError::BodyTooLarge {
                        limit: route.body_bytes_max,
                    });
                }
                Ok(Err(_)) => {
                    return Err(ProxyError::BadRequest("the request body could not be read"));
                }
                Err(_) => {
                    return Err(ProxyError::BadRequest(
                        "the request body did not arrive within the route timeout",
                    ));
                }
            }
        } else {
            (
                None,
                Some(Limited::new(body, limit).map_err(BoxError::from).boxed()),
            )
        };
        let plan = RetryPlan::new(route, &parts.method, bodiless, replay.is_some());

        let mut parts = Some(parts);
        let cluster = &route.cluster;
        let mut last: Option<Arc<Endpoint>> = None;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let last_attempt = attempt >= plan.attempts_max;
            let pick: Pick<'_> =
                cluster
                    .pick(last.as_ref())
                    .map_err(|e| ProxyError::NoHealthyUpstream {
                        cluster: cluster.name.clone(),
                        retry_after: e.retry_after,
                    })?;
            let uri = Cluster::uri(pick.endpoint, path_and_query)
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
            let this_body = if let Some(bytes) = &replay {
                crate::body::full(bytes.clone())
            } else if last_attempt {
                body.take().unwrap_or_else(crate::body::empty)
            } else {
                crate::body::empty()
            };
            let sent = tokio::time::timeout_at(
                plan.deadline,
                cluster
                    .client()
                    .request(Request::from_parts(head, this_body)),
            )
            .await;
            match sent {
                Ok(Ok(response)) => {
                    let status = response.status();
                    let failed = status.is_server_error();
                    let endpoint = Arc::clone(pick.endpoint);
                    cluster.finish(pick, failed);
                    // The upstream saw the request: a status retry sends it again, which only a
                    // bodiless or idempotent request may be.
                    if failed
                        && (plan.bodiless || plan.idempotent)
                        && route
                            .retry
                            .as_ref()
                            .is_some_and(|r| r.statuses.contains(&status))
                        && plan.may_retry(route, attempt)
                    {
                        last = Some(endpoint);
                        continue;
                    }
                    return Ok(self.downstream_response(response));
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
                    if (error.is_connect() || plan.idempotent) && plan.may_retry(route, attempt) {
                        last = Some(endpoint);
                        continue;
                    }
                    return Err(upstream_error(cluster, &error));
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

    /// The upstream's response as the client gets it: hop-by-hop headers removed,
    /// [`GatewayHooks::response_filter`](crate::GatewayHooks::response_filter) applied, and the
    /// body bounded in time.
    fn downstream_response(&self, response: Response<Incoming>) -> Response<GatewayBody> {
        let route = self.route;
        let (mut head, incoming) = response.into_parts();
        strip_hop_by_hop(&mut head.headers);
        self.shared.hooks.response_filter(&self.ctx, &mut head);
        // The route timeout covered the head; these bound the body, so an upstream that
        // sends headers and then stalls or trickles cannot hold the client's connection
        // (and this one) forever.
        let body = TimedBody::new(
            incoming,
            route.response_body_timeout,
            route.response_body_idle_timeout,
            BodyTimeoutReport {
                route: Arc::clone(&route.name),
                request_id: self.ctx.request_id.clone(),
                timeouts: route.metrics.body_timeouts.clone(),
            },
        );
        Response::from_parts(head, body.boxed())
    }
}

/// The retry phase's decisions for one request, fixed before its first attempt.
#[derive(Debug)]
struct RetryPlan {
    /// Whether the request has no body.
    bodiless: bool,
    /// Attempts in all, the first included; 1 when the request is not retried.
    attempts_max: u32,
    /// Whether the method may be repeated after the upstream may have seen it.
    idempotent: bool,
    /// The end of the route timeout: the wait for the response head, retries included.
    deadline: Instant,
}

impl RetryPlan {
    /// A retryable request (bodiless or with its body read whole, on a route with a retry
    /// policy) pays into the route's retry budget, which later retries draw from.
    fn new(route: &Route, method: &Method, bodiless: bool, replayable: bool) -> Self {
        let attempts_max = match &route.retry {
            Some(rule) if bodiless || replayable => {
                rule.budget.deposit();
                rule.attempts
            }
            _ => 1,
        };
        Self {
            bodiless,
            attempts_max,
            idempotent: matches!(
                *method,
                Method::GET
                    | Method::HEAD
                    | Method::OPTIONS
                    | Method::PUT
                    | Method::DELETE
                    | Method::TRACE
            ),
            deadline: Instant::now() + route.timeout,
        }
    }

    /// Whether failed attempt number `attempt` (from 1) may be followed by another: an
    /// attempt and time are left, and the route's retry budget grants a retry.
    fn may_retry(&self, route: &Route, attempt: u32) -> bool {
        attempt < self.attempts_max
            && Instant::now() < self.deadline
            && route
                .retry
                .as_ref()
                .is_some_and(|rule| rule.budget.try_withdraw())
    }
}

/// The error for an upstream call that failed without an answer.
fn upstream_error(cluster: &Cluster, error: &hyper_util::client::legacy::Error) -> ProxyError {
    if error.is_connect() {
        ProxyError::UpstreamConnect {
            cluster: cluster.name.clone(),
            message: error_chain(error),
        }
    } else {
        ProxyError::UpstreamBroken {
            cluster: cluster.name.clone(),
            message: error_chain(error),
        }
    }
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
}
