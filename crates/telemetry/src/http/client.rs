//! The client side: send the current trace context along.

use std::task::{Context, Poll};

use http::{Request, Response};
use opentelemetry::trace::TraceContextExt;
use tower::{Layer, Service};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::future::ClientResponseFuture;
use crate::propagation;

/// Wraps a service in [`TraceContextClient`].
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceContextClientLayer {
    _private: (),
}

impl TraceContextClientLayer {
    /// A layer that propagates the current trace on each outgoing request.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }
}

impl<S> Layer<S> for TraceContextClientLayer {
    type Service = TraceContextClient<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TraceContextClient::new(inner)
    }
}

/// Sends each request inside an `http.client` span and propagates its context.
///
/// The span is a child of the current span and records `http.request.method`,
/// `server.address`, `url.path`, `otel.kind = "client"`, for a gRPC call `rpc.system = "grpc"`
/// and the method (`package.Service/Method`) as its name, and, once the response arrives,
/// `http.response.status_code`; a 4xx, a 5xx or an inner error also sets
/// `otel.status_code = "ERROR"`. The span's context replaces any `traceparent` / `tracestate`
/// already on the request, so the server sees this call as its parent. The query string is not
/// recorded, since it may carry secrets.
#[derive(Debug, Clone)]
pub struct TraceContextClient<S> {
    inner: S,
}

impl<S> TraceContextClient<S> {
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

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for TraceContextClient<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ClientResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let span = tracing::info_span!(
            "http.client",
            http.request.method = %request.method(),
            server.address = request.uri().host().unwrap_or_default(),
            url.path = %request.uri().path(),
            http.response.status_code = tracing::field::Empty,
            otel.kind = "client",
            otel.name = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            rpc.system = tracing::field::Empty,
        );
        super::name_span(&span, &request, None);
        let mut context = span.context();
        if !context.has_active_span() {
            // The client span is filtered out or has no OpenTelemetry side: still pass on the
            // caller's context rather than cut the trace here.
            context = opentelemetry::Context::current();
        }
        propagation::inject_headers(&context, request.headers_mut());
        let future = span.in_scope(|| self.inner.call(request));
        ClientResponseFuture::new(future, span)
    }
}
