//! The PostgreSQL saga log.
//!
//! Throughput comes from group commit, as in the SQLite store: creates and appends go to one
//! writer task per store, which takes every write queued while its previous transaction
//! committed (up to [`PG_GROUP_COMMIT_MAX`]) and runs them as one transaction of one statement
//! per kind whatever their number (a lone saga's append is one round trip): one that inserts the new instances and their first
//! records, one that applies every append (a conditional `UPDATE` of the instance rows, which
//! locks them, checks each expected sequence and lease owner and extends or ends each lease,
//! and the `INSERT` of the records whose update matched). Each caller is answered after the
//! commit. A record's context is NULL when it equals the last one stored (most transitions
//! change no context: a saga whose context never changes keeps it once). Should a group fail
//! (a deadlock with another process's group, a lost connection), each of its writes runs again
//! alone, so one bad write never fails its neighbours. Claims, renewals and reads go straight
//! to the pool. Lease expiry uses the server's clock (`now()`), so engines on hosts with skewed
//! clocks agree on it; claims take the row with `FOR UPDATE SKIP LOCKED`, so engines polling
//! together never wait on, or take, the same saga.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::Row as _;
use sqlx::postgres::{PgPool, PgPoolOptions};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::rows;
use super::{
    LIST_ACTIVE_MAX, Lease, PURGE_BATCH_MAX, SagaFilter, SagaId, SagaInstance, SagaRecord,
    SagaStore, SagaSummary,
};
use crate::error::SagaError;
use writer::{Queued, Write, write_loop};

mod writer;

/// Connections in the pool.
const CONNECTIONS_MAX: u32 = 8;
/// How long getting a connection from the pool may take.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
/// The most creates and appends one group-commit transaction holds.
pub const PG_GROUP_COMMIT_MAX: usize = 512;
/// Writes waiting for the writer task; callers wait for room beyond it.
const WRITES_QUEUED_MAX: usize = 4 * PG_GROUP_COMMIT_MAX;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS saga_instances (
    id          UUID        PRIMARY KEY,
    definition  TEXT        NOT NULL,
    version     BIGINT      NOT NULL,
    status      TEXT        NOT NULL,
    last_seq    BIGINT      NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL,
    lease_owner      TEXT,
    lease_expires_at TIMESTAMPTZ
);
ALTER TABLE saga_instances ADD COLUMN IF NOT EXISTS lease_owner TEXT;
ALTER TABLE saga_instances ADD COLUMN IF NOT EXISTS lease_expires_at TIMESTAMPTZ;
CREATE INDEX IF NOT EXISTS saga_instances_status ON saga_instances (status, id);
CREATE INDEX IF NOT EXISTS saga_instances_active ON saga_instances (id)
    WHERE status IN ('running', 'compensating');
CREATE TABLE IF NOT EXISTS saga_log (
    saga_id     UUID        NOT NULL REFERENCES saga_instances (id),
    seq         BIGINT      NOT NULL,
    transition  JSONB       NOT NULL,
    context     JSONB,
    at          TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (saga_id, seq)
);
-- Logs created before contexts were kept once: NULL now means "the previous record's".
DO $$ BEGIN
    IF EXISTS (SELECT 1 FROM information_schema.columns
               WHERE table_schema = current_schema() AND table_name = 'saga_log'
                 AND column_name = 'context' AND is_nullable = 'NO') THEN
        ALTER TABLE saga_log ALTER COLUMN context DROP NOT NULL;
    END IF;
END $$;
"#;

/// A saga log in PostgreSQL. Cheap to clone; clones share the pool and the writer task,
/// which stops when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct PostgresSagaStore {
    pool: PgPool,
    writes: mpsc::Sender<Queued>,
}

impl PostgresSagaStore {
    /// Connects to `url` and creates the tables if needed.
    ///
    /// # Errors
    /// A storage error when the server cannot be reached or the schema not created.
    pub async fn connect(url: &str) -> Result<Self, SagaError> {
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
        sqlx::raw_sql(SCHEMA).execute(&pool).await?;
        let (writes, queue) = mpsc::channel(WRITES_QUEUED_MAX);
        tokio::spawn(write_loop(pool.clone(), queue));
        Ok(Self { pool, writes })
    }

    async fn write(&self, write: Write) -> Result<(), SagaError> {
        let stopped = || SagaError::Unavailable("the PostgreSQL saga writer stopped".to_owned());
        let (answer, answered) = oneshot::channel();
        self.writes
            .send(Queued { write, answer })
            .await
            .map_err(|_| stopped())?;
        answered.await.map_err(|_| stopped())?
    }
}

impl SagaStore for PostgresSagaStore {
    async fn create(
        &self,
        id: SagaId,
        definition: &str,
        version: u32,
        first: &SagaRecord,
        lease: &Lease,
    ) -> Result<(), SagaError> {
        if first.seq != 1 {
            return Err(SagaError::Conflict { id, seq: first.seq });
        }
        self.write(Write::Create {
            id,
            definition: definition.to_owned(),
            version,
            first: first.clone(),
            lease: lease.clone(),
        })
        .await
    }

