//! The `SagaStore` contract, checked on every backend.

use std::time::Duration;

use chrono::Utc;
use trellis_saga::{
    InMemorySagaStore, Lease, PostgresSagaStore, SagaError, SagaFilter, SagaId, SagaRecord,
    SagaStatus, SagaStore, SqliteSagaStore, Transition,
};

fn started() -> Transition {
    Transition::Started {
        steps: vec!["flight".to_owned()],
        pivot: None,
    }
}

fn lease(owner: &str) -> Lease {
    Lease::new(owner, Duration::from_secs(60))
}

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
        .create(id, "book-trip", 3, &record(1, started()), &lease("a"))
        .await
        .expect("create");
    let duplicate = store
        .create(id, "book-trip", 3, &record(1, started()), &lease("a"))
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
        .append(id, &record(2, executing.clone()), &lease("a"))
        .await
        .expect("append 2");
    // A second writer at the same position loses, and so does one skipping ahead.
    let same = store
        .append(id, &record(2, Transition::Completed), &lease("a"))
        .await;
    assert!(
        matches!(same, Err(SagaError::Conflict { seq: 2, .. })),
        "{same:?}"
    );
    let ahead = store
        .append(id, &record(4, Transition::Completed), &lease("a"))
        .await;
    assert!(
        matches!(ahead, Err(SagaError::Conflict { seq: 4, .. })),
        "{ahead:?}"
    );
    let missing = store
        .append(
            SagaId::new(),
            &record(2, Transition::Completed),
            &lease("a"),
        )
        .await;
    assert!(
        matches!(missing, Err(SagaError::NotFound(_))),
        "{missing:?}"
    );

    let other = SagaId::new();
    store
        .create(other, "ship", 1, &record(1, started()), &lease("a"))
        .await
        .expect("create other");
    assert_eq!(store.list_active(10).await.expect("list"), vec![id, other]);
    assert_eq!(store.list_active(1).await.expect("list"), vec![id]);

    let compensating = Transition::Compensating {
        failed_step: "flight".to_owned(),
        error: "no seats".to_owned(),
    };
    store
        .append(id, &record(3, compensating.clone()), &lease("a"))
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
    assert_eq!(log, vec![started(), executing, compensating]);
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
            &lease("a"),
        )
        .await
        .expect("append 4");
    assert_eq!(store.list_active(10).await.expect("list"), vec![other]);
    assert_eq!(store.load(SagaId::new()).await.expect("load"), None);
    lease_contract(&store, other).await;
    inspect_contract(&store, id, other).await;
    context_contract(&store).await;
}

/// Records whose context repeats the previous one's, changes, and changes back: `load` gives
/// every record its own context whatever the store keeps on disk. Returns the saga's id.
async fn context_contract<S: SagaStore>(store: &S) -> SagaId {
    let id = SagaId::new();
    let first = serde_json::json!({ "trip": "lisbon", "seats": [1, 2] });
    let second = serde_json::json!({ "trip": "lisbon", "seats": [1, 2], "booked": true });
    let contexts = [&first, &first, &first, &second, &second, &first];
    let record = |seq: u64, context: &serde_json::Value| SagaRecord {
        seq,
        transition: if seq == 1 {
            started()
        } else {
            Transition::StepExecuting {
                step: "flight".to_owned(),
                attempt: u32::try_from(seq).expect("small"),
            }
        },
        context: context.clone(),
        at: Utc::now(),
    };
    store
        .create(id, "book-trip", 1, &record(1, contexts[0]), &lease("a"))
        .await
        .expect("create");
    for (index, context) in contexts.iter().enumerate().skip(1) {
        store
            .append(id, &record(index as u64 + 1, context), &lease("a"))
            .await
            .expect("append");
    }
    let instance = store.load(id).await.expect("load").expect("exists");
    let loaded: Vec<_> = instance.records.iter().map(|r| &r.context).collect();
    assert_eq!(loaded, contexts);
    id
}

