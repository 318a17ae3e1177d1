//! Behaviour of the engine on the in-memory store.

use std::time::Duration;

use trellis_saga::{
    InMemorySagaStore, SagaDefinition, SagaEngine, SagaError, SagaStatus, SagaStore as _, Step,
    StepContext, StepError, Transition,
};

use crate::support::{Behaviour, Ledger, Trip, quick_retry, step, trip, trip_with_pivot};

fn ada() -> Trip {
    Trip {
        customer: "ada".to_owned(),
        done: Vec::new(),
    }
}

fn transitions(instance: &trellis_saga::SagaInstance) -> Vec<Transition> {
    instance
        .records
        .iter()
        .map(|record| record.transition.clone())
        .collect()
}

fn executing(step: &str, attempt: u32) -> Transition {
    Transition::StepExecuting {
        step: step.to_owned(),
        attempt,
    }
}

fn succeeded(step: &str) -> Transition {
    Transition::StepSucceeded {
        step: step.to_owned(),
    }
}

#[tokio::test(start_paused = true)]
async fn every_step_runs_in_order_and_the_saga_completes() {
    // Goal: the happy path writes each transition in order and the context carries every step.
    let ledger = Ledger::default();
    let engine =
        SagaEngine::new(InMemorySagaStore::new()).register(trip(&ledger, Behaviour::Succeeds));
    let id = engine.start("book-trip", &ada()).await.expect("start");
    let instance = engine.load(id).await.expect("load");
    assert_eq!(instance.status, SagaStatus::Completed);
    assert_eq!(
        transitions(&instance),
        vec![
            Transition::Started {
                steps: vec!["flight".to_owned(), "hotel".to_owned(), "car".to_owned()],
                pivot: None
            },
            executing("flight", 1),
            succeeded("flight"),
            executing("hotel", 1),
            succeeded("hotel"),
            executing("car", 1),
            succeeded("car"),
            Transition::Completed,
        ]
    );
    let context: Trip = instance.context().expect("context");
    assert_eq!(context.done, ["flight", "hotel", "car"]);
    // Each snapshot is the context as it stood when the transition was written.
    assert_eq!(
        instance.records[2].context["done"],
        serde_json::json!(["flight"])
    );
    ledger.with(|state| {
        assert_eq!(state.applied.len(), 3);
        assert!(state.applied.contains_key(&format!("{id}:hotel")));
        assert!(state.undone.is_empty());
    });
}

#[tokio::test(start_paused = true)]
async fn a_failing_third_step_compensates_the_first_two_in_reverse_order_once() {
    // Goal: the seed's test: step 3 fails permanently, steps 2 then 1 compensate exactly once,
    // and the saga fails naming step 3.
    let ledger = Ledger::default();
    let engine = SagaEngine::new(InMemorySagaStore::new())
        .register(trip(&ledger, Behaviour::FailsPermanently));
    let id = engine.start("book-trip", &ada()).await.expect("start");
    let instance = engine.load(id).await.expect("load");
    assert_eq!(instance.status, SagaStatus::Failed);
    assert_eq!(
        instance.last().transition,
        Transition::Failed {
            step: "car".to_owned(),
            error: "car refused".to_owned()
        }
    );
    ledger.with(|state| {
        assert_eq!(state.compensation_order, ["hotel", "flight"]);
        assert!(state.undone.values().all(|count| *count == 1));
        assert_eq!(state.calls, 4, "two effects, two undos, nothing more");
    });
    let context: Trip = instance.context().expect("context");
    assert!(
        context.done.is_empty(),
        "compensations see and update the context"
    );
}

#[tokio::test(start_paused = true)]
async fn a_retryable_failure_is_retried_within_the_budget() {
    // Goal: a step failing once retryably succeeds on attempt 2, with both attempts logged.
    let ledger = Ledger::default();
    let engine =
        SagaEngine::new(InMemorySagaStore::new()).register(trip(&ledger, Behaviour::FailsOnce));
    let id = engine.start("book-trip", &ada()).await.expect("start");
    let instance = engine.load(id).await.expect("load");
    assert_eq!(instance.status, SagaStatus::Completed);
    let log = transitions(&instance);
    assert!(log.contains(&Transition::StepFailed {
        step: "car".to_owned(),
        attempt: 1,
        retryable: true,
        error: "car flaked".to_owned(),
    }));
    assert!(log.contains(&executing("car", 2)));
}

