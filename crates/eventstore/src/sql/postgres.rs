//! The PostgreSQL backend: the scale-out engine.
//!
//! # Why `read_all` never skips an event
//! A `BIGSERIAL` position is assigned when a row is inserted, not when its transaction
//! commits, so two concurrent appends can commit in the opposite order of their positions, and
//! a reader that saw position 11 could miss position 10 committing a moment later. This
//! backend assigns positions under a lock instead. An append is one statement (so one
//! implicit transaction): it writes its events (`es_events`, keyed by event id, with
//! `UNIQUE (stream_id, version)` catching a concurrent append to the same stream) and the
//! streams' versions, then calls `es_number`, which takes a transaction-scoped advisory lock,
//! numbers the events in the log table (`es_log`: position → event id) from `MAX(position)`,
//! and notifies; the statement then commits. PostgreSQL releases transaction-scoped locks only
//! after the commit is visible to other sessions, so the next append cannot number anything
//! until every lower position is visible, and the visible positions always form a gap-free
//! prefix of the log.
//!
//! Only the numbering and the commit are serialized; writing the events themselves (parsing
//! the JSON, updating the indexes) runs in parallel, in several writer tasks per store and in
//! several processes. Each writer decides a batch on a read of the committed state (one
//! query), then writes it with that one statement, so an append costs two round trips. Each
//! writer also groups the appends waiting in its queue into one batch. An append that loses a
//! race on a stream version or an event id (a unique violation) is decided again on fresh
//! state, so it gets the right answer: a version conflict, or the earlier append's result for
//! a retried event id.
//!
//! Appends `NOTIFY` the new head on the `trellis_es_head` channel, so subscriptions in every
//! process wake up at once instead of polling.

use std::sync::Weak;
use std::time::Duration;

use sqlx::Postgres;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions, PgRow};
use tokio::sync::watch;
use uuid::Uuid;

use super::raise;
use super::writer::{
    AppendRequest, BatchState, BatchTx, Dialect, Plan, PlannedRow, Writers, to_u64,
};
use crate::error::EventStoreError;

