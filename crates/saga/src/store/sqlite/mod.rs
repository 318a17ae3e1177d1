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
//! Lease expiry uses this host's wall clock (milliseconds since the epoch): processes sharing
//! a SQLite file share a host.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{SqliteConnection, SqlitePool, SqlitePoolOptions};
use sqlx::{Connection as _, Row as _, SqliteExecutor};
use tokio::sync::{mpsc, oneshot};

use super::rows::{self, to_i64};
use super::{
    LIST_ACTIVE_MAX, Lease, PURGE_BATCH_MAX, SagaFilter, SagaId, SagaInstance, SagaRecord,
    SagaStore, SagaSummary,
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
        let options = trellis_sqlite::connect_options(url)
            .map_err(sqlx::Error::from)?
            .busy_timeout(BUSY_TIMEOUT);
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
            Err(error) => {
                // Something failed below the level of a single write's outcome: run each
                // write alone so each caller gets its own answer.
                tracing::warn!(%error, writes = group.len(), "saga log group commit failed; retrying each write alone");
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
///
/// The writes in a group were all pending at once, so they are concurrent and may run in any
/// order. Creates and appends (at most one per saga) run in bulk: one `INSERT … RETURNING` for
/// the new instances, one `UPDATE … FROM json_each(…) RETURNING` that checks every append's
/// sequence and lease owner, and one `INSERT` of all their log records; the other writes run
/// one by one.
async fn commit_group(
    connection: &mut SqliteConnection,
    group: &[Queued],
) -> Result<Vec<Result<Answer, SagaError>>, SagaError> {
    let mut tx = connection.begin_with("BEGIN IMMEDIATE").await?;
    match apply_group(&mut tx, group).await {
        Ok(answers) => {
            tx.commit().await?;
            Ok(answers)
        }
        Err(error) => {
            tx.rollback().await?;
            Err(error)
        }
    }
}

async fn apply_group(
    tx: &mut SqliteConnection,
    group: &[Queued],
) -> Result<Vec<Result<Answer, SagaError>>, SagaError> {
    let mut answers: Vec<Option<Result<Answer, SagaError>>> = group.iter().map(|_| None).collect();
    let mut sagas = HashSet::new();
    let (mut creates, mut appends, mut others) = (Vec::new(), Vec::new(), Vec::new());
    for (index, queued) in group.iter().enumerate() {
        match &queued.write {
            Write::Create { id, first, .. } if first.seq == 1 && sagas.insert(*id) => {
                creates.push(index);
            }
            Write::Append { id, .. } if sagas.insert(*id) => appends.push(index),
            _ => others.push(index),
        }
    }
    let mut records = Vec::new();

    if !creates.is_empty() {
        let mut rows = Vec::with_capacity(creates.len());
        for &index in &creates {
            let Write::Create {
                id,
                definition,
                version,
                first,
                lease,
            } = &group[index].write
            else {
                unreachable!("only creates were collected");
            };
            rows.push(serde_json::json!({
                "id": id.to_string(),
                "definition": definition,
                "version": version,
                "status": first.transition.status_after().as_str(),
                "at": timestamp(first.at),
                "owner": lease.owner(),
                "expires": now_ms().saturating_add(lease.duration_ms()),
            }));
        }
        let created: Vec<String> = sqlx::query_scalar(
            "INSERT INTO saga_instances
                 (id, definition, version, status, last_seq, created_at, updated_at,
                  lease_owner, lease_expires_ms)
             SELECT json_extract(value, '$.id'), json_extract(value, '$.definition'),
                    json_extract(value, '$.version'), json_extract(value, '$.status'), 1,
                    json_extract(value, '$.at'), json_extract(value, '$.at'),
                    json_extract(value, '$.owner'), json_extract(value, '$.expires')
             FROM json_each(?) WHERE true
             ON CONFLICT (id) DO NOTHING
             RETURNING id",
        )
        .bind(serde_json::Value::Array(rows).to_string())
        .fetch_all(&mut *tx)
        .await?;
        let created: HashSet<String> = created.into_iter().collect();
        for &index in &creates {
            let Write::Create { id, first, .. } = &group[index].write else {
                unreachable!("only creates were collected");
            };
            answers[index] = Some(if created.contains(&id.to_string()) {
                records.push(log_row(*id, first)?);
                Ok(Answer::Done)
            } else {
                Err(SagaError::Conflict { id: *id, seq: 1 })
            });
        }
    }

    if !appends.is_empty() {
        let mut rows = Vec::with_capacity(appends.len());
        for &index in &appends {
            let Write::Append { id, record, lease } = &group[index].write else {
                unreachable!("only appends were collected");
            };
            let status = record.transition.status_after();
            let (owner_after, expires) = if status.is_terminal() {
                (None, None)
            } else {
                (
                    Some(lease.owner()),
                    Some(now_ms().saturating_add(lease.duration_ms())),
                )
            };
            rows.push(serde_json::json!({
                "id": id.to_string(),
                "seq": to_i64(*id, record.seq)?,
                "status": status.as_str(),
                "at": timestamp(record.at),
                "owner": lease.owner(),
                "owner_after": owner_after,
                "expires": expires,
            }));
        }
        let updated: Vec<String> = sqlx::query_scalar(
            "UPDATE saga_instances AS i
             SET status = v.status, last_seq = v.seq, updated_at = v.at,
                 lease_owner = v.owner_after, lease_expires_ms = v.expires
             FROM (SELECT json_extract(value, '$.id') AS id, json_extract(value, '$.seq') AS seq,
                          json_extract(value, '$.status') AS status,
                          json_extract(value, '$.at') AS at,
                          json_extract(value, '$.owner') AS owner,
                          json_extract(value, '$.owner_after') AS owner_after,
                          json_extract(value, '$.expires') AS expires
                   FROM json_each(?)) AS v
             WHERE i.id = v.id AND i.last_seq = v.seq - 1 AND i.lease_owner = v.owner
             RETURNING id",
        )
        .bind(serde_json::Value::Array(rows).to_string())
        .fetch_all(&mut *tx)
        .await?;
        let updated: HashSet<String> = updated.into_iter().collect();
        for &index in &appends {
            let Write::Append { id, record, .. } = &group[index].write else {
                unreachable!("only appends were collected");
            };
            answers[index] = Some(if updated.contains(&id.to_string()) {
                records.push(log_row(*id, record)?);
                Ok(Answer::Done)
            } else {
                Err(refusal(tx, *id, record.seq).await?)
            });
        }
    }

    if !records.is_empty() {
        sqlx::query(
            "INSERT INTO saga_log (saga_id, seq, transition, context, at)
             SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'),
                    json_extract(value, '$[2]'), json_extract(value, '$[3]'),
                    json_extract(value, '$[4]')
             FROM json_each(?)",
        )
        .bind(serde_json::Value::Array(records).to_string())
        .execute(&mut *tx)
        .await?;
    }

    for index in others {
        answers[index] = Some(apply(tx, &group[index].write).await?);
    }
    Ok(answers
        .into_iter()
        .map(|answer| answer.expect("every write of the group was answered"))
        .collect())
}

/// A log record as a JSON row for the bulk insert: `[saga_id, seq, transition, context, at]`,
/// the transition and context as JSON text, as the single-row path stores them.
fn log_row(id: SagaId, record: &SagaRecord) -> Result<serde_json::Value, SagaError> {
    Ok(serde_json::json!([
        id.to_string(),
        to_i64(id, record.seq)?,
        serde_json::to_string(&record.transition)?,
        serde_json::to_string(&record.context)?,
        timestamp(record.at),
    ]))
}

/// A timestamp as sqlx writes a `DateTime<Utc>` to SQLite, so both paths store the same text.
fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false)
}