#[tokio::test(start_paused = true)]
async fn exhausted_retries_before_the_pivot_compensate() {
    // Goal: a step that keeps failing retryably uses all three attempts, then compensates.
    let ledger = Ledger::default();
    let engine = SagaEngine::new(InMemorySagaStore::new())
        .register(trip(&ledger, Behaviour::AlwaysFailsRetryably));
    let id = engine.start("book-trip", &ada()).await.expect("start");
    let instance = engine.load(id).await.expect("load");
    assert_eq!(instance.status, SagaStatus::Failed);
    let failures = transitions(&instance)
        .iter()
        .filter(|t| matches!(t, Transition::StepFailed { .. }))
        .count();
    assert_eq!(failures, 3);
    ledger.with(|state| assert_eq!(state.compensation_order, ["hotel", "flight"]));
}

#[tokio::test(start_paused = true)]
async fn a_failure_after_the_pivot_never_compensates_and_ends_stuck() {
    // Goal: past the pivot the saga only goes forward: a step failing after it is retried
    // until its budget, then the saga is Stuck with no compensation run.
    let ledger = Ledger::default();
    let engine = SagaEngine::new(InMemorySagaStore::new()).register(trip_with_pivot(
        &ledger,
        Behaviour::Succeeds,
        Behaviour::AlwaysFailsRetryably,
    ));
    let id = engine.start("book-trip", &ada()).await.expect("start");
    let instance = engine.load(id).await.expect("load");
    assert_eq!(instance.status, SagaStatus::Stuck);
    assert_eq!(
        instance.last().transition,
        Transition::Stuck {
            step: "ship".to_owned(),
            compensating: false,
            error: "ship unavailable".to_owned()
        }
    );
    ledger.with(|state| assert!(state.undone.is_empty(), "nothing compensated"));
    let report = engine.recover().await.expect("recover");
    assert!(
        report.resumed.is_empty(),
        "a stuck saga waits for an operator"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failing_pivot_compensates_the_steps_before_it() {
    // Goal: the pivot itself failing is still before the point of no return.
    let ledger = Ledger::default();
    let engine = SagaEngine::new(InMemorySagaStore::new()).register(trip_with_pivot(
        &ledger,
        Behaviour::FailsPermanently,
        Behaviour::Succeeds,
    ));
    let id = engine.start("book-trip", &ada()).await.expect("start");
    assert_eq!(engine.status(id).await.expect("status"), SagaStatus::Failed);
    ledger.with(|state| assert_eq!(state.compensation_order, ["flight"]));
}

#[tokio::test(start_paused = true)]
async fn a_compensation_that_keeps_failing_ends_stuck_after_its_budget() {
    // Goal: a compensation failing on every attempt is tried attempts_max times, then the saga
    // is Stuck naming that compensation; the steps below it are not compensated.
    let ledger = Ledger::default();
    let definition = SagaDefinition::builder("book-trip", 1)
        .step(step(&ledger, "flight", Behaviour::Succeeds, true, false))
        .step(step(&ledger, "hotel", Behaviour::Succeeds, true, true))
        .step(step(
            &ledger,
            "car",
            Behaviour::FailsPermanently,
            true,
            false,
        ))
        .build()
        .expect("valid");
    let engine = SagaEngine::new(InMemorySagaStore::new()).register(definition);
    let id = engine.start("book-trip", &ada()).await.expect("start");
    let instance = engine.load(id).await.expect("load");
    assert_eq!(instance.status, SagaStatus::Stuck);
    let failed_undos = transitions(&instance)
        .iter()
        .filter(|t| matches!(t, Transition::CompensationFailed { step, .. } if step == "hotel"))
        .count();
    assert_eq!(failed_undos, 3);
    assert!(matches!(
        &instance.last().transition,
        Transition::Stuck { step, compensating: true, .. } if step == "hotel"
    ));
    ledger.with(|state| assert!(state.undone.is_empty(), "flight is left for the operator"));
}

#[tokio::test(start_paused = true)]
async fn a_step_past_its_timeout_fails_retryably_and_the_saga_compensates() {
    // Goal: under paused time, an attempt running past its timeout is cut off and counted as
    // a retryable failure; after the budget the earlier step is compensated.
    let ledger = Ledger::default();
    let slow = Step::new("slow", |_trip: &mut Trip, _step: StepContext| {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(())
        })
    })
    .timeout(Duration::from_secs(1))
    .retry(quick_retry(2));
    let definition = SagaDefinition::builder("book-trip", 1)
        .step(step(&ledger, "flight", Behaviour::Succeeds, true, false))
        .step(slow)
        .build()
        .expect("valid");
    let engine = SagaEngine::new(InMemorySagaStore::new()).register(definition);
    let started = tokio::time::Instant::now();
    let id = engine.start("book-trip", &ada()).await.expect("start");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "no attempt ran to 60 s"
    );
    let instance = engine.load(id).await.expect("load");
    assert_eq!(instance.status, SagaStatus::Failed);
    assert!(transitions(&instance).contains(&Transition::StepFailed {
        step: "slow".to_owned(),
        attempt: 2,
        retryable: true,
        error: "timed out after 1000 ms".to_owned(),
    }));
    ledger.with(|state| assert_eq!(state.compensation_order, ["flight"]));
}

