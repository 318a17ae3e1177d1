//! The time source every policy reads, injectable so tests control time.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// A monotonic time source.
///
/// Policies never read the wall clock directly: they ask a `Clock` for the time elapsed since
/// the clock's own origin. The default, [`TokioClock`], follows tokio's clock, so tests that run
/// with `#[tokio::test(start_paused = true)]` and `tokio::time::advance` drive every policy
/// deterministically without sleeping.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Time elapsed since this clock's origin. Never decreases.
    fn now(&self) -> Duration;
}

/// A cheaply cloneable handle to a [`Clock`].
#[derive(Clone, Debug)]
pub struct SharedClock(Arc<dyn Clock>);

impl SharedClock {
    /// Wraps a clock.
    pub fn new(clock: impl Clock) -> Self {
        Self(Arc::new(clock))
    }

    /// Time elapsed since the clock's origin.
    #[inline]
    pub fn now(&self) -> Duration {
        self.0.now()
    }
}

impl Default for SharedClock {
    fn default() -> Self {
        Self::new(TokioClock::new())
    }
}

/// A clock that reads `tokio::time::Instant`, so it honours tokio's paused test time.
///
/// Outside a tokio runtime it reads the operating system's monotonic clock.
#[derive(Clone, Copy, Debug)]
pub struct TokioClock {
    origin: tokio::time::Instant,
}

impl TokioClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        Self {
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    #[inline]
    fn now(&self) -> Duration {
        tokio::time::Instant::now().saturating_duration_since(self.origin)
    }
}

/// Adapts a [`SharedClock`] to `governor`'s clock trait, so the rate limiter follows the same
/// (possibly paused) time as every other policy.
#[derive(Clone, Debug)]
pub(crate) struct GovernorClock(pub(crate) SharedClock);

impl governor::clock::Clock for GovernorClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        self.0.now()
    }
}
