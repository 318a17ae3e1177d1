//! Resilience policies for calls to other services: a circuit breaker, retry with a budget,
//! timeout, bulkhead and rate limiter.
//!
//! Each policy works two ways: on a plain future (`breaker.call(|| async { .. })`), so it wraps
//! a hyper or reqwest call, a tonic channel or a database query alike, and as a tower
//! `Layer`/`Service` pair. [`Resilience`] composes them in one documented order
//! (retry outside breaker outside rate limiter outside timeout outside bulkhead), and every
//! policy reports its rejections through one error type, [`ResilienceError`], that says which
//! policy refused and how long to wait.
//!
//! The gateway puts a breaker in front of each upstream; the shop's payments service calls its
//! provider through the whole stack; the saga engine retries steps with [`RetryPolicy`].
//!
//! # Why our own breaker and retry
//! They are the product: the breaker's CLOSED path is lock-free (one atomic load to admit,
//! a ring-slot swap to record) and supports count- and time-based windows with failure and
//! slow-call rates, observable transitions and manual overrides, which the published Rust
//! breakers do not combine. Rate limiting wraps `governor` (GCRA) rather than rewriting it, and
//! the timeout and bulkhead are thin layers over tokio's timer and semaphore.
//!
//! # Time
//! Every policy reads time through tokio (the breaker and limiter through an injectable
//! [`Clock`], tokio's by default), so tests run with `#[tokio::test(start_paused = true)]` and
//! `tokio::time::advance` instead of sleeping.
//!
//! # Metrics
//! Recorded through the `metrics` facade: `trellis_breaker_state`, `trellis_breaker_calls_total`
//! (by outcome), `trellis_breaker_rejections_total`, `trellis_breaker_transitions_total`,
//! `trellis_retry_retries_total`, `trellis_retry_budget_exhausted_total`,
//! `trellis_bulkhead_rejections_total`, `trellis_rate_limiter_rejections_total`. Install the
//! recorder (trellis-telemetry does) before building policies: handles are registered at build
//! time so the hot path does no lookup.
//!
//! # Example
//! ```
//! use std::time::Duration;
//! use trellis_resilience::{
//!     Backoff, Bulkhead, CircuitBreaker, Resilience, ResilienceError, RetryPolicy, SlidingWindow,
//! };
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let stack = Resilience::builder()
//!     .retry(RetryPolicy::builder().max_attempts(3).backoff(Backoff::default()).build().expect("valid"))
//!     .circuit_breaker(
//!         CircuitBreaker::builder("provider")
//!             .sliding_window(SlidingWindow::Count(50))
//!             .failure_rate_threshold(0.5)
//!             .slow_calls(Duration::from_secs(2), 0.8)
//!             .build()
//!             .expect("valid"),
//!     )
//!     .timeout(Duration::from_secs(3))
//!     .bulkhead(Bulkhead::new("provider", 32, 64, Duration::from_millis(50)).expect("valid"))
//!     .build();
//!
//! match stack.call(|| async { Ok::<_, std::io::Error>("charged") }).await {
//!     Ok(answer) => assert_eq!(answer, "charged"),
//!     Err(ResilienceError::BreakerOpen { retry_after, .. }) => println!("provider down, retry in {retry_after:?}"),
//!     Err(other) => println!("failed: {other}"),
//! }
//! # }
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod breaker;
mod bulkhead;
mod classify;
mod clock;
mod error;
mod metric_help;
mod rate_limit;
mod retry;
mod stack;
mod timeout;

pub use breaker::{
    BreakerState, CallPermit, CircuitBreaker, CircuitBreakerBuilder, CircuitBreakerLayer,
    CircuitBreakerService, HALF_OPEN_CALLS_MAX, ResponseFuture, SlidingWindow, Transition,
    WINDOW_SIZE_MAX, WindowSnapshot,
};
pub use bulkhead::{Bulkhead, BulkheadLayer, BulkheadPermit, BulkheadService};
pub use classify::{
    Classify, ErrorsAreFailures, Outcome, RetryErrors, RetryIf, RetryTransient, ServerErrors,
};
pub use clock::{Clock, SharedClock, TokioClock};
pub use error::{ConfigError, ResilienceError};
pub use rate_limit::{RateLimiter, RateLimiterBuilder, RateLimiterLayer, RateLimiterService};
pub use retry::{
    ATTEMPTS_MAX, Backoff, RetryBudget, RetryLayer, RetryPolicy, RetryPolicyBuilder, RetryService,
};
pub use stack::{Resilience, ResilienceBuilder, ResilienceLayer, ResilienceService};
pub use timeout::{TimeoutFuture, TimeoutLayer, TimeoutService, with_timeout};
