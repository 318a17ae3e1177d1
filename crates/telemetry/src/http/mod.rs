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

/// Names a gRPC call's span after its method (`/package.Service/Method` without the slash) and
/// marks it `rpc.system = "grpc"`; leaves any other request's span alone.
fn record_grpc<B>(span: &tracing::Span, request: &http::Request<B>) {
    let grpc = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/grpc"));
    if grpc {
        let method = request.uri().path().trim_start_matches('/');
        span.record("otel.name", method);
        span.record("rpc.system", "grpc");
    }
}
