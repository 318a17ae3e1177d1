//! The policies composed in one documented order.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tower::{Layer, Service, ServiceExt};

use crate::breaker::CircuitBreaker;
use crate::bulkhead::Bulkhead;
use crate::classify::{Classify, ErrorsAreFailures, Outcome, RetryErrors, RetryIf};
use crate::error::ResilienceError;
use crate::rate_limit::RateLimiter;
use crate::retry::{Finished, RetryPolicy};

/// Several policies around one call, always in this order (outermost first):
///
/// `retry( circuit breaker( rate limiter( timeout( bulkhead( call )))))`
///
/// - Retry is outermost, so every attempt is judged by the breaker and a retry never bypasses
///   an open breaker (an attempt the breaker rejects is not retried: it fails fast).
/// - The breaker sees timeouts as failures, but a rate-limiter or bulkhead rejection is a local
///   decision that says nothing about the callee, so it is ignored by the breaker.
/// - The timeout covers the wait for a bulkhead slot and the call itself, so a caller never
///   waits longer than the timeout per attempt.
///
/// This is resilience4j's recommended order. Every policy is optional; an empty stack just runs
/// the call.
///
/// # Examples
/// ```
/// use std::time::Duration;
/// use trellis_resilience::{CircuitBreaker, Resilience, RetryPolicy};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let stack = Resilience::builder()
///     .retry(RetryPolicy::builder().max_attempts(3).build().expect("valid"))
///     .circuit_breaker(CircuitBreaker::builder("inventory").build().expect("valid"))
///     .timeout(Duration::from_millis(500))
///     .build();
/// let stock = stack.call(|| async { Ok::<u32, std::io::Error>(7) }).await;
/// assert_eq!(stock.ok(), Some(7));
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct Resilience {
    retry: Option<RetryPolicy>,
    breaker: Option<CircuitBreaker>,
    rate_limiter: Option<RateLimiter>,
    timeout: Option<Duration>,
    bulkhead: Option<Bulkhead>,
}

/// Builds a [`Resilience`] stack.
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct ResilienceBuilder {
    stack: Resilience,
}

impl ResilienceBuilder {
    /// Retries failed attempts.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.stack.retry = Some(policy);
        self
    }

    /// Guards each attempt with a circuit breaker.
    pub fn circuit_breaker(mut self, breaker: CircuitBreaker) -> Self {
        self.stack.breaker = Some(breaker);
        self
    }

    /// Limits the rate of attempts.
    pub fn rate_limiter(mut self, limiter: RateLimiter) -> Self {
        self.stack.rate_limiter = Some(limiter);
        self
    }

    /// Limits each attempt's duration.
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.stack.timeout = Some(limit);
        self
    }

    /// Limits concurrent attempts.
    pub fn bulkhead(mut self, bulkhead: Bulkhead) -> Self {
        self.stack.bulkhead = Some(bulkhead);
        self
    }

    /// The stack.
    pub fn build(self) -> Resilience {
        self.stack
    }
}

impl Resilience {
    /// Starts an empty stack.
    pub fn builder() -> ResilienceBuilder {
        ResilienceBuilder::default()
    }

    /// The circuit breaker, if the stack has one.
    pub fn circuit_breaker(&self) -> Option<&CircuitBreaker> {
        self.breaker.as_ref()
    }

