//! The `SagaStore` contract, checked on every backend.

use chrono::Utc;
use trellis_saga::{
    InMemorySagaStore, PostgresSagaStore, SagaError, SagaId, SagaRecord, SagaStatus, SagaStore,
    SqliteSagaStore, Transition,
};

fn record(seq: u64, transition: Transition) -> SagaRecord {
    SagaRecord {
        seq,
        transition,
        context: serde_json::json!({ "seq": seq }),
        at: Utc::now(),
    }
}

/// Creates, appends, conflicts, loads and lists on `store`, as every backend must.
async fn store_contract<S: SagaStore>(store: S) {
    let id = SagaId::new();
    store
        .create(id, "book-trip", 3, &record(1, Transition::Started))
        .await
        .expect("create");
    let duplicate = store
        .create(id, "book-trip", 3, &record(1, Transition::Started))
        .await;
    assert!(
        matches!(duplicate, Err(SagaError::Conflict { .. })),
        "{duplicate:?}"
    );

    let executing = Transition::StepExecuting {
        step: "flight".to_owned(),
        attempt: 1,
    };
    store
        .append(id, &record(2, executing.clone()))
        .await
        .expect("append 2");
    // A second writer at the same position loses, and so does one skipping ahead.
    let same = store.append(id, &record(2, Transition::Completed)).await;
    assert!(
        matches!(same, Err(SagaError::Conflict { seq: 2, .. })),
        "{same:?}"
    );
    let ahead = store.append(id, &record(4, Transition::Completed)).await;
    assert!(
        matches!(ahead, Err(SagaError::Conflict { seq: 4, .. })),
        "{ahead:?}"
    );
    let missing = store
        .append(SagaId::new(), &record(2, Transition::Completed))
        .await;
    assert!(
        matches!(missing, Err(SagaError::NotFound(_))),
        "{missing:?}"
    );

    let other = SagaId::new();
    store
        .create(other, "ship", 1, &record(1, Transition::Started))
        .await
        .expect("create other");
    assert_eq!(store.list_active(10).await.expect("list"), vec![id, other]);
    assert_eq!(store.list_active(1).await.expect("list"), vec![id]);

    let compensating = Transition::Compensating {
        failed_step: "flight".to_owned(),
        error: "no seats".to_owned(),
    };
    store
        .append(id, &record(3, compensating.clone()))
        .await
        .expect("append 3");
    let instance = store.load(id).await.expect("load").expect("exists");
    assert_eq!(instance.definition, "book-trip");
    assert_eq!(instance.version, 3);
    assert_eq!(instance.status, SagaStatus::Compensating);
    let log: Vec<_> = instance
        .records
        .iter()
        .map(|r| r.transition.clone())
        .collect();
    assert_eq!(log, vec![Transition::Started, executing, compensating]);
    assert_eq!(instance.records[1].context, serde_json::json!({ "seq": 2 }));

    store
        .append(
            id,
            &record(
                4,
                Transition::Failed {
                    step: "flight".to_owned(),
                    error: "no seats".to_owned(),
                },
            ),
        )
        .await
        .expect("append 4");
    assert_eq!(store.list_active(10).await.expect("list"), vec![other]);
    assert_eq!(store.load(SagaId::new()).await.expect("load"), None);
}

#[tokio::test]
async fn the_in_memory_store_keeps_the_store_contract() {
    // Goal: the in-memory log orders, conflicts and lists as the trait says.
    store_contract(InMemorySagaStore::new()).await;
}

#[tokio::test]
async fn the_sqlite_store_keeps_the_store_contract() {
    // Goal: the SQLite log orders, conflicts and lists as the trait says.
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("saga.db").display());
    store_contract(SqliteSagaStore::open(&url).await.expect("open")).await;
}

#[tokio::test]
async fn the_postgres_store_keeps_the_store_contract() {
    // Goal: the PostgreSQL log orders, conflicts and lists as the trait says.
    let Some(db) = trellis_testkit::postgres("saga_store_contract").await else {
        return;
    };
    store_contract(PostgresSagaStore::connect(&db.url).await.expect("connect")).await;
}
