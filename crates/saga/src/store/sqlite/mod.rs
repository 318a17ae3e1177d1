//! The SQLite saga log.
//!
//! Durability: WAL journal with `synchronous = FULL`, so a transition acknowledged by
//! [`SagaStore::append`] survives a power loss before the engine acts on it.
//!
//! Throughput comes from group commit, not weaker durability: every write (create, append,
//! claim, renew, release, purge) goes to one writer task per store, which runs the writes
//! queued while the previous transaction committed (up to [`GROUP_COMMIT_MAX`]) in one
//! `BEGIN IMMEDIATE` transaction and answers each caller after the commit. Inside the group,
//! creates and appends run as three bulk statements whatever their number (see
//! `commit_group`), so the writer's cost per transition stays small. Should a statement
//! fail inside a group, the group is rolled back and each write is run again in its own
//! transaction, so one bad write never fails its neighbours. `BEGIN IMMEDIATE` takes SQLite's
//! write lock, so several processes may share one file (taking turns, with a busy timeout).
//! Reads use a separate pool of connections and see every acknowledged write.
//!
//! Size: a record's `context` is stored as `''` (never valid JSON) when it equals the last
//! context stored for the saga, and read back as that one; most transitions change no context.
//!
//! Lease expiry uses this host's wall clock (milliseconds since the epoch): processes sharing
//! a SQLite file share a host.

mod writer;

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{SqliteConnection, SqlitePool};
use sqlx::{Connection as _, Row as _};
use tokio::sync::{mpsc, oneshot};

use super::rows;
use super::{
    LIST_ACTIVE_MAX, Lease, SagaFilter, SagaId, SagaInstance, SagaRecord, SagaStore, SagaSummary,
};
use crate::error::SagaError;
use writer::{Answer, Queued, Write, unexpected, write_loop};

/// How long a connection waits for another process's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Reading connections in the pool.
const READERS_MAX: u32 = 4;
/// The most writes one group-commit transaction holds.
pub const GROUP_COMMIT_MAX: usize = 512;
/// Writes waiting for the writer task; callers wait for room beyond it.
const WRITES_QUEUED_MAX: usize = 4 * GROUP_COMMIT_MAX;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS saga_instances (
    id          TEXT    PRIMARY KEY,
    definition  TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    status      TEXT    NOT NULL,
    last_seq    INTEGER NOT NULL,
    created_at  TEXT    NOT NULL,
    updated_at  TEXT    NOT NULL,
    lease_owner      TEXT,
    lease_expires_ms INTEGER
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

/// A saga log in a SQLite file. Cheap to clone; clones share the pool and the writer task,
/// which stops when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct SqliteSagaStore {
    readers: SqlitePool,
    writes: mpsc::Sender<Queued>,
}

impl SqliteSagaStore {
    /// Opens (creating if needed) the log at a `sqlite://path` URL, creates its tables and
    /// starts its writer task on the current tokio runtime.
    ///
    /// # Errors
    /// A storage error when the file cannot be opened or the schema not created.
    pub async fn open(url: &str) -> Result<Self, SagaError> {
        let options = trellis_sqlite::connect_options(url)
            .map_err(sqlx::Error::from)?
            .busy_timeout(BUSY_TIMEOUT);
        let mut writer = SqliteConnection::connect_with(&options).await?;
        sqlx::raw_sql(SCHEMA).execute(&mut writer).await?;
        let readers = trellis_sqlite::pool_options()
            .max_connections(READERS_MAX)
            .connect_with(options)
            .await?;
        let (writes, queue) = mpsc::channel(WRITES_QUEUED_MAX);
        tokio::spawn(write_loop(writer, queue));
        Ok(Self { readers, writes })
    }

    async fn write(&self, write: Write) -> Result<Answer, SagaError> {
        let (answer, answered) = oneshot::channel();
        self.writes
            .send(Queued { write, answer })
            .await
            .map_err(|_| SagaError::Unavailable("the SQLite saga writer stopped".to_owned()))?;
        answered
            .await
            .map_err(|_| SagaError::Unavailable("the SQLite saga writer stopped".to_owned()))?
    }
}

fn parse_id(text: &str) -> Result<SagaId, SagaError> {
    uuid::Uuid::parse_str(text)
        .map(SagaId::from_uuid)
        .map_err(|error| SagaError::Storage(sqlx::Error::Decode(Box::new(error))))
}

