//! The PostgreSQL store's writer task: creates and appends queued by many sagas, committed
//! together (see the parent module's notes).

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnection, PgPool};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::PG_GROUP_COMMIT_MAX;
use crate::error::SagaError;
use crate::store::rows::to_i64;
use crate::store::{Lease, SagaId, SagaRecord};

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
}

impl Write {
    fn id(&self) -> SagaId {
        match self {
            Self::Create { id, .. } | Self::Append { id, .. } => *id,
        }
    }
}

#[derive(Debug)]
pub(super) struct Queued {
    pub(super) write: Write,
    pub(super) answer: oneshot::Sender<Result<(), SagaError>>,
}

/// The writer task: one transaction per group of queued writes, until every sender is gone.
pub(super) async fn write_loop(pool: PgPool, mut queue: mpsc::Receiver<Queued>) {
    let mut group = Vec::with_capacity(PG_GROUP_COMMIT_MAX);
    while queue.recv_many(&mut group, PG_GROUP_COMMIT_MAX).await > 0 {
        // The first write of each saga joins the group; a second one for the same saga (two
        // writers racing on one log) runs alone afterwards, so the group's bulk statements
        // touch each saga once.
        let mut sagas = HashSet::with_capacity(group.len());
        let (bulk, alone): (Vec<Queued>, Vec<Queued>) = group
            .drain(..)
            .partition(|queued| sagas.insert(queued.write.id()));
        match commit_group(&pool, &bulk).await {
            Ok(answers) => {
                for (queued, answer) in bulk.into_iter().zip(answers) {
                    let _ = queued.answer.send(answer);
                }
            }
            Err(Failed::Commit(error)) => {
                // The commit's outcome is unknown (the connection broke during it): running
                // the writes again could answer a conflict for a write that landed, so each
                // caller hears the failure and reloads, as after a failed single append.
                tracing::warn!(%error, writes = bulk.len(), "saga log group commit's outcome unknown");
                for queued in bulk {
                    let _ = queued.answer.send(Err(SagaError::Unavailable(format!(
                        "the saga log's commit failed, its outcome unknown: {error}"
                    ))));
                }
            }
            Err(Failed::Statement(error)) => {
                tracing::warn!(%error, writes = bulk.len(), "saga log group commit failed; retrying each write alone");
                for queued in bulk {
                    let answer = commit_one(&pool, &queued.write).await;
                    let _ = queued.answer.send(answer);
                }
            }
        }
        for queued in alone {
            let answer = commit_one(&pool, &queued.write).await;
            let _ = queued.answer.send(answer);
        }
    }
}

/// Why a group was not answered write by write.
enum Failed {
    /// A statement failed before the commit: nothing was written.
    Statement(SagaError),
    /// The commit itself failed: the writes may or may not have landed.
    Commit(SagaError),
}

impl From<SagaError> for Failed {
    fn from(error: SagaError) -> Self {
        Self::Statement(error)
    }
}

impl From<sqlx::Error> for Failed {
    fn from(error: sqlx::Error) -> Self {
        Self::Statement(error.into())
    }
}

/// Runs `group` (at most one write per saga) in one transaction: each write's own outcome,
/// which may be a refusal.
async fn commit_group(
    pool: &PgPool,
    group: &[Queued],
) -> Result<Vec<Result<(), SagaError>>, Failed> {
    let creates: Vec<&Write> = group
        .iter()
        .map(|queued| &queued.write)
        .filter(|write| matches!(write, Write::Create { .. }))
        .collect();
    let appends: Vec<&Write> = group
        .iter()
        .map(|queued| &queued.write)
        .filter(|write| matches!(write, Write::Append { .. }))
        .collect();
    let (created, appended) = if creates.is_empty() || appends.is_empty() {
        // One statement: its own transaction, one round trip (a lone saga's append costs what
        // it did before group commit). A server error means it rolled back; any other failure
        // (the connection broke) leaves its outcome unknown.
        let mut connection = pool.acquire().await?;
        let outcome = if creates.is_empty() {
            append_records(&mut connection, &appends)
                .await
                .map(|appended| (HashSet::new(), appended))
        } else {
            insert_instances(&mut connection, &creates)
                .await
                .map(|created| (created, HashSet::new()))
        };
        outcome.map_err(|error| match error {
            SagaError::Storage(sqlx::Error::Database(_)) => Failed::Statement(error),
            SagaError::Storage(_) => Failed::Commit(error),
            other => Failed::Statement(other),
        })?
    } else {
        let mut tx = pool.begin().await?;
        let created = insert_instances(&mut tx, &creates).await?;
        let appended = append_records(&mut tx, &appends).await?;
        tx.commit()
            .await
            .map_err(|error| Failed::Commit(error.into()))?;
        (created, appended)
    };
    let mut answers = Vec::with_capacity(group.len());
    for queued in group {
        answers.push(match &queued.write {
            Write::Create { id, .. } if created.contains(&id.as_uuid()) => Ok(()),
            Write::Create { id, .. } => Err(SagaError::Conflict { id: *id, seq: 1 }),
            Write::Append { id, .. } if appended.contains(&id.as_uuid()) => Ok(()),
            // The group is committed: a failure to read the refusal is this write's answer.
            Write::Append { id, record, .. } => Err(refusal(pool, *id, record.seq)
                .await
                .unwrap_or_else(|error| error)),
        });
    }
    Ok(answers)
}