/// How many of `saga`'s `saga_log` rows keep a context of their own in the SQLite file at `url`.
async fn contexts_kept_sqlite(url: &str, saga: SagaId) -> i64 {
    let pool = sqlx::SqlitePool::connect(url).await.expect("open");
    sqlx::query_scalar("SELECT count(*) FROM saga_log WHERE saga_id = ? AND context <> ''")
        .bind(saga.to_string())
        .fetch_one(&pool)
        .await
        .expect("count")
}

#[tokio::test]
async fn the_sqlite_store_keeps_a_context_once_until_it_changes() {
    // Goal: the log's size follows the context's changes, not its transitions: six records
    // whose context changes twice keep three contexts (read back in the contract above).
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("saga.db").display());
    let store = SqliteSagaStore::open(&url).await.expect("open");
    let id = context_contract(&store).await;
    assert_eq!(contexts_kept_sqlite(&url, id).await, 3);
}

#[tokio::test]
async fn the_postgres_store_keeps_a_context_once_until_it_changes() {
    // Goal: as on SQLite, six records whose context changes twice keep three contexts.
    let Some(db) = trellis_testkit::postgres("saga_store_contexts").await else {
        return;
    };
    let store = PostgresSagaStore::connect(&db.url).await.expect("connect");
    let id = context_contract(&store).await;
    let pool = sqlx::PgPool::connect(&db.url).await.expect("connect");
    let kept: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM saga_log WHERE saga_id = $1 AND context IS NOT NULL",
    )
    .bind(id.as_uuid())
    .fetch_one(&pool)
    .await
    .expect("count");
    assert_eq!(kept, 3);
}

/// Leases on the active saga `id`, held by "a": fenced appends, claims, renewals, release and
/// expiry.
async fn lease_contract<S: SagaStore>(store: &S, id: SagaId) {
    let next = |seq| {
        record(
            seq,
            Transition::StepExecuting {
                step: "ship".to_owned(),
                attempt: 1,
            },
        )
    };
    // b cannot write, claim or renew while a holds a live lease.
    let fenced = store.append(id, &next(2), &lease("b")).await;
    assert!(
        matches!(&fenced, Err(SagaError::Leased { owner, .. }) if owner == "a"),
        "{fenced:?}"
    );
    let claim = store.claim(id, &lease("b")).await;
    assert!(matches!(claim, Err(SagaError::Leased { .. })), "{claim:?}");
    assert_eq!(
        store.claim_next(&lease("b"), None).await.expect("claim"),
        None
    );
    assert!(!store.renew(id, &lease("b")).await.expect("renew"));
    assert!(store.renew(id, &lease("a")).await.expect("renew"));
    // a's own claims succeed (a restarted process under the same owner).
    assert_eq!(
        store.claim_next(&lease("a"), None).await.expect("claim"),
        Some(id)
    );
    assert_eq!(
        store
            .claim_next(&lease("a"), Some(id))
            .await
            .expect("claim"),
        None
    );

    // Released, the saga goes to the next claimer, and a is fenced out.
    store.release(id, "a").await.expect("release");
    assert_eq!(
        store.claim_next(&lease("b"), None).await.expect("claim"),
        Some(id)
    );
    let stale = store.append(id, &next(2), &lease("a")).await;
    assert!(
        matches!(&stale, Err(SagaError::Leased { owner, .. }) if owner == "b"),
        "{stale:?}"
    );
    assert!(!store.renew(id, &lease("a")).await.expect("renew"));

    // An expired lease (zero duration) is claimable by anyone.
    store
        .append(id, &next(2), &Lease::new("b", Duration::ZERO))
        .await
        .expect("b appends");
    store
        .claim(id, &lease("c"))
        .await
        .expect("c takes over the expired lease");
    let listed = store.list(&SagaFilter::new()).await.expect("list");
    let summary = listed.iter().find(|s| s.id == id).expect("listed");
    assert_eq!(summary.lease_owner.as_deref(), Some("c"));

    // A terminal append releases the lease; operators may still claim the saga.
    store
        .append(id, &record(3, Transition::Completed), &lease("c"))
        .await
        .expect("complete");
    assert_eq!(
        store.claim_next(&lease("d"), None).await.expect("claim"),
        None
    );
    store
        .claim(id, &lease("d"))
        .await
        .expect("claim a terminal saga");
    store.release(id, "d").await.expect("release");
    let missing = store.claim(SagaId::new(), &lease("d")).await;
    assert!(
        matches!(missing, Err(SagaError::NotFound(_))),
        "{missing:?}"
    );
}

