//! Shared fixtures: a participant ledger that dedupes by idempotency key, a three-step trip
//! saga with configurable failures, and a store wrapper that crashes at a chosen write.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use trellis_resilience::Backoff;
use trellis_saga::{
    Lease, SagaDefinition, SagaError, SagaFilter, SagaId, SagaInstance, SagaRecord, SagaStore,
    SagaSummary, Step, StepContext, StepError, StepRetry,
};

/// The lease owner of the engines in crash tests: a restarted process keeps its name, so it
/// takes its sagas back at once.
pub(crate) const NODE: &str = "node-1";

/// The saga context: which steps ran, as the saga itself sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Trip {
    pub(crate) customer: String,
    pub(crate) done: Vec<String>,
}

/// What the participants saw. `applied` and `undone` count effects per idempotency key (a
/// participant applies a key once, as real ones must); `calls` counts every invocation.
#[derive(Debug, Default)]
pub(crate) struct LedgerState {
    pub(crate) applied: BTreeMap<String, u32>,
    pub(crate) undone: BTreeMap<String, u32>,
    pub(crate) calls: u32,
    pub(crate) compensation_order: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Ledger(Arc<Mutex<LedgerState>>);

impl Ledger {
    pub(crate) fn apply(&self, key: &str) {
        let mut state = self.0.lock().expect("ledger lock");
        state.calls += 1;
        state.applied.entry(key.to_owned()).or_insert(1);
    }

    pub(crate) fn undo(&self, key: &str, step: &str) {
        let mut state = self.0.lock().expect("ledger lock");
        state.calls += 1;
        if !state.undone.contains_key(key) {
            state.undone.insert(key.to_owned(), 1);
            state.compensation_order.push(step.to_owned());
        }
    }

    pub(crate) fn with<T>(&self, f: impl FnOnce(&LedgerState) -> T) -> T {
        f(&self.0.lock().expect("ledger lock"))
    }
}

/// How a step's `execute` behaves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Behaviour {
    Succeeds,
    /// Fails permanently without effect.
    FailsPermanently,
    /// Fails (retryably, without effect) on the first attempt, then succeeds.
    FailsOnce,
    /// Always fails retryably without effect.
    AlwaysFailsRetryably,
}

/// A fast backoff so retries do not slow the tests down.
pub(crate) fn quick_retry(attempts_max: u32) -> StepRetry {
    StepRetry::new(
        attempts_max,
        Backoff {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(1),
            multiplier: 1.0,
            full_jitter: false,
        },
    )
}

/// One participant step: applies its effect keyed by the idempotency key; compensates (when
/// `compensable`) by undoing it, or keeps failing when `compensation_fails`.
pub(crate) fn step(
    ledger: &Ledger,
    name: &'static str,
    behaviour: Behaviour,
    compensable: bool,
    compensation_fails: bool,
) -> Step<Trip> {
    let forward = ledger.clone();
    let step = Step::new(name, move |trip: &mut Trip, context: StepContext| {
        let ledger = forward.clone();
        Box::pin(async move {
            let failure = match behaviour {
                Behaviour::Succeeds => None,
                Behaviour::FailsPermanently => {
                    Some(StepError::permanent(format!("{name} refused")))
                }
                Behaviour::FailsOnce if context.attempt() == 1 => {
                    Some(StepError::retryable(format!("{name} flaked")))
                }
                Behaviour::FailsOnce => None,
                Behaviour::AlwaysFailsRetryably => {
                    Some(StepError::retryable(format!("{name} unavailable")))
                }
            };
            if let Some(error) = failure {
                return Err(error);
            }
            ledger.apply(&context.idempotency_key());
            trip.done.push(name.to_owned());
            Ok(())
        })
    })
    .retry(quick_retry(3));
    if !compensable {
        return step;
    }
    let backward = ledger.clone();
    step.compensate(move |trip: &mut Trip, context: StepContext| {
        let ledger = backward.clone();
        Box::pin(async move {
            if compensation_fails {
                return Err(StepError::retryable(format!("{name} undo unavailable")));
            }
            ledger.undo(&context.idempotency_key(), name);
            trip.done.retain(|done| done != name);
            Ok(())
        })
    })
}

