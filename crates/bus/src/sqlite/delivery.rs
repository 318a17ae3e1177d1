//! Fetching (admitting log rows, leasing deliverable heads) and settling, inside the
//! writer's transactions; the subscription's source and settler.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use sqlx::{Row, SqliteConnection};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::SqliteBus;
use super::dlq::insert_letter;
use super::writer::Command;
use crate::bus::{
    DeliveryKey, Message, RawDelivery, Settle, Settlement, Source, duration_millis, fetch_until,
    from_millis,
};
use crate::dlq::DeadLetter;
use crate::error::BusError;
use crate::topic;

/// How often an idle consumer looks for messages written by other processes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Most log rows one fetch admits into a group's pending set.
const ADMIT_BATCH_MAX: i64 = 8_192;

pub(super) async fn fetch_in(
    tx: &mut SqliteConnection,
    group: &str,
    max: usize,
    ack_wait: Duration,
    ordered: bool,
    now: i64,
) -> Result<Vec<RawDelivery>, BusError> {
    // The group's list and position, and the log rows after it, in one statement (a
    // group with nothing new gives one row without a log row).
    let rows = sqlx::query(
        "SELECT g.pattern, l.seq, l.topic, l.only_group FROM bus_groups g \
         LEFT JOIN bus_log l ON l.seq > g.cursor WHERE g.name = ? ORDER BY l.seq LIMIT ?",
    )
    .bind(group)
    .bind(ADMIT_BATCH_MAX)
    .fetch_all(&mut *tx)
    .await?;
    let Some(first) = rows.first() else {
        return Ok(Vec::new());
    };
    let pattern: String = first.try_get("pattern")?;
    let mut last_seq = None;
    let mut admitted = Vec::with_capacity(rows.len());
    for row in &rows {
        let Some(seq) = row.try_get::<Option<i64>, _>("seq")? else {
            continue;
        };
        last_seq = Some(seq);
        let topic: &str = row.try_get("topic")?;
        let only_group: Option<&str> = row.try_get("only_group")?;
        if only_group.is_none_or(|only| only == group) && topic::matches(&pattern, topic) {
            admitted.push(seq);
        }
    }
    if let Some(last_seq) = last_seq {
        if !admitted.is_empty() {
            let seqs = serde_json::to_string(&admitted).map_err(BusError::corrupt)?;
            sqlx::query(
                "INSERT OR IGNORE INTO bus_pending (grp, seq, subject, visible_ms) \
                 SELECT ?, seq, subject, 0 FROM bus_log WHERE seq IN (SELECT value FROM json_each(?))",
            )
            .bind(group)
            .bind(seqs)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("UPDATE bus_groups SET cursor = ? WHERE name = ?")
            .bind(last_seq)
            .bind(group)
            .execute(&mut *tx)
            .await?;
    }
    let lease = fastrand::i64(1..i64::MAX);
    let visible_ms = now.saturating_add(duration_millis(ack_wait));
    let leased = sqlx::query(
        "UPDATE bus_pending SET visible_ms = ?1, lease = ?2, attempts = attempts + 1 \
         WHERE grp = ?3 AND seq IN ( \
             SELECT p.seq FROM bus_pending p WHERE p.grp = ?3 AND p.visible_ms <= ?4 \
             AND (?5 = 0 OR NOT EXISTS (SELECT 1 FROM bus_pending q \
                 WHERE q.grp = ?3 AND q.subject = p.subject AND q.seq < p.seq)) \
             ORDER BY p.seq LIMIT ?6) \
         RETURNING seq, attempts",
    )
    .bind(visible_ms)
    .bind(lease)
    .bind(group)
    .bind(now)
    .bind(ordered)
    .bind(i64::try_from(max).unwrap_or(i64::MAX))
    .fetch_all(&mut *tx)
    .await?;
    if leased.is_empty() {
        return Ok(Vec::new());
    }
    let mut attempts_by_seq = BTreeMap::new();
    for row in &leased {
        attempts_by_seq.insert(
            row.try_get::<i64, _>("seq")?,
            row.try_get::<i64, _>("attempts")?,
        );
    }
    let seqs = serde_json::to_string(&attempts_by_seq.keys().collect::<Vec<_>>())
        .map_err(BusError::corrupt)?;
    let bodies = sqlx::query(
        "SELECT seq, topic, envelope FROM bus_log WHERE seq IN (SELECT value FROM json_each(?)) ORDER BY seq",
    )
    .bind(seqs)
    .fetch_all(&mut *tx)
    .await?;
    let mut deliveries = Vec::with_capacity(bodies.len());
    for row in bodies {
        let seq: i64 = row.try_get("seq")?;
        let attempts = attempts_by_seq.get(&seq).copied().unwrap_or(1);
        let text: String = row.try_get("envelope")?;
        deliveries.push(RawDelivery {
            topic: row.try_get("topic")?,
            envelope: serde_json::from_str(&text).map_err(|_| text),
            attempt: u32::try_from(attempts).unwrap_or(u32::MAX),
            key: DeliveryKey {
                sequence: u64::try_from(seq).map_err(BusError::corrupt)?,
                lease: lease.unsigned_abs(),
                reply: None,
                parked: false,
                first_failure: None,
            },
        });
    }
    Ok(deliveries)
}

pub(super) async fn settle_in(
    tx: &mut SqliteConnection,
    message: &Message,
    key: &DeliveryKey,
    attempt: u32,
    settlement: &Settlement,
    now: i64,
) -> Result<Result<(), BusError>, BusError> {
    let seq = i64::try_from(key.sequence).map_err(BusError::corrupt)?;
    let lease = i64::try_from(key.lease).map_err(BusError::corrupt)?;
    let found = match settlement {
        Settlement::Ack => {
            sqlx::query("DELETE FROM bus_pending WHERE grp = ? AND seq = ? AND lease = ?")
                .bind(&message.group)
                .bind(seq)
                .bind(lease)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                > 0
        }
        Settlement::Nack { delay, failed } => {
            let visible_ms = now.saturating_add(duration_millis(*delay));
            sqlx::query(
                "UPDATE bus_pending SET visible_ms = ?, lease = NULL, \
                 first_failure_ms = CASE WHEN ? THEN COALESCE(first_failure_ms, ?) ELSE first_failure_ms END \
                 WHERE grp = ? AND seq = ? AND lease = ?",
            )
            .bind(visible_ms)
            .bind(*failed)
            .bind(now)
            .bind(&message.group)
            .bind(seq)
            .bind(lease)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                > 0
        }
        Settlement::DeadLetter(failure) => {
            let removed = sqlx::query(
                "DELETE FROM bus_pending WHERE grp = ? AND seq = ? AND lease = ? RETURNING first_failure_ms",
            )
            .bind(&message.group)
            .bind(seq)
            .bind(lease)
            .fetch_optional(&mut *tx)
            .await?;
            match removed {
                None => false,
                Some(row) => {
                    let first: Option<i64> = row.try_get("first_failure_ms")?;
                    let letter =
                        DeadLetter::from_failure(message, attempt, failure, first.map(from_millis));
                    insert_letter(tx, &letter).await?;
                    true
                }
            }
        }
    };
    Ok(if found {
        Ok(())
    } else {
        Err(BusError::LeaseLost)
    })
}

#[derive(Debug)]
pub(super) struct SqliteSource {
    pub(super) bus: SqliteBus,
    pub(super) group: String,
    pub(super) ack_wait: Duration,
    pub(super) ordered: bool,
}

impl Source for SqliteSource {
    fn fetch(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<RawDelivery>, BusError>> {
        let (bus, group) = (&self.bus, self.group.as_str());
        let (ack_wait, ordered) = (self.ack_wait, self.ordered);
        // Other processes write the same file without waking this one: poll.
        Box::pin(fetch_until(&bus.inner.changed, wait, move || async move {
            let (reply, answer) = oneshot::channel();
            bus.send(Command::Fetch {
                group: group.to_owned(),
                max,
                ack_wait,
                ordered,
                reply,
            })
            .await?;
            let deliveries = answer.await.map_err(|_| BusError::Closed)??;
            Ok((deliveries, Some(Instant::now() + POLL_INTERVAL)))
        }))
    }
}

impl Settle for SqliteBus {
    fn settle(
        &self,
        message: Arc<Message>,
        key: DeliveryKey,
        attempt: u32,
        settlement: Settlement,
    ) -> BoxFuture<'static, Result<(), BusError>> {
        let bus = self.clone();
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            bus.send(Command::Settle {
                message,
                key,
                attempt,
                settlement,
                reply,
            })
            .await?;
            answer.await.map_err(|_| BusError::Closed)?
        })
    }
}
