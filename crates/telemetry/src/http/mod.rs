//! Tower middleware that carries W3C trace context across HTTP hops, and measures a server's
//! requests.
//!
//! - [`TraceContextServerLayer`] wraps a server: each request gets an `http.server` span whose
//!   OpenTelemetry parent is the caller's `traceparent` (or a new trace when there is none or
//!   it is malformed), and the inner service runs inside that span.
//! - [`TraceContextClientLayer`] wraps a client: each request gets an `http.client` span, a
//!   child of the current span, and its context is written into the outgoing `traceparent` and
//!   `tracestate` headers.
//! - [`RequestMetricsLayer`] wraps a server's router: each request is counted and timed per
//!   matched route (REST) or per RPC (gRPC), labelled with the service's name (the RED metrics
//!   of docs/metrics.md).
//!
//! Both are generic over `http::Request<B>` / `http::Response<B>`, so they fit axum, hyper and
//! hyper-util services alike. Spans are created at `INFO` level; [`init`](crate::init) makes sure
//! the OpenTelemetry layer always sees them.
//!
//! ```
//! use axum::{Router, routing::get};
//! use trellis_telemetry::http::TraceContextServerLayer;
//!
//! let app: Router = Router::new()
//!     .route("/healthz", get(|| async { "ok" }))
//!     .layer(TraceContextServerLayer::new());
//! # drop(app);
//! ```

mod client;
mod future;
mod request_metrics;
mod server;

pub use client::{TraceContextClient, TraceContextClientLayer};
pub use future::{ClientResponseFuture, ServerResponseFuture};
pub use request_metrics::{
    GRPC_DURATION, GRPC_REQUESTS, HTTP_DURATION, HTTP_REQUESTS, RequestMetrics,
    RequestMetricsFuture, RequestMetricsLayer, UNKNOWN_RPC, UNMATCHED_ROUTE,
    describe_request_metrics,
};
pub use server::{TraceContextServer, TraceContextServerLayer};

/// Renames `span` and sets string attributes on it, also after it has started: for a server
/// that knows what a request is only once it has routed it (the gateway names its server span
/// `{method} {route}` after the route a request took), when recording `otel.name` would be
/// too late (tracing-opentelemetry reads it only until the span starts). A span that is
/// disabled, or has no OpenTelemetry side, is left alone.
pub fn rename_span(
    span: &tracing::Span,
    name: impl Into<std::borrow::Cow<'static, str>>,
    attributes: &[(&'static str, &str)],
) {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    if span.is_disabled() {
        return;
    }
    let context = span.context();
    let otel = context.span();
    otel.update_name(name);
    for (key, value) in attributes {
        otel.set_attribute(opentelemetry::KeyValue::new(*key, (*value).to_owned()));
    }
}

/// Names a request's span: a gRPC call after its method (`/package.Service/Method` without
/// the slash), marked `rpc.system = "grpc"`; any other request as OpenTelemetry's HTTP
/// conventions say, `{method} {route}` when the route template is known (a server behind
/// axum's router: `POST /api/orders`, `GET /api/orders/{id}`), else `{method}` alone (a
/// client, which knows no template; the path would make one name per order).
fn name_span<B>(span: &tracing::Span, request: &http::Request<B>, route: Option<&str>) {
    let grpc = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/grpc"));
    if grpc {
        let method = request.uri().path().trim_start_matches('/');
        span.record("otel.name", method);
        span.record("rpc.system", "grpc");
        return;
    }
    match route {
        Some(route) => {
            span.record("http.route", route);
            span.record(
                "otel.name",
                format!("{} {route}", request.method()).as_str(),
            );
        }
        None => {
            span.record("otel.name", request.method().as_str());
        }
    }
}
