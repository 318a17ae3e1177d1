//! Shared test helpers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use trellis_resilience::{Clock, SharedClock};

/// A clock that moves only when the test says so; usable from any thread.
#[derive(Debug, Clone, Default)]
pub(crate) struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    pub(crate) fn advance(&self, by: Duration) {
        self.0.fetch_add(
            u64::try_from(by.as_nanos()).expect("small"),
            Ordering::SeqCst,
        );
    }

    pub(crate) fn shared(&self) -> SharedClock {
        SharedClock::new(self.clone())
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::SeqCst))
    }
}

pub(crate) type TestError = &'static str;

pub(crate) async fn ok() -> Result<u32, TestError> {
    Ok(1)
}

pub(crate) async fn fail() -> Result<u32, TestError> {
    Err("boom")
}