/// A `charge` step that acts on every attempt, then never answers (its answer lost): each
/// attempt times out, so the step fails for good with its effect in place. Compensable; with
/// `own_failure` its compensation also covers its own failure.
fn charge_that_loses_its_answers(ledger: &Ledger, own_failure: bool) -> SagaDefinition<Trip> {
    let forward = ledger.clone();
    let backward = ledger.clone();
    let charge = Step::new("charge", move |_trip: &mut Trip, step: StepContext| {
        let ledger = forward.clone();
        Box::pin(async move {
            ledger.apply(&step.idempotency_key());
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(())
        })
    })
    .compensate(move |_trip: &mut Trip, step: StepContext| {
        let ledger = backward.clone();
        Box::pin(async move {
            ledger.undo(&step.idempotency_key(), "charge");
            Ok(())
        })
    })
    .timeout(Duration::from_secs(1))
    .retry(quick_retry(2));
    let charge = if own_failure {
        charge.compensate_on_failure()
    } else {
        charge
    };
    SagaDefinition::builder("book-trip", 1)
        .step(step(ledger, "flight", Behaviour::Succeeds, true, false))
        .step(charge)
        .build()
        .expect("valid")
}

#[tokio::test(start_paused = true)]
async fn a_step_that_compensates_its_own_failure_undoes_an_effect_whose_answer_was_lost() {
    // Goal: a step whose attempts acted but timed out fails for good; with
    // `compensate_on_failure` its own compensation runs first, then the earlier step's, each
    // once, and the saga fails naming it. Without the flag (the default) the same run leaves
    // the charge in place: the failure the flag exists for.
    let ledger = Ledger::default();
    let engine = SagaEngine::new(InMemorySagaStore::new())
        .register(charge_that_loses_its_answers(&ledger, true));
    let id = engine.start("book-trip", &ada()).await.expect("start");
    let instance = engine.load(id).await.expect("load");
    assert_eq!(instance.status, SagaStatus::Failed);
    let log = transitions(&instance);
    let own = log
        .iter()
        .position(|t| matches!(t, Transition::StepCompensated { step } if step == "charge"))
        .expect("the failed step compensated");
    let earlier = log
        .iter()
        .position(|t| matches!(t, Transition::StepCompensated { step } if step == "flight"))
        .expect("the earlier step compensated");
    assert!(own < earlier, "the failed step is undone first: {log:?}");
    assert!(matches!(
        &instance.last().transition,
        Transition::Failed { step, .. } if step == "charge"
    ));
    ledger.with(|state| {
        assert_eq!(state.compensation_order, ["charge", "flight"]);
        assert!(state.undone.contains_key(&format!("{id}:charge")));
    });

    let ledger = Ledger::default();
    let engine = SagaEngine::new(InMemorySagaStore::new())
        .register(charge_that_loses_its_answers(&ledger, false));
    let id = engine.start("book-trip", &ada()).await.expect("start");
    assert_eq!(
        engine.load(id).await.expect("load").status,
        SagaStatus::Failed
    );
    ledger.with(|state| {
        assert_eq!(state.compensation_order, ["flight"]);
        assert!(state.applied.contains_key(&format!("{id}:charge")));
        assert!(!state.undone.contains_key(&format!("{id}:charge")), "kept");
    });
}

