//! The circuit breaker: CLOSED / OPEN / HALF_OPEN, count- or time-based windows, failure and
//! slow-call rates, observable transitions.
//! (Over 600 lines: the lock-free state machine on one atomic word reads best whole.)
//!
//! # How it works
//! The whole state lives in one `AtomicU64`: the state kind, a generation that changes on
//! every transition, and a payload (the OPEN deadline in milliseconds, or the HALF_OPEN
//! admitted/succeeded trial counts). Admission in CLOSED is a single atomic load; recording a
//! success is a ring-slot swap plus a cursor increment (see the window module). Transitions are
//! compare-and-swap on the state word, so exactly one caller performs each transition, and a
//! call's outcome is only counted in the state (and generation) that admitted it: a slow call
//! admitted before the breaker opened cannot close it again.

mod builder;
mod layer;
mod window;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::{Counter, Gauge};
use tokio::sync::{broadcast, watch};

use self::builder::BreakerConfig;
pub use self::builder::{
    CircuitBreakerBuilder, HALF_OPEN_CALLS_MAX, SlidingWindow, WINDOW_SIZE_MAX,
};
pub use self::layer::{CircuitBreakerLayer, CircuitBreakerService, ResponseFuture};
use self::window::{CALL, Counts, FAILED, SLOW, Window};
use crate::classify::{Classify, ErrorsAreFailures, Outcome};
use crate::error::ResilienceError;

/// Capacity of the transition broadcast; a receiver that falls further behind sees `Lagged`.
const TRANSITION_EVENTS_MAX: usize = 64;

/// The state of a circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Calls pass and their outcomes are counted.
    Closed,
    /// Calls are rejected until the open duration has passed.
    Open,
    /// A fixed number of trial calls pass; the rest are rejected.
    HalfOpen,
    /// Held open by an operator: every call is rejected.
    ForcedOpen,
    /// Held closed by an operator: every call passes and nothing trips the breaker.
    ForcedClosed,
}

impl BreakerState {
    /// The state's name in logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
            Self::ForcedOpen => "forced_open",
            Self::ForcedClosed => "forced_closed",
        }
    }

    /// The value of the `trellis_breaker_state` gauge for this state.
    pub fn gauge_value(self) -> f64 {
        match self {
            Self::Closed => 0.0,
            Self::Open => 1.0,
            Self::HalfOpen => 2.0,
            Self::ForcedOpen => 3.0,
            Self::ForcedClosed => 4.0,
        }
    }

    fn from_kind(kind: u64) -> Self {
        match kind {
            CLOSED => Self::Closed,
            OPEN => Self::Open,
            HALF_OPEN => Self::HalfOpen,
            FORCED_OPEN => Self::ForcedOpen,
            _ => Self::ForcedClosed,
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One state change, as broadcast to [`CircuitBreaker::transitions`] subscribers.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// The breaker's name.
    pub breaker: Arc<str>,
    /// The state left.
    pub from: BreakerState,
    /// The state entered.
    pub to: BreakerState,
    /// When, on the breaker's clock.
    pub at: Duration,
    /// Why, in a few words (`failure rate 0.62 >= 0.50`, `trial call failed`, `forced`).
    pub reason: String,
}

/// The breaker's view of its current window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowSnapshot {
    /// Calls in the window.
    pub calls: u64,
    /// Failed calls in the window.
    pub failures: u64,
    /// Slow calls in the window.
    pub slow_calls: u64,
}

impl WindowSnapshot {
    /// failures / calls, or 0 for an empty window.
    pub fn failure_rate(&self) -> f64 {
        ratio(self.failures, self.calls)
    }

