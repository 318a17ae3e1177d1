//! The run's clock and its trace: every decision and outcome, stamped with simulated time.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeZone as _, Utc};

/// Simulated time, readable from any thread: the simulation thread publishes tokio's paused
/// clock into it ([`SimClock::sync`]) before anything else may read it (the participants'
/// host runs only while the simulation thread waits for it).
#[derive(Debug, Clone)]
pub(crate) struct SimClock {
    origin: tokio::time::Instant,
    nanos: Arc<AtomicU64>,
}

impl SimClock {
    /// Starts at zero (call on the simulation's runtime).
    pub(crate) fn start() -> Self {
        Self {
            origin: tokio::time::Instant::now(),
            nanos: Arc::default(),
        }
    }

    /// Publishes the simulation's current time; returns it.
    pub(crate) fn sync(&self) -> Duration {
        let elapsed = self.origin.elapsed();
        self.nanos
            .store(elapsed.as_nanos() as u64, Ordering::SeqCst);
        elapsed
    }

    /// The last published time.
    pub(crate) fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::SeqCst))
    }
}

impl trellis_resilience::Clock for SimClock {
    fn now(&self) -> Duration {
        self.elapsed()
    }
}

impl shop_orders::aggregate::Clock for SimClock {
    fn now(&self) -> DateTime<Utc> {
        // A fixed epoch plus simulated time: events record the same times in every replay.
        let epoch = Utc
            .with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
            .single()
            .unwrap_or_default();
        epoch + chrono::Duration::from_std(self.elapsed()).unwrap_or_default()
    }
}

/// The trace of one run: what the RNG decided and what happened, in order.
#[derive(Clone)]
pub(crate) struct Trace {
    clock: SimClock,
    lines: Arc<Mutex<Vec<String>>>,
    echo: bool,
}

impl fmt::Debug for Trace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Trace").finish_non_exhaustive()
    }
}

impl Trace {
    pub(crate) fn new(clock: SimClock, echo: bool) -> Self {
        Self {
            clock,
            lines: Arc::default(),
            echo,
        }
    }

    /// Appends a line stamped with the last published simulated time.
    pub(crate) fn log(&self, line: impl fmt::Display) {
        let at = self.clock.elapsed();
        let line = format!("{:>6}.{:03}s {line}", at.as_secs(), at.subsec_millis());
        if self.echo {
            eprintln!("{line}");
        }
        self.lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(line);
    }

    /// Publishes the simulated time, then appends a line.
    pub(crate) fn now(&self, line: impl fmt::Display) {
        self.clock.sync();
        self.log(line);
    }

    /// The run's clock.
    pub(crate) fn clock(&self) -> SimClock {
        self.clock.clone()
    }

    pub(crate) fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