    async fn append(
        &self,
        id: SagaId,
        record: &SagaRecord,
        lease: &Lease,
    ) -> Result<(), SagaError> {
        self.write(Write::Append {
            id,
            record: record.clone(),
            lease: lease.clone(),
        })
        .await
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
        let log = sqlx::query(
            "SELECT seq, transition::text AS transition, context::text AS context, at
             FROM saga_log WHERE saga_id = $1 ORDER BY seq",
        )
        .bind(id.as_uuid())
        .fetch_all(&self.pool)
        .await?;
        rows::instance(id, &row, &log).map(Some)
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

    async fn claim_next(
        &self,
        lease: &Lease,
        after: Option<SagaId>,
    ) -> Result<Option<SagaId>, SagaError> {
        let after = after.map_or(Uuid::nil(), |id| id.as_uuid());
        let claimed: Option<Uuid> = sqlx::query_scalar(
            "UPDATE saga_instances
             SET lease_owner = $1, lease_expires_at = now() + $2::bigint * interval '1 millisecond'
             WHERE id = (
                 SELECT id FROM saga_instances
                 WHERE status IN ('running', 'compensating') AND id > $3
                   AND (lease_owner IS NULL OR lease_owner = $1 OR lease_expires_at <= now())
                 ORDER BY id
                 LIMIT 1
                 FOR UPDATE SKIP LOCKED)
             RETURNING id",
        )
        .bind(lease.owner())
        .bind(lease.duration_ms())
        .bind(after)
        .fetch_optional(&self.pool)
        .await?;
        Ok(claimed.map(SagaId::from_uuid))
    }

    async fn claim(&self, id: SagaId, lease: &Lease) -> Result<(), SagaError> {
        let claimed = sqlx::query(
            "UPDATE saga_instances
             SET lease_owner = $1, lease_expires_at = now() + $2::bigint * interval '1 millisecond'
             WHERE id = $3
               AND (lease_owner IS NULL OR lease_owner = $1 OR lease_expires_at <= now())",
        )
        .bind(lease.owner())
        .bind(lease.duration_ms())
        .bind(id.as_uuid())
        .execute(&self.pool)
        .await?;
        if claimed.rows_affected() == 1 {
            return Ok(());
        }
        let owner: Option<Option<String>> =
            sqlx::query_scalar("SELECT lease_owner FROM saga_instances WHERE id = $1")
                .bind(id.as_uuid())
                .fetch_optional(&self.pool)
                .await?;
        Err(match owner {
            None => SagaError::NotFound(id),
            Some(owner) => SagaError::Leased {
                id,
                owner: owner.unwrap_or_default(),
            },
        })
    }

    async fn renew(&self, id: SagaId, lease: &Lease) -> Result<bool, SagaError> {
        let renewed = sqlx::query(
            "UPDATE saga_instances
             SET lease_expires_at = now() + $1::bigint * interval '1 millisecond'
             WHERE id = $2 AND lease_owner = $3",
        )
        .bind(lease.duration_ms())
        .bind(id.as_uuid())
        .bind(lease.owner())
        .execute(&self.pool)
        .await?;
        Ok(renewed.rows_affected() == 1)
    }

    async fn release(&self, id: SagaId, owner: &str) -> Result<(), SagaError> {
        sqlx::query(
            "UPDATE saga_instances SET lease_owner = NULL, lease_expires_at = NULL
             WHERE id = $1 AND lease_owner = $2",
        )
        .bind(id.as_uuid())
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn list(&self, filter: &SagaFilter) -> Result<Vec<SagaSummary>, SagaError> {
        let statuses: Option<Vec<String>> = (!filter.statuses.is_empty()).then(|| {
            filter
                .statuses
                .iter()
                .map(|status| status.as_str().to_owned())
                .collect()
        });
        let limit = i64::try_from(filter.limit_or_max()).unwrap_or(i64::MAX);
        let rows = sqlx::query(
            "SELECT id, definition, version, status, last_seq, created_at, updated_at, lease_owner
             FROM saga_instances
             WHERE ($1::text[] IS NULL OR status = ANY($1))
               AND ($2::text IS NULL OR definition = $2)
               AND ($3::timestamptz IS NULL OR created_at < $3)
               AND ($4::timestamptz IS NULL OR created_at >= $4)
             ORDER BY id
             LIMIT $5",
        )
        .bind(statuses)
        .bind(filter.definition.as_deref())
        .bind(filter.created_before)
        .bind(filter.created_after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| rows::summary(SagaId::from_uuid(row.try_get("id")?), row))
            .collect()
    }

    async fn purge(&self, before: DateTime<Utc>) -> Result<u64, SagaError> {
        let mut tx = self.pool.begin().await?;
        let ids: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM saga_instances
             WHERE status IN ('completed', 'failed') AND updated_at < $1
             ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .bind(before)
        .bind(i64::try_from(PURGE_BATCH_MAX).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM saga_log WHERE saga_id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM saga_instances WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(ids.len() as u64)
    }
}