#[tokio::test(start_paused = true)]
async fn a_pivot_that_compensates_its_own_failure_undoes_it_only_when_it_fails() {
    // Goal: the pivot may carry a compensation of its own failure: it runs when the pivot
    // fails for good, and never once the pivot succeeded (a later step failing ends Stuck).
    let ledger = Ledger::default();
    let pivot = |pay| {
        SagaDefinition::builder("book-trip", 1)
            .step(step(&ledger, "flight", Behaviour::Succeeds, true, false))
            .pivot_step(step(&ledger, "pay", pay, true, false).compensate_on_failure())
            .step(step(
                &ledger,
                "ship",
                Behaviour::FailsPermanently,
                false,
                false,
            ))
            .build()
            .expect("a pivot may compensate its own failure")
    };
    let engine =
        SagaEngine::new(InMemorySagaStore::new()).register(pivot(Behaviour::AlwaysFailsRetryably));
    let id = engine.start("book-trip", &ada()).await.expect("start");
    assert_eq!(
        engine.load(id).await.expect("load").status,
        SagaStatus::Failed
    );
    ledger.with(|state| assert_eq!(state.compensation_order, ["pay", "flight"]));

    let ledger_after = Ledger::default();
    let definition = SagaDefinition::builder("book-trip", 1)
        .step(step(
            &ledger_after,
            "flight",
            Behaviour::Succeeds,
            true,
            false,
        ))
        .pivot_step(
            step(&ledger_after, "pay", Behaviour::Succeeds, true, false).compensate_on_failure(),
        )
        .step(step(
            &ledger_after,
            "ship",
            Behaviour::FailsPermanently,
            false,
            false,
        ))
        .build()
        .expect("valid");
    let engine = SagaEngine::new(InMemorySagaStore::new()).register(definition);
    let id = engine.start("book-trip", &ada()).await.expect("start");
    assert_eq!(
        engine.load(id).await.expect("load").status,
        SagaStatus::Stuck
    );
    ledger_after.with(|state| assert!(state.compensation_order.is_empty(), "past the pivot"));
}

#[tokio::test(start_paused = true)]
async fn an_unknown_definition_version_is_refused_and_left_untouched() {
    // Goal: the versioning guard: an engine knowing only v2 refuses a v1 saga left active by a
    // crash, says which versions it knows, and does not write to its log.
    let store = InMemorySagaStore::new();
    let ledger = Ledger::default();
    let crashing =
        crate::support::CrashingStore::new(store.clone(), 3, crate::support::Crash::AfterWrite);
    let old = SagaEngine::new(crashing.clone())
        .with_owner(crate::support::NODE)
        .register(trip(&ledger, Behaviour::Succeeds));
    old.start("book-trip", &ada())
        .await
        .expect_err("crashes at write 3");
    let id = crashing.created().expect("created");
    let before = store.load(id).await.expect("load").expect("exists");

    let v2 = SagaDefinition::builder("book-trip", 2)
        .step(step(&ledger, "flight", Behaviour::Succeeds, true, false))
        .build()
        .expect("valid");
    let new = SagaEngine::new(store.clone())
        .with_owner(crate::support::NODE)
        .register(v2);
    let report = new.recover().await.expect("recover");
    assert!(report.resumed.is_empty());
    let [(refused, error)] = report.refused.as_slice() else {
        panic!("one refusal expected: {report:?}");
    };
    assert_eq!(*refused, id);
    assert!(matches!(
        error,
        SagaError::UnknownDefinition { version: 1, .. }
    ));
    let message = error.to_string();
    assert!(
        message.contains("book-trip version 1") && message.contains("book-trip@2"),
        "{message}"
    );
    assert_eq!(store.load(id).await.expect("load").expect("exists"), before);
    assert!(!error.is_retryable());
}

