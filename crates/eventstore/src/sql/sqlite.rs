//! The SQLite backend: the embedded default.
//!
//! Durability: WAL journal with `synchronous = FULL`, so an acknowledged append survives a
//! power loss. Throughput comes from group commit (see the writer module), not from weaker
//! durability. Several processes may share one file: every append batch runs in a
//! `BEGIN IMMEDIATE` transaction, which holds SQLite's single write lock, and positions are
//! `MAX(position) + 1` under that lock, so they are assigned in commit order.

use std::sync::Weak;
use std::time::Duration;

use sqlx::sqlite::{SqlitePool, SqliteRow};
use sqlx::{Sqlite, Transaction};
use tokio::sync::watch;
use uuid::Uuid;

use super::writer::{AppendRequest, BatchState, BatchTx, Dialect, Plan, Writers, to_i64, to_u64};
use crate::error::EventStoreError;

/// How long a connection waits for another process's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Reader connections.
const READ_CONNECTIONS_MAX: u32 = 4;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS es_events (
    position       INTEGER PRIMARY KEY,
    stream_id      TEXT    NOT NULL,
    version        INTEGER NOT NULL,
    event_id       TEXT    NOT NULL UNIQUE,
    event_type     TEXT    NOT NULL,
    schema_version INTEGER NOT NULL,
    data           TEXT    NOT NULL,
    metadata       TEXT    NOT NULL,
    recorded_at    TEXT    NOT NULL,
    UNIQUE (stream_id, version)
);
CREATE TABLE IF NOT EXISTS es_streams (
    stream_id       TEXT PRIMARY KEY,
    version         INTEGER NOT NULL,
    max_count       INTEGER,
    truncate_before INTEGER,
    deleted         INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS es_snapshots (
    stream_id      TEXT PRIMARY KEY,
    version        INTEGER NOT NULL,
    schema_version INTEGER NOT NULL,
    state          TEXT    NOT NULL
);
"#;

/// An event store in a SQLite file. Cheap to clone; clones share the pool and the writer.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    writers: Writers,
}

impl SqliteStore {
    /// Opens (creating if needed) the store at a `sqlite://path` URL. Must be called inside a
    /// tokio runtime (it starts the writer task).
    ///
    /// # Errors
    /// A backend error when the file cannot be opened or the schema not created.
    pub async fn open(url: &str) -> Result<Self, EventStoreError> {
        let options = trellis_sqlite::connect_options(url)
            .map_err(sqlx::Error::from)?
            .busy_timeout(BUSY_TIMEOUT);
        let pool = trellis_sqlite::pool_options()
            .max_connections(READ_CONNECTIONS_MAX + 1)
            .connect_with(options)
            .await?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await?;
        let writers = Writers::start(&pool).await?;
        Ok(Self { pool, writers })
    }

    /// The connection pool, for read models kept in the same file.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

/// A batch inside `BEGIN IMMEDIATE`, which holds SQLite's single write lock, so the head read
/// at its start is still the head when it commits.
pub(crate) struct SqliteBatch {
    tx: Transaction<'static, Sqlite>,
    head: u64,
}

impl Dialect for SqlitePool {
    type Batch = SqliteBatch;
    /// One: the database has a single write lock, so a second writer would only wait for it.
    const WRITERS: usize = 1;
    const EVENTS_FROM: &'static str = "es_events e";
    const POSITION: &'static str = "e.position";

    async fn read_head(&self) -> Result<u64, sqlx::Error> {
        let head: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(position), 0) FROM es_events")
            .fetch_one(self)
            .await?;
        Ok(to_u64(head))
    }

    /// Nothing: SQLite has no notifications, so a subscription learns of another process's
    /// appends by polling (`SUBSCRIPTION_POLL`).
    fn spawn_waker(&self, _: Weak<watch::Sender<u64>>) {}

    async fn begin(&self) -> Result<SqliteBatch, sqlx::Error> {
        let tx = self.begin_with("BEGIN IMMEDIATE").await?;
        Ok(SqliteBatch { tx, head: 0 })
    }

    /// Never: the write lock is held from the batch's first read, so no one can race it.
    fn lost_race(_: &sqlx::Error) -> bool {
        false
    }
}

impl BatchTx for SqliteBatch {
    /// One statement: sqlx runs each SQLite connection on its own worker thread, so every
    /// statement costs two thread hops; the head, stored ids and versions come back together.
    async fn read_state(
        &mut self,
        ids: &[Uuid],
        streams: &[String],
    ) -> Result<BatchState, sqlx::Error> {
        let ids = json_text(&ids.iter().map(Uuid::to_string).collect::<Vec<_>>())?;
        let streams = json_text(&streams)?;
        let (head, stored, versions): (i64, String, String) = sqlx::query_as(
            "SELECT
                 (SELECT COALESCE(MAX(position), 0) FROM es_events),
                 (SELECT json_group_array(json_array(e.event_id, e.stream_id, e.version, e.position))
                    FROM json_each(?1) AS ids JOIN es_events e ON e.event_id = ids.value),
                 (SELECT json_group_array(json_array(s.stream_id, s.version))
                    FROM json_each(?2) AS wanted JOIN es_streams s ON s.stream_id = wanted.value)",
        )
        .bind(ids)
        .bind(streams)
        .fetch_one(&mut *self.tx)
        .await?;
        self.head = to_u64(head);
        BatchState::from_json(&stored, &versions)
    }

    /// All rows in one `INSERT … SELECT FROM json_each`, numbered from the head read under the
    /// lock, the versions in a second statement.
    async fn write(mut self, batch: &[AppendRequest], plan: &Plan) -> Result<u64, sqlx::Error> {
        let recorded_at = plan.recorded_at.to_rfc3339();
        let rows: Vec<serde_json::Value> = (plan.rows.iter().enumerate())
            .map(|(k, row)| {
                let (stream, event) = (
                    &batch[row.request].stream,
                    &batch[row.request].events[row.event],
                );
                Ok(serde_json::json!([
                    to_i64(self.head + k as u64 + 1),
                    stream.as_str(),
                    row.version,
                    event.id.to_string(),
                    event.event_type,
                    event.schema_version,
                    json_text(&event.data)?,
                    json_text(&event.metadata)?,
                    recorded_at,
                ]))
            })
            .collect::<Result<_, sqlx::Error>>()?;
        sqlx::query(
            "INSERT INTO es_events (position, stream_id, version, event_id, event_type, schema_version, data, metadata, recorded_at)
             SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6, value ->> 7, value ->> 8
             FROM json_each(?1) ORDER BY key",
        )
        .bind(json_text(&rows)?)
        .execute(&mut *self.tx)
        .await?;
        sqlx::query(
            "INSERT INTO es_streams (stream_id, version) SELECT value ->> 0, value ->> 1 FROM json_each(?1) WHERE true
             ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version, deleted = 0",
        )
        .bind(json_text(&plan.versions)?)
        .execute(&mut *self.tx)
        .await?;
        self.tx.commit().await?;
        Ok(self.head)
    }
}

fn json_text<T: serde::Serialize + ?Sized>(value: &T) -> Result<String, sqlx::Error> {
    serde_json::to_string(value).map_err(|e| sqlx::Error::Encode(Box::new(e)))
}

sql_event_store!(SqliteStore, SqlitePool, SqliteRow);
