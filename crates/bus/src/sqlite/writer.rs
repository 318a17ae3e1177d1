//! The writer task: group commit of publishes, fetches and settlements, and pruning.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use sqlx::{Connection, SqliteConnection};
use tokio::sync::{Notify, mpsc, oneshot};

use super::delivery::{fetch_in, settle_in};
use crate::bus::{DeliveryKey, Message, RawDelivery, Settlement, duration_millis, millis};
use crate::error::BusError;

/// Most operations one group commit holds.
pub const WRITE_BATCH_MAX: usize = 1_024;
/// Most operations waiting for the writer task; callers wait for room beyond it.
pub const WRITE_QUEUE_MAX: usize = 16_384;
/// How often the writer removes log rows past retention.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(10);
/// Most log rows one prune pass removes.
const PRUNE_ROWS_MAX: i64 = 10_000;
/// Most rows in one multi-row insert (4 bound values each).
const INSERT_ROWS_MAX: usize = 200;

#[derive(Debug)]
pub(super) enum Command {
    Publish {
        topic: String,
        subject: String,
        envelope: String,
        reply: oneshot::Sender<Result<(), BusError>>,
    },
    Fetch {
        group: String,
        max: usize,
        ack_wait: Duration,
        ordered: bool,
        reply: oneshot::Sender<Result<Vec<RawDelivery>, BusError>>,
    },
    Settle {
        message: Arc<Message>,
        key: DeliveryKey,
        attempt: u32,
        settlement: Settlement,
        reply: oneshot::Sender<Result<(), BusError>>,
    },
}

/// What one command produced inside a batch, sent after the commit.
enum Outcome {
    Done(Result<(), BusError>),
    Fetched(Vec<RawDelivery>),
}

pub(super) async fn write_loop(
    mut connection: SqliteConnection,
    mut receiver: mpsc::Receiver<Command>,
    changed: Arc<Notify>,
    retention: Duration,
) {
    let mut batch = Vec::with_capacity(WRITE_BATCH_MAX);
    let mut last_prune = tokio::time::Instant::now();
    while receiver.recv_many(&mut batch, WRITE_BATCH_MAX).await > 0 {
        if last_prune.elapsed() >= PRUNE_INTERVAL {
            last_prune = tokio::time::Instant::now();
            if let Err(error) = prune(&mut connection, retention).await {
                tracing::warn!(%error, "pruning the bus log failed");
            }
        }
        // Every consumer of this process is woken after a write. Waking only the groups a
        // commit concerns was measured (fewer fetches, 3-20% less CPU per choreographed
        // order) and undone: POST latency rose from 5 to 25-42 ms p50 at 200 orders/s
        // (docs/BENCHMARKS.md, issue 19).
        let wrote = batch
            .iter()
            .any(|c| matches!(c, Command::Publish { .. } | Command::Settle { .. }));
        match run_batch(&mut connection, &batch).await {
            Ok(outcomes) => {
                for (command, outcome) in batch.drain(..).zip(outcomes) {
                    reply(command, outcome);
                }
            }
            Err(error) => {
                let text = error.to_string();
                tracing::error!(error = %text, "bus group commit failed");
                for command in batch.drain(..) {
                    reply(
                        command,
                        Outcome::Done(Err(BusError::Unavailable(text.clone()))),
                    );
                }
            }
        }
        if wrote {
            changed.notify_waiters();
        }
    }
}

/// Removes log rows older than `retention` that every group has admitted and none holds.
pub(super) async fn prune(
    connection: &mut SqliteConnection,
    retention: Duration,
) -> Result<u64, BusError> {
    let cutoff = millis(Utc::now()).saturating_sub(duration_millis(retention));
    let mut tx = connection.begin_with("BEGIN IMMEDIATE").await?;
    let removed = sqlx::query(
        "DELETE FROM bus_log WHERE seq IN (SELECT seq FROM bus_log \
             WHERE published_ms < ?1 \
             AND seq <= COALESCE((SELECT MIN(cursor) FROM bus_groups), (SELECT MAX(seq) FROM bus_log)) \
             AND seq NOT IN (SELECT seq FROM bus_pending) \
             ORDER BY seq LIMIT ?2)",
    )
    .bind(cutoff)
    .bind(PRUNE_ROWS_MAX)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(removed)
}