/// `book-trip` v1: flight, hotel, car, all compensable; `car` behaves as told.
pub(crate) fn trip(ledger: &Ledger, car: Behaviour) -> SagaDefinition<Trip> {
    SagaDefinition::builder("book-trip", 1)
        .step(step(ledger, "flight", Behaviour::Succeeds, true, false))
        .step(step(ledger, "hotel", Behaviour::Succeeds, true, false))
        .step(step(ledger, "car", car, true, false))
        .build()
        .expect("valid definition")
}

/// `book-trip` v1 with a pivot: flight (compensable), pay (pivot), then `ship` behaving as told.
pub(crate) fn trip_with_pivot(
    ledger: &Ledger,
    pay: Behaviour,
    ship: Behaviour,
) -> SagaDefinition<Trip> {
    SagaDefinition::builder("book-trip", 1)
        .step(step(ledger, "flight", Behaviour::Succeeds, true, false))
        .pivot_step(step(ledger, "pay", pay, false, false))
        .step(step(ledger, "ship", ship, false, false))
        .build()
        .expect("valid definition")
}

/// Where the injected crash happens relative to the chosen write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Crash {
    /// The write is lost (the process died before the log saw it).
    BeforeWrite,
    /// The write is durable, then the process dies before acting on it.
    AfterWrite,
    /// No crash: the database fails the write for a transient reason (no pooled connection
    /// in time) and writes nothing.
    Transient,
}

/// A store that crashes at its `crash_at`-th write (create or append, 1-based); 0 never
/// crashes. Counts every write it passes on.
#[derive(Debug, Clone)]
pub(crate) struct CrashingStore<S> {
    inner: S,
    crash_at: u64,
    mode: Crash,
    writes: Arc<AtomicU64>,
    created: Arc<Mutex<Option<SagaId>>>,
}

impl<S: SagaStore> CrashingStore<S> {
    pub(crate) fn new(inner: S, crash_at: u64, mode: Crash) -> Self {
        Self {
            inner,
            crash_at,
            mode,
            writes: Arc::default(),
            created: Arc::default(),
        }
    }

    /// The id of the saga this store was last asked to create.
    pub(crate) fn created(&self) -> Option<SagaId> {
        *self.created.lock().expect("created lock")
    }

    pub(crate) fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    async fn write(
        &self,
        write: impl Future<Output = Result<(), SagaError>>,
    ) -> Result<(), SagaError> {
        let number = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
        if number != self.crash_at {
            return write.await;
        }
        if self.mode == Crash::Transient {
            return Err(SagaError::Storage(sqlx::Error::PoolTimedOut));
        }
        if self.mode == Crash::AfterWrite {
            write.await?;
        }
        Err(SagaError::Unavailable(format!(
            "injected crash at write {number}"
        )))
    }
}

impl<S: SagaStore> SagaStore for CrashingStore<S> {
    async fn create(
        &self,
        id: SagaId,
        definition: &str,
        version: u32,
        first: &SagaRecord,
        lease: &Lease,
    ) -> Result<(), SagaError> {
        *self.created.lock().expect("created lock") = Some(id);
        self.write(self.inner.create(id, definition, version, first, lease))
            .await
    }

    async fn append(
        &self,
        id: SagaId,
        record: &SagaRecord,
        lease: &Lease,
    ) -> Result<(), SagaError> {
        self.write(self.inner.append(id, record, lease)).await
    }

    async fn load(&self, id: SagaId) -> Result<Option<SagaInstance>, SagaError> {
        self.inner.load(id).await
    }

    async fn list_active(&self, limit: usize) -> Result<Vec<SagaId>, SagaError> {
        self.inner.list_active(limit).await
    }

    async fn claim_next(
        &self,
        lease: &Lease,
        after: Option<SagaId>,
    ) -> Result<Option<SagaId>, SagaError> {
        self.inner.claim_next(lease, after).await
    }

    async fn claim(&self, id: SagaId, lease: &Lease) -> Result<(), SagaError> {
        self.inner.claim(id, lease).await
    }

    async fn renew(&self, id: SagaId, lease: &Lease) -> Result<bool, SagaError> {
        self.inner.renew(id, lease).await
    }

    async fn release(&self, id: SagaId, owner: &str) -> Result<(), SagaError> {
        self.inner.release(id, owner).await
    }

    async fn list(&self, filter: &SagaFilter) -> Result<Vec<SagaSummary>, SagaError> {
        self.inner.list(filter).await
    }

    async fn purge(&self, before: DateTime<Utc>) -> Result<u64, SagaError> {
        self.inner.purge(before).await
    }
}

