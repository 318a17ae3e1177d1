//! The per-request entry points: [`handle`] for the public listener (path normalisation,
//! the admin endpoints, routing, [`GatewayHooks::request_filter`], then the
//! [pipeline](pipeline) of the matched route, and the answer's common headers, metrics and
//! access log) and [`handle_admin`] for the operator listener. The routing table lives in
//! [`table`].

mod cors;
mod pipeline;
mod table;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::time::Instant;
use trellis_telemetry::metrics::PrometheusHandle;

use crate::body::{GatewayBody, full};
use crate::error::{ProxyError, json_error};
use crate::hooks::{GatewayHooks, HookDecision, RequestCtx};
use crate::rate_limit::RateLimitHeaders;

use pipeline::Exchange;
pub(crate) use table::{Table, resolve_workers};

/// Longest `x-request-id` kept from a client, bytes.
const REQUEST_ID_BYTES_MAX: usize = 128;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// State shared by every connection.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) table: arc_swap::ArcSwap<Table>,
    pub(crate) hooks: Arc<dyn GatewayHooks>,
    pub(crate) metrics: Option<PrometheusHandle>,
    pub(crate) admin: AdminPlacement,
    /// `Strict-Transport-Security` for every answer of the public listener (TLS only).
    pub(crate) hsts: Option<HeaderValue>,
    /// Whether the public listener serves HTTPS (`x-forwarded-proto`).
    pub(crate) https: bool,
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

/// The attribute of the gateway's server span naming the route a request took.
const ROUTE_ATTRIBUTE: &str = "trellis.gateway.route";

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
        finish_response(&mut response, &request_id(&parts.headers), None, &shared);
        shared
            .table
            .load()
            .unrouted
            .record(response.status(), started.elapsed());
        return response;
    }
    match shared.admin {
        AdminPlacement::Public => {
            if let Some(mut response) = admin(&shared, &parts) {
                finish_response(&mut response, &request_id(&parts.headers), None, &shared);
                return response;
            }
        }
        // Not forwarded either: a catch-all route must not hand them to an upstream.
        AdminPlacement::Operator if ADMIN_PATHS.contains(&parts.uri.path()) => {
            let mut response = ProxyError::NoRoute.to_response();
            finish_response(&mut response, &request_id(&parts.headers), None, &shared);
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
    if let Some(cors) = &table.cors
        && cors::Cors::is_preflight(&parts.method, &parts.headers)
    {
        // Before routing and authentication: a browser sends no credential on a preflight.
        let mut response = cors.preflight(&parts.headers);
        finish_response(&mut response, &request_id, None, &shared);
        table.unrouted.record(response.status(), started.elapsed());
        return response;
    }
    // Kept for the answer's CORS headers (the request's headers move into the pipeline).
    let origin = table
        .cors
        .as_ref()
        .and_then(|_| parts.headers.get(header::ORIGIN).cloned());
    let decorate = |response: &mut Response<GatewayBody>| {
        if let Some(cors) = &table.cors {
            cors.decorate(origin.as_ref(), response);
        }
    };

    let Some(route) = table.find(&parts) else {
        let mut response = ProxyError::NoRoute.to_response();
        finish_response(&mut response, &request_id, None, &shared);
        decorate(&mut response);
        table.unrouted.record(response.status(), started.elapsed());
        return response;
    };
    // The server span (trellis_telemetry's, entered while this runs) is named after the
    // route the request took (`POST orders`), not one name per path.
    trellis_telemetry::http::rename_span(
        &tracing::Span::current(),
        format!("{} {}", parts.method, route.name),
        &[(ROUTE_ATTRIBUTE, &route.name)],
    );
    let mut exchange = Exchange {
        shared: &shared,
        table: &table,
        route,
        ctx: RequestCtx {
            request_id,
            route: Arc::clone(&route.name),
            peer,
            subject: None,
        },
        rate_limit: None,
    };
    let outcome = match shared.hooks.request_filter(&mut exchange.ctx, &mut parts) {
        HookDecision::Respond(response) => Ok(response),
        HookDecision::Continue => exchange.run(parts, body).await,
    };
    let Exchange {
        ctx, rate_limit, ..
    } = exchange;
    let mut response = match outcome {
        Ok(response) => response,
        Err(error) => {
            if error.source_kind() != crate::error::ErrorSource::Downstream {
                tracing::warn!(route = %route.name, request_id = %ctx.request_id, error = %error, source = error.source_kind().as_str(), "request failed");
            }
            error.to_response()
        }
    };
    finish_response(&mut response, &ctx.request_id, rate_limit, &shared);
    decorate(&mut response);
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
    shared: &Shared,
) {
    let headers = response.headers_mut();
    if let Some(hsts) = &shared.hsts {
        headers.insert(header::STRICT_TRANSPORT_SECURITY, hsts.clone());
    }
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert(X_REQUEST_ID, v);
    }
    // Every answer, an upstream's too: a browser must not guess a type the answer does not
    // declare (an upstream that sets it keeps its own value).
    headers
        .entry(header::X_CONTENT_TYPE_OPTIONS)
        .or_insert(HeaderValue::from_static("nosniff"));
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
    finish_response(&mut response, &request_id(&parts.headers), None, shared);
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
                Bytes::from(trellis_telemetry::metrics::render(handle)),
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
