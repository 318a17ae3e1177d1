//! Timeout: a call that does not finish in time is cancelled and reported as
//! [`ResilienceError::Timeout`].

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::{Layer, Service};

use crate::error::ResilienceError;

/// Runs `future`, cancelling it after `limit`.
///
/// # Errors
/// [`ResilienceError::Timeout`] when the limit passes first, otherwise the future's own error
/// as [`ResilienceError::Inner`].
pub async fn with_timeout<Fut, T, E>(limit: Duration, future: Fut) -> Result<T, ResilienceError<E>>
where
    Fut: Future<Output = Result<T, E>>,
{
    match tokio::time::timeout(limit, future).await {
        Ok(result) => result.map_err(ResilienceError::Inner),
        Err(_) => Err(ResilienceError::Timeout(limit)),
    }
}

/// Wraps services in a [`TimeoutService`].
#[derive(Debug, Clone, Copy)]
pub struct TimeoutLayer {
    limit: Duration,
}

impl TimeoutLayer {
    /// Calls taking longer than `limit` are cancelled.
    pub fn new(limit: Duration) -> Self {
        Self { limit }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = TimeoutService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TimeoutService {
            inner,
            limit: self.limit,
        }
    }
}

/// A service whose calls are cancelled after a time limit.
#[derive(Debug, Clone)]
pub struct TimeoutService<S> {
    inner: S,
    limit: Duration,
}

impl<S, Req> Service<Req> for TimeoutService<S>
where
    S: Service<Req>,
{
    type Response = S::Response;
    type Error = ResilienceError<S::Error>;
    type Future = TimeoutFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(ResilienceError::Inner)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        TimeoutFuture {
            call: self.inner.call(request),
            sleep: tokio::time::sleep(self.limit),
            limit: self.limit,
        }
    }
}

pin_project! {
    /// The future of a [`TimeoutService`] call.
    #[derive(Debug)]
    pub struct TimeoutFuture<F> {
        #[pin]
        call: F,
        #[pin]
        sleep: Sleep,
        limit: Duration,
    }
}

impl<F, T, E> Future for TimeoutFuture<F>
where
    F: Future<Output = Result<T, E>>,
{
    type Output = Result<T, ResilienceError<E>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(result) = this.call.poll(cx) {
            return Poll::Ready(result.map_err(ResilienceError::Inner));
        }
        match this.sleep.poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(ResilienceError::Timeout(*this.limit))),
            Poll::Pending => Poll::Pending,
        }
    }
}