/// Runs one write in its own transaction (a group of one).
async fn commit_one(pool: &PgPool, write: &Write) -> Result<(), SagaError> {
    let mut tx = pool.begin().await?;
    let done = match write {
        Write::Create { .. } => !insert_instances(&mut tx, &[write]).await?.is_empty(),
        Write::Append { .. } => !append_records(&mut tx, &[write]).await?.is_empty(),
    };
    tx.commit().await?;
    match write {
        _ if done => Ok(()),
        Write::Create { id, .. } => Err(SagaError::Conflict { id: *id, seq: 1 }),
        Write::Append { id, record, .. } => Err(refusal(pool, *id, record.seq).await?),
    }
}

/// Inserts the instances of `creates` (all `Write::Create`, distinct ids) with their first
/// records, skipping ids that exist; returns the ids inserted.
async fn insert_instances(
    tx: &mut PgConnection,
    creates: &[&Write],
) -> Result<HashSet<Uuid>, SagaError> {
    if creates.is_empty() {
        return Ok(HashSet::new());
    }
    let mut columns = CreateColumns::default();
    for write in creates {
        let Write::Create {
            id,
            definition,
            version,
            first,
            lease,
        } = write
        else {
            unreachable!("only creates are passed");
        };
        columns.ids.push(id.as_uuid());
        columns.definitions.push(definition.clone());
        columns.versions.push(i64::from(*version));
        columns
            .statuses
            .push(first.transition.status_after().as_str().to_owned());
        columns.ats.push(first.at);
        columns.owners.push(lease.owner().to_owned());
        columns.lease_ms.push(lease.duration_ms());
        columns
            .transitions
            .push(serde_json::to_string(&first.transition)?);
        columns
            .contexts
            .push(serde_json::to_string(&first.context)?);
    }
    let created: Vec<Uuid> = sqlx::query_scalar(
        "WITH v AS (
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::bigint[], $4::text[],
                                  $5::timestamptz[], $6::text[], $7::bigint[], $8::text[], $9::text[])
                 AS v (id, definition, version, status, at, owner, lease_ms, transition, context)),
         instance AS (
             INSERT INTO saga_instances
                 (id, definition, version, status, last_seq, created_at, updated_at,
                  lease_owner, lease_expires_at)
             SELECT id, definition, version, status, 1, at, at, owner,
                    now() + lease_ms * interval '1 millisecond'
             FROM v
             ON CONFLICT (id) DO NOTHING
             RETURNING id),
         logged AS (
             INSERT INTO saga_log (saga_id, seq, transition, context, at)
             SELECT v.id, 1, v.transition::jsonb, v.context::jsonb, v.at
             FROM v JOIN instance USING (id))
         SELECT id FROM instance",
    )
    .bind(&columns.ids)
    .bind(&columns.definitions)
    .bind(&columns.versions)
    .bind(&columns.statuses)
    .bind(&columns.ats)
    .bind(&columns.owners)
    .bind(&columns.lease_ms)
    .bind(&columns.transitions)
    .bind(&columns.contexts)
    .fetch_all(&mut *tx)
    .await?;
    Ok(created.into_iter().collect())
}

/// The creates of a group as columns, for `UNNEST`.
#[derive(Default)]
struct CreateColumns {
    ids: Vec<Uuid>,
    definitions: Vec<String>,
    versions: Vec<i64>,
    statuses: Vec<String>,
    ats: Vec<DateTime<Utc>>,
    owners: Vec<String>,
    lease_ms: Vec<i64>,
    transitions: Vec<String>,
    contexts: Vec<String>,
}