    /// Runs `f` through the stack: `Err` counts as a failure and is retried.
    ///
    /// # Errors
    /// The rejecting policy's error, or the last attempt's error as [`ResilienceError::Inner`].
    pub async fn call<F, Fut, T, E>(&self, f: F) -> Result<T, ResilienceError<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.call_with(&ErrorsAreFailures, &RetryErrors, f).await
    }

    /// Runs `f` through the stack with a classifier for the breaker and a predicate for retry.
    ///
    /// # Errors
    /// As [`call`](Self::call).
    pub async fn call_with<C, P, F, Fut, T, E>(
        &self,
        classifier: &C,
        retry_if: &P,
        mut f: F,
    ) -> Result<T, ResilienceError<E>>
    where
        C: Classify<T, E> + ?Sized,
        P: RetryIf<T, E> + ?Sized,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let Some(retry) = &self.retry else {
            return self.attempt(classifier, f()).await;
        };
        let attempt = || self.attempt(classifier, f());
        let should_retry = |result: &Result<T, ResilienceError<E>>| match result {
            Ok(value) => retry_if.should_retry(Ok(value)),
            Err(ResilienceError::Inner(error)) => retry_if.should_retry(Err(error)),
            // A slow callee may answer the next attempt; local congestion may clear.
            Err(ResilienceError::Timeout(_) | ResilienceError::BulkheadFull) => true,
            // Retrying into an open breaker or a rate limit only adds load.
            Err(ResilienceError::BreakerOpen { .. } | ResilienceError::RateLimited { .. }) => false,
        };
        match retry.run(None, attempt, should_retry).await {
            Finished::Result(result) => result,
            Finished::TimedOut(after) => Err(ResilienceError::Timeout(after)),
        }
    }

    /// One attempt: breaker, rate limiter, timeout, bulkhead, call.
    async fn attempt<C, Fut, T, E>(
        &self,
        classifier: &C,
        call: Fut,
    ) -> Result<T, ResilienceError<E>>
    where
        C: Classify<T, E> + ?Sized,
        Fut: Future<Output = Result<T, E>>,
    {
        let permit = match &self.breaker {
            Some(breaker) => Some(
                breaker
                    .try_acquire()
                    .map_err(|rejection| rejection.map_inner(|never| match never {}))?,
            ),
            None => None,
        };
        let result = self.guarded(call).await;
        if let Some(permit) = permit {
            let outcome = match &result {
                Ok(value) => classifier.classify(Ok(value)),
                Err(ResilienceError::Inner(error)) => classifier.classify(Err(error)),
                Err(ResilienceError::Timeout(_)) => Outcome::Failure,
                Err(_) => Outcome::Ignored,
            };
            permit.record(outcome);
        }
        result
    }

    async fn guarded<Fut, T, E>(&self, call: Fut) -> Result<T, ResilienceError<E>>
    where
        Fut: Future<Output = Result<T, E>>,
    {
        if let Some(limiter) = &self.rate_limiter {
            limiter.acquire().await?;
        }
        let bulkheaded = async {
            let _permit = match &self.bulkhead {
                Some(bulkhead) => Some(bulkhead.acquire().await?),
                None => None,
            };
            call.await.map_err(ResilienceError::Inner)
        };
        match self.timeout {
            Some(limit) => tokio::time::timeout(limit, bulkheaded)
                .await
                .unwrap_or(Err(ResilienceError::Timeout(limit))),
            None => bulkheaded.await,
        }
    }
}

/// Wraps services in a [`ResilienceService`] running a [`Resilience`] stack.
#[derive(Debug, Clone)]
pub struct ResilienceLayer<C = ErrorsAreFailures, P = RetryErrors> {
    stack: Resilience,
    classifier: C,
    retry_if: P,
}

impl ResilienceLayer {
    /// A layer for `stack`, counting and retrying every `Err`.
    pub fn new(stack: Resilience) -> Self {
        Self {
            stack,
            classifier: ErrorsAreFailures,
            retry_if: RetryErrors,
        }
    }
}

impl<C, P> ResilienceLayer<C, P> {
    /// Uses `classifier` for the breaker and `retry_if` for retries (for HTTP:
    /// [`ServerErrors`](crate::ServerErrors) and [`RetryTransient`](crate::RetryTransient)).
    #[must_use]
    pub fn with_policies<C2, P2>(self, classifier: C2, retry_if: P2) -> ResilienceLayer<C2, P2> {
        ResilienceLayer {
            stack: self.stack,
            classifier,
            retry_if,
        }
    }
}

impl<S, C: Clone, P: Clone> Layer<S> for ResilienceLayer<C, P> {
    type Service = ResilienceService<S, C, P>;

    fn layer(&self, inner: S) -> Self::Service {
        ResilienceService {
            inner,
            stack: self.stack.clone(),
            classifier: self.classifier.clone(),
            retry_if: self.retry_if.clone(),
        }
    }
}

/// A service whose calls run through a [`Resilience`] stack. Requests must be `Clone` (each
/// attempt sends a copy); `poll_ready` is always ready, each attempt readies its own clone.
#[derive(Debug, Clone)]
pub struct ResilienceService<S, C = ErrorsAreFailures, P = RetryErrors> {
    inner: S,
    stack: Resilience,
    classifier: C,
    retry_if: P,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, C, P, Req> Service<Req> for ResilienceService<S, C, P>
where
    S: Service<Req> + Clone + Send + Sync + 'static,
    S::Future: Send,
    S::Response: Send + Sync,
    S::Error: Send + Sync,
    C: Classify<S::Response, S::Error> + Clone + Send + Sync + 'static,
    P: RetryIf<S::Response, S::Error> + Clone + Send + Sync + 'static,
    Req: Clone + Send + Sync + 'static,
{
    type Response = S::Response;
    type Error = ResilienceError<S::Error>;
    type Future = BoxFuture<Result<S::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let service = self.inner.clone();
        let stack = self.stack.clone();
        let classifier = self.classifier.clone();
        let retry_if = self.retry_if.clone();
        Box::pin(async move {
            stack
                .call_with(&classifier, &retry_if, || {
                    service.clone().oneshot(request.clone())
                })
                .await
        })
    }
}
