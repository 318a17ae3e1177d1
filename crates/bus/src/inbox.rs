//! The inbox: exactly-once effects on at-least-once delivery.
//!
//! [`SqliteInbox::handle_once`] / [`PgInbox::handle_once`] open a transaction, record the
//! message id for the consumer group in `bus_inbox`, and run the handler's writes in the same
//! transaction. A redelivered message finds its id already recorded and is skipped
//! ([`Handled::Duplicate`]); a failed handler rolls back both its writes and the record, so the
//! retry runs it again. On PostgreSQL a concurrent duplicate waits on the first one's row
//! lock and then sees it committed.
//!
//! ```no_run
//! # async fn demo(pool: sqlx::SqlitePool, message: trellis_bus::Message) -> Result<(), trellis_bus::HandlerError> {
//! use trellis_bus::inbox::{Handled, SqliteInbox};
//!
//! let inbox = SqliteInbox::new(pool).await?;
//! let outcome = inbox
//!     .handle_once(&message, |tx| {
//!         Box::pin(async move {
//!             sqlx::query("UPDATE stock SET reserved = reserved + 1 WHERE sku = 'a'")
//!                 .execute(&mut **tx)
//!                 .await?;
//!             Ok(())
//!         })
//!     })
//!     .await?;
//! assert!(matches!(outcome, Handled::Done(()) | Handled::Duplicate));
//! # Ok(())
//! # }
//! ```

use std::time::Duration;

use chrono::Utc;
use futures_util::future::BoxFuture;
use sqlx::{Postgres, Sqlite, Transaction};

use crate::bus::{HandlerError, Message};
use crate::error::BusError;

/// Most rows one [`SqliteInbox::purge_older_than`] call deletes.
pub const PURGE_BATCH_MAX: i64 = 100_000;

/// What `handle_once` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled<T> {
    /// The handler ran and its writes committed with the inbox record.
    Done(T),
    /// The message id was already recorded for this group: nothing ran.
    Duplicate,
}

impl From<sqlx::Error> for HandlerError {
    /// A database error during handling is transient: the retry policy applies.
    fn from(error: sqlx::Error) -> Self {
        HandlerError::from(BusError::Database(error))
    }
}

const SQLITE_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS bus_inbox (
    grp TEXT NOT NULL,
    message_id TEXT NOT NULL,
    handled_ms INTEGER NOT NULL,
    PRIMARY KEY (grp, message_id)
) WITHOUT ROWID";

const PG_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS bus_inbox (
    grp TEXT NOT NULL,
    message_id UUID NOT NULL,
    handled_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (grp, message_id)
)";

/// The inbox in a service's SQLite database.
#[derive(Debug, Clone)]
pub struct SqliteInbox {
    pool: sqlx::SqlitePool,
}

impl SqliteInbox {
    /// Uses `pool` (the service's own database) and creates `bus_inbox` if missing.
    ///
    /// # Errors
    /// The table cannot be created.
    pub async fn new(pool: sqlx::SqlitePool) -> Result<Self, BusError> {
        sqlx::query(SQLITE_SCHEMA).execute(&pool).await?;
        Ok(Self { pool })
    }

    /// Runs `handler` once per (group, message id), in one `BEGIN IMMEDIATE` transaction with
    /// the inbox record.
    ///
    /// # Errors
    /// The handler's error (its writes are rolled back), or a database error as a transient
    /// [`HandlerError`].
    pub async fn handle_once<T, F>(
        &self,
        message: &Message,
        handler: F,
    ) -> Result<Handled<T>, HandlerError>
    where
        F: for<'t> FnOnce(
            &'t mut Transaction<'static, Sqlite>,
        ) -> BoxFuture<'t, Result<T, HandlerError>>,
    {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let inserted = sqlx::query(
            "INSERT INTO bus_inbox (grp, message_id, handled_ms) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
        )
        .bind(&message.group)
        .bind(message.envelope.id.to_string())
        .bind(Utc::now().timestamp_millis())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            tx.rollback().await?;
            metrics::counter!("trellis_bus_inbox_duplicates_total").increment(1);
            return Ok(Handled::Duplicate);
        }
        let value = handler(&mut tx).await?;
        tx.commit().await?;
        // The effect and the inbox record are durable; the delivery is not acked yet.
        failpoint!(crate::failpoints::INBOX_AFTER_COMMIT, &message.group);
        Ok(Handled::Done(value))
    }

    /// Deletes records older than `age` (at most [`PURGE_BATCH_MAX`]); redeliveries older
    /// than that are no longer recognised, so keep it well above the bus's retention.
    ///
    /// # Errors
    /// Database errors.
    pub async fn purge_older_than(&self, age: Duration) -> Result<u64, BusError> {
        let cutoff =
            Utc::now().timestamp_millis() - i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
        Ok(sqlx::query(
            "DELETE FROM bus_inbox WHERE (grp, message_id) IN \
             (SELECT grp, message_id FROM bus_inbox WHERE handled_ms < ? LIMIT ?)",
        )
        .bind(cutoff)
        .bind(PURGE_BATCH_MAX)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }
}

/// The inbox in a service's PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PgInbox {
    pool: sqlx::PgPool,
}

impl PgInbox {
    /// Uses `pool` and creates `bus_inbox` if missing.
    ///
    /// # Errors
    /// The table cannot be created.
    pub async fn new(pool: sqlx::PgPool) -> Result<Self, BusError> {
        sqlx::query(PG_SCHEMA).execute(&pool).await?;
        Ok(Self { pool })
    }

    /// Runs `handler` once per (group, message id), in one transaction with the inbox record.
    ///
    /// # Errors
    /// As [`SqliteInbox::handle_once`].
    pub async fn handle_once<T, F>(
        &self,
        message: &Message,
        handler: F,
    ) -> Result<Handled<T>, HandlerError>
    where
        F: for<'t> FnOnce(
            &'t mut Transaction<'static, Postgres>,
        ) -> BoxFuture<'t, Result<T, HandlerError>>,
    {
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO bus_inbox (grp, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(&message.group)
        .bind(message.envelope.id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            tx.rollback().await?;
            metrics::counter!("trellis_bus_inbox_duplicates_total").increment(1);
            return Ok(Handled::Duplicate);
        }
        let value = handler(&mut tx).await?;
        tx.commit().await?;
        // The effect and the inbox record are durable; the delivery is not acked yet.
        failpoint!(crate::failpoints::INBOX_AFTER_COMMIT, &message.group);
        Ok(Handled::Done(value))
    }

    /// Deletes records older than `age` (at most [`PURGE_BATCH_MAX`]).
    ///
    /// # Errors
    /// Database errors.
    pub async fn purge_older_than(&self, age: Duration) -> Result<u64, BusError> {
        let cutoff = Utc::now() - chrono::Duration::from_std(age).unwrap_or(chrono::Duration::MAX);
        Ok(sqlx::query(
            "DELETE FROM bus_inbox WHERE (grp, message_id) IN \
             (SELECT grp, message_id FROM bus_inbox WHERE handled_at < $1 LIMIT $2)",
        )
        .bind(cutoff)
        .bind(PURGE_BATCH_MAX)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }
}
