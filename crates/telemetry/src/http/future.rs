//! Response futures that keep their span entered while polled and record the outcome.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;
use pin_project_lite::pin_project;
use tracing::Span;

pin_project! {
    /// The response future of [`TraceContextServer`](super::TraceContextServer).
    ///
    /// Enters the `http.server` span on every poll (never across an await point) and records
    /// the response status when the inner future completes.
    #[derive(Debug)]
    pub struct ServerResponseFuture<F> {
        #[pin]
        inner: F,
        span: Span,
    }
}

impl<F> ServerResponseFuture<F> {
    pub(super) fn new(inner: F, span: Span) -> Self {
        Self { inner, span }
    }
}

impl<F, B, E> Future for ServerResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        let output = std::task::ready!(this.inner.poll(cx));
        match &output {
            Ok(response) => {
                let status = response.status();
                this.span
                    .record("http.response.status_code", status.as_u16());
                // For a server span only 5xx is an error: a 4xx is the caller's mistake.
                if status.is_server_error() {
                    this.span.record("otel.status_code", "ERROR");
                }
            }
            Err(_) => {
                this.span.record("otel.status_code", "ERROR");
            }
        }
        Poll::Ready(output)
    }
}

pin_project! {
    /// The response future of [`TraceContextClient`](super::TraceContextClient).
    ///
    /// Enters the `http.client` span on every poll (never across an await point) and records
    /// the response status when the inner future completes.
    #[derive(Debug)]
    pub struct ClientResponseFuture<F> {
        #[pin]
        inner: F,
        span: Span,
    }
}

impl<F> ClientResponseFuture<F> {
    pub(super) fn new(inner: F, span: Span) -> Self {
        Self { inner, span }
    }
}

impl<F, B, E> Future for ClientResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        let output = std::task::ready!(this.inner.poll(cx));
        match &output {
            Ok(response) => {
                let status = response.status();
                this.span
                    .record("http.response.status_code", status.as_u16());
                // For a client span every 4xx and 5xx is an error: the call did not succeed.
                if status.is_client_error() || status.is_server_error() {
                    this.span.record("otel.status_code", "ERROR");
                }
            }
            Err(_) => {
                this.span.record("otel.status_code", "ERROR");
            }
        }
        Poll::Ready(output)
    }
}
