//! The SQLite saga log.
//!
//! Durability: WAL journal with `synchronous = FULL`, so a transition acknowledged by
//! [`SagaStore::append`] survives a power loss before the engine acts on it.
//!
//! Throughput comes from group commit, not weaker durability: every write (create, append,
//! claim, renew, release, purge) goes to one writer task per store, which runs the writes
//! queued while the previous transaction committed (up to [`GROUP_COMMIT_MAX`]) in one
//! `BEGIN IMMEDIATE` transaction and answers each caller after the commit. Should a statement
//! fail inside a group, the group is rolled back and each write is run again in its own
//! transaction, so one bad write never fails its neighbours. `BEGIN IMMEDIATE` takes SQLite's
//! write lock, so several processes may share one file (taking turns, with a busy timeout).
//! Reads use a separate pool of connections and see every acknowledged write.
//!
//! Lease expiry uses this host's wall clock (milliseconds since the epoch): processes sharing
//! a SQLite file share a host.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{Connection as _, Row as _, SqliteExecutor};
use tokio::sync::{mpsc, oneshot};

use super::{
    LIST_ACTIVE_MAX, Lease, PURGE_BATCH_MAX, SagaFilter, SagaId, SagaInstance, SagaRecord,
    SagaStore, SagaSummary, decode_transition, instance, summary, to_i64, to_u64,
};
use crate::error::SagaError;

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
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let mut writer = SqliteConnection::connect_with(&options).await?;
        sqlx::raw_sql(SCHEMA).execute(&mut writer).await?;
        let readers = SqlitePoolOptions::new()
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

/// One write for the writer task, with everything it needs owned.
#[derive(Debug)]
enum Write {
    Create {
        id: SagaId,
        definition: String,
        version: u32,
        first: SagaRecord,
        lease: Lease,
    },
    Append {
        id: SagaId,
        record: SagaRecord,
        lease: Lease,
    },
    ClaimNext {
        lease: Lease,
        after: Option<SagaId>,
    },
    Claim {
        id: SagaId,
        lease: Lease,
    },
    Renew {
        id: SagaId,
        lease: Lease,
    },
    Release {
        id: SagaId,
        owner: String,
    },
    Purge {
        before: DateTime<Utc>,
    },
}

/// What a write answers.
#[derive(Debug)]
enum Answer {
    Done,
    Claimed(Option<SagaId>),
    Renewed(bool),
    Purged(u64),
}

#[derive(Debug)]
struct Queued {
    write: Write,
    answer: oneshot::Sender<Result<Answer, SagaError>>,
}

/// The writer task: one transaction per group of queued writes.
async fn write_loop(mut connection: SqliteConnection, mut queue: mpsc::Receiver<Queued>) {
    let mut group = Vec::with_capacity(GROUP_COMMIT_MAX);
    while queue.recv_many(&mut group, GROUP_COMMIT_MAX).await > 0 {
        match commit_group(&mut connection, &group).await {
            Ok(answers) => {
                for (queued, answer) in group.drain(..).zip(answers) {
                    let _ = queued.answer.send(answer);
                }
            }
            Err(_) => {
                // Something failed below the level of a single write's outcome: run each
                // write alone so each caller gets its own answer.
                for queued in group.drain(..) {
                    let answer = commit_one(&mut connection, &queued.write).await;
                    let _ = queued.answer.send(answer);
                }
            }
        }
    }
}

/// Runs `group` in one transaction. `Err` when any statement failed (the transaction is rolled
/// back); otherwise each write's own outcome, which may be a refusal such as a conflict.
async fn commit_group(
    connection: &mut SqliteConnection,
    group: &[Queued],
) -> Result<Vec<Result<Answer, SagaError>>, SagaError> {
    let mut tx = connection.begin_with("BEGIN IMMEDIATE").await?;
    let mut answers = Vec::with_capacity(group.len());
    for queued in group {
        match apply(&mut tx, &queued.write).await {
            Ok(answer) => answers.push(answer),
            Err(error) => {
                tx.rollback().await?;
                return Err(error);
            }
        }
    }
    tx.commit().await?;
    Ok(answers)
}