#[tokio::test]
async fn starting_an_unregistered_definition_or_a_mismatched_context_is_an_error() {
    // Goal: start checks the definition name and the context type before writing anything.
    let ledger = Ledger::default();
    let store = InMemorySagaStore::new();
    let engine = SagaEngine::new(store.clone()).register(trip(&ledger, Behaviour::Succeeds));
    let unknown = engine.start("ship-order", &ada()).await;
    assert!(matches!(unknown, Err(SagaError::UnknownDefinition { .. })));
    let mismatched = engine.start("book-trip", &42_u32).await;
    assert!(matches!(mismatched, Err(SagaError::Context(_))));
    assert!(store.list_active(10).await.expect("list").is_empty());
}

#[test]
fn invalid_definitions_are_rejected_with_the_reason() {
    // Goal: the builder refuses duplicate step names, compensation past the pivot (or on it,
    // unless only for its own failure), `compensate_on_failure` without a compensation and a
    // zero-attempt budget.
    let ledger = Ledger::default();
    let duplicate = SagaDefinition::builder("d", 1)
        .step(step(&ledger, "a", Behaviour::Succeeds, false, false))
        .step(step(&ledger, "a", Behaviour::Succeeds, false, false))
        .build();
    assert!(matches!(
        duplicate,
        Err(SagaError::InvalidDefinition { .. })
    ));
    let compensated_pivot = SagaDefinition::builder("d", 1)
        .pivot_step(step(&ledger, "a", Behaviour::Succeeds, true, false))
        .build();
    assert!(matches!(
        compensated_pivot,
        Err(SagaError::InvalidDefinition { .. })
    ));
    let no_attempts = SagaDefinition::builder("d", 1)
        .step(step(&ledger, "a", Behaviour::Succeeds, false, false).retry(quick_retry(0)))
        .build();
    assert!(matches!(
        no_attempts,
        Err(SagaError::InvalidDefinition { .. })
    ));
    let empty = SagaDefinition::<Trip>::builder("d", 1).build();
    assert!(matches!(empty, Err(SagaError::InvalidDefinition { .. })));
    let own_failure_without_compensation = SagaDefinition::builder("d", 1)
        .step(step(&ledger, "a", Behaviour::Succeeds, false, false).compensate_on_failure())
        .build();
    assert!(matches!(
        own_failure_without_compensation,
        Err(SagaError::InvalidDefinition { .. })
    ));
    let own_failure_after_the_pivot = SagaDefinition::builder("d", 1)
        .pivot_step(step(&ledger, "a", Behaviour::Succeeds, false, false))
        .step(step(&ledger, "b", Behaviour::Succeeds, true, false).compensate_on_failure())
        .build();
    assert!(matches!(
        own_failure_after_the_pivot,
        Err(SagaError::InvalidDefinition { .. })
    ));
}

#[test]
fn step_errors_say_whether_they_are_retryable() {
    // Goal: a step error carries its retry classification and its message.
    let error = StepError::permanent("no");
    assert!(!error.is_retryable());
    assert_eq!(error.message(), "no");
    assert!(StepError::retryable("later").is_retryable());
}

/// Counts `trellis_saga_stuck_total` increments; every other metric is dropped.
#[derive(Debug, Default)]
struct StuckCounter(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl metrics::CounterFn for StuckCounter {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, std::sync::atomic::Ordering::SeqCst);
    }

    fn absolute(&self, value: u64) {
        self.0.store(value, std::sync::atomic::Ordering::SeqCst);
    }
}

