//! The breaker as tower middleware.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::{CircuitBreaker, Inner, Ticket};
use crate::classify::{Classify, ErrorsAreFailures, Outcome};
use crate::error::ResilienceError;

/// Wraps services in a [`CircuitBreakerService`] sharing one [`CircuitBreaker`].
#[derive(Debug, Clone)]
pub struct CircuitBreakerLayer<C = ErrorsAreFailures> {
    breaker: CircuitBreaker,
    classifier: C,
}

impl CircuitBreakerLayer {
    /// A layer counting every `Err` as a failure.
    pub fn new(breaker: CircuitBreaker) -> Self {
        Self {
            breaker,
            classifier: ErrorsAreFailures,
        }
    }
}

impl<C> CircuitBreakerLayer<C> {
    /// Uses `classifier` to decide what counts as a failure.
    #[must_use]
    pub fn with_classifier<C2>(self, classifier: C2) -> CircuitBreakerLayer<C2> {
        CircuitBreakerLayer {
            breaker: self.breaker,
            classifier,
        }
    }
}

impl<S, C: Clone> Layer<S> for CircuitBreakerLayer<C> {
    type Service = CircuitBreakerService<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreakerService {
            inner,
            breaker: self.breaker.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

/// A service whose calls pass through a [`CircuitBreaker`].
///
/// `poll_ready` only reflects the inner service; a rejected call completes at once with
/// [`ResilienceError::BreakerOpen`], without reaching the inner service.
#[derive(Debug, Clone)]
pub struct CircuitBreakerService<S, C = ErrorsAreFailures> {
    inner: S,
    breaker: CircuitBreaker,
    classifier: C,
}

impl<S, C, Req> Service<Req> for CircuitBreakerService<S, C>
where
    S: Service<Req>,
    C: Classify<S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = ResilienceError<S::Error>;
    type Future = ResponseFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(ResilienceError::Inner)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        match self.breaker.inner.admit() {
            Ok(ticket) => ResponseFuture {
                call: Some(self.inner.call(request)),
                guard: OwnedGuard {
                    inner: self.breaker.inner.clone(),
                    ticket: Some(ticket),
                },
                classifier: self.classifier.clone(),
                rejected: None,
            },
            Err(retry_after) => ResponseFuture {
                call: None,
                guard: OwnedGuard {
                    inner: self.breaker.inner.clone(),
                    ticket: None,
                },
                classifier: self.classifier.clone(),
                rejected: Some(retry_after),
            },
        }
    }
}

/// Records the outcome once; as ignored if the future is dropped first.
struct OwnedGuard {
    inner: Arc<Inner>,
    ticket: Option<Ticket>,
}

impl Drop for OwnedGuard {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.inner.complete(ticket, Outcome::Ignored);
        }
    }
}

pin_project! {
    /// The future of a [`CircuitBreakerService`] call.
    pub struct ResponseFuture<F, C> {
        #[pin]
        call: Option<F>,
        guard: OwnedGuard,
        classifier: C,
        rejected: Option<Duration>,
    }
}

impl<F, C> std::fmt::Debug for ResponseFuture<F, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("rejected", &self.rejected)
            .finish_non_exhaustive()
    }
}

impl<F, C, T, E> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    C: Classify<T, E>,
{
    type Output = Result<T, ResilienceError<E>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(call) = this.call.as_pin_mut() else {
            let retry_after = this.rejected.take().unwrap_or_default();
            return Poll::Ready(Err(ResilienceError::BreakerOpen {
                name: this.guard.inner.config.name.clone(),
                retry_after,
            }));
        };
        let result = ready!(call.poll(cx));
        if let Some(ticket) = this.guard.ticket.take() {
            this.guard
                .inner
                .complete(ticket, this.classifier.classify(result.as_ref()));
        }
        Poll::Ready(result.map_err(ResilienceError::Inner))
    }
}
