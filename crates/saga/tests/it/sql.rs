//! The same crash-recovery checks on the SQLite and PostgreSQL saga logs.

use trellis_saga::{PostgresSagaStore, SagaStatus, SqliteSagaStore};

use crate::support::{Behaviour, crash_at_every_boundary, crash_every_attempt, trip};

#[tokio::test]
async fn a_compensated_saga_survives_a_crash_at_every_boundary_on_sqlite() {
    // Goal: the crash matrix holds on a real SQLite file (WAL, synchronous FULL).
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("saga.db").display());
    let store = SqliteSagaStore::open(&url).await.expect("open");
    crash_at_every_boundary(
        store.clone(),
        |ledger| trip(ledger, Behaviour::FailsPermanently),
        SagaStatus::Failed,
        &["flight", "hotel"],
        &["hotel", "flight"],
    )
    .await;
    crash_at_every_boundary(
        store,
        |ledger| trip(ledger, Behaviour::Succeeds),
        SagaStatus::Completed,
        &["car", "flight", "hotel"],
        &[],
    )
    .await;
    // Reopening the file sees the same, terminal, sagas.
    let reopened = SqliteSagaStore::open(&url).await.expect("reopen");
    use trellis_saga::SagaStore as _;
    assert!(reopened.list_active(10).await.expect("list").is_empty());
}

#[tokio::test]
async fn a_compensated_saga_survives_a_crash_at_every_boundary_on_postgres() {
    // Goal: the crash matrix holds on a fresh PostgreSQL database from the testkit.
    let Some(db) = trellis_testkit::postgres("saga_crash_matrix").await else {
        return;
    };
    let store = PostgresSagaStore::connect(&db.url).await.expect("connect");
    crash_at_every_boundary(
        store.clone(),
        |ledger| trip(ledger, Behaviour::FailsPermanently),
        SagaStatus::Failed,
        &["flight", "hotel"],
        &["hotel", "flight"],
    )
    .await;
    crash_at_every_boundary(
        store,
        |ledger| trip(ledger, Behaviour::Succeeds),
        SagaStatus::Completed,
        &["car", "flight", "hotel"],
        &[],
    )
    .await;
}

#[tokio::test]
async fn a_step_that_crashes_the_engine_every_time_exhausts_its_budget_on_sqlite() {
    // Goal: interrupted attempts count against the budget on a SQLite log; method: the crash
    // loop of `crash_every_attempt` on a fresh file.
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("saga.db").display());
    let store = SqliteSagaStore::open(&url).await.expect("open");
    crash_every_attempt(store).await;
}

#[tokio::test]
async fn a_step_that_crashes_the_engine_every_time_exhausts_its_budget_on_postgres() {
    // Goal: interrupted attempts count against the budget on a PostgreSQL log; method: the
    // crash loop of `crash_every_attempt` on a fresh database from the testkit.
    let Some(db) = trellis_testkit::postgres("saga_crash_loop").await else {
        return;
    };
    let store = PostgresSagaStore::connect(&db.url).await.expect("connect");
    crash_every_attempt(store).await;
}
