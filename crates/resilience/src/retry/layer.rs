//! Retry as tower middleware.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tower::{Layer, Service, ServiceExt};

use super::{Finished, RetryPolicy};
use crate::classify::{RetryErrors, RetryIf};
use crate::error::ResilienceError;

/// Wraps services in a [`RetryService`].
#[derive(Debug, Clone)]
pub struct RetryLayer<P = RetryErrors> {
    policy: RetryPolicy,
    retry_if: P,
}

impl RetryLayer {
    /// A layer retrying every `Err`.
    pub fn new(policy: RetryPolicy) -> Self {
        Self {
            policy,
            retry_if: RetryErrors,
        }
    }
}

impl<P> RetryLayer<P> {
    /// Retries only what `retry_if` accepts (for HTTP, [`RetryTransient`](crate::RetryTransient)).
    #[must_use]
    pub fn with_predicate<P2>(self, retry_if: P2) -> RetryLayer<P2> {
        RetryLayer {
            policy: self.policy,
            retry_if,
        }
    }
}

impl<S, P: Clone> Layer<S> for RetryLayer<P> {
    type Service = RetryService<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        RetryService {
            inner,
            policy: self.policy.clone(),
            retry_if: self.retry_if.clone(),
        }
    }
}

/// A service that retries failed calls. Requests must be `Clone`: each attempt sends a copy.
///
/// Each attempt waits for a clone of the inner service to be ready, so `poll_ready` is always
/// ready.
#[derive(Debug, Clone)]
pub struct RetryService<S, P = RetryErrors> {
    inner: S,
    policy: RetryPolicy,
    retry_if: P,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, P, Req> Service<Req> for RetryService<S, P>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send,
    S::Error: Send,
    P: RetryIf<S::Response, S::Error> + Clone + Send + Sync + 'static,
    Req: Clone + Send + 'static,
{
    type Response = S::Response;
    type Error = ResilienceError<S::Error>;
    type Future = BoxFuture<Result<S::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let service = self.inner.clone();
        let policy = self.policy.clone();
        let retry_if = self.retry_if.clone();
        Box::pin(async move {
            let attempt = move || {
                let service = service.clone();
                let request = request.clone();
                async move { service.oneshot(request).await }
            };
            let should_retry =
                |result: &Result<S::Response, S::Error>| retry_if.should_retry(result.as_ref());
            match policy.run(None, attempt, should_retry).await {
                Finished::Result(result) => result.map_err(ResilienceError::Inner),
                Finished::TimedOut(after) => Err(ResilienceError::Timeout(after)),
            }
        })
    }
}
