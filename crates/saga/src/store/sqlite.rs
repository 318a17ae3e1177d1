//! The SQLite saga log.
//!
//! Durability: WAL journal with `synchronous = FULL`, so a transition acknowledged by
//! [`SagaStore::append`] survives a power loss before the engine acts on it. Every append runs
//! in a `BEGIN IMMEDIATE` transaction (SQLite's write lock), so several processes may share
//! one file.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::Row as _;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use super::{
    LIST_ACTIVE_MAX, SagaId, SagaInstance, SagaRecord, SagaStore, decode_transition, instance,
    to_i64, to_u64,
};
use crate::error::SagaError;

/// How long a connection waits for another process's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections in the pool.
const CONNECTIONS_MAX: u32 = 4;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS saga_instances (
    id          TEXT    PRIMARY KEY,
    definition  TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    status      TEXT    NOT NULL,
    last_seq    INTEGER NOT NULL,
    created_at  TEXT    NOT NULL,
    updated_at  TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS saga_instances_status ON saga_instances (status, id);
CREATE TABLE IF NOT EXISTS saga_log (
    saga_id     TEXT    NOT NULL REFERENCES saga_instances (id),
    seq         INTEGER NOT NULL,
    transition  TEXT    NOT NULL,
    context     TEXT    NOT NULL,
    at          TEXT    NOT NULL,
    PRIMARY KEY (saga_id, seq)
);
"#;

/// A saga log in a SQLite file. Cheap to clone; clones share the pool.
#[derive(Debug, Clone)]
pub struct SqliteSagaStore {
    pool: SqlitePool,
}

impl SqliteSagaStore {
    /// Opens (creating if needed) the log at a `sqlite://path` URL and creates its tables.
    ///
    /// # Errors
    /// A storage error when the file cannot be opened or the schema not created.
    pub async fn open(url: &str) -> Result<Self, SagaError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(CONNECTIONS_MAX)
            .connect_with(options)
            .await?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await?;
        Ok(Self { pool })
    }
}

impl SagaStore for SqliteSagaStore {
    async fn create(
        &self,
        id: SagaId,
        definition: &str,
        version: u32,
        first: &SagaRecord,
    ) -> Result<(), SagaError> {
        if first.seq != 1 {
            return Err(SagaError::Conflict { id, seq: first.seq });
        }
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let inserted = sqlx::query(
            "INSERT INTO saga_instances (id, definition, version, status, last_seq, created_at, updated_at)
             VALUES (?, ?, ?, ?, 1, ?, ?) ON CONFLICT (id) DO NOTHING",
        )
        .bind(id.to_string())
        .bind(definition)
        .bind(i64::from(version))
        .bind(first.transition.status_after().as_str())
        .bind(first.at)
        .bind(first.at)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() != 1 {
            return Err(SagaError::Conflict { id, seq: 1 });
        }
        insert_record(&mut tx, id, first).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn append(&self, id: SagaId, record: &SagaRecord) -> Result<(), SagaError> {
        let previous = to_i64(id, record.seq.saturating_sub(1))?;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let updated = sqlx::query(
            "UPDATE saga_instances SET status = ?, last_seq = ?, updated_at = ? WHERE id = ? AND last_seq = ?",
        )
        .bind(record.transition.status_after().as_str())
        .bind(to_i64(id, record.seq)?)
        .bind(record.at)
        .bind(id.to_string())
        .bind(previous)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() != 1 {
            let exists: Option<i64> =
                sqlx::query_scalar("SELECT last_seq FROM saga_instances WHERE id = ?")
                    .bind(id.to_string())
                    .fetch_optional(&mut *tx)
                    .await?;
            return Err(match exists {
                None => SagaError::NotFound(id),
                Some(_) => SagaError::Conflict {
                    id,
                    seq: record.seq,
                },
            });
        }
        insert_record(&mut tx, id, record).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn load(&self, id: SagaId) -> Result<Option<SagaInstance>, SagaError> {
        let Some(row) =
            sqlx::query("SELECT definition, version, status FROM saga_instances WHERE id = ?")
                .bind(id.to_string())
                .fetch_optional(&self.pool)
                .await?
        else {
            return Ok(None);
        };
        let definition: String = row.try_get("definition")?;
        let version: i64 = row.try_get("version")?;
        let status: String = row.try_get("status")?;
        let rows = sqlx::query(
            "SELECT seq, transition, context, at FROM saga_log WHERE saga_id = ? ORDER BY seq",
        )
        .bind(id.to_string())
        .fetch_all(&self.pool)
        .await?;
        let mut records = Vec::with_capacity(rows.len());
        for row in rows {
            let seq: i64 = row.try_get("seq")?;
            let transition: String = row.try_get("transition")?;
            let context: String = row.try_get("context")?;
            let at: DateTime<Utc> = row.try_get("at")?;
            records.push(SagaRecord {
                seq: to_u64(id, seq)?,
                transition: decode_transition(id, &transition)?,
                context: serde_json::from_str(&context).map_err(|error| SagaError::CorruptLog {
                    id,
                    reason: format!("unreadable context: {error}"),
                })?,
                at,
            });
        }
        instance(id, definition, version, &status, records).map(Some)
    }

    async fn list_active(&self, limit: usize) -> Result<Vec<SagaId>, SagaError> {
        let limit = i64::try_from(limit.min(LIST_ACTIVE_MAX)).unwrap_or(i64::MAX);
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM saga_instances WHERE status IN ('running', 'compensating') ORDER BY id LIMIT ?",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        ids.iter()
            .map(|text| {
                uuid::Uuid::parse_str(text)
                    .map(SagaId::from_uuid)
                    .map_err(|error| SagaError::Storage(sqlx::Error::Decode(Box::new(error))))
            })
            .collect()
    }
}

async fn insert_record(
    tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    id: SagaId,
    record: &SagaRecord,
) -> Result<(), SagaError> {
    sqlx::query(
        "INSERT INTO saga_log (saga_id, seq, transition, context, at) VALUES (?, ?, ?, ?, ?)",
    )
    .bind(id.to_string())
    .bind(to_i64(id, record.seq)?)
    .bind(serde_json::to_string(&record.transition)?)
    .bind(serde_json::to_string(&record.context)?)
    .bind(record.at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