/// The advisory lock key appends hold (ASCII "trellis" as a number).
const APPEND_LOCK_KEY: i64 = 0x0074_7265_6c6c_6973;
/// The advisory lock key schema creation holds.
const SCHEMA_LOCK_KEY: i64 = APPEND_LOCK_KEY + 1;
/// The channel appends notify.
const HEAD_CHANNEL: &str = "trellis_es_head";
/// Connections in the pool.
const CONNECTIONS_MAX: u32 = 8;
/// How long to wait for a connection.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the notification listener checks whether its store is gone.
const LISTENER_IDLE_CHECK: Duration = Duration::from_secs(5);

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS es_events (
    event_id       UUID        PRIMARY KEY,
    stream_id      TEXT        NOT NULL,
    version        BIGINT      NOT NULL,
    event_type     TEXT        NOT NULL,
    schema_version INTEGER     NOT NULL,
    data           JSONB       NOT NULL,
    metadata       JSONB       NOT NULL,
    recorded_at    TIMESTAMPTZ NOT NULL,
    UNIQUE (stream_id, version)
);
CREATE TABLE IF NOT EXISTS es_log (
    position BIGINT PRIMARY KEY,
    event_id UUID   NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS es_streams (
    stream_id       TEXT    PRIMARY KEY,
    version         BIGINT  NOT NULL,
    max_count       BIGINT,
    truncate_before BIGINT,
    deleted         BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE TABLE IF NOT EXISTS es_snapshots (
    stream_id      TEXT    PRIMARY KEY,
    version        BIGINT  NOT NULL,
    schema_version INTEGER NOT NULL,
    state          JSONB   NOT NULL
);
-- The serialized part of an append, in one round trip: take the lock, number the events
-- after the newest committed position, tell subscribers. Each statement of a VOLATILE
-- PL/pgSQL function takes a fresh snapshot, so MAX(position) sees every commit made before
-- the lock was granted. `written` only orders the call after the caller's inserts. Returns the
-- head before numbering.
CREATE OR REPLACE FUNCTION es_number(ids UUID[], channel TEXT, lock_key BIGINT, written BIGINT) RETURNS BIGINT
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    head BIGINT;
BEGIN
    PERFORM pg_advisory_xact_lock(lock_key);
    SELECT COALESCE(MAX(position), 0) INTO head FROM es_log;
    INSERT INTO es_log (position, event_id)
        SELECT head + x.ord, x.id FROM UNNEST(ids) WITH ORDINALITY AS x(id, ord);
    PERFORM pg_notify(channel, (head + COALESCE(array_length(ids, 1), 0))::text);
    RETURN head;
END
$$;
"#;

/// An event store in PostgreSQL. Cheap to clone; clones share the pool and the writer.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    writers: Writers,
}

impl PostgresStore {
    /// Connects to a `postgres://` URL and creates the schema if needed. Must be called inside
    /// a tokio runtime (it starts the writer and the notification listener).
    ///
    /// # Errors
    /// A backend error when the server cannot be reached or the schema not created.
    pub async fn open(url: &str) -> Result<Self, EventStoreError> {
        let pool = PgPoolOptions::new()
            // `TRELLIS_PG_POOL_MAX` caps it, as it caps trellis-service's pools.
            .max_connections(
                std::env::var("TRELLIS_PG_POOL_MAX")
                    .ok()
                    .and_then(|v| v.trim().parse::<u32>().ok())
                    .filter(|&cap| cap > 0)
                    .map_or(CONNECTIONS_MAX, |cap| cap.min(CONNECTIONS_MAX)),
            )
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect(url)
            .await?;
        Self::with_pool(pool).await
    }

    /// Uses an existing pool (read models may share it) and creates the schema if needed.
    ///
    /// # Errors
    /// A backend error when the schema cannot be created.
    pub async fn with_pool(pool: PgPool) -> Result<Self, EventStoreError> {
        {
            let mut connection = pool.acquire().await?;
            sqlx::query("SELECT pg_advisory_lock($1)")
                .bind(SCHEMA_LOCK_KEY)
                .execute(&mut *connection)
                .await?;
            let created = sqlx::raw_sql(SCHEMA).execute(&mut *connection).await;
            sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(SCHEMA_LOCK_KEY)
                .execute(&mut *connection)
                .await?;
            created?;
        }
        let writers = Writers::start(&pool).await?;
        Ok(Self { pool, writers })
    }

    /// The connection pool, for read models kept in the same database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// Listens for other processes' appends; ends when the store is dropped.
fn spawn_listener(pool: PgPool, head: Weak<watch::Sender<u64>>) {
    tokio::spawn(async move {
        let Ok(mut listener) = PgListener::connect_with(&pool).await else {
            tracing::warn!(
                "event store: cannot listen for appends; subscriptions fall back to polling"
            );
            return;
        };
        if listener.listen(HEAD_CHANNEL).await.is_err() {
            return;
        }
        loop {
            match tokio::time::timeout(LISTENER_IDLE_CHECK, listener.try_recv()).await {
                Ok(Ok(Some(notification))) => {
                    let Some(head) = head.upgrade() else { return };
                    if let Ok(position) = notification.payload().parse::<u64>() {
                        raise(&head, position);
                    }
                }
                // Connection lost: PgListener reconnects on the next call.
                Ok(Ok(None)) => {}
                Ok(Err(error)) => {
                    tracing::warn!(%error, "event store notification listener failed");
                    tokio::time::sleep(LISTENER_IDLE_CHECK).await;
                }
                Err(_) => {}
            }
            if head.strong_count() == 0 {
                return;
            }
        }
    });
}

/// A batch on one pooled connection. Its read runs outside any transaction (a plain
/// snapshot of committed state); its write is one statement, so one implicit transaction.
pub(crate) struct PgBatch {
    connection: PoolConnection<Postgres>,
}

impl Dialect for PgPool {
    type Batch = PgBatch;
    /// Several: they write events in parallel and take turns only to number them.
    const WRITERS: usize = 2;
    const EVENTS_FROM: &'static str = "es_events e JOIN es_log l ON l.event_id = e.event_id";
    const POSITION: &'static str = "l.position";

    async fn read_head(&self) -> Result<u64, sqlx::Error> {
        let head: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(position), 0) FROM es_log")
            .fetch_one(self)
            .await?;
        Ok(to_u64(head))
    }

    /// `LISTEN` on the channel `es_number` notifies, so subscriptions in every process wake
    /// at once instead of polling.
    fn spawn_waker(&self, head: Weak<watch::Sender<u64>>) {
        spawn_listener(self.clone(), head);
    }

    async fn begin(&self) -> Result<PgBatch, sqlx::Error> {
        let connection = self.acquire().await?;
        Ok(PgBatch { connection })
    }

    /// A unique violation (a stream version or event id taken concurrently) or a deadlock.
    fn lost_race(error: &sqlx::Error) -> bool {
        matches!(error, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("23505" | "40P01")))
    }
}