/// Listing with filters and purging, once both sagas are terminal (`failed` is "book-trip",
/// `completed` is "ship").
async fn inspect_contract<S: SagaStore>(store: &S, failed: SagaId, completed: SagaId) {
    let all = store.list(&SagaFilter::new()).await.expect("list");
    assert_eq!(
        all.iter().map(|s| s.id).collect::<Vec<_>>(),
        vec![failed, completed]
    );
    assert_eq!(all[0].definition, "book-trip");
    assert_eq!(all[0].status, SagaStatus::Failed);
    assert_eq!(all[0].transitions, 4);
    assert_eq!(all[0].lease_owner, None);
    let by_status = store
        .list(&SagaFilter::new().with_status(SagaStatus::Completed))
        .await
        .expect("list");
    assert_eq!(
        by_status.iter().map(|s| s.id).collect::<Vec<_>>(),
        vec![completed]
    );
    let by_definition = store
        .list(&SagaFilter::new().with_definition("book-trip"))
        .await
        .expect("list");
    assert_eq!(
        by_definition.iter().map(|s| s.id).collect::<Vec<_>>(),
        vec![failed]
    );
    let future = Utc::now() + chrono::Duration::hours(1);
    let old = store
        .list(&SagaFilter::new().with_created_before(future).with_limit(1))
        .await
        .expect("list");
    assert_eq!(old.len(), 1);
    let young = store
        .list(&SagaFilter::new().with_created_after(future))
        .await
        .expect("list");
    assert!(young.is_empty());

    // Purging keeps everything newer than the cut-off, and never keeps terminal sagas older.
    let past = Utc::now() - chrono::Duration::hours(1);
    assert_eq!(store.purge(past).await.expect("purge"), 0);
    let stuck = SagaId::new();
    store
        .create(stuck, "ship", 1, &record(1, started()), &lease("a"))
        .await
        .expect("create");
    store
        .append(
            stuck,
            &record(
                2,
                Transition::Stuck {
                    step: "ship".to_owned(),
                    compensating: false,
                    error: "lost".to_owned(),
                },
            ),
            &lease("a"),
        )
        .await
        .expect("stuck");
    assert_eq!(store.purge(future).await.expect("purge"), 2);
    assert_eq!(store.load(failed).await.expect("load"), None);
    let left = store.list(&SagaFilter::new()).await.expect("list");
    assert_eq!(
        left.iter().map(|s| s.id).collect::<Vec<_>>(),
        vec![stuck],
        "stuck sagas stay"
    );
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

#[tokio::test]
async fn the_store_a_url_names_keeps_the_store_contract_on_every_backend() {
    // Goal: AnySagaStore opened from each scheme's URL passes the same contract as the
    // backend it wraps, so a binary that picks its log by URL loses nothing.
    let dir = tempfile::tempdir().expect("temp dir");
    let sqlite = format!("sqlite://{}", dir.path().join("any.db").display());
    let postgres = trellis_testkit::postgres("saga_any_store_contract").await;
    let mut urls = vec!["memory://".to_owned(), sqlite];
    urls.extend(postgres.as_ref().map(|db| db.url.clone()));
    for url in urls {
        let store = trellis_saga::AnySagaStore::open(&url)
            .await
            .unwrap_or_else(|error| panic!("open {url}: {error}"));
        store_contract(store).await;
    }
}
