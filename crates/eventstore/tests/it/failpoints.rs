//! Crashes at the projection checkpoint (feature `failpoints`): after a batch is applied to
//! the read model and before its checkpoint is written, and after both committed.
//!
//! A crash is the failpoint failing (an error) or panicking, then dropping the runner, the
//! event store and the read model's pool and opening them again from their files (PostgreSQL:
//! the database). After each crash the runner catches up, more events arrive, it catches up
//! again, and every event must be in the read model exactly once.
//!
//! fail's registry is global to the process: all cases run in sequence in one test holding a
//! `FailScenario`, and the points are scoped to this test's projection name.

use std::future::Future;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use fail::FailScenario;
use serde_json::json;
use sqlx::sqlite::SqlitePoolOptions;
use sqlx::{Pool, Postgres, Sqlite, Transaction};
use trellis_eventstore::failpoints::{PROJECTION_AFTER_COMMIT, PROJECTION_BEFORE_CHECKPOINT};
use trellis_eventstore::{
    EventStore, ExpectedVersion, NewEvent, Projection, ProjectionRunner, ReadModelDatabase,
    RecordedEvent, SqliteStore, StreamId,
};

/// The projection's name, and so the failpoints' scope.
const NAME: &str = "fp-ledger";

/// Records every event it applies as a row of its own, so a second application shows.
#[derive(Debug)]
struct Ledger;

macro_rules! ledger_projection {
    ($db:ty) => {
        impl Projection<$db> for Ledger {
            fn name(&self) -> &str {
                NAME
            }

            async fn setup(
                &self,
                tx: &mut Transaction<'static, $db>,
                generation: u32,
            ) -> Result<(), sqlx::Error> {
                let sql = format!(
                    "CREATE TABLE IF NOT EXISTS fp_ledger_g{generation} (position BIGINT NOT NULL)"
                );
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .execute(&mut **tx)
                    .await?;
                Ok(())
            }

            async fn apply(
                &self,
                tx: &mut Transaction<'static, $db>,
                generation: u32,
                event: &RecordedEvent,
            ) -> Result<(), String> {
                let sql = format!("INSERT INTO fp_ledger_g{generation} (position) VALUES ($1)");
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(i64::try_from(event.position).map_err(|e| e.to_string())?)
                    .execute(&mut **tx)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(())
            }

            async fn activate(
                &self,
                tx: &mut Transaction<'static, $db>,
                generation: u32,
            ) -> Result<(), sqlx::Error> {
                sqlx::query("DROP VIEW IF EXISTS fp_ledger")
                    .execute(&mut **tx)
                    .await?;
                let sql = format!(
                    "CREATE VIEW fp_ledger AS SELECT position FROM fp_ledger_g{generation}"
                );
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .execute(&mut **tx)
                    .await?;
                Ok(())
            }

            async fn teardown(
                &self,
                tx: &mut Transaction<'static, $db>,
                generation: u32,
            ) -> Result<(), sqlx::Error> {
                let sql = format!("DROP TABLE IF EXISTS fp_ledger_g{generation}");
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .execute(&mut **tx)
                    .await?;
                Ok(())
            }
        }
    };
}

ledger_projection!(Sqlite);
ledger_projection!(Postgres);

#[derive(Debug, Clone, Copy)]
enum Mode {
    Error,
    Panic,
}

/// Arms failpoint `name` for this test's projection until dropped.
struct Armed(&'static str);

impl Armed {
    fn new(name: &'static str, mode: Mode) -> anyhow::Result<Self> {
        let action = match mode {
            Mode::Error => format!("return({NAME})"),
            Mode::Panic => format!("return({NAME}:panic)"),
        };
        fail::cfg(name, &action).map_err(anyhow::Error::msg)?;
        Ok(Self(name))
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        fail::remove(self.0);
    }
}

/// Where the read model lives, opened again after each crash.
trait ReadModel {
    type Db: ReadModelDatabase;
    fn open(&self) -> impl Future<Output = anyhow::Result<Pool<Self::Db>>>;
}

struct SqliteFile(String);

impl ReadModel for SqliteFile {
    type Db = Sqlite;
    async fn open(&self) -> anyhow::Result<Pool<Sqlite>> {
        let options =
            trellis_sqlite::connect_options(&self.0)?.busy_timeout(Duration::from_secs(5));
        Ok(SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await?)
    }
}

struct PgDatabase(String);

impl ReadModel for PgDatabase {
    type Db = Postgres;
    async fn open(&self) -> anyhow::Result<Pool<Postgres>> {
        Ok(Pool::<Postgres>::connect(&self.0).await?)
    }
}

async fn append(store: &SqliteStore, events: usize) -> anyhow::Result<()> {
    let stream = StreamId::new("ledger-1")?;
    let batch = (0..events)
        .map(|n| NewEvent::new("Entered", json!({ "n": n })))
        .collect();
    store.append(&stream, ExpectedVersion::Any, batch).await?;
    Ok(())
}

async fn applied<DB>(pool: &Pool<DB>) -> anyhow::Result<Vec<i64>>
where
    DB: sqlx::Database,
    for<'c> &'c Pool<DB>: sqlx::Executor<'c, Database = DB>,
    for<'r> (i64,): sqlx::FromRow<'r, DB::Row>,
    <DB as sqlx::Database>::Arguments: sqlx::IntoArguments<DB>,
{
    let rows: Vec<(i64,)> = sqlx::query_as("SELECT position FROM fp_ledger ORDER BY position")
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().map(|(p,)| p).collect())
}