#[derive(Debug, Default)]
struct StuckRecorder(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl metrics::Recorder for StuckRecorder {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }

    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        let labelled = key
            .labels()
            .any(|label| label.key() == "definition" && label.value() == "book-trip");
        if key.name() == "trellis_saga_stuck_total" && labelled {
            metrics::Counter::from_arc(std::sync::Arc::new(StuckCounter(self.0.clone())))
        } else {
            metrics::Counter::noop()
        }
    }

    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }

    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_stuck_saga_is_counted_in_the_stuck_metric() {
    // Goal: reaching Stuck increments trellis_saga_stuck_total{definition} once, read through
    // a thread-local recorder on a single-threaded runtime.
    let recorder = StuckRecorder::default();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let ledger = Ledger::default();
    let engine = SagaEngine::new(InMemorySagaStore::new()).register(trip_with_pivot(
        &ledger,
        Behaviour::Succeeds,
        Behaviour::FailsPermanently,
    ));
    let id = engine.start("book-trip", &ada()).await.expect("start");
    assert_eq!(engine.status(id).await.expect("status"), SagaStatus::Stuck);
    assert_eq!(recorder.0.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// A two-step saga whose second step always fails; the first step's compensation fails
/// (retryably) `failures` times before it succeeds.
fn flaky_compensation(
    failures: u32,
    compensate_retry: Option<trellis_saga::StepRetry>,
) -> (
    SagaDefinition<Trip>,
    std::sync::Arc<std::sync::atomic::AtomicU32>,
) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    let tries = Arc::new(AtomicU32::new(0));
    let seen = tries.clone();
    let mut hold = Step::new("hold", |_: &mut Trip, _: StepContext| {
        Box::pin(async { Ok(()) })
    })
    .compensate(move |_: &mut Trip, _: StepContext| {
        let tries = tries.clone();
        Box::pin(async move {
            if tries.fetch_add(1, Ordering::SeqCst) < failures {
                Err(StepError::retryable("participant unreachable"))
            } else {
                Ok(())
            }
        })
    })
    .retry(quick_retry(3));
    if let Some(retry) = compensate_retry {
        hold = hold.compensate_retry(retry);
    }
    let fail = Step::new("fail", |_: &mut Trip, _: StepContext| {
        Box::pin(async { Err(StepError::permanent("no")) })
    });
    let definition = SagaDefinition::builder("flaky-undo", 1)
        .step(hold)
        .step(fail)
        .build()
        .expect("valid");
    (definition, seen)
}

#[tokio::test(start_paused = true)]
async fn a_compensation_gets_its_own_longer_retry_budget() {
    // Goal: a participant unreachable for longer than the forward step's retry budget leaves
    // the saga Stuck (with its effect in place) unless the compensation has a budget of its
    // own; with one, the saga ends Failed with everything undone. (`trellis chaos` found the
    // shop's sagas Stuck after a 4-second partition of shipping.)
    let (definition, _) = flaky_compensation(5, None);
    let engine = SagaEngine::new(InMemorySagaStore::new()).register(definition);
    let id = engine.start("flaky-undo", &ada()).await.expect("start");
    assert_eq!(engine.status(id).await.expect("status"), SagaStatus::Stuck);

    let (definition, tries) = flaky_compensation(5, Some(quick_retry(10)));
    let engine = SagaEngine::new(InMemorySagaStore::new()).register(definition);
    let id = engine.start("flaky-undo", &ada()).await.expect("start");
    assert_eq!(engine.status(id).await.expect("status"), SagaStatus::Failed);
    assert_eq!(tries.load(std::sync::atomic::Ordering::SeqCst), 6);
}

#[tokio::test(start_paused = true)]
async fn a_saga_started_twice_with_one_id_runs_once() {
    // Goal: a business key makes a start idempotent: two engines (say, a request and a
    // sweeper that thinks the first start was lost) starting a saga with the same id run its
    // steps once, and the second start is told the id is taken. Method: two engines with
    // different owners on one store, the same id.
    let ledger = Ledger::default();
    let store = InMemorySagaStore::new();
    let first = SagaEngine::new(store.clone())
        .with_owner("first")
        .register(trip(&ledger, Behaviour::Succeeds));
    let second = SagaEngine::new(store.clone())
        .with_owner("second")
        .register(trip(&ledger, Behaviour::Succeeds));
    let id = trellis_saga::SagaId::new();
    let started = first
        .start_with_id("book-trip", id, &ada())
        .await
        .expect("the first start runs the saga");
    assert_eq!(started, id);
    let again = second.start_with_id("book-trip", id, &ada()).await;
    assert!(
        matches!(again, Err(SagaError::Conflict { id: taken, seq: 1 }) if taken == id),
        "{again:?}"
    );
    assert_eq!(
        store.load(id).await.expect("load").expect("exists").status,
        SagaStatus::Completed
    );
    ledger.with(|state| assert_eq!(state.applied.len(), 3, "each step applied once"));
}
