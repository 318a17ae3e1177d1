//! Retry: bounded attempts, exponential backoff with full jitter, a retry budget, a retryable
//! predicate, and never past the caller's deadline.

mod backoff;
mod budget;
mod layer;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::Counter;
use tokio::time::Instant;

pub use self::backoff::Backoff;
pub use self::budget::RetryBudget;
pub use self::layer::{RetryLayer, RetryService};
use crate::classify::{RetryErrors, RetryIf};
use crate::error::{ConfigError, ResilienceError};

/// The most attempts a policy may make (first attempt included).
pub const ATTEMPTS_MAX: u32 = 100;

/// A retry policy. Cheap to clone; clones share the budget and the jitter source.
///
/// Sleeps use tokio's timer, so tests drive them with paused time.
///
/// # Examples
/// ```
/// use std::time::Duration;
/// use trellis_resilience::{Backoff, RetryBudget, RetryPolicy};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let retry = RetryPolicy::builder()
///     .max_attempts(3)
///     .backoff(Backoff { initial: Duration::from_millis(10), ..Backoff::default() })
///     .budget(RetryBudget::default())
///     .build()
///     .expect("valid settings");
///
/// let mut calls = 0;
/// let answer = retry
///     .call(|| {
///         calls += 1;
///         let attempt = calls;
///         async move { if attempt < 3 { Err("flaky") } else { Ok(attempt) } }
///     })
///     .await;
/// assert_eq!(answer.ok(), Some(3));
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    inner: Arc<RetryInner>,
}

#[derive(Debug)]
struct RetryInner {
    max_attempts: u32,
    backoff: Backoff,
    budget: Option<RetryBudget>,
    max_elapsed: Option<Duration>,
    rng: Mutex<fastrand::Rng>,
    retries: Counter,
    budget_exhausted: Counter,
}

/// Builds a [`RetryPolicy`]. Defaults: 3 attempts, [`Backoff::default`], the default
/// [`RetryBudget`], no overall time limit.
#[derive(Debug, Clone)]
#[must_use]
pub struct RetryPolicyBuilder {
    name: String,
    max_attempts: u32,
    backoff: Backoff,
    budget: Option<RetryBudget>,
    max_elapsed: Option<Duration>,
    seed: Option<u64>,
}

impl RetryPolicyBuilder {
    /// The name used in metrics labels (`retry` unless set).
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.to_owned();
        self
    }

    /// Attempts in all, the first included (1 disables retrying).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// The backoff between attempts.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// The retry budget; share one budget between the policies calling the same upstream.
    pub fn budget(mut self, budget: RetryBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// No budget: only `max_attempts` limits retries. Prefer a budget in production.
    pub fn without_budget(mut self) -> Self {
        self.budget = None;
        self
    }

    /// An overall limit for a call, all attempts and waits included.
    pub fn max_elapsed(mut self, limit: Duration) -> Self {
        self.max_elapsed = Some(limit);
        self
    }

    /// Seeds the jitter, for reproducible delays in tests.
    pub fn jitter_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Checks the settings and builds the policy.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the first setting out of range.
    pub fn build(self) -> Result<RetryPolicy, ConfigError> {
        if self.max_attempts == 0 || self.max_attempts > ATTEMPTS_MAX {
            return Err(ConfigError::new(
                "retry",
                "max_attempts",
                format!("must be between 1 and {ATTEMPTS_MAX}"),
            ));
        }
        if !(self.backoff.multiplier >= 1.0 && self.backoff.multiplier <= 100.0) {
            return Err(ConfigError::new(
                "retry",
                "backoff.multiplier",
                "must be between 1 and 100",
            ));
        }
        if self.backoff.initial > self.backoff.max {
            return Err(ConfigError::new(
                "retry",
                "backoff.initial",
                "must not exceed backoff.max",
            ));
        }
        crate::metric_help::describe();
        let rng = self
            .seed
            .map_or_else(fastrand::Rng::new, fastrand::Rng::with_seed);
        Ok(RetryPolicy {
            inner: Arc::new(RetryInner {
                max_attempts: self.max_attempts,
                backoff: self.backoff,
                budget: self.budget,
                max_elapsed: self.max_elapsed,
                rng: Mutex::new(rng),
                retries: metrics::counter!("trellis_retry_retries_total", "policy" => self.name.clone()),
                budget_exhausted: metrics::counter!("trellis_retry_budget_exhausted_total", "policy" => self.name),
            }),
        })
    }
}

