//! The one error type every policy returns.

use std::time::Duration;

/// Why a call guarded by trellis-resilience did not produce the inner service's answer.
///
/// Each variant names the policy that rejected the call, so callers (and a gateway mapping
/// errors to HTTP statuses) can react precisely: a `BreakerOpen` maps to 503 with
/// `Retry-After`, a `Timeout` to 504, a `RateLimited` to 429 and so on.
#[derive(Debug, thiserror::Error)]
pub enum ResilienceError<E> {
    /// The circuit breaker is open (or half-open with every trial call taken) and rejected the
    /// call without running it.
    #[error("circuit breaker `{name}` is open; next trial in {retry_after:?}")]
    BreakerOpen {
        /// The breaker's name.
        name: std::sync::Arc<str>,
        /// Time left until the breaker admits a trial call.
        retry_after: Duration,
    },
    /// The call did not finish within its time limit and was cancelled.
    #[error("call timed out after {0:?}")]
    Timeout(Duration),
    /// The bulkhead's concurrent calls and its waiting queue were full, or the wait for a slot
    /// passed its limit.
    #[error("bulkhead is full")]
    BulkheadFull,
    /// The rate limiter refused the call.
    #[error("rate limited; retry in {retry_after:?}")]
    RateLimited {
        /// Time until the limiter would admit the call.
        retry_after: Duration,
    },
    /// The inner call failed with its own error.
    #[error(transparent)]
    Inner(E),
}

impl<E> ResilienceError<E> {
    /// Whether trying the call again, later, can succeed.
    ///
    /// Every policy rejection is transient by nature (`retry_after` says when). An inner error
    /// is reported as retryable here; a [`RetryPolicy`](crate::RetryPolicy)'s predicate decides
    /// for inner errors, because only the caller knows what its error means.
    pub fn is_retryable(&self) -> bool {
        true
    }

    /// Whether a policy (not the inner call) produced this error.
    pub fn is_rejection(&self) -> bool {
        !matches!(self, Self::Inner(_))
    }

    /// How long to wait before calling again, when the rejecting policy knows.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::BreakerOpen { retry_after, .. } | Self::RateLimited { retry_after } => {
                Some(*retry_after)
            }
            _ => None,
        }
    }

    /// The inner error, if the inner call produced it.
    pub fn into_inner(self) -> Option<E> {
        match self {
            Self::Inner(e) => Some(e),
            _ => None,
        }
    }

    /// A short, stable name of the variant, for metrics labels and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::BreakerOpen { .. } => "breaker_open",
            Self::Timeout(_) => "timeout",
            Self::BulkheadFull => "bulkhead_full",
            Self::RateLimited { .. } => "rate_limited",
            Self::Inner(_) => "inner",
        }
    }

    /// Maps the inner error.
    pub fn map_inner<F, E2>(self, f: F) -> ResilienceError<E2>
    where
        F: FnOnce(E) -> E2,
    {
        match self {
            Self::BreakerOpen { name, retry_after } => {
                ResilienceError::BreakerOpen { name, retry_after }
            }
            Self::Timeout(d) => ResilienceError::Timeout(d),
            Self::BulkheadFull => ResilienceError::BulkheadFull,
            Self::RateLimited { retry_after } => ResilienceError::RateLimited { retry_after },
            Self::Inner(e) => ResilienceError::Inner(f(e)),
        }
    }
}

/// A builder was given a setting outside its allowed range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {policy} setting `{setting}`: {reason}")]
pub struct ConfigError {
    /// The policy being built.
    pub policy: &'static str,
    /// The setting that is wrong.
    pub setting: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl ConfigError {
    pub(crate) fn new(
        policy: &'static str,
        setting: &'static str,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            policy,
            setting,
            reason: reason.into(),
        }
    }
}