/// Crashes the runner at `point` while it applies the first events, then checks that the
/// rebuilt runner leaves every event applied exactly once.
async fn crash_at<R>(
    point: &'static str,
    mode: Mode,
    read_model: &R,
    dir: &tempfile::TempDir,
) -> anyhow::Result<()>
where
    R: ReadModel,
    Ledger: Projection<R::Db>,
    for<'c> &'c mut <R::Db as sqlx::Database>::Connection: sqlx::Executor<'c, Database = R::Db>,
    for<'c> &'c Pool<R::Db>: sqlx::Executor<'c, Database = R::Db>,
    for<'r> (i64,): sqlx::FromRow<'r, <R::Db as sqlx::Database>::Row>,
    <R::Db as sqlx::Database>::Arguments: sqlx::IntoArguments<R::Db>,
{
    let events_url = format!("sqlite://{}", dir.path().join("events.db").display());
    let store = SqliteStore::open(&events_url).await?;
    append(&store, 5).await?;
    let pool = read_model.open().await?;
    let runner = ProjectionRunner::new(Ledger, store.clone(), pool.clone()).await?;
    {
        let _armed = Armed::new(point, mode)?;
        let runner = runner.clone();
        match (
            mode,
            tokio::spawn(async move { runner.catch_up().await }).await,
        ) {
            (Mode::Error, Ok(Err(error))) if error.to_string().contains("failpoint") => {}
            (Mode::Panic, Err(join)) if join.is_panic() => {}
            (mode, outcome) => {
                bail!("{mode:?}: the failpoint did not crash the runner: {outcome:?}")
            }
        }
    }
    // What the crash left: nothing (rolled back with the checkpoint) or everything.
    let left = applied(&pool).await?;
    let expected_left: Vec<i64> = if point == PROJECTION_AFTER_COMMIT {
        (1..=5).collect()
    } else {
        Vec::new()
    };
    ensure!(left == expected_left, "after the crash: {left:?}");
    drop((runner, store));
    pool.close().await;

    let store = SqliteStore::open(&events_url).await?;
    let pool = read_model.open().await?;
    let runner = ProjectionRunner::new(Ledger, store.clone(), pool.clone()).await?;
    ensure!(runner.catch_up().await? == 5);
    append(&store, 3).await?;
    ensure!(runner.catch_up().await? == 8);
    ensure!(runner.checkpoint().await? == 8);
    let all = applied(&pool).await?;
    ensure!(
        all == (1..=8).collect::<Vec<i64>>(),
        "each event once: {all:?}"
    );
    pool.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_the_projection_checkpoint_applies_every_event_exactly_once()
-> anyhow::Result<()> {
    let scenario = FailScenario::setup();
    for point in [PROJECTION_BEFORE_CHECKPOINT, PROJECTION_AFTER_COMMIT] {
        for mode in [Mode::Error, Mode::Panic] {
            let dir = tempfile::tempdir()?;
            let read_model =
                SqliteFile(format!("sqlite://{}", dir.path().join("read.db").display()));
            crash_at(point, mode, &read_model, &dir)
                .await
                .with_context(|| format!("SQLite read model, {point}, {mode:?}"))?;
            if let Some(db) = trellis_testkit::postgres("fp_projection").await {
                let dir = tempfile::tempdir()?;
                crash_at(point, mode, &PgDatabase(db.url.clone()), &dir)
                    .await
                    .with_context(|| format!("PostgreSQL read model, {point}, {mode:?}"))?;
            }
        }
    }
    scenario.teardown();
    Ok(())
}
