//! The transactional outbox: publish state changes without "write then publish".
//!
//! A service writes its state change and an outbox row ([`SqliteOutbox::enqueue`],
//! [`PgOutbox::enqueue`]) in one transaction. A relay ([`SqliteOutbox::relay_once`] /
//! [`PgOutbox::run`]) publishes unsent rows in id order, per subject strictly one after
//! another, and deletes each row once the bus confirmed it: at-least-once (a relay killed
//! between publish and delete publishes again; the consumer's inbox makes that harmless).
//! The lag (age of the oldest unsent row) is reported and recorded as the gauge
//! `trellis_bus_outbox_lag_seconds`.
//!
//! No relay holds a lock the service's own writes need while it waits for the bus, because a
//! publish can take seconds (a slow or unreachable broker) and the outbox lives in the
//! service's database:
//!
//! - On SQLite, a round reads its rows without a write transaction, publishes them, and only
//!   then deletes the confirmed ones in a short `BEGIN IMMEDIATE` transaction. SQLite has one
//!   write lock per database; holding it across the publish (as this relay once did) stalled
//!   every write of the service for as long as the bus took. Rounds of one [`SqliteOutbox`]
//!   take turns. Relays in several processes on one file may publish a row twice (both read
//!   it before either deleted it), which the inbox absorbs; they never publish a subject's
//!   row before its predecessor was published, since each relay starts a subject at its
//!   oldest undeleted row and a row is deleted only after the bus confirmed it.
//! - On PostgreSQL each relay takes a transaction-level advisory lock per subject
//!   (`pg_try_advisory_xact_lock`) and skips subjects another relay holds, the per-subject
//!   equivalent of `FOR UPDATE SKIP LOCKED`: relays share the work by subject and never
//!   reorder one subject's messages. The transaction stays open across the publish, but it
//!   holds no row locks until its final `DELETE` (advisory locks block only other relays),
//!   so the service's inserts and updates are not delayed.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row, SqliteConnection};

use crate::bus::{Bus, prepare_publish};
use crate::envelope::{Envelope, MESSAGE_BYTES_MAX_DEFAULT};
use crate::error::BusError;

/// Most rows one relay round publishes.
pub const RELAY_BATCH_MAX: i64 = 1_000;
/// Most subjects one PostgreSQL relay round takes.
pub const RELAY_SUBJECTS_MAX: i64 = 256;
/// How long an idle relay waits before looking again.
pub const RELAY_IDLE_WAIT: Duration = Duration::from_millis(100);
/// The first key of the PostgreSQL advisory locks the relay takes (the second is the
/// subject's hash), so they do not collide with an application's own advisory locks.
pub const ADVISORY_LOCK_NAMESPACE: i32 = 0x7472_6c73; // "trls"

const SQLITE_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS bus_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    subject TEXT NOT NULL,
    envelope TEXT NOT NULL,
    created_ms INTEGER NOT NULL
)";

const PG_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS bus_outbox (
    id BIGSERIAL PRIMARY KEY,
    topic TEXT NOT NULL,
    subject TEXT NOT NULL,
    envelope TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS bus_outbox_by_subject ON bus_outbox (subject, id)";

/// What one relay round did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RelayReport {
    /// Rows published and removed.
    pub published: usize,
    /// Age of the oldest unsent row when the round started (`None`: nothing was waiting).
    pub lag: Option<Duration>,
}

fn prepare(topic: &str, envelope: &Envelope) -> Result<(String, String), BusError> {
    let mut envelope = envelope.clone();
    let bytes = prepare_publish(topic, &mut envelope, MESSAGE_BYTES_MAX_DEFAULT)?;
    let text = String::from_utf8(bytes).map_err(BusError::corrupt)?;
    Ok((envelope.subject, text))
}

fn record_lag(lag: Option<Duration>) {
    metrics::gauge!("trellis_bus_outbox_lag_seconds").set(lag.map_or(0.0, |lag| lag.as_secs_f64()));
}