    /// slow calls / calls, or 0 for an empty window.
    pub fn slow_call_rate(&self) -> f64 {
        ratio(self.slow_calls, self.calls)
    }
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

// State word layout: kind (3 bits) | generation (21 bits) | payload (40 bits).
const CLOSED: u64 = 0;
const OPEN: u64 = 1;
const HALF_OPEN: u64 = 2;
const FORCED_OPEN: u64 = 3;
const FORCED_CLOSED: u64 = 4;
const KIND_MASK: u64 = 0b111;
const GENERATION_SHIFT: u32 = 3;
const GENERATION_MASK: u64 = (1 << 21) - 1;
const PAYLOAD_SHIFT: u32 = 24;
const TRIAL_MASK: u64 = (1 << 20) - 1;
const OPEN_UNTIL_MS_MAX: u64 = (1 << 40) - 1;

#[inline]
fn kind(word: u64) -> u64 {
    word & KIND_MASK
}

#[inline]
fn generation(word: u64) -> u64 {
    (word >> GENERATION_SHIFT) & GENERATION_MASK
}

#[inline]
fn payload(word: u64) -> u64 {
    word >> PAYLOAD_SHIFT
}

fn pack(kind: u64, generation: u64, payload: u64) -> u64 {
    kind | ((generation & GENERATION_MASK) << GENERATION_SHIFT) | (payload << PAYLOAD_SHIFT)
}

fn next(word: u64, kind: u64, payload: u64) -> u64 {
    pack(kind, generation(word) + 1, payload)
}

fn trials(word: u64) -> (u64, u64) {
    let p = payload(word);
    (p & TRIAL_MASK, (p >> 20) & TRIAL_MASK)
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A circuit breaker. Cheap to clone: clones share one state.
///
/// # Examples
/// ```
/// use std::time::Duration;
/// use trellis_resilience::{CircuitBreaker, ResilienceError, SlidingWindow};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let breaker = CircuitBreaker::builder("payments")
///     .sliding_window(SlidingWindow::Count(20))
///     .minimum_calls(10)
///     .failure_rate_threshold(0.5)
///     .open_duration(Duration::from_secs(10))
///     .build()
///     .expect("valid settings");
///
/// let answer = breaker.call(|| async { Ok::<_, std::io::Error>(42) }).await;
/// assert_eq!(answer.ok(), Some(42));
///
/// breaker.force_open();
/// let rejected = breaker.call(|| async { Ok::<_, std::io::Error>(42) }).await;
/// assert!(matches!(rejected, Err(ResilienceError::BreakerOpen { .. })));
/// # }
/// ```
#[derive(Clone)]
pub struct CircuitBreaker {
    inner: Arc<Inner>,
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("name", &self.inner.config.name)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

struct Inner {
    state: AtomicU64,
    window: Window,
    config: BreakerConfig,
    /// Reading the clock costs more than the rest of a CLOSED call: only do it when the
    /// window or slow-call detection needs it.
    timed: bool,
    minimum_calls: u64,
    watch: watch::Sender<BreakerState>,
    events: broadcast::Sender<Transition>,
    metrics: BreakerMetrics,
}

struct BreakerMetrics {
    success: Counter,
    failure: Counter,
    slow_success: Counter,
    slow_failure: Counter,
    ignored: Counter,
    rejected: Counter,
    state: Gauge,
}

impl BreakerMetrics {
    fn new(name: &Arc<str>) -> Self {
        crate::metric_help::describe();
        let calls = |outcome: &'static str| metrics::counter!("trellis_breaker_calls_total", "breaker" => name.to_string(), "outcome" => outcome);
        Self {
            success: calls("success"),
            failure: calls("failure"),
            slow_success: calls("slow_success"),
            slow_failure: calls("slow_failure"),
            ignored: calls("ignored"),
            rejected: metrics::counter!("trellis_breaker_rejections_total", "breaker" => name.to_string()),
            state: metrics::gauge!("trellis_breaker_state", "breaker" => name.to_string()),
        }
    }
}

/// An admitted call, not yet recorded. Kept to 16 bytes (and `Option<Ticket>` too, through
/// the enum's niche): it is moved through the call's future on the hot path.
#[derive(Debug, Clone, Copy)]
struct Ticket {
    started_nanos: u64,
    generation: u32,
    kind: Admitted,
}

/// The state that admitted a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admitted {
    Closed,
    HalfOpen,
    ForcedClosed,
}

impl Ticket {
    fn new(kind: Admitted, word: u64, started: Duration) -> Self {
        let generation = u32::try_from(generation(word)).expect("generations have 21 bits");
        Self {
            started_nanos: u64::try_from(started.as_nanos()).unwrap_or(u64::MAX),
            generation,
            kind,
        }
    }

    fn admitted_in(&self, word: u64) -> bool {
        generation(word) == u64::from(self.generation)
    }
}

impl CircuitBreaker {
    /// Starts building a breaker with the given name (used in errors, logs and metrics).
    pub fn builder(name: &str) -> CircuitBreakerBuilder {
        CircuitBreakerBuilder::new(name)
    }

    fn from_config(config: BreakerConfig) -> Self {
        let window = match config.window {
            SlidingWindow::Count(size) => Window::count(size),
            SlidingWindow::Time(duration) => Window::time(duration),
        };
        let minimum_calls = match config.window {
            SlidingWindow::Count(size) => config.minimum_calls.min(size),
            SlidingWindow::Time(_) => config.minimum_calls,
        };
        let metrics = BreakerMetrics::new(&config.name);
        metrics.state.set(BreakerState::Closed.gauge_value());
        let (events, _) = broadcast::channel(TRANSITION_EVENTS_MAX);
        Self {
            inner: Arc::new(Inner {
                state: AtomicU64::new(pack(CLOSED, 0, 0)),
                timed: window.needs_time() || config.slow_call_duration.is_some(),
                window,
                minimum_calls: u64::from(minimum_calls),
                watch: watch::Sender::new(BreakerState::Closed),
                events,
                metrics,
                config,
            }),
        }
    }

    /// The breaker's name.
    pub fn name(&self) -> &str {
        &self.inner.config.name
    }

    /// The current state. An OPEN breaker whose open duration has passed still reports OPEN
    /// until the next call moves it to HALF_OPEN.
    pub fn state(&self) -> BreakerState {
        BreakerState::from_kind(kind(self.inner.state.load(Ordering::Acquire)))
    }

    /// The current window's counts (meaningful in CLOSED; cleared on every close).
    pub fn window(&self) -> WindowSnapshot {
        let counts = self.inner.window.counts(self.inner.config.clock.now());
        WindowSnapshot {
            calls: counts.calls,
            failures: counts.failures,
            slow_calls: counts.slow,
        }
    }

    /// A receiver that always holds the current state.
    pub fn subscribe(&self) -> watch::Receiver<BreakerState> {
        self.inner.watch.subscribe()
    }

    /// A receiver of every transition from now on.
    pub fn transitions(&self) -> broadcast::Receiver<Transition> {
        self.inner.events.subscribe()
    }

    /// Runs `f` through the breaker, counting `Err` as a failure.
    ///
    /// # Errors
    /// [`ResilienceError::BreakerOpen`] without running `f` when the breaker rejects the call,
    /// otherwise `f`'s own error as [`ResilienceError::Inner`].
    pub async fn call<F, Fut, T, E>(&self, f: F) -> Result<T, ResilienceError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.call_classified(&ErrorsAreFailures, f).await
    }

    /// Runs `f` through the breaker, letting `classifier` decide what counts as a failure
    /// (for example [`ServerErrors`](crate::ServerErrors): a 4xx is not the upstream's fault).
    ///
    /// # Errors
    /// As [`call`](Self::call).
    pub async fn call_classified<C, F, Fut, T, E>(
        &self,
        classifier: &C,
        f: F,
    ) -> Result<T, ResilienceError<E>>
    where
        C: Classify<T, E> + ?Sized,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let permit = self
            .inner
            .admit()
            .map_err(|retry_after| self.rejection(retry_after))?;
        let mut guard = TicketGuard {
            inner: &self.inner,
            ticket: Some(permit),
        };
        let result = f().await;
        guard.finish(classifier.classify(result.as_ref()));
        result.map_err(ResilienceError::Inner)
    }