/// What one run left behind, with keys reduced to step names.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Outcome {
    pub(crate) status: Option<trellis_saga::SagaStatus>,
    pub(crate) applied: BTreeMap<String, u32>,
    pub(crate) undone: BTreeMap<String, u32>,
    pub(crate) compensation_order: Vec<String>,
}

fn by_step(keys: &BTreeMap<String, u32>) -> BTreeMap<String, u32> {
    keys.iter()
        .map(|(key, count)| {
            let step = key.rsplit_once(':').map_or(key.as_str(), |(_, step)| step);
            (step.to_owned(), *count)
        })
        .collect()
}

impl Outcome {
    pub(crate) fn read(ledger: &Ledger, status: Option<trellis_saga::SagaStatus>) -> Self {
        ledger.with(|state| Self {
            status,
            applied: by_step(&state.applied),
            undone: by_step(&state.undone),
            compensation_order: state.compensation_order.clone(),
        })
    }
}

/// Crashes a saga of `definition` at every write, both before and after the write, and
/// checks that a fresh engine's `recover()` ends it as a clean run does, with every step
/// effect and every compensation applied once per idempotency key.
pub(crate) async fn crash_at_every_boundary<S, F>(
    store: S,
    definition: F,
    status: trellis_saga::SagaStatus,
    applied: &[&str],
    compensated: &[&str],
) where
    S: SagaStore + Clone,
    F: Fn(&Ledger) -> SagaDefinition<Trip>,
{
    use trellis_saga::SagaEngine;

    let trip = Trip {
        customer: "ada".to_owned(),
        done: Vec::new(),
    };
    let ledger = Ledger::default();
    let counting = CrashingStore::new(store.clone(), 0, Crash::AfterWrite);
    let engine = SagaEngine::new(counting.clone()).register(definition(&ledger));
    let id = engine.start("book-trip", &trip).await.expect("clean run");
    let expected = Outcome::read(&ledger, Some(engine.status(id).await.expect("status")));
    assert_eq!(
        expected,
        Outcome {
            status: Some(status),
            applied: applied.iter().map(|step| ((*step).to_owned(), 1)).collect(),
            undone: compensated
                .iter()
                .map(|step| ((*step).to_owned(), 1))
                .collect(),
            compensation_order: compensated.iter().map(|step| (*step).to_owned()).collect(),
        },
        "the clean run"
    );
    let clean_calls = ledger.with(|state| state.calls);
    let writes = counting.writes();
    assert!(writes >= 3, "a saga writes at least three transitions");

    for mode in [Crash::BeforeWrite, Crash::AfterWrite] {
        for crash_at in 1..=writes {
            let ledger = Ledger::default();
            let crashing = CrashingStore::new(store.clone(), crash_at, mode);
            let engine = SagaEngine::new(crashing.clone())
                .with_owner(NODE)
                .register(definition(&ledger));
            let result = engine.start("book-trip", &trip).await;
            let Err(error) = result else {
                panic!("{mode:?} at write {crash_at} of {writes}: the run did not crash");
            };
            assert!(
                error.is_retryable(),
                "an injected crash is transient: {error}"
            );
            let id = crashing.created().expect("the run asked to create a saga");
            let was_active = store
                .load(id)
                .await
                .expect("load")
                .map(|instance| instance.status.is_active());
            drop(engine);

            // A new process: fresh engine, same log, same participants.
            let engine = SagaEngine::new(store.clone())
                .with_owner(NODE)
                .register(definition(&ledger));
            let report = engine.recover().await.expect("recover");
            assert!(
                report.refused.is_empty(),
                "nothing refused: {:?}",
                report.refused
            );
            let context = format!("{mode:?} at write {crash_at} of {writes}");
            let Some(was_active) = was_active else {
                assert_eq!(
                    (mode, crash_at),
                    (Crash::BeforeWrite, 1),
                    "{context}: only a lost create leaves no saga"
                );
                assert_eq!(ledger.with(|state| state.calls), 0, "{context}");
                continue;
            };
            assert_eq!(
                report.resumed.iter().any(|(resumed, _)| *resumed == id),
                was_active,
                "{context}: recover resumes exactly the active saga"
            );
            let status = Some(engine.status(id).await.expect("status"));
            let outcome = Outcome::read(&ledger, status);
            assert!(
                outcome
                    .status
                    .is_some_and(trellis_saga::SagaStatus::is_terminal),
                "{context}: terminal"
            );
            assert_eq!(outcome, expected, "{context}");
            let calls = ledger.with(|state| state.calls);
            assert!(
                calls <= clean_calls + 1,
                "{context}: at most the interrupted call runs again ({calls} vs {clean_calls})"
            );
        }
    }
}

