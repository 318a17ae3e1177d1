//! The writer task: one per store, running the queued writes in group-commit transactions
//! (see the parent module's durability notes). Some 630 lines with the unit test of the bulk
//! statements: the group path, its one-by-one fallback and their statements read as one.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteConnection;
use sqlx::{Connection as _, SqliteExecutor};
use tokio::sync::{mpsc, oneshot};

use super::{GROUP_COMMIT_MAX, parse_id};
use crate::error::SagaError;
use crate::store::rows::to_i64;
use crate::store::{Lease, PURGE_BATCH_MAX, SagaId, SagaRecord};

/// One write for the writer task, with everything it needs owned.
#[derive(Debug)]
pub(super) enum Write {
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
pub(super) enum Answer {
    Done,
    Claimed(Option<SagaId>),
    Renewed(bool),
    Purged(u64),
}

#[derive(Debug)]
pub(super) struct Queued {
    pub(super) write: Write,
    pub(super) answer: oneshot::Sender<Result<Answer, SagaError>>,
}

/// The writer task: one transaction per group of queued writes.
pub(super) async fn write_loop(
    mut connection: SqliteConnection,
    mut queue: mpsc::Receiver<Queued>,
) {
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
        // At most one record per saga in a group, so each record's predecessor is already in
        // the table when the statement starts.
        sqlx::query(
            "INSERT INTO saga_log (saga_id, seq, transition, context, at)
             SELECT v.saga_id, v.seq, v.transition,
                    CASE WHEN v.context = (
                        SELECT l.context FROM saga_log AS l
                        WHERE l.saga_id = v.saga_id AND l.seq < v.seq AND l.context <> ''
                        ORDER BY l.seq DESC LIMIT 1)
                    THEN '' ELSE v.context END,
                    v.at
             FROM (SELECT json_extract(value, '$[0]') AS saga_id,
                          json_extract(value, '$[1]') AS seq,
                          json_extract(value, '$[2]') AS transition,
                          json_extract(value, '$[3]') AS context,
                          json_extract(value, '$[4]') AS at
                   FROM json_each(?)) AS v",
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

pub(super) fn unexpected(answer: &Answer) -> SagaError {
    SagaError::Unavailable(format!("the SQLite saga writer answered {answer:?}"))
}

async fn insert_record<'c>(
    executor: impl SqliteExecutor<'c>,
    id: SagaId,
    record: &SagaRecord,
) -> Result<(), SagaError> {
    sqlx::query(
        "INSERT INTO saga_log (saga_id, seq, transition, context, at)
         SELECT ?1, ?2, ?3,
                CASE WHEN ?4 = (
                    SELECT context FROM saga_log
                    WHERE saga_id = ?1 AND seq < ?2 AND context <> ''
                    ORDER BY seq DESC LIMIT 1)
                THEN '' ELSE ?4 END,
                ?5",
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

    use super::super::SCHEMA;
    use super::{Answer, Queued, Write, commit_group, commit_one};
    use crate::error::SagaError;
    use crate::store::{Lease, SagaId, SagaRecord, Transition};

    fn queued(write: Write) -> Queued {
        Queued {
            write,
            answer: oneshot::channel().0,
        }
    }

    /// A connection to a fresh saga log in `dir`, with its schema.
    async fn open_log(dir: &tempfile::TempDir) -> SqliteConnection {
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
        connection
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
        let mut connection = open_log(&dir).await;
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

    #[tokio::test]
    async fn a_write_run_alone_keeps_a_repeated_context_once() {
        // Goal: the one-by-one path (a failed group's fallback) stores a context only when it
        // changes, as the bulk path does: three records with one context and one with another
        // keep two contexts.
        let dir = tempfile::tempdir().expect("tempdir");
        let mut connection = open_log(&dir).await;
        let lease = Lease::new("a", Duration::from_secs(60));
        let id = SagaId::new();
        let with_context =
            |seq: u64, transition: Transition, context: serde_json::Value| SagaRecord {
                context,
                ..record(seq, transition)
            };
        let same = serde_json::json!({ "order": "o-1" });
        let started = Transition::Started {
            steps: vec!["s".to_owned()],
            pivot: None,
        };
        let executing = Transition::StepExecuting {
            step: "s".to_owned(),
            attempt: 1,
        };
        let succeeded = Transition::StepSucceeded {
            step: "s".to_owned(),
        };
        let writes = [
            Write::Create {
                id,
                definition: "d".to_owned(),
                version: 1,
                first: with_context(1, started, same.clone()),
                lease: lease.clone(),
            },
            Write::Append {
                id,
                record: with_context(2, executing, same.clone()),
                lease: lease.clone(),
            },
            Write::Append {
                id,
                record: with_context(3, succeeded, same),
                lease: lease.clone(),
            },
            Write::Append {
                id,
                record: with_context(4, Transition::Completed, serde_json::json!({ "done": 1 })),
                lease,
            },
        ];
        for write in &writes {
            assert!(matches!(
                commit_one(&mut connection, write).await,
                Ok(Answer::Done)
            ));
        }
        let kept: Vec<String> =
            sqlx::query_scalar("SELECT context FROM saga_log WHERE saga_id = ? ORDER BY seq")
                .bind(id.to_string())
                .fetch_all(&mut connection)
                .await
                .expect("contexts");
        assert_eq!(kept, ["{\"order\":\"o-1\"}", "", "", "{\"done\":1}"]);
    }
}