/// Publishes each subject's rows in order (subjects concurrently); returns the ids (and
/// topics) the bus confirmed. A failure stops that subject, so its later rows stay behind the
/// failed one.
async fn publish_in_order<B: Bus>(
    bus: &B,
    rows: Vec<(i64, String, String, String)>,
) -> Vec<(i64, String)> {
    let mut by_subject: BTreeMap<String, Vec<(i64, String, String)>> = BTreeMap::new();
    for (id, topic, subject, envelope) in rows {
        by_subject
            .entry(subject)
            .or_default()
            .push((id, topic, envelope));
    }
    let lanes = by_subject.into_values().map(|lane| async move {
        let mut sent = Vec::new();
        for (id, topic, text) in lane {
            let envelope: Envelope = match serde_json::from_str(&text) {
                Ok(envelope) => envelope,
                Err(error) => {
                    tracing::error!(id, %error, "outbox row does not decode; left in place");
                    break;
                }
            };
            match bus.publish(&topic, envelope).await {
                Ok(()) => sent.push((id, topic)),
                Err(error) => {
                    tracing::warn!(id, %error, "outbox publish failed; will retry");
                    break;
                }
            }
        }
        sent
    });
    futures_util::future::join_all(lanes)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Runs `round` until `shutdown`, pausing when idle or failing.
async fn run_rounds<F, Fut>(mut round: F, shutdown: impl Future<Output = ()>)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<RelayReport, BusError>>,
{
    tokio::pin!(shutdown);
    loop {
        let pause = tokio::select! {
            () = &mut shutdown => return,
            report = round() => match report {
                Ok(report) if report.published > 0 => Duration::ZERO,
                Ok(_) => RELAY_IDLE_WAIT,
                Err(error) => {
                    tracing::warn!(%error, "outbox relay round failed");
                    RELAY_IDLE_WAIT
                }
            },
        };
        if !pause.is_zero() {
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }
}

/// The outbox in a service's SQLite database.
#[derive(Debug, Clone)]
pub struct SqliteOutbox {
    pool: sqlx::SqlitePool,
    /// Serialises this outbox's rounds, so one process never publishes a row twice at once.
    turn: Arc<tokio::sync::Mutex<()>>,
}

impl SqliteOutbox {
    /// Uses `pool` and creates `bus_outbox` if missing.
    ///
    /// # Errors
    /// The table cannot be created.
    pub async fn new(pool: sqlx::SqlitePool) -> Result<Self, BusError> {
        sqlx::query(SQLITE_SCHEMA).execute(&pool).await?;
        Ok(Self {
            pool,
            turn: Arc::default(),
        })
    }

    /// Writes `envelope` for `topic` in the caller's transaction (when `traceparent` is
    /// empty, fills it with a PRODUCER span's, a child of the current span).
    ///
    /// # Errors
    /// Bad topic, oversize envelope, database errors.
    pub async fn enqueue(
        tx: &mut SqliteConnection,
        topic: &str,
        envelope: &Envelope,
    ) -> Result<(), BusError> {
        let (subject, text) = prepare(topic, envelope)?;
        sqlx::query(
            "INSERT INTO bus_outbox (topic, subject, envelope, created_ms) VALUES (?, ?, ?, ?)",
        )
        .bind(topic)
        .bind(subject)
        .bind(text)
        .bind(Utc::now().timestamp_millis())
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    /// Publishes up to `batch_max` (capped at [`RELAY_BATCH_MAX`]) unsent rows, then removes
    /// the ones the bus confirmed in a short write transaction.
    ///
    /// The rows are read and published outside any write transaction: a publish may wait
    /// on the network for seconds, and holding SQLite's single write lock meanwhile would
    /// stall every write of the service. Rounds of one `SqliteOutbox` (and its clones) take
    /// turns.
    ///
    /// # Errors
    /// Database errors; publish failures leave rows for the next round and are not errors.
    pub async fn relay_once<B: Bus>(
        &self,
        bus: &B,
        batch_max: i64,
    ) -> Result<RelayReport, BusError> {
        let _turn = self.turn.lock().await;
        let rows = sqlx::query(
            "SELECT id, topic, subject, envelope, created_ms FROM bus_outbox ORDER BY id LIMIT ?",
        )
        .bind(batch_max.clamp(1, RELAY_BATCH_MAX))
        .fetch_all(&self.pool)
        .await?;
        let lag = match rows.first() {
            Some(row) => {
                let created: i64 = row.try_get("created_ms")?;
                let age_ms = Utc::now().timestamp_millis().saturating_sub(created).max(0);
                Some(Duration::from_millis(age_ms.unsigned_abs()))
            }
            None => None,
        };
        record_lag(lag);
        if rows.is_empty() {
            return Ok(RelayReport::default());
        }
        let mut decoded = Vec::with_capacity(rows.len());
        for row in &rows {
            decoded.push((
                row.try_get("id")?,
                row.try_get("topic")?,
                row.try_get("subject")?,
                row.try_get("envelope")?,
            ));
        }
        let sent = publish_in_order(bus, decoded).await;
        // Published, not yet deleted: a relay dying here publishes these rows again.
        #[cfg(feature = "failpoints")]
        for (_, topic) in &sent {
            failpoint!(crate::failpoints::OUTBOX_AFTER_PUBLISH, topic);
        }
        let sent: Vec<i64> = sent.into_iter().map(|(id, _)| id).collect();
        if !sent.is_empty() {
            let ids = serde_json::to_string(&sent).map_err(BusError::corrupt)?;
            let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
            sqlx::query("DELETE FROM bus_outbox WHERE id IN (SELECT value FROM json_each(?))")
                .bind(ids)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        }
        Ok(RelayReport {
            published: sent.len(),
            lag,
        })
    }

    /// Relays until `shutdown` resolves.
    pub async fn run<B: Bus>(&self, bus: &B, shutdown: impl Future<Output = ()>) {
        run_rounds(|| self.relay_once(bus, RELAY_BATCH_MAX), shutdown).await;
    }
}

/// The outbox in a service's PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PgOutbox {
    pool: sqlx::PgPool,
}

impl PgOutbox {
    /// Uses `pool` and creates `bus_outbox` if missing.
    ///
    /// # Errors
    /// The table cannot be created.
    pub async fn new(pool: sqlx::PgPool) -> Result<Self, BusError> {
        sqlx::raw_sql(PG_SCHEMA).execute(&pool).await?;
        Ok(Self { pool })
    }

    /// Writes `envelope` for `topic` in the caller's transaction.
    ///
    /// # Errors
    /// Bad topic, oversize envelope, database errors.
    pub async fn enqueue(
        tx: &mut PgConnection,
        topic: &str,
        envelope: &Envelope,
    ) -> Result<(), BusError> {
        let (subject, text) = prepare(topic, envelope)?;
        sqlx::query("INSERT INTO bus_outbox (topic, subject, envelope) VALUES ($1, $2, $3)")
            .bind(topic)
            .bind(subject)
            .bind(text)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }

    /// One relay round: takes the advisory lock of up to [`RELAY_SUBJECTS_MAX`] waiting
    /// subjects no other relay holds, publishes their rows in order (at most `batch_max` per
    /// subject) and removes them in the same transaction.
    ///
    /// # Errors
    /// Database errors; publish failures leave rows for the next round and are not errors.
    pub async fn relay_once<B: Bus>(
        &self,
        bus: &B,
        batch_max: i64,
    ) -> Result<RelayReport, BusError> {
        let mut tx = self.pool.begin().await?;
        let subjects = sqlx::query(
            "SELECT subject, MIN(id) AS first_id, MIN(created_at) AS oldest FROM bus_outbox \
             GROUP BY subject ORDER BY first_id LIMIT $1",
        )
        .bind(RELAY_SUBJECTS_MAX)
        .fetch_all(&mut *tx)
        .await?;
        let oldest: Option<DateTime<Utc>> = subjects
            .iter()
            .filter_map(|row| row.try_get::<DateTime<Utc>, _>("oldest").ok())
            .min();
        let lag = oldest.map(|at| (Utc::now() - at).to_std().unwrap_or_default());
        record_lag(lag);
        let mut rows = Vec::new();
        for row in &subjects {
            let subject: String = row.try_get("subject")?;
            let locked: bool =
                sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1, hashtext($2))")
                    .bind(ADVISORY_LOCK_NAMESPACE)
                    .bind(&subject)
                    .fetch_one(&mut *tx)
                    .await?;
            if !locked {
                continue;
            }
            // Read after locking: rows another relay removed before we got the lock are gone.
            let lane = sqlx::query(
                "SELECT id, topic, envelope FROM bus_outbox WHERE subject = $1 ORDER BY id LIMIT $2",
            )
            .bind(&subject)
            .bind(batch_max.clamp(1, RELAY_BATCH_MAX))
            .fetch_all(&mut *tx)
            .await?;
            for row in lane {
                rows.push((
                    row.try_get("id")?,
                    row.try_get("topic")?,
                    subject.clone(),
                    row.try_get("envelope")?,
                ));
            }
        }
        let sent = publish_in_order(bus, rows).await;
        // Published, not yet deleted: returning here rolls the transaction back.
        #[cfg(feature = "failpoints")]
        for (_, topic) in &sent {
            failpoint!(crate::failpoints::OUTBOX_AFTER_PUBLISH, topic);
        }
        let sent: Vec<i64> = sent.into_iter().map(|(id, _)| id).collect();
        sqlx::query("DELETE FROM bus_outbox WHERE id = ANY($1)")
            .bind(&sent)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(RelayReport {
            published: sent.len(),
            lag,
        })
    }

    /// Relays until `shutdown` resolves.
    pub async fn run<B: Bus>(&self, bus: &B, shutdown: impl Future<Output = ()>) {
        run_rounds(|| self.relay_once(bus, RELAY_BATCH_MAX), shutdown).await;
    }
}
