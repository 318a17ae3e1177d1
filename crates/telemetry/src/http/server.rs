//! The server side: adopt the caller's trace context.

use std::task::{Context, Poll};

use http::{Request, Response};
use tower::{Layer, Service};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::future::ServerResponseFuture;
use crate::propagation;
use crate::service::{self, ServiceName};

/// Wraps a service in [`TraceContextServer`].
#[derive(Debug, Clone)]
pub struct TraceContextServerLayer {
    service: Option<ServiceName>,
}

impl Default for TraceContextServerLayer {
    /// The same as [`TraceContextServerLayer::new`].
    fn default() -> Self {
        Self::new()
    }
}

impl TraceContextServerLayer {
    /// A layer that continues each request's incoming trace, its spans attributed to the
    /// service whose [scope](crate::service) the layer is built in (none outside any scope:
    /// then the process's own service name applies).
    #[must_use]
    pub fn new() -> Self {
        Self {
            service: service::current(),
        }
    }

    /// A layer whose server spans (and everything below them) are exported as `service`'s.
    #[must_use]
    pub fn for_service(service: impl Into<std::borrow::Cow<'static, str>>) -> Self {
        Self {
            service: Some(ServiceName::new(service)),
        }
    }
}

impl<S> Layer<S> for TraceContextServerLayer {
    type Service = TraceContextServer<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TraceContextServer {
            inner,
            service: self.service.clone(),
        }
    }
}

/// Runs each request inside an `http.server` span that continues the caller's trace.
///
/// The span records `http.request.method`, `url.path`, `otel.kind = "server"`, for a gRPC call
/// `rpc.system = "grpc"` and the method (`package.Service/Method`) as its name, and, once the
/// response arrives, `http.response.status_code` (a 5xx or an inner error also sets
/// `otel.status_code = "ERROR"`). Its OpenTelemetry parent is the context in the request's
/// `traceparent` / `tracestate` headers; without a valid one the span starts a new trace, so
/// a request is a trace boundary and never inherits whatever span the server task runs in.
/// The span, and so everything below it, is exported under the server's service name (see
/// [`service`](crate::service)), not the caller's.
#[derive(Debug, Clone)]
pub struct TraceContextServer<S> {
    inner: S,
    service: Option<ServiceName>,
}

impl<S> TraceContextServer<S> {
    /// Wraps `inner`, attributing its spans to the service whose scope this is called in.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            service: service::current(),
        }
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
        let mut remote = propagation::extract_headers(request.headers());
        if let Some(service) = &self.service {
            remote = remote.with_value(service.clone());
        }
        let span = tracing::info_span!(
            "http.server",
            http.request.method = %request.method(),
            url.path = %request.uri().path(),
            http.response.status_code = tracing::field::Empty,
            otel.kind = "server",
            otel.name = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            rpc.system = tracing::field::Empty,
            http.route = tracing::field::Empty,
        );
        // Behind `Router::layer` axum has matched the route already.
        let route = request
            .extensions()
            .get::<axum::extract::MatchedPath>()
            .map(axum::extract::MatchedPath::as_str);
        super::name_span(&span, &request, route);
        // Before the span is entered: once started, its parent is fixed. An empty remote
        // context makes the span a root. The error cases (span disabled, no OpenTelemetry
        // layer installed) leave a span without trace ids, which is all they can do.
        let _ = span.set_parent(remote);
        let future = span.in_scope(|| self.inner.call(request));
        ServerResponseFuture::new(future, span)
    }
}
