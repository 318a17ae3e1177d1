//! Projections into SQLite and PostgreSQL read models: exactly once, rebuilds, lag.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::json;
use sqlx::{Pool, Postgres, Sqlite, Transaction};
use trellis_eventstore::{
    EventStore, ExpectedVersion, MemoryStore, NewEvent, Projection, ProjectionError,
    ProjectionRunner, ReadModelDatabase, RecordedEvent, StreamId,
};

/// Balances per account, in `balances_g{generation}`, read through the `balances` view.
/// `fail_at` makes the handler refuse the event at that position (a crash mid-batch).
#[derive(Debug, Default)]
struct Balances {
    fail_at: Arc<AtomicU64>,
}

macro_rules! balances_projection {
    ($db:ty) => {
        impl Projection<$db> for Balances {
            fn name(&self) -> &str {
                "balances"
            }

            async fn setup(&self, tx: &mut Transaction<'static, $db>, generation: u32) -> Result<(), sqlx::Error> {
                let sql = format!(
                    "CREATE TABLE IF NOT EXISTS balances_g{generation} (account TEXT PRIMARY KEY, balance BIGINT NOT NULL, events BIGINT NOT NULL)"
                );
                sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut **tx).await?;
                Ok(())
            }

            async fn apply(&self, tx: &mut Transaction<'static, $db>, generation: u32, event: &RecordedEvent) -> Result<(), String> {
                if self.fail_at.load(Ordering::SeqCst) == event.position {
                    return Err("injected failure".into());
                }
                let delta = match event.event_type.as_str() {
                    "Deposited" => event.data["amount_cents"].as_i64().ok_or("no amount")?,
                    "Withdrew" => -event.data["amount_cents"].as_i64().ok_or("no amount")?,
                    _ => return Ok(()),
                };
                let sql = format!(
                    "INSERT INTO balances_g{generation} (account, balance, events) VALUES ($1, $2, 1)
                     ON CONFLICT (account) DO UPDATE SET balance = balances_g{generation}.balance + excluded.balance,
                         events = balances_g{generation}.events + 1"
                );
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(event.stream.as_str())
                    .bind(delta)
                    .execute(&mut **tx)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(())
            }

            async fn activate(&self, tx: &mut Transaction<'static, $db>, generation: u32) -> Result<(), sqlx::Error> {
                sqlx::query("DROP VIEW IF EXISTS balances").execute(&mut **tx).await?;
                let sql = format!("CREATE VIEW balances AS SELECT account, balance, events FROM balances_g{generation}");
                sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut **tx).await?;
                Ok(())
            }

            async fn teardown(&self, tx: &mut Transaction<'static, $db>, generation: u32) -> Result<(), sqlx::Error> {
                let sql = format!("DROP TABLE IF EXISTS balances_g{generation}");
                sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut **tx).await?;
                Ok(())
            }
        }
    };
}

balances_projection!(Sqlite);
balances_projection!(Postgres);

async fn deposit(store: &MemoryStore, account: &str, amount_cents: i64, times: usize) {
    let stream = StreamId::new(account).expect("valid");
    let events: Vec<_> = (0..times)
        .map(|_| NewEvent::new("Deposited", json!({ "amount_cents": amount_cents })))
        .collect();
    for chunk in events.chunks(1_000) {
        store
            .append(&stream, ExpectedVersion::Any, chunk.to_vec())
            .await
            .expect("append");
    }
}

async fn balances<DB>(pool: &Pool<DB>) -> Vec<(String, i64, i64)>
where
    DB: sqlx::Database,
    for<'c> &'c Pool<DB>: sqlx::Executor<'c, Database = DB>,
    for<'r> (String, i64, i64): sqlx::FromRow<'r, DB::Row>,
    <DB as sqlx::Database>::Arguments: sqlx::IntoArguments<DB>,
{
    sqlx::query_as("SELECT account, balance, events FROM balances ORDER BY account")
        .fetch_all(pool)
        .await
        .expect("query view")
}

async fn exactly_once<DB>(pool: Pool<DB>)
where
    DB: ReadModelDatabase,
    Balances: Projection<DB>,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'c> &'c Pool<DB>: sqlx::Executor<'c, Database = DB>,
    for<'r> (String, i64, i64): sqlx::FromRow<'r, DB::Row>,
    <DB as sqlx::Database>::Arguments: sqlx::IntoArguments<DB>,
{
    let store = MemoryStore::new();
    deposit(&store, "acct-a", 10, 700).await;
    deposit(&store, "acct-b", 1, 300).await;
    let fail_at = Arc::new(AtomicU64::new(650));
    let runner = ProjectionRunner::new(
        Balances {
            fail_at: fail_at.clone(),
        },
        store.clone(),
        pool.clone(),
    )
    .await
    .expect("runner");

    // The batch holding position 650 fails: its writes and its checkpoint roll back together.
    let failed = runner.catch_up().await;
    assert!(
        matches!(failed, Err(ProjectionError::Handler { position: 650, .. })),
        "{failed:?}"
    );
    assert_eq!(runner.checkpoint().await.expect("checkpoint"), 500);
    assert_eq!(balances(&pool).await, [("acct-a".to_owned(), 5_000, 500)]);

    // "Restart": the batch is applied again from the checkpoint, exactly once.
    fail_at.store(0, Ordering::SeqCst);
    assert_eq!(runner.catch_up().await.expect("catch up"), 1_000);
    assert_eq!(
        balances(&pool).await,
        [
            ("acct-a".to_owned(), 7_000, 700),
            ("acct-b".to_owned(), 300, 300)
        ]
    );
    assert_eq!(runner.lag().await.expect("lag"), 0);
    deposit(&store, "acct-b", 1, 10).await;
    assert_eq!(runner.lag().await.expect("lag"), 10);
}

