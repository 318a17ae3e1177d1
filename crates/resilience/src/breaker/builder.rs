//! Configuration of a circuit breaker.

use std::sync::Arc;
use std::time::Duration;

use super::CircuitBreaker;
use crate::clock::SharedClock;
use crate::error::ConfigError;

/// The largest number of trial calls HALF_OPEN may admit (the state word holds the count in
/// 20 bits).
pub const HALF_OPEN_CALLS_MAX: u32 = (1 << 20) - 1;

/// The largest count-based window.
pub const WINDOW_SIZE_MAX: u32 = 1 << 20;

/// Which calls the failure and slow-call rates are computed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlidingWindow {
    /// The last `n` calls.
    Count(u32),
    /// The calls of the last duration (kept in ten buckets; the window moves a bucket at a time).
    Time(Duration),
}

/// Settings of a [`CircuitBreaker`]; built with [`CircuitBreaker::builder`].
#[derive(Debug, Clone)]
pub(crate) struct BreakerConfig {
    pub(crate) name: Arc<str>,
    pub(crate) window: SlidingWindow,
    pub(crate) minimum_calls: u32,
    pub(crate) failure_rate_threshold: f64,
    pub(crate) slow_call_rate_threshold: f64,
    pub(crate) slow_call_duration: Option<Duration>,
    pub(crate) open_duration: Duration,
    pub(crate) half_open_calls: u32,
    pub(crate) clock: SharedClock,
}

/// Builds a [`CircuitBreaker`].
///
/// Defaults (those of resilience4j where it has one): a count window of the last 100 calls,
/// at least 20 calls before the rates are judged, opens at a 50 % failure rate, slow-call
/// detection off, 30 s open, 10 trial calls in HALF_OPEN, tokio's clock.
#[derive(Debug, Clone)]
#[must_use]
pub struct CircuitBreakerBuilder {
    config: BreakerConfig,
}

impl CircuitBreakerBuilder {
    pub(crate) fn new(name: &str) -> Self {
        Self {
            config: BreakerConfig {
                name: Arc::from(name),
                window: SlidingWindow::Count(100),
                minimum_calls: 20,
                failure_rate_threshold: 0.5,
                slow_call_rate_threshold: 1.0,
                slow_call_duration: None,
                open_duration: Duration::from_secs(30),
                half_open_calls: 10,
                clock: SharedClock::default(),
            },
        }
    }

    /// The window the rates are computed over.
    pub fn sliding_window(mut self, window: SlidingWindow) -> Self {
        self.config.window = window;
        self
    }

    /// The number of calls the window must hold before the breaker may open. A count window
    /// smaller than this uses its size instead.
    pub fn minimum_calls(mut self, calls: u32) -> Self {
        self.config.minimum_calls = calls;
        self
    }

    /// The failure rate (0 < rate <= 1) at or above which the breaker opens.
    pub fn failure_rate_threshold(mut self, rate: f64) -> Self {
        self.config.failure_rate_threshold = rate;
        self
    }

    /// Turns on slow-call detection: a call taking at least `duration` is slow, and the breaker
    /// opens when the slow-call rate reaches `rate` (0 < rate <= 1).
    pub fn slow_calls(mut self, duration: Duration, rate: f64) -> Self {
        self.config.slow_call_duration = Some(duration);
        self.config.slow_call_rate_threshold = rate;
        self
    }

    /// How long the breaker stays OPEN before it admits trial calls.
    pub fn open_duration(mut self, duration: Duration) -> Self {
        self.config.open_duration = duration;
        self
    }

    /// The number of trial calls HALF_OPEN admits; all must succeed to close the breaker.
    pub fn half_open_calls(mut self, calls: u32) -> Self {
        self.config.half_open_calls = calls;
        self
    }

    /// The time source (tokio's clock by default).
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.config.clock = clock;
        self
    }

    /// Checks the settings and builds the breaker.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the first setting out of range.
    pub fn build(self) -> Result<CircuitBreaker, ConfigError> {
        let c = &self.config;
        let bad = |setting, reason: &str| Err(ConfigError::new("circuit breaker", setting, reason));
        let rate_ok = |rate: f64| rate > 0.0 && rate <= 1.0;
        match c.window {
            SlidingWindow::Count(0) => {
                return bad("sliding_window", "a count window needs at least one call");
            }
            SlidingWindow::Count(n) if n > WINDOW_SIZE_MAX => {
                return bad(
                    "sliding_window",
                    &format!("a count window holds at most {WINDOW_SIZE_MAX} calls"),
                );
            }
            SlidingWindow::Time(d) if d < Duration::from_millis(10) => {
                return bad("sliding_window", "a time window must span at least 10 ms");
            }
            _ => {}
        }
        if c.minimum_calls == 0 {
            return bad("minimum_calls", "must be at least 1");
        }
        if !rate_ok(c.failure_rate_threshold) {
            return bad("failure_rate_threshold", "must be in (0, 1]");
        }
        if !rate_ok(c.slow_call_rate_threshold) {
            return bad("slow_call_rate_threshold", "must be in (0, 1]");
        }
        if c.slow_call_duration.is_some_and(|d| d.is_zero()) {
            return bad("slow_call_duration", "must be greater than zero");
        }
        if c.open_duration.is_zero() || c.open_duration > Duration::from_secs(86_400 * 365) {
            return bad("open_duration", "must be between 1 ms and one year");
        }
        if c.half_open_calls == 0 || c.half_open_calls > HALF_OPEN_CALLS_MAX {
            return bad(
                "half_open_calls",
                &format!("must be between 1 and {HALF_OPEN_CALLS_MAX}"),
            );
        }
        Ok(CircuitBreaker::from_config(self.config))
    }
}