/// Why an append changed nothing: the saga is missing, at another sequence, or leased to
/// another owner.
async fn refusal(tx: &mut SqliteConnection, id: SagaId, seq: u64) -> Result<SagaError, SagaError> {
    let previous = to_i64(id, seq.saturating_sub(1))?;
    let row: Option<(i64, Option<String>)> =
        sqlx::query_as("SELECT last_seq, lease_owner FROM saga_instances WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await?;
    Ok(match row {
        None => SagaError::NotFound(id),
        Some((last_seq, _)) if last_seq != previous => SagaError::Conflict { id, seq },
        Some((_, owner)) => SagaError::Leased {
            id,
            owner: owner.unwrap_or_else(|| "nobody".to_owned()),
        },
    })
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
                return Ok(Err(refusal(tx, id, record.seq).await?));
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chrono::Utc;
    use sqlx::Connection as _;
    use std::str::FromStr;

    use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
    use tokio::sync::oneshot;

    use super::{Answer, Queued, SCHEMA, Write, commit_group};
    use crate::error::SagaError;
    use crate::store::{Lease, SagaId, SagaRecord, Transition};

    fn queued(write: Write) -> Queued {
        Queued {
            write,
            answer: oneshot::channel().0,
        }
    }

    fn record(seq: u64, transition: Transition) -> SagaRecord {
        SagaRecord {
            seq,
            transition,
            context: serde_json::json!({ "seq": seq }),
            at: Utc::now(),
        }
    }

    #[tokio::test]
    async fn a_group_of_creates_and_appends_commits_in_bulk_with_per_write_outcomes() {
        // Goal: the bulk statements run (the group is not rolled back into the one-by-one
        // fallback), and each write still gets its own outcome: a duplicate create conflicts,
        // a stale sequence conflicts, a foreign owner is fenced out.
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("saga.db").display());
        let options = SqliteConnectOptions::from_str(&url)
            .expect("url")
            .create_if_missing(true);
        let mut connection = SqliteConnection::connect_with(&options)
            .await
            .expect("connect");
        sqlx::raw_sql(SCHEMA)
            .execute(&mut connection)
            .await
            .expect("schema");
        let lease = Lease::new("a", Duration::from_secs(60));
        let started = Transition::Started {
            steps: vec!["s".to_owned()],
            pivot: None,
        };
        let (one, two, three) = (SagaId::new(), SagaId::new(), SagaId::new());
        let create = |id| {
            queued(Write::Create {
                id,
                definition: "d".to_owned(),
                version: 1,
                first: record(1, started.clone()),
                lease: lease.clone(),
            })
        };
        let answers = commit_group(&mut connection, &[create(one), create(two), create(three)])
            .await
            .expect("the bulk create commits");
        assert!(
            answers
                .iter()
                .all(|answer| matches!(answer, Ok(Answer::Done)))
        );
        let answers = commit_group(&mut connection, &[create(one)])
            .await
            .expect("commits");
        assert!(matches!(
            answers[0],
            Err(SagaError::Conflict { seq: 1, .. })
        ));

        let executing = Transition::StepExecuting {
            step: "s".to_owned(),
            attempt: 1,
        };
        let append = |id, seq, owner: &str| {
            queued(Write::Append {
                id,
                record: record(seq, executing.clone()),
                lease: Lease::new(owner, Duration::from_secs(60)),
            })
        };
        let answers = commit_group(
            &mut connection,
            &[
                append(one, 2, "a"),
                append(two, 3, "a"),
                append(three, 2, "b"),
            ],
        )
        .await
        .expect("the bulk append commits");
        assert!(matches!(answers[0], Ok(Answer::Done)), "{:?}", answers[0]);
        assert!(matches!(
            answers[1],
            Err(SagaError::Conflict { seq: 3, .. })
        ));
        assert!(matches!(&answers[2], Err(SagaError::Leased { owner, .. }) if owner == "a"));
        let logged: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM saga_log")
            .fetch_one(&mut connection)
            .await
            .expect("count");
        assert_eq!(logged, 4, "three Started records and one append");
    }
}