/// How an attempt loop ended.
pub(crate) enum Finished<R> {
    /// The last attempt's result (success, final failure, or the last failure when attempts,
    /// budget or time ran out).
    Result(R),
    /// The deadline passed during an attempt.
    TimedOut(Duration),
}

impl RetryPolicy {
    /// Starts building a policy.
    pub fn builder() -> RetryPolicyBuilder {
        RetryPolicyBuilder {
            name: "retry".to_owned(),
            max_attempts: 3,
            backoff: Backoff::default(),
            budget: Some(RetryBudget::default()),
            max_elapsed: None,
            seed: None,
        }
    }

    /// The attempts limit, first attempt included.
    pub fn max_attempts(&self) -> u32 {
        self.inner.max_attempts
    }

    /// Calls `f` until it succeeds, retrying every `Err`.
    ///
    /// # Errors
    /// The last attempt's error as [`ResilienceError::Inner`], or [`ResilienceError::Timeout`]
    /// when the policy's `max_elapsed` passed during an attempt.
    pub async fn call<F, Fut, T, E>(&self, f: F) -> Result<T, ResilienceError<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.call_if(&RetryErrors, None, f).await
    }

    /// Calls `f`, retrying while `retry_if` says so, and never past `deadline` (the caller's
    /// own deadline; the earlier of it and the policy's `max_elapsed` applies). No attempt
    /// starts, and no backoff sleep is begun, that would end after the deadline; an attempt
    /// still running at the deadline is cancelled.
    ///
    /// # Errors
    /// As [`call`](Self::call).
    pub async fn call_if<P, F, Fut, T, E>(
        &self,
        retry_if: &P,
        deadline: Option<Instant>,
        f: F,
    ) -> Result<T, ResilienceError<E>>
    where
        P: RetryIf<T, E> + ?Sized,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        match self
            .run(deadline, f, |result: &Result<T, E>| {
                retry_if.should_retry(result.as_ref())
            })
            .await
        {
            Finished::Result(result) => result.map_err(ResilienceError::Inner),
            Finished::TimedOut(after) => Err(ResilienceError::Timeout(after)),
        }
    }

    /// The attempt loop, generic over what an attempt returns.
    pub(crate) async fn run<R, F, Fut>(
        &self,
        deadline: Option<Instant>,
        mut f: F,
        should_retry: impl Fn(&R) -> bool,
    ) -> Finished<R>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = R>,
    {
        let inner = &*self.inner;
        // Reading the clock is most of a first attempt's overhead: only do it when a time
        // limit applies.
        let started = (deadline.is_some() || inner.max_elapsed.is_some()).then(Instant::now);
        let deadline = match (
            deadline,
            inner.max_elapsed.zip(started).map(|(limit, at)| at + limit),
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(budget) = &inner.budget {
            budget.deposit();
        }
        let mut attempt = 1;
        loop {
            let result = match deadline {
                Some(deadline) => match tokio::time::timeout_at(deadline, f()).await {
                    Ok(result) => result,
                    Err(_) => {
                        return Finished::TimedOut(
                            started.map_or(Duration::ZERO, |at| at.elapsed()),
                        );
                    }
                },
                None => f().await,
            };
            if attempt >= inner.max_attempts || !should_retry(&result) {
                return Finished::Result(result);
            }
            let delay = inner.backoff.delay(attempt, &inner.rng);
            if deadline.is_some_and(|deadline| Instant::now() + delay >= deadline) {
                return Finished::Result(result);
            }
            if inner
                .budget
                .as_ref()
                .is_some_and(|budget| !budget.try_withdraw())
            {
                inner.budget_exhausted.increment(1);
                return Finished::Result(result);
            }
            drop(result);
            inner.retries.increment(1);
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }
}