    /// Asks for permission to make one call by hand. Report the call's outcome on the returned
    /// permit; a permit dropped without a report counts as [`Outcome::Ignored`].
    ///
    /// # Errors
    /// [`ResilienceError::BreakerOpen`] when the breaker rejects the call.
    pub fn try_acquire(&self) -> Result<CallPermit<'_>, ResilienceError<std::convert::Infallible>> {
        match self.inner.admit() {
            Ok(ticket) => Ok(CallPermit {
                guard: TicketGuard {
                    inner: &self.inner,
                    ticket: Some(ticket),
                },
            }),
            Err(retry_after) => Err(self.rejection(retry_after)),
        }
    }

    fn rejection<E>(&self, retry_after: Duration) -> ResilienceError<E> {
        ResilienceError::BreakerOpen {
            name: self.inner.config.name.clone(),
            retry_after,
        }
    }

    /// Holds the breaker OPEN until [`reset`](Self::reset) or [`force_closed`](Self::force_closed).
    pub fn force_open(&self) {
        self.inner.force(FORCED_OPEN, "forced open by operator");
    }

    /// Holds the breaker CLOSED (calls pass, nothing trips it) until [`reset`](Self::reset).
    pub fn force_closed(&self) {
        self.inner.force(FORCED_CLOSED, "forced closed by operator");
    }

    /// Returns to CLOSED with an empty window.
    pub fn reset(&self) {
        self.inner.window.reset(self.inner.config.clock.now());
        self.inner.force(CLOSED, "reset by operator");
    }
}