async fn rebuild_while_serving<DB>(pool: Pool<DB>)
where
    DB: ReadModelDatabase,
    Balances: Projection<DB>,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'c> &'c Pool<DB>: sqlx::Executor<'c, Database = DB>,
    for<'r> (String, i64, i64): sqlx::FromRow<'r, DB::Row>,
    <DB as sqlx::Database>::Arguments: sqlx::IntoArguments<DB>,
{
    let store = MemoryStore::new();
    deposit(&store, "acct-a", 2, 2_000).await;
    let runner = ProjectionRunner::new(Balances::default(), store.clone(), pool.clone())
        .await
        .expect("runner");
    runner.catch_up().await.expect("catch up");
    let expected = vec![("acct-a".to_owned(), 4_000, 2_000)];
    assert_eq!(balances(&pool).await, expected);

    let rebuild = {
        let runner = runner.clone();
        tokio::spawn(async move {
            let mut progress = Vec::new();
            let generation = runner.rebuild(|p| progress.push(p)).await.expect("rebuild");
            (generation, progress)
        })
    };
    // Readers keep getting the complete old model while the new one is built.
    let mut reads = 0;
    while !rebuild.is_finished() {
        assert_eq!(balances(&pool).await, expected);
        reads += 1;
        tokio::task::yield_now().await;
    }
    let (generation, progress) = rebuild.await.expect("task");
    assert_eq!(generation, 2);
    assert!(reads > 0);
    assert!(
        progress.len() >= 4,
        "progress is reported per batch: {progress:?}"
    );
    assert!(progress.windows(2).all(|w| w[1].position >= w[0].position));
    assert_eq!(progress.last().map(|p| p.position), Some(2_000));
    assert_eq!(runner.active_generation().await.expect("generation"), 2);
    assert_eq!(
        balances(&pool).await,
        expected,
        "the rebuilt model equals a replay of the log"
    );
}