impl SagaStore for SqliteSagaStore {
    async fn create(
        &self,
        id: SagaId,
        definition: &str,
        version: u32,
        first: &SagaRecord,
        lease: &Lease,
    ) -> Result<(), SagaError> {
        self.write(Write::Create {
            id,
            definition: definition.to_owned(),
            version,
            first: first.clone(),
            lease: lease.clone(),
        })
        .await
        .map(drop)
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
        .map(drop)
    }

    async fn load(&self, id: SagaId) -> Result<Option<SagaInstance>, SagaError> {
        // One read transaction, so the row and the log are the same snapshot.
        let mut tx = self.readers.begin().await?;
        let Some(row) =
            sqlx::query("SELECT definition, version, status FROM saga_instances WHERE id = ?")
                .bind(id.to_string())
                .fetch_optional(&mut *tx)
                .await?
        else {
            return Ok(None);
        };
        let log = sqlx::query(
            "SELECT seq, transition, context, at FROM saga_log WHERE saga_id = ? ORDER BY seq",
        )
        .bind(id.to_string())
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        rows::instance(id, &row, &log).map(Some)
    }

    async fn list_active(&self, limit: usize) -> Result<Vec<SagaId>, SagaError> {
        let limit = i64::try_from(limit.min(LIST_ACTIVE_MAX)).unwrap_or(i64::MAX);
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM saga_instances WHERE status IN ('running', 'compensating') ORDER BY id LIMIT ?",
        )
        .bind(limit)
        .fetch_all(&self.readers)
        .await?;
        ids.iter().map(|text| parse_id(text)).collect()
    }

    async fn claim_next(
        &self,
        lease: &Lease,
        after: Option<SagaId>,
    ) -> Result<Option<SagaId>, SagaError> {
        match self
            .write(Write::ClaimNext {
                lease: lease.clone(),
                after,
            })
            .await?
        {
            Answer::Claimed(id) => Ok(id),
            other => Err(unexpected(&other)),
        }
    }

    async fn claim(&self, id: SagaId, lease: &Lease) -> Result<(), SagaError> {
        self.write(Write::Claim {
            id,
            lease: lease.clone(),
        })
        .await
        .map(drop)
    }

    async fn renew(&self, id: SagaId, lease: &Lease) -> Result<bool, SagaError> {
        match self
            .write(Write::Renew {
                id,
                lease: lease.clone(),
            })
            .await?
        {
            Answer::Renewed(renewed) => Ok(renewed),
            other => Err(unexpected(&other)),
        }
    }

    async fn release(&self, id: SagaId, owner: &str) -> Result<(), SagaError> {
        self.write(Write::Release {
            id,
            owner: owner.to_owned(),
        })
        .await
        .map(drop)
    }

    async fn list(&self, filter: &SagaFilter) -> Result<Vec<SagaSummary>, SagaError> {
        // A fixed statement with optional conditions; the statuses travel as a JSON array.
        let statuses = (!filter.statuses.is_empty()).then(|| {
            serde_json::to_string(
                &filter
                    .statuses
                    .iter()
                    .map(|status| status.as_str())
                    .collect::<Vec<_>>(),
            )
            .expect("a list of strings serializes")
        });
        let limit = i64::try_from(filter.limit_or_max()).unwrap_or(i64::MAX);
        let rows = sqlx::query(
            "SELECT id, definition, version, status, last_seq, created_at, updated_at, lease_owner
             FROM saga_instances
             WHERE (?1 IS NULL OR status IN (SELECT value FROM json_each(?1)))
               AND (?2 IS NULL OR definition = ?2)
               AND (?3 IS NULL OR created_at < ?3)
               AND (?4 IS NULL OR created_at >= ?4)
             ORDER BY id
             LIMIT ?5",
        )
        .bind(statuses)
        .bind(filter.definition.as_deref())
        .bind(filter.created_before)
        .bind(filter.created_after)
        .bind(limit)
        .fetch_all(&self.readers)
        .await?;
        rows.iter()
            .map(|row| rows::summary(parse_id(&row.try_get::<String, _>("id")?)?, row))
            .collect()
    }

    async fn purge(&self, before: DateTime<Utc>) -> Result<u64, SagaError> {
        match self.write(Write::Purge { before }).await? {
            Answer::Purged(count) => Ok(count),
            other => Err(unexpected(&other)),
        }
    }
}