/// Permission for one call, from [`CircuitBreaker::try_acquire`].
#[must_use = "report the outcome with `record`; a dropped permit counts as ignored"]
pub struct CallPermit<'a> {
    guard: TicketGuard<'a>,
}

impl CallPermit<'_> {
    /// Reports how the call went.
    pub fn record(mut self, outcome: Outcome) {
        self.guard.finish(outcome);
    }
}

impl std::fmt::Debug for CallPermit<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallPermit")
            .field("ticket", &self.guard.ticket)
            .finish()
    }
}

/// Records an admitted call's outcome exactly once, and as ignored when the call's future is
/// dropped before it finished (so a cancelled trial call gives its HALF_OPEN slot back).
struct TicketGuard<'a> {
    inner: &'a Inner,
    ticket: Option<Ticket>,
}

impl TicketGuard<'_> {
    #[inline]
    fn finish(&mut self, outcome: Outcome) {
        if let Some(ticket) = self.ticket.take() {
            self.inner.complete(ticket, outcome);
        }
    }
}

impl Drop for TicketGuard<'_> {
    fn drop(&mut self) {
        self.finish(Outcome::Ignored);
    }
}

impl Inner {
    #[inline]
    fn now_if_timed(&self) -> Duration {
        if self.timed {
            self.config.clock.now()
        } else {
            Duration::ZERO
        }
    }

    /// Admits a call or says how long until the next trial.
    #[inline]
    fn admit(&self) -> Result<Ticket, Duration> {
        let word = self.state.load(Ordering::Acquire);
        if kind(word) == CLOSED {
            return Ok(Ticket::new(Admitted::Closed, word, self.now_if_timed()));
        }
        self.admit_slow(word)
    }