/// Two runners (as two processes would run) feed one read model from one log at once, each
/// from its own pool, until both reach the head; every event must count once.
async fn two_runners_apply_each_event_once<DB>(first: Pool<DB>, second: Pool<DB>)
where
    DB: ReadModelDatabase,
    Balances: Projection<DB>,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'c> &'c Pool<DB>: sqlx::Executor<'c, Database = DB>,
    for<'r> (String, i64, i64): sqlx::FromRow<'r, DB::Row>,
    <DB as sqlx::Database>::Arguments: sqlx::IntoArguments<DB>,
{
    const EVENTS: usize = 5_000;
    let store = MemoryStore::new();
    let mut runners = Vec::new();
    for pool in [first.clone(), second] {
        runners.push(
            ProjectionRunner::new(Balances::default(), store.clone(), pool)
                .await
                .expect("runner"),
        );
    }
    // Both runners follow the log while it grows, so they race over every batch.
    let tasks: Vec<_> = runners
        .into_iter()
        .map(|runner| {
            tokio::spawn(async move {
                loop {
                    let checkpoint = runner.catch_up().await.expect("catch up");
                    if checkpoint == EVENTS as u64 {
                        return;
                    }
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    for _ in 0..EVENTS / 100 {
        deposit(&store, "acct-a", 1, 100).await;
        tokio::task::yield_now().await;
    }
    for task in tasks {
        task.await.expect("runner task");
    }
    assert_eq!(
        balances(&first).await,
        [("acct-a".to_owned(), EVENTS as i64, EVENTS as i64)],
        "each deposit is counted once"
    );
}

/// A runner keeps following the read model after a runner of another process rebuilt it (a
/// new generation active, the old one dropped): the live runner remembers the active
/// generation instead of reading it per batch, so its next batch must find out under the lock
/// and go to the new generation.
async fn a_rebuild_elsewhere_moves_the_live_runner<DB>(first: Pool<DB>, second: Pool<DB>)
where
    DB: ReadModelDatabase,
    Balances: Projection<DB>,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'c> &'c Pool<DB>: sqlx::Executor<'c, Database = DB>,
    for<'r> (String, i64, i64): sqlx::FromRow<'r, DB::Row>,
    <DB as sqlx::Database>::Arguments: sqlx::IntoArguments<DB>,
{
    let store = MemoryStore::new();
    deposit(&store, "acct-a", 1, 10).await;
    let live = ProjectionRunner::new(Balances::default(), store.clone(), first.clone())
        .await
        .expect("runner");
    assert_eq!(live.catch_up().await.expect("catch up"), 10);
    let elsewhere = ProjectionRunner::new(Balances::default(), store.clone(), second)
        .await
        .expect("runner");
    assert_eq!(elsewhere.rebuild(|_| {}).await.expect("rebuild"), 2);
    deposit(&store, "acct-a", 1, 5).await;
    assert_eq!(
        live.catch_up().await.expect("catch up after the rebuild"),
        15
    );
    assert_eq!(live.active_generation().await.expect("generation"), 2);
    assert_eq!(balances(&first).await, [("acct-a".to_owned(), 15, 15)]);
}

mod sqlite {
    use super::*;

    async fn pool() -> (Pool<Sqlite>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("read.db").display());
        (sqlx::SqlitePool::connect(&url).await.expect("open"), dir)
    }

    #[tokio::test]
    async fn a_failed_batch_is_applied_again_exactly_once() {
        // The checkpoint commits with the read model, so a crash mid-batch neither skips nor doubles.
        let (pool, _dir) = pool().await;
        exactly_once(pool).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rebuild_swaps_in_a_new_generation_while_the_old_one_serves() {
        // Replaying into a new generation leaves the active one readable until the swap.
        let (pool, _dir) = pool().await;
        rebuild_while_serving(pool).await;
    }

    #[tokio::test]
    async fn a_runner_whose_checkpoint_went_back_applies_again_from_it() {
        // The runner starts each batch's read where it last committed instead of reading the
        // checkpoint again; when the checkpoint row went back meanwhile (the generation was
        // set up again), the next catch-up must apply every event from there, not only those
        // after what the runner remembered.
        let (pool, _dir) = pool().await;
        let store = MemoryStore::new();
        deposit(&store, "acct-a", 1, 600).await;
        let runner = ProjectionRunner::new(
            Balances {
                fail_at: Arc::new(AtomicU64::new(0)),
            },
            store.clone(),
            pool.clone(),
        )
        .await
        .expect("runner");
        assert_eq!(runner.catch_up().await.expect("catch up"), 600);
        sqlx::raw_sql("DELETE FROM balances_g1; UPDATE projection_checkpoints SET position = 0")
            .execute(&pool)
            .await
            .expect("reset the generation");
        deposit(&store, "acct-a", 1, 10).await;
        assert_eq!(runner.catch_up().await.expect("catch up"), 610);
        assert_eq!(balances(&pool).await, [("acct-a".to_owned(), 610, 610)]);
    }

    #[tokio::test]
    async fn a_runner_follows_a_rebuild_another_process_ran() {
        // As the generic check says, with two pools on one read-model file.
        let (first, dir) = pool().await;
        let url = format!("sqlite://{}", dir.path().join("read.db").display());
        let second = sqlx::SqlitePool::connect(&url).await.expect("open");
        a_rebuild_elsewhere_moves_the_live_runner(first, second).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_projection_runners_on_sqlite_apply_each_event_once() {
        // Two runners with their own pools on one read-model file race over a growing log.
        let (first, dir) = pool().await;
        let url = format!("sqlite://{}", dir.path().join("read.db").display());
        let second = sqlx::SqlitePool::connect(&url).await.expect("open");
        two_runners_apply_each_event_once(first, second).await;
    }
}

mod postgres {
    use super::*;

    #[tokio::test]
    async fn a_failed_batch_is_applied_again_exactly_once() {
        // As for SQLite, on the machine's PostgreSQL.
        let Some(db) = trellis_testkit::postgres("projection_exactly_once").await else {
            return;
        };
        let pool = sqlx::PgPool::connect(&db.url).await.expect("connect");
        exactly_once(pool.clone()).await;
        pool.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rebuild_swaps_in_a_new_generation_while_the_old_one_serves() {
        // As for SQLite, on the machine's PostgreSQL.
        let Some(db) = trellis_testkit::postgres("projection_rebuild").await else {
            return;
        };
        let pool = sqlx::PgPool::connect(&db.url).await.expect("connect");
        rebuild_while_serving(pool.clone()).await;
        pool.close().await;
    }

    #[tokio::test]
    async fn a_runner_follows_a_rebuild_another_process_ran() {
        // As for SQLite, on the machine's PostgreSQL.
        let Some(db) = trellis_testkit::postgres("projection_rebuild_elsewhere").await else {
            return;
        };
        let first = sqlx::PgPool::connect(&db.url).await.expect("connect");
        let second = sqlx::PgPool::connect(&db.url).await.expect("connect");
        a_rebuild_elsewhere_moves_the_live_runner(first.clone(), second.clone()).await;
        first.close().await;
        second.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_projection_runners_on_postgres_apply_each_event_once() {
        // Two runners with their own pools on one PostgreSQL read model race over a growing
        // log; the checkpoint row's lock must let only one apply each batch.
        let Some(db) = trellis_testkit::postgres("projection_two_runners").await else {
            return;
        };
        let first = sqlx::PgPool::connect(&db.url).await.expect("connect");
        let second = sqlx::PgPool::connect(&db.url).await.expect("connect");
        two_runners_apply_each_event_once(first.clone(), second.clone()).await;
        first.close().await;
        second.close().await;
    }
}
