//! Crash injection at every transition boundary, on the in-memory store.

use trellis_saga::{InMemorySagaStore, SagaStatus};

use crate::support::{
    Behaviour, crash_at_every_boundary, crash_every_attempt, trip, trip_with_pivot,
};

#[tokio::test(start_paused = true)]
async fn a_completed_saga_survives_a_crash_at_every_boundary() {
    // Goal: crashing the happy path before and after every write, then recovering, completes
    // the saga with each step's effect applied once per idempotency key.
    crash_at_every_boundary(
        InMemorySagaStore::new(),
        |ledger| trip(ledger, Behaviour::Succeeds),
        SagaStatus::Completed,
        &["car", "flight", "hotel"],
        &[],
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_compensated_saga_survives_a_crash_at_every_boundary() {
    // Goal: crashing a failing saga anywhere, including mid-compensation, still compensates
    // each completed step exactly once, in reverse order.
    crash_at_every_boundary(
        InMemorySagaStore::new(),
        |ledger| trip(ledger, Behaviour::FailsPermanently),
        SagaStatus::Failed,
        &["flight", "hotel"],
        &["hotel", "flight"],
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_retried_step_survives_a_crash_at_every_boundary() {
    // Goal: crashes between a failed attempt and its retry resume the retry, not a restart.
    crash_at_every_boundary(
        InMemorySagaStore::new(),
        |ledger| trip(ledger, Behaviour::FailsOnce),
        SagaStatus::Completed,
        &["car", "flight", "hotel"],
        &[],
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_stuck_saga_after_the_pivot_survives_a_crash_at_every_boundary() {
    // Goal: crashes after the pivot never lead to compensation and still end Stuck.
    crash_at_every_boundary(
        InMemorySagaStore::new(),
        |ledger| trip_with_pivot(ledger, Behaviour::Succeeds, Behaviour::AlwaysFailsRetryably),
        SagaStatus::Stuck,
        &["flight", "pay"],
        &[],
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_step_that_crashes_the_engine_every_time_exhausts_its_budget() {
    // Goal: a step whose every attempt kills its engine ends the saga compensated once its
    // three attempts are spent; method: abort the engine's task as each attempt starts and
    // recover with a fresh engine, on the in-memory store.
    crash_every_attempt(InMemorySagaStore::new()).await;
}

#[tokio::test(start_paused = true)]
async fn a_recovery_pass_drives_the_orphaned_sagas_side_by_side() {
    // Goal: an engine that died with many sagas in flight leaves them to the next engine's
    // recovery, which must run them side by side, not one after another (a chaos run on
    // PostgreSQL recovered 4,000 orphaned order sagas at three a second). Method: engine `a`
    // starts 16 sagas whose step hangs and dies; engine `b`'s step waits for all 16 to be
    // running at once (a barrier) and fails if they are not within 5 s of paused time, so a
    // one-by-one recovery compensates every saga and a concurrent one completes them all.
    use std::sync::Arc;
    use std::time::Duration;

    use trellis_saga::{SagaDefinition, SagaEngine, SagaStore, Step, StepContext, StepError};

    // As many as the default drives at once.
    const SAGAS: usize = trellis_saga::RECOVERY_CONCURRENCY_DEFAULT;
    let store = InMemorySagaStore::new();
    let hanging = SagaDefinition::builder("fan", 1)
        .step(Step::new("wait", |_: &mut u32, _step: StepContext| {
            Box::pin(async move {
                std::future::pending::<()>().await;
                Ok(())
            })
        }))
        .build()
        .expect("valid");
    let a = Arc::new(
        SagaEngine::new(store.clone())
            .with_owner("a")
            .register(hanging),
    );
    let mut runs = tokio::task::JoinSet::new();
    for i in 0..SAGAS {
        let a = a.clone();
        runs.spawn(async move { a.start("fan", &(i as u32)).await });
    }
    while store.list_active(100).await.expect("list").len() < SAGAS {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    runs.abort_all();
    while runs.join_next().await.is_some() {}
    drop(a);

    let barrier = Arc::new(tokio::sync::Barrier::new(SAGAS));
    let meeting = SagaDefinition::builder("fan", 1)
        .step(Step::new("wait", move |_: &mut u32, _step: StepContext| {
            let barrier = barrier.clone();
            Box::pin(async move {
                match tokio::time::timeout(Duration::from_secs(5), barrier.wait()).await {
                    Ok(_) => Ok(()),
                    Err(_) => Err(StepError::permanent("the other sagas are not running")),
                }
            })
        }))
        .build()
        .expect("valid");
    // The same owner, as a restarted process on SQLite: its sagas are claimable at once.
    let b = SagaEngine::new(store.clone())
        .with_owner("a")
        .register(meeting);
    let report = b.recover().await.expect("recovery pass");
    assert_eq!(report.resumed.len(), SAGAS, "{report:?}");
    assert!(
        report
            .resumed
            .iter()
            .all(|(_, status)| *status == SagaStatus::Completed),
        "every saga's step met the others: {report:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_transition_the_database_fails_for_a_moment_is_written_again_not_given_up() {
    // Goal: a saga-log write that fails for a transient reason (a pool timeout, as under a
    // PostgreSQL connection kill) is tried again within the lease, so the saga finishes in
    // the engine that runs it instead of being left to recovery (a chaos run on PostgreSQL
    // gave up 1,424 sagas this way). Method: the store fails its third write once.
    use trellis_saga::SagaEngine;

    use crate::support::{Crash, CrashingStore, Ledger};

    let store = InMemorySagaStore::new();
    let ledger = Ledger::default();
    let engine = SagaEngine::new(CrashingStore::new(store.clone(), 3, Crash::Transient))
        .register(trip(&ledger, Behaviour::Succeeds));
    let id = engine
        .start("book-trip", &crate::support::Trip::default())
        .await
        .expect("the saga finishes in the engine that started it");
    let saga = engine.load(id).await.expect("load");
    assert_eq!(saga.status, SagaStatus::Completed);
}