fn reply(command: Command, outcome: Outcome) {
    // A caller that gave up waiting dropped its receiver; nothing to tell it.
    match (command, outcome) {
        (Command::Fetch { reply, .. }, Outcome::Fetched(deliveries)) => {
            let _ = reply.send(Ok(deliveries));
        }
        (Command::Fetch { reply, .. }, Outcome::Done(result)) => {
            let _ = reply.send(result.map(|()| Vec::new()));
        }
        (Command::Publish { reply, .. } | Command::Settle { reply, .. }, Outcome::Done(result)) => {
            let _ = reply.send(result);
        }
        (Command::Publish { reply, .. } | Command::Settle { reply, .. }, Outcome::Fetched(_)) => {
            let _ = reply.send(Err(BusError::corrupt("a write got a fetch outcome")));
        }
    }
}

async fn run_batch(
    connection: &mut SqliteConnection,
    batch: &[Command],
) -> Result<Vec<Outcome>, BusError> {
    let mut tx = connection.begin_with("BEGIN IMMEDIATE").await?;
    let now = millis(Utc::now());
    let mut outcomes: Vec<Option<Outcome>> = (0..batch.len()).map(|_| None).collect();

    // 1. Every publish of the batch, in multi-row inserts (queue order = log order).
    let publishes: Vec<(usize, &str, &str, &str)> = batch
        .iter()
        .enumerate()
        .filter_map(|(index, command)| match command {
            Command::Publish {
                topic,
                subject,
                envelope,
                ..
            } => Some((index, topic.as_str(), subject.as_str(), envelope.as_str())),
            _ => None,
        })
        .collect();
    for chunk in publishes.chunks(INSERT_ROWS_MAX) {
        let mut sql =
            String::from("INSERT INTO bus_log (topic, subject, envelope, published_ms) VALUES ");
        for row in 0..chunk.len() {
            sql.push_str(if row == 0 {
                "(?, ?, ?, ?)"
            } else {
                ", (?, ?, ?, ?)"
            });
        }
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (_, topic, subject, envelope) in chunk {
            query = query.bind(*topic).bind(*subject).bind(*envelope).bind(now);
        }
        query.execute(&mut *tx).await?;
        for (index, ..) in chunk {
            outcomes[*index] = Some(Outcome::Done(Ok(())));
        }
    }

    // 2. Acks, one statement per (group, lease); other settlements one by one.
    let mut acks: BTreeMap<(&str, i64), Vec<(usize, i64)>> = BTreeMap::new();
    for (index, command) in batch.iter().enumerate() {
        if let Command::Settle {
            message,
            key,
            attempt,
            settlement,
            ..
        } = command
        {
            if matches!(settlement, Settlement::Ack) {
                let lease = i64::try_from(key.lease).map_err(BusError::corrupt)?;
                let seq = i64::try_from(key.sequence).map_err(BusError::corrupt)?;
                acks.entry((message.group.as_str(), lease))
                    .or_default()
                    .push((index, seq));
            } else {
                let result = settle_in(&mut tx, message, key, *attempt, settlement, now).await?;
                outcomes[index] = Some(Outcome::Done(result));
            }
        }
    }
    for ((group, lease), entries) in &acks {
        let seqs = serde_json::to_string(&entries.iter().map(|(_, seq)| *seq).collect::<Vec<_>>())
            .map_err(BusError::corrupt)?;
        let deleted: Vec<i64> = sqlx::query_scalar(
            "DELETE FROM bus_pending WHERE grp = ? AND lease = ? \
             AND seq IN (SELECT value FROM json_each(?)) RETURNING seq",
        )
        .bind(*group)
        .bind(*lease)
        .bind(seqs)
        .fetch_all(&mut *tx)
        .await?;
        let deleted: HashSet<i64> = deleted.into_iter().collect();
        for (index, seq) in entries {
            outcomes[*index] = Some(Outcome::Done(if deleted.contains(seq) {
                Ok(())
            } else {
                Err(BusError::LeaseLost)
            }));
        }
    }

    // 3. Fetches last, so they see this batch's publishes and the subjects its acks freed.
    for (index, command) in batch.iter().enumerate() {
        if let Command::Fetch {
            group,
            max,
            ack_wait,
            ordered,
            ..
        } = command
        {
            let fetched = fetch_in(&mut tx, group, *max, *ack_wait, *ordered, now).await?;
            outcomes[index] = Some(Outcome::Fetched(fetched));
        }
    }
    tx.commit().await?;
    outcomes
        .into_iter()
        .map(|outcome| outcome.ok_or_else(|| BusError::corrupt("a command got no outcome")))
        .collect()
}
