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