/// Applies `appends` (all `Write::Append`, distinct sagas): each instance row whose last
/// sequence is the record's predecessor and whose lease `lease`'s owner holds is updated
/// (status, sequence, lease extended or, at a terminal status, released), and its record
/// inserted. Returns the sagas appended to.
async fn append_records(
    tx: &mut PgConnection,
    appends: &[&Write],
) -> Result<HashSet<Uuid>, SagaError> {
    if appends.is_empty() {
        return Ok(HashSet::new());
    }
    let mut columns = AppendColumns::default();
    for write in appends {
        let Write::Append { id, record, lease } = write else {
            unreachable!("only appends are passed");
        };
        let status = record.transition.status_after();
        columns.ids.push(id.as_uuid());
        columns.seqs.push(to_i64(*id, record.seq)?);
        columns.statuses.push(status.as_str().to_owned());
        columns.ats.push(record.at);
        columns.terminals.push(status.is_terminal());
        columns.lease_ms.push(lease.duration_ms());
        columns.owners.push(lease.owner().to_owned());
        columns
            .transitions
            .push(serde_json::to_string(&record.transition)?);
        columns
            .contexts
            .push(serde_json::to_string(&record.context)?);
    }
    // The context is NULL when it equals the last one the saga's log keeps (the statement's
    // snapshot holds every earlier record: a group has one record per saga).
    let appended: Vec<Uuid> = sqlx::query_scalar(
        "WITH v AS (
             SELECT * FROM UNNEST($1::uuid[], $2::bigint[], $3::text[], $4::timestamptz[],
                                  $5::bool[], $6::bigint[], $7::text[], $8::text[], $9::text[])
                 AS v (id, seq, status, at, terminal, lease_ms, owner, transition, context)),
         updated AS (
             UPDATE saga_instances AS i
             SET status = v.status, last_seq = v.seq, updated_at = v.at,
                 lease_owner = CASE WHEN v.terminal THEN NULL ELSE i.lease_owner END,
                 lease_expires_at = CASE WHEN v.terminal THEN NULL
                     ELSE now() + v.lease_ms * interval '1 millisecond' END
             FROM v
             WHERE i.id = v.id AND i.last_seq = v.seq - 1 AND i.lease_owner = v.owner
             RETURNING i.id),
         logged AS (
             INSERT INTO saga_log (saga_id, seq, transition, context, at)
             SELECT v.id, v.seq, v.transition::jsonb,
                    CASE WHEN v.context::jsonb = (
                        SELECT l.context FROM saga_log AS l
                        WHERE l.saga_id = v.id AND l.seq < v.seq AND l.context IS NOT NULL
                        ORDER BY l.seq DESC LIMIT 1)
                    THEN NULL ELSE v.context::jsonb END,
                    v.at
             FROM v JOIN updated USING (id))
         SELECT id FROM updated",
    )
    .bind(&columns.ids)
    .bind(&columns.seqs)
    .bind(&columns.statuses)
    .bind(&columns.ats)
    .bind(&columns.terminals)
    .bind(&columns.lease_ms)
    .bind(&columns.owners)
    .bind(&columns.transitions)
    .bind(&columns.contexts)
    .fetch_all(&mut *tx)
    .await?;
    Ok(appended.into_iter().collect())
}

/// The appends of a group as columns, for `UNNEST`.
#[derive(Default)]
struct AppendColumns {
    ids: Vec<Uuid>,
    seqs: Vec<i64>,
    statuses: Vec<String>,
    ats: Vec<DateTime<Utc>>,
    terminals: Vec<bool>,
    lease_ms: Vec<i64>,
    owners: Vec<String>,
    transitions: Vec<String>,
    contexts: Vec<String>,
}

/// Why an append changed nothing, as the instance row reads now: the saga is missing, at
/// another sequence, or leased to another owner.
async fn refusal(pool: &PgPool, id: SagaId, seq: u64) -> Result<SagaError, SagaError> {
    let previous = to_i64(id, seq.saturating_sub(1))?;
    let row: Option<(i64, Option<String>)> =
        sqlx::query_as("SELECT last_seq, lease_owner FROM saga_instances WHERE id = $1")
            .bind(id.as_uuid())
            .fetch_optional(pool)
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
