//! The PostgreSQL saga log.
//!
//! Each append is one transaction: a conditional `UPDATE` of the instance row (which locks it
//! and checks the expected sequence) and the `INSERT` of the record.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::Row as _;
use sqlx::postgres::{PgPool, PgPoolOptions};
use uuid::Uuid;

use super::{
    LIST_ACTIVE_MAX, SagaId, SagaInstance, SagaRecord, SagaStore, decode_transition, instance,
    to_i64, to_u64,
};
use crate::error::SagaError;

/// Connections in the pool.
const CONNECTIONS_MAX: u32 = 8;
/// How long getting a connection from the pool may take.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS saga_instances (
    id          UUID        PRIMARY KEY,
    definition  TEXT        NOT NULL,
    version     BIGINT      NOT NULL,
    status      TEXT        NOT NULL,
    last_seq    BIGINT      NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS saga_instances_status ON saga_instances (status, id);
CREATE TABLE IF NOT EXISTS saga_log (
    saga_id     UUID        NOT NULL REFERENCES saga_instances (id),
    seq         BIGINT      NOT NULL,
    transition  JSONB       NOT NULL,
    context     JSONB       NOT NULL,
    at          TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (saga_id, seq)
);
"#;

/// A saga log in PostgreSQL. Cheap to clone; clones share the pool.
#[derive(Debug, Clone)]
pub struct PostgresSagaStore {
    pool: PgPool,
}

impl PostgresSagaStore {
    /// Connects to `url` and creates the tables if needed.
    ///
    /// # Errors
    /// A storage error when the server cannot be reached or the schema not created.
    pub async fn connect(url: &str) -> Result<Self, SagaError> {
        let pool = PgPoolOptions::new()
            .max_connections(CONNECTIONS_MAX)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect(url)
            .await?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await?;
        Ok(Self { pool })
    }
}

impl SagaStore for PostgresSagaStore {
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
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO saga_instances (id, definition, version, status, last_seq, created_at, updated_at)
             VALUES ($1, $2, $3, $4, 1, $5, $5) ON CONFLICT (id) DO NOTHING",
        )
        .bind(id.as_uuid())
        .bind(definition)
        .bind(i64::from(version))
        .bind(first.transition.status_after().as_str())
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
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE saga_instances SET status = $1, last_seq = $2, updated_at = $3 WHERE id = $4 AND last_seq = $5",
        )
        .bind(record.transition.status_after().as_str())
        .bind(to_i64(id, record.seq)?)
        .bind(record.at)
        .bind(id.as_uuid())
        .bind(previous)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() != 1 {
            let exists: Option<i64> =
                sqlx::query_scalar("SELECT last_seq FROM saga_instances WHERE id = $1")
                    .bind(id.as_uuid())
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
            sqlx::query("SELECT definition, version, status FROM saga_instances WHERE id = $1")
                .bind(id.as_uuid())
                .fetch_optional(&self.pool)
                .await?
        else {
            return Ok(None);
        };
        let definition: String = row.try_get("definition")?;
        let version: i64 = row.try_get("version")?;
        let status: String = row.try_get("status")?;
        let rows = sqlx::query(
            "SELECT seq, transition::text AS transition, context::text AS context, at
             FROM saga_log WHERE saga_id = $1 ORDER BY seq",
        )
        .bind(id.as_uuid())
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
        let ids: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM saga_instances WHERE status IN ('running', 'compensating') ORDER BY id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(ids.into_iter().map(SagaId::from_uuid).collect())
    }
}

async fn insert_record(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    id: SagaId,
    record: &SagaRecord,
) -> Result<(), SagaError> {
    sqlx::query(
        "INSERT INTO saga_log (saga_id, seq, transition, context, at) VALUES ($1, $2, $3::jsonb, $4::jsonb, $5)",
    )
    .bind(id.as_uuid())
    .bind(to_i64(id, record.seq)?)
    .bind(serde_json::to_string(&record.transition)?)
    .bind(serde_json::to_string(&record.context)?)
    .bind(record.at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