    #[cold]
    fn admit_slow(&self, mut word: u64) -> Result<Ticket, Duration> {
        loop {
            let new = match kind(word) {
                CLOSED => return Ok(Ticket::new(Admitted::Closed, word, self.now_if_timed())),
                FORCED_CLOSED => {
                    return Ok(Ticket::new(
                        Admitted::ForcedClosed,
                        word,
                        self.now_if_timed(),
                    ));
                }
                FORCED_OPEN => {
                    self.metrics.rejected.increment(1);
                    return Err(self.config.open_duration);
                }
                OPEN => {
                    let now = duration_ms(self.config.clock.now());
                    let until = payload(word);
                    if now < until {
                        self.metrics.rejected.increment(1);
                        return Err(Duration::from_millis(until - now));
                    }
                    next(word, HALF_OPEN, 1)
                }
                _ => {
                    let (admitted, succeeded) = trials(word);
                    if admitted >= u64::from(self.config.half_open_calls) {
                        self.metrics.rejected.increment(1);
                        // The trials in flight decide; until then, suggest a short wait.
                        return Err(self.config.open_duration.min(Duration::from_secs(1)));
                    }
                    pack(
                        HALF_OPEN,
                        generation(word),
                        (admitted + 1) | (succeeded << 20),
                    )
                }
            };
            match self
                .state
                .compare_exchange(word, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    if kind(word) == OPEN {
                        self.announce(word, new, "open duration elapsed".to_owned());
                    }
                    return Ok(Ticket::new(Admitted::HalfOpen, new, self.now_if_timed()));
                }
                Err(actual) => word = actual,
            }
        }
    }

    /// Records a finished call admitted with `ticket`.
    #[inline]
    fn complete(&self, ticket: Ticket, outcome: Outcome) {
        // One clock reading serves both the slow-call check and the time window.
        let now = if outcome == Outcome::Ignored {
            Duration::ZERO
        } else {
            self.now_if_timed()
        };
        let slow = match self.config.slow_call_duration {
            Some(limit) if outcome != Outcome::Ignored => {
                now.saturating_sub(Duration::from_nanos(ticket.started_nanos)) >= limit
            }
            _ => false,
        };
        match (outcome, slow) {
            (Outcome::Success, false) => self.metrics.success.increment(1),
            (Outcome::Success, true) => self.metrics.slow_success.increment(1),
            (Outcome::Failure, false) => self.metrics.failure.increment(1),
            (Outcome::Failure, true) => self.metrics.slow_failure.increment(1),
            (Outcome::Ignored, _) => self.metrics.ignored.increment(1),
        }
        match ticket.kind {
            Admitted::Closed if outcome != Outcome::Ignored => {
                let mut bits = CALL;
                if outcome == Outcome::Failure {
                    bits |= FAILED;
                }
                if slow {
                    bits |= SLOW;
                }
                self.record_closed(ticket, bits, now);
            }
            Admitted::HalfOpen => self.record_trial(ticket, outcome, slow),
            _ => {}
        }
    }

    #[inline]
    fn record_closed(&self, ticket: Ticket, bits: u8, now: Duration) {
        let word = self.state.load(Ordering::Acquire);
        if kind(word) != CLOSED || !ticket.admitted_in(word) {
            return; // admitted in an earlier period: says nothing about this one
        }
        self.window.record(bits, now);
        if bits & (FAILED | SLOW) != 0 {
            self.evaluate(word, now);
        }
    }

    /// Opens the breaker when a rate crosses its threshold. Only a failure or slow call can
    /// raise a rate, so only those call this.
    #[cold]
    fn evaluate(&self, word: u64, now: Duration) {
        let Counts {
            calls,
            failures,
            slow,
        } = self.window.counts(now);
        if calls < self.minimum_calls {
            return;
        }
        let failure_rate = ratio(failures, calls);
        let slow_rate = ratio(slow, calls);
        let reason = if failure_rate >= self.config.failure_rate_threshold {
            format!(
                "failure rate {failure_rate:.2} >= {:.2} over {calls} calls",
                self.config.failure_rate_threshold
            )
        } else if self.config.slow_call_duration.is_some()
            && slow_rate >= self.config.slow_call_rate_threshold
        {
            format!(
                "slow-call rate {slow_rate:.2} >= {:.2} over {calls} calls",
                self.config.slow_call_rate_threshold
            )
        } else {
            return;
        };
        self.open_from(word, reason);
    }

    fn open_from(&self, word: u64, reason: String) {
        let until =
            duration_ms(self.config.clock.now() + self.config.open_duration).min(OPEN_UNTIL_MS_MAX);
        let new = next(word, OPEN, until);
        if self
            .state
            .compare_exchange(word, new, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.announce(word, new, reason);
        }
    }

    #[cold]
    fn record_trial(&self, ticket: Ticket, outcome: Outcome, slow: bool) {
        let mut word = self.state.load(Ordering::Acquire);
        loop {
            if kind(word) != HALF_OPEN || !ticket.admitted_in(word) {
                return;
            }
            let (admitted, succeeded) = trials(word);
            match (outcome, slow) {
                (Outcome::Ignored, _) => {
                    let released = pack(
                        HALF_OPEN,
                        generation(word),
                        admitted.saturating_sub(1) | (succeeded << 20),
                    );
                    match self.state.compare_exchange(
                        word,
                        released,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    ) {
                        Ok(_) => return,
                        Err(actual) => word = actual,
                    }
                }
                (Outcome::Failure, _) | (Outcome::Success, true) => {
                    let reason = if slow {
                        "trial call was slow"
                    } else {
                        "trial call failed"
                    };
                    self.open_from(word, reason.to_owned());
                    let now = self.state.load(Ordering::Acquire);
                    if generation(now) == generation(word) && kind(now) == HALF_OPEN {
                        word = now; // lost a race with another trial's report: try again
                        continue;
                    }
                    return;
                }
                (Outcome::Success, false) => {
                    let succeeded = succeeded + 1;
                    let new = if succeeded >= u64::from(self.config.half_open_calls) {
                        self.window.reset(self.config.clock.now());
                        next(word, CLOSED, 0)
                    } else {
                        pack(HALF_OPEN, generation(word), admitted | (succeeded << 20))
                    };
                    match self.state.compare_exchange(
                        word,
                        new,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    ) {
                        Ok(_) => {
                            if kind(new) == CLOSED {
                                self.announce(
                                    word,
                                    new,
                                    format!("{succeeded} trial calls succeeded"),
                                );
                            }
                            return;
                        }
                        Err(actual) => word = actual,
                    }
                }
            }
        }
    }

    fn force(&self, target: u64, reason: &str) {
        let mut word = self.state.load(Ordering::Acquire);
        loop {
            let new = next(word, target, 0);
            match self
                .state
                .compare_exchange(word, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    self.announce(word, new, reason.to_owned());
                    return;
                }
                Err(actual) => word = actual,
            }
        }
    }

    /// Publishes a transition that this caller won.
    fn announce(&self, old: u64, new: u64, reason: String) {
        let from = BreakerState::from_kind(kind(old));
        let to = BreakerState::from_kind(kind(new));
        let name = &self.config.name;
        match to {
            BreakerState::Open | BreakerState::ForcedOpen => {
                tracing::warn!(breaker = %name, %from, %to, %reason, "circuit breaker opened");
            }
            _ => {
                tracing::info!(breaker = %name, %from, %to, %reason, "circuit breaker state changed")
            }
        }
        self.metrics.state.set(to.gauge_value());
        metrics::counter!(
            "trellis_breaker_transitions_total",
            "breaker" => name.to_string(), "from" => from.as_str(), "to" => to.as_str()
        )
        .increment(1);
        self.watch.send_replace(to);
        // No subscriber is fine: the transition is still logged and counted.
        let _ = self.events.send(Transition {
            breaker: name.clone(),
            from,
            to,
            at: self.config.clock.now(),
            reason,
        });
    }
}