/// Runs one write in its own transaction.
async fn commit_one(connection: &mut SqliteConnection, write: &Write) -> Result<Answer, SagaError> {
    let mut tx = connection.begin_with("BEGIN IMMEDIATE").await?;
    match apply(&mut tx, write).await {
        Ok(Ok(answer)) => {
            tx.commit().await?;
            Ok(answer)
        }
        Ok(Err(refusal)) => {
            tx.rollback().await?;
            Err(refusal)
        }
        Err(error) => {
            tx.rollback().await?;
            Err(error)
        }
    }
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// Applies one write inside the group's transaction. The outer `Err` is a failed statement
/// (roll back the group); the inner result is the write's own outcome. A refused write
/// (conflict, lease held elsewhere) changes nothing.
async fn apply(
    tx: &mut SqliteConnection,
    write: &Write,
) -> Result<Result<Answer, SagaError>, SagaError> {
    match write {
        Write::Create {
            id,
            definition,
            version,
            first,
            lease,
        } => {
            let id = *id;
            if first.seq != 1 {
                return Ok(Err(SagaError::Conflict { id, seq: first.seq }));
            }
            let inserted = sqlx::query(
                "INSERT INTO saga_instances
                     (id, definition, version, status, last_seq, created_at, updated_at,
                      lease_owner, lease_expires_ms)
                 VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
            )
            .bind(id.to_string())
            .bind(definition)
            .bind(i64::from(*version))
            .bind(first.transition.status_after().as_str())
            .bind(first.at)
            .bind(first.at)
            .bind(lease.owner())
            .bind(now_ms().saturating_add(lease.duration_ms()))
            .execute(&mut *tx)
            .await?;
            if inserted.rows_affected() != 1 {
                return Ok(Err(SagaError::Conflict { id, seq: 1 }));
            }
            insert_record(&mut *tx, id, first).await?;
            Ok(Ok(Answer::Done))
        }
        Write::Append { id, record, lease } => {
            let id = *id;
            let previous = to_i64(id, record.seq.saturating_sub(1))?;
            let status = record.transition.status_after();
            let (owner, expires) = if status.is_terminal() {
                (None, None)
            } else {
                (
                    Some(lease.owner()),
                    Some(now_ms().saturating_add(lease.duration_ms())),
                )
            };
            let updated = sqlx::query(
                "UPDATE saga_instances
                 SET status = ?, last_seq = ?, updated_at = ?, lease_owner = ?, lease_expires_ms = ?
                 WHERE id = ? AND last_seq = ? AND lease_owner = ?",
            )
            .bind(status.as_str())
            .bind(to_i64(id, record.seq)?)
            .bind(record.at)
            .bind(owner)
            .bind(expires)
            .bind(id.to_string())
            .bind(previous)
            .bind(lease.owner())
            .execute(&mut *tx)
            .await?;
            if updated.rows_affected() != 1 {
                let row: Option<(i64, Option<String>)> =
                    sqlx::query_as("SELECT last_seq, lease_owner FROM saga_instances WHERE id = ?")
                        .bind(id.to_string())
                        .fetch_optional(&mut *tx)
                        .await?;
                return Ok(Err(match row {
                    None => SagaError::NotFound(id),
                    Some((last_seq, _)) if last_seq != previous => SagaError::Conflict {
                        id,
                        seq: record.seq,
                    },
                    Some((_, owner)) => SagaError::Leased {
                        id,
                        owner: owner.unwrap_or_else(|| "nobody".to_owned()),
                    },
                }));
            }
            insert_record(&mut *tx, id, record).await?;
            Ok(Ok(Answer::Done))
        }
        Write::ClaimNext { lease, after } => {
            let now = now_ms();
            let after = after.map_or_else(|| uuid::Uuid::nil().to_string(), |id| id.to_string());
            let claimed: Option<String> = sqlx::query_scalar(
                "UPDATE saga_instances SET lease_owner = ?1, lease_expires_ms = ?2
                 WHERE id = (
                     SELECT id FROM saga_instances
                     WHERE status IN ('running', 'compensating') AND id > ?3
                       AND (lease_owner IS NULL OR lease_owner = ?4 OR lease_expires_ms <= ?5)
                     ORDER BY id LIMIT 1)
                 RETURNING id",
            )
            .bind(lease.owner())
            .bind(now.saturating_add(lease.duration_ms()))
            .bind(after)
            .bind(lease.owner())
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            claimed
                .map(|text| parse_id(&text))
                .transpose()
                .map(|id| Ok(Answer::Claimed(id)))
        }
        Write::Claim { id, lease } => {
            let id = *id;
            let now = now_ms();
            let claimed = sqlx::query(
                "UPDATE saga_instances SET lease_owner = ?1, lease_expires_ms = ?2
                 WHERE id = ?3 AND (lease_owner IS NULL OR lease_owner = ?4 OR lease_expires_ms <= ?5)",
            )
            .bind(lease.owner())
            .bind(now.saturating_add(lease.duration_ms()))
            .bind(id.to_string())
            .bind(lease.owner())
            .bind(now)
            .execute(&mut *tx)
            .await?;
            if claimed.rows_affected() == 1 {
                return Ok(Ok(Answer::Done));
            }
            let owner: Option<Option<String>> =
                sqlx::query_scalar("SELECT lease_owner FROM saga_instances WHERE id = ?")
                    .bind(id.to_string())
                    .fetch_optional(&mut *tx)
                    .await?;
            Ok(Err(match owner {
                None => SagaError::NotFound(id),
                Some(owner) => SagaError::Leased {
                    id,
                    owner: owner.unwrap_or_default(),
                },
            }))
        }
        Write::Renew { id, lease } => {
            let renewed = sqlx::query(
                "UPDATE saga_instances SET lease_expires_ms = ? WHERE id = ? AND lease_owner = ?",
            )
            .bind(now_ms().saturating_add(lease.duration_ms()))
            .bind(id.to_string())
            .bind(lease.owner())
            .execute(&mut *tx)
            .await?;
            Ok(Ok(Answer::Renewed(renewed.rows_affected() == 1)))
        }
        Write::Release { id, owner } => {
            sqlx::query(
                "UPDATE saga_instances SET lease_owner = NULL, lease_expires_ms = NULL
                 WHERE id = ? AND lease_owner = ?",
            )
            .bind(id.to_string())
            .bind(owner)
            .execute(&mut *tx)
            .await?;
            Ok(Ok(Answer::Done))
        }
        Write::Purge { before } => {
            let ids: Vec<String> = sqlx::query_scalar(
                "SELECT id FROM saga_instances
                 WHERE status IN ('completed', 'failed') AND updated_at < ?
                 ORDER BY id LIMIT ?",
            )
            .bind(before)
            .bind(i64::try_from(PURGE_BATCH_MAX).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await?;
            for id in &ids {
                sqlx::query("DELETE FROM saga_log WHERE saga_id = ?")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("DELETE FROM saga_instances WHERE id = ?")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
            Ok(Ok(Answer::Purged(ids.len() as u64)))
        }
    }
}

fn parse_id(text: &str) -> Result<SagaId, SagaError> {
    uuid::Uuid::parse_str(text)
        .map(SagaId::from_uuid)
        .map_err(|error| SagaError::Storage(sqlx::Error::Decode(Box::new(error))))
}

fn unexpected(answer: &Answer) -> SagaError {
    SagaError::Unavailable(format!("the SQLite saga writer answered {answer:?}"))
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
        let definition: String = row.try_get("definition")?;
        let version: i64 = row.try_get("version")?;
        let status: String = row.try_get("status")?;
        let rows = sqlx::query(
            "SELECT seq, transition, context, at FROM saga_log WHERE saga_id = ? ORDER BY seq",
        )
        .bind(id.to_string())
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
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
            .map(|row| {
                let id = parse_id(&row.try_get::<String, _>("id")?)?;
                summary(
                    id,
                    row.try_get("definition")?,
                    row.try_get("version")?,
                    row.try_get("status")?,
                    row.try_get("last_seq")?,
                    row.try_get("created_at")?,
                    row.try_get("updated_at")?,
                    row.try_get("lease_owner")?,
                )
            })
            .collect()
    }

    async fn purge(&self, before: DateTime<Utc>) -> Result<u64, SagaError> {
        match self.write(Write::Purge { before }).await? {
            Answer::Purged(count) => Ok(count),
            other => Err(unexpected(&other)),
        }
    }
}

async fn insert_record<'c>(
    executor: impl SqliteExecutor<'c>,
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
    .execute(executor)
    .await?;
    Ok(())
}
