//! Rate limiter: GCRA through `governor`, with an optional bounded wait.

use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use governor::Quota;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use metrics::Counter;
use tower::{Layer, Service, ServiceExt};

use crate::clock::{GovernorClock, SharedClock};
use crate::error::{ConfigError, ResilienceError};

type Gcra = governor::RateLimiter<NotKeyed, InMemoryState, GovernorClock, NoOpMiddleware<Duration>>;

/// Admits calls at a steady rate with a burst allowance (GCRA, as `governor` implements it).
/// Cheap to clone; clones share the limit.
///
/// A call over the limit waits when the wait is within `max_wait` (zero by default: no
/// waiting), otherwise it is rejected with [`ResilienceError::RateLimited`] carrying the time
/// until it would be admitted.
///
/// # Examples
/// ```
/// use trellis_resilience::{RateLimiter, ResilienceError};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let limiter = RateLimiter::builder("search").per_second(100).burst(2).build().expect("valid");
/// assert!(limiter.check().is_ok());
/// assert!(limiter.check().is_ok());
/// assert!(limiter.check().is_err(), "the burst of 2 is spent");
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct RateLimiter {
    inner: Arc<LimiterInner>,
}

#[derive(Debug)]
struct LimiterInner {
    gcra: Gcra,
    clock: SharedClock,
    max_wait: Duration,
    rejected: Counter,
}

/// Builds a [`RateLimiter`].
#[derive(Debug, Clone)]
#[must_use]
pub struct RateLimiterBuilder {
    name: String,
    per_second: u32,
    burst: Option<u32>,
    max_wait: Duration,
    clock: SharedClock,
}

impl RateLimiterBuilder {
    /// The sustained rate in calls per second.
    pub fn per_second(mut self, calls: u32) -> Self {
        self.per_second = calls;
        self
    }

    /// Calls admitted at once after a quiet period (the rate by default).
    pub fn burst(mut self, calls: u32) -> Self {
        self.burst = Some(calls);
        self
    }

    /// How long a call may wait for its turn before it is rejected.
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.max_wait = wait;
        self
    }

    /// The time source (tokio's clock by default).
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// Checks the settings and builds the limiter.
    ///
    /// # Errors
    /// A [`ConfigError`] when the rate or burst is zero.
    pub fn build(self) -> Result<RateLimiter, ConfigError> {
        let rate = NonZeroU32::new(self.per_second)
            .ok_or_else(|| ConfigError::new("rate limiter", "per_second", "must be at least 1"))?;
        let burst = NonZeroU32::new(self.burst.unwrap_or(self.per_second))
            .ok_or_else(|| ConfigError::new("rate limiter", "burst", "must be at least 1"))?;
        let quota = Quota::per_second(rate).allow_burst(burst);
        crate::metric_help::describe();
        Ok(RateLimiter {
            inner: Arc::new(LimiterInner {
                gcra: governor::RateLimiter::direct_with_clock(
                    quota,
                    GovernorClock(self.clock.clone()),
                ),
                clock: self.clock,
                max_wait: self.max_wait,
                rejected: metrics::counter!("trellis_rate_limiter_rejections_total", "limiter" => self.name),
            }),
        })
    }
}

impl RateLimiter {
    /// Starts building a limiter (default: 100 calls per second, burst 100, no waiting).
    pub fn builder(name: &str) -> RateLimiterBuilder {
        RateLimiterBuilder {
            name: name.to_owned(),
            per_second: 100,
            burst: None,
            max_wait: Duration::ZERO,
            clock: SharedClock::default(),
        }
    }

    /// Takes a cell now, or says how long until one is free.
    ///
    /// # Errors
    /// The wait until the call would be admitted.
    pub fn check(&self) -> Result<(), Duration> {
        self.inner
            .gcra
            .check()
            .map_err(|not_until| not_until.wait_time_from(self.inner.clock.now()))
    }

    /// Takes a cell, waiting up to the limiter's `max_wait`.
    ///
    /// # Errors
    /// [`ResilienceError::RateLimited`] when the wait would exceed `max_wait`.
    pub async fn acquire<E>(&self) -> Result<(), ResilienceError<E>> {
        let inner = &*self.inner;
        let mut waited = Duration::ZERO;
        loop {
            match self.check() {
                Ok(()) => return Ok(()),
                Err(wait) if waited + wait <= inner.max_wait => {
                    tokio::time::sleep(wait).await;
                    waited += wait;
                }
                Err(wait) => {
                    inner.rejected.increment(1);
                    return Err(ResilienceError::RateLimited { retry_after: wait });
                }
            }
        }
    }

    /// Runs `f` once the limiter admits it.
    ///
    /// # Errors
    /// [`ResilienceError::RateLimited`] without running `f`, or `f`'s error as
    /// [`ResilienceError::Inner`].
    pub async fn call<F, Fut, T, E>(&self, f: F) -> Result<T, ResilienceError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.acquire().await?;
        f().await.map_err(ResilienceError::Inner)
    }
}

/// Wraps services in a [`RateLimiterService`].
#[derive(Debug, Clone)]
pub struct RateLimiterLayer {
    limiter: RateLimiter,
}

impl RateLimiterLayer {
    /// Services made by this layer share `limiter`.
    pub fn new(limiter: RateLimiter) -> Self {
        Self { limiter }
    }
}

impl<S> Layer<S> for RateLimiterLayer {
    type Service = RateLimiterService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimiterService {
            inner,
            limiter: self.limiter.clone(),
        }
    }
}

/// A service whose calls pass through a [`RateLimiter`].
#[derive(Debug, Clone)]
pub struct RateLimiterService<S> {
    inner: S,
    limiter: RateLimiter,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, Req> Service<Req> for RateLimiterService<S>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send,
    S::Error: Send,
    Req: Send + 'static,
{
    type Response = S::Response;
    type Error = ResilienceError<S::Error>;
    type Future = BoxFuture<Result<S::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let service = self.inner.clone();
        let limiter = self.limiter.clone();
        Box::pin(async move {
            limiter.acquire().await?;
            service
                .oneshot(request)
                .await
                .map_err(ResilienceError::Inner)
        })
    }
}
