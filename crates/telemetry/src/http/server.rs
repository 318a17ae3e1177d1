//! The server side: adopt the caller's trace context.

use std::task::{Context, Poll};

use http::{Request, Response};
use tower::{Layer, Service};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::future::ServerResponseFuture;
use crate::propagation;

/// Wraps a service in [`TraceContextServer`].
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceContextServerLayer {
    _private: (),
}

impl TraceContextServerLayer {
    /// A layer that continues each request's incoming trace.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }
}

impl<S> Layer<S> for TraceContextServerLayer {
    type Service = TraceContextServer<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TraceContextServer::new(inner)
    }
}

/// Runs each request inside an `http.server` span that continues the caller's trace.
///
/// The span records `http.request.method`, `url.path`, `otel.kind = "server"` and, once the
/// response arrives, `http.response.status_code` (a 5xx or an inner error also sets
/// `otel.status_code = "ERROR"`). Its OpenTelemetry parent is the context in the request's
/// `traceparent` / `tracestate` headers; without a valid one the span starts a new trace, so
/// a request is a trace boundary and never inherits whatever span the server task runs in.
#[derive(Debug, Clone)]
pub struct TraceContextServer<S> {
    inner: S,
}

impl<S> TraceContextServer<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for TraceContextServer<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ServerResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let remote = propagation::extract_headers(request.headers());
        let span = tracing::info_span!(
            "http.server",
            http.request.method = %request.method(),
            url.path = %request.uri().path(),
            http.response.status_code = tracing::field::Empty,
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
        );
        // Before the span is entered: once started, its parent is fixed. An empty remote
        // context makes the span a root. The error cases (span disabled, no OpenTelemetry
        // layer installed) leave a span without trace ids, which is all they can do.
        let _ = span.set_parent(remote);
        let future = span.in_scope(|| self.inner.call(request));
        ServerResponseFuture::new(future, span)
    }
}