/// The attempts a crash loop is allowed before the step fails for good.
const CRASH_LOOP_ATTEMPTS_MAX: u32 = 3;
/// How many times the crash loop restarts the engine at most (well past the budget, so a
/// step that never exhausts it shows as a loop that did not end).
const CRASH_LOOP_RESTARTS_MAX: u32 = 10;

/// `book-trip` v1: flight (compensable), then `hotel`, whose every attempt reports its number
/// on `entered` and never ends: whoever runs it dies during it.
fn crash_loop(
    ledger: &Ledger,
    entered: tokio::sync::mpsc::UnboundedSender<u32>,
) -> SagaDefinition<Trip> {
    let hotel = Step::new("hotel", move |_: &mut Trip, context: StepContext| {
        let entered = entered.clone();
        Box::pin(async move {
            let _ = entered.send(context.attempt());
            std::future::pending::<()>().await;
            Ok(())
        })
    })
    .timeout(STEP_TIMEOUT_NEVER)
    .retry(quick_retry(CRASH_LOOP_ATTEMPTS_MAX));
    SagaDefinition::builder("book-trip", 1)
        .step(step(ledger, "flight", Behaviour::Succeeds, true, false))
        .step(hotel)
        .build()
        .expect("valid definition")
}

/// A step timeout no crash-loop attempt reaches: the engine dies first.
pub(crate) const STEP_TIMEOUT_NEVER: Duration = Duration::from_secs(3600);

/// Runs a saga whose second step kills its engine on every attempt (the engine's task is
/// aborted as soon as the attempt starts), restarting a fresh engine on `store` each time,
/// and checks the interrupted attempts count against the step's budget: attempts 1, 2 and 3
/// run once each, then the saga compensates `flight` and ends `Failed`.
pub(crate) async fn crash_every_attempt<S: SagaStore + Clone>(store: S) {
    use trellis_saga::{SagaEngine, SagaStatus};

    let ledger = Ledger::default();
    let (entered, mut attempts) = tokio::sync::mpsc::unbounded_channel();
    let engine = || {
        SagaEngine::new(store.clone())
            .with_owner(NODE)
            .register(crash_loop(&ledger, entered.clone()))
    };
    let trip = Trip {
        customer: "ada".to_owned(),
        done: Vec::new(),
    };
    let first = engine();
    let mut run = tokio::spawn(async move { first.start("book-trip", &trip).await.map(|_| ()) });
    let mut seen = Vec::new();
    let mut finished = false;
    for _ in 0..=CRASH_LOOP_RESTARTS_MAX {
        tokio::select! {
            attempt = attempts.recv() => {
                seen.push(attempt.expect("the sender lives in this function"));
                run.abort(); // the crash: the engine and its step vanish mid-attempt
                let _ = (&mut run).await;
            }
            outcome = &mut run => {
                outcome.expect("the engine's task did not panic").expect("recovered");
                finished = true;
                break;
            }
        }
        let restarted = engine();
        run = tokio::spawn(async move { restarted.recover().await.map(|_| ()) });
    }
    assert!(
        finished,
        "the saga still runs after {CRASH_LOOP_RESTARTS_MAX} crashes; attempts seen: {seen:?}"
    );
    assert_eq!(seen, (1..=CRASH_LOOP_ATTEMPTS_MAX).collect::<Vec<_>>());
    let sagas = store.list(&SagaFilter::new()).await.expect("list");
    assert_eq!(sagas.len(), 1);
    assert_eq!(sagas[0].status, SagaStatus::Failed);
    let outcome = Outcome::read(&ledger, Some(SagaStatus::Failed));
    assert_eq!(outcome.compensation_order, ["flight"]);
    let timeline = trellis_saga::Inspector::new(store)
        .show(sagas[0].id)
        .await
        .expect("show");
    let hotel: Vec<_> = timeline.steps[1]
        .attempts
        .iter()
        .map(|attempt| (attempt.attempt, attempt.outcome))
        .collect();
    let interrupted = trellis_saga::AttemptOutcome::Interrupted;
    assert_eq!(
        hotel,
        [(1, interrupted), (2, interrupted), (3, interrupted)]
    );
}