impl BatchTx for PgBatch {
    /// Which ids are stored (with stream, version and position) and the streams' versions, in
    /// one round trip. Joins against the unnested arrays keep the plans index lookups; a
    /// generic plan for `= ANY($1)` can turn into a scan of the whole table as it grows.
    async fn read_state(
        &mut self,
        ids: &[Uuid],
        streams: &[String],
    ) -> Result<BatchState, sqlx::Error> {
        let (stored, versions): (String, String) = sqlx::query_as(
            "SELECT
                 (SELECT COALESCE(json_agg(json_build_array(e.event_id, e.stream_id, e.version, l.position)), '[]')
                    FROM UNNEST($1::uuid[]) AS ids(id)
                    JOIN es_events e ON e.event_id = ids.id
                    JOIN es_log l ON l.event_id = e.event_id)::text,
                 (SELECT COALESCE(json_agg(json_build_array(s.stream_id, s.version)), '[]')
                    FROM UNNEST($2::text[]) AS wanted(id) JOIN es_streams s ON s.stream_id = wanted.id)::text",
        )
        .bind(ids)
        .bind(streams)
        .fetch_one(&mut *self.connection)
        .await?;
        BatchState::from_json(&stored, &versions)
    }

    /// Writes the events and the streams' new versions in one statement. Rows go in sorted by
    /// (stream, version) so concurrent writers take index locks in the same order.
    async fn write(mut self, batch: &[AppendRequest], plan: &Plan) -> Result<u64, sqlx::Error> {
        // Numbered in plan order, so each append's positions follow from the head before.
        let numbered: Vec<Uuid> = (plan.rows.iter())
            .map(|row| batch[row.request].events[row.event].id)
            .collect();
        let mut order: Vec<&PlannedRow> = plan.rows.iter().collect();
        order.sort_by_key(|row| (batch[row.request].stream.as_str(), row.version));
        let rows = plan.rows.len();
        let mut streams = Vec::with_capacity(rows);
        let mut row_versions = Vec::with_capacity(rows);
        let mut ids = Vec::with_capacity(rows);
        let mut types = Vec::with_capacity(rows);
        let mut schema_versions = Vec::with_capacity(rows);
        let mut data = Vec::with_capacity(rows);
        let mut metadata = Vec::with_capacity(rows);
        for row in order {
            let (stream, event) = (
                &batch[row.request].stream,
                &batch[row.request].events[row.event],
            );
            streams.push(stream.as_str());
            row_versions.push(row.version);
            ids.push(event.id);
            types.push(event.event_type.as_str());
            schema_versions.push(i32::try_from(event.schema_version).unwrap_or(i32::MAX));
            data.push(json_text(&event.data)?);
            metadata.push(json_text(&event.metadata)?);
        }
        let (touched, touched_versions): (Vec<&str>, Vec<i64>) =
            plan.versions.iter().map(|(s, v)| (s.as_str(), *v)).unzip();
        // One statement, so one implicit transaction and one round trip: the events and stream
        // versions are written first (es_number's last argument consumes both CTEs, so they run
        // to completion before it is called), then es_number takes the lock and numbers them,
        // and the statement's commit releases the lock.
        let before: i64 = sqlx::query_scalar(
            "WITH inserted AS (
                 INSERT INTO es_events (event_id, stream_id, version, event_type, schema_version, data, metadata, recorded_at)
                 SELECT i, s, v, t, sv, d::jsonb, m::jsonb, $8
                 FROM UNNEST($1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::int4[], $6::text[], $7::text[])
                      AS x(i, s, v, t, sv, d, m)
                 RETURNING 1
             ), touched AS (
                 INSERT INTO es_streams (stream_id, version)
                 SELECT s, v FROM UNNEST($9::text[], $10::bigint[]) AS y(s, v)
                 ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version, deleted = FALSE
                 RETURNING 1
             )
             SELECT es_number($11, $12, $13, (SELECT count(*) FROM inserted) + (SELECT count(*) FROM touched))",
        )
        .bind(ids)
        .bind(streams)
        .bind(row_versions)
        .bind(types)
        .bind(schema_versions)
        .bind(data)
        .bind(metadata)
        .bind(plan.recorded_at)
        .bind(touched)
        .bind(touched_versions)
        .bind(&numbered)
        .bind(HEAD_CHANNEL)
        .bind(APPEND_LOCK_KEY)
        .fetch_one(&mut *self.connection)
        .await?;
        Ok(to_u64(before))
    }
}

fn json_text<T: serde::Serialize>(value: &T) -> Result<String, sqlx::Error> {
    serde_json::to_string(value).map_err(|e| sqlx::Error::Encode(Box::new(e)))
}

sql_event_store!(PostgresStore, PgPool, PgRow);
