//! The SQLite durable log: the embedded default backend.
//!
//! One SQLite file in WAL mode holds the log (`bus_log`), each group's pending deliveries
//! (`bus_pending`: lease, attempts, first failure), the dead letters and the DLQ action log.
//! Several processes on one machine can open the same file: writers take the database lock
//! with `BEGIN IMMEDIATE` and wait up to the busy timeout for each other, and a consumer
//! polls for other processes' messages every [`POLL_INTERVAL`].
//!
//! # Durability and throughput
//!
//! `synchronous = FULL` by default: a publish returns after its commit reached the disk, so a
//! process kill or a power loss loses nothing that was acknowledged. Throughput comes from
//! group commit, not weaker durability: one writer task per process takes every queued
//! publish, fetch and settlement (up to [`WRITE_BATCH_MAX`]) into one transaction and answers
//! each caller after the commit. [`SqliteBusConfig::with_synchronous_normal`] trades the last
//! commits on power loss (not on a process crash) for speed, and says so.

// The writer task and its group commit; fetching and settling inside its transactions; the
// dead-letter queue. This file: the schema, configuration, opening and publishing.
mod delivery;
mod dlq;
mod writer;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteSynchronous};
use sqlx::{Connection, SqliteConnection, SqlitePool};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::bus::{Bus, Subscription, count_published, prepare_publish, validate_subscription};
use crate::envelope::{Envelope, MESSAGE_BYTES_MAX_DEFAULT};
use crate::error::BusError;
use crate::policy::SubscribeOptions;

pub use delivery::POLL_INTERVAL;
pub use writer::{PRUNE_INTERVAL, WRITE_BATCH_MAX, WRITE_QUEUE_MAX};

use delivery::SqliteSource;
use writer::{Command, prune, write_loop};

/// How long a writer waits for another process's lock before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a message stays in the log (7 days; rows still pending or not yet admitted
/// by every group stay longer).
pub const RETENTION_DEFAULT: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// Read connections for listing dead letters.
const READ_CONNECTIONS_MAX: u32 = 4;

const SCHEMA: &str = r"
CREATE TABLE IF NOT EXISTS bus_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    subject TEXT NOT NULL,
    only_group TEXT,
    envelope TEXT NOT NULL,
    published_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS bus_groups (
    name TEXT PRIMARY KEY,
    pattern TEXT NOT NULL,
    cursor INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS bus_pending (
    grp TEXT NOT NULL,
    seq INTEGER NOT NULL,
    subject TEXT NOT NULL,
    visible_ms INTEGER NOT NULL,
    lease INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    first_failure_ms INTEGER,
    PRIMARY KEY (grp, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS bus_pending_by_subject ON bus_pending (grp, subject, seq);
CREATE TABLE IF NOT EXISTS bus_dead_letters (
    id TEXT PRIMARY KEY,
    grp TEXT NOT NULL,
    topic TEXT NOT NULL,
    envelope TEXT NOT NULL,
    reason TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    first_failure_ms INTEGER NOT NULL,
    last_failure_ms INTEGER NOT NULL,
    error_kind TEXT NOT NULL,
    error TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    state TEXT NOT NULL,
    redrive_count INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS bus_dead_letters_by_fingerprint ON bus_dead_letters (fingerprint);
CREATE INDEX IF NOT EXISTS bus_dead_letters_by_state ON bus_dead_letters (state, id);
CREATE TABLE IF NOT EXISTS bus_dlq_actions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    action TEXT NOT NULL,
    dead_letter_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    actor TEXT NOT NULL
);
";

/// How to open a [`SqliteBus`].
#[derive(Debug, Clone)]
pub struct SqliteBusConfig {
    url: String,
    message_bytes_max: usize,
    synchronous_full: bool,
    retention: Duration,
}

impl SqliteBusConfig {
    /// A file path, created if missing.
    #[must_use]
    pub fn from_path(path: impl AsRef<Path>) -> Self {
        Self::from_location(format!("sqlite://{}", path.as_ref().display()))
    }

    /// A `sqlite://path` URL.
    ///
    /// # Errors
    /// [`BusError::InvalidConfig`] for a URL sqlx does not parse.
    pub fn from_url(url: &str) -> Result<Self, BusError> {
        if !trellis_sqlite::is_sqlite_url(url) {
            return Err(BusError::InvalidConfig(format!(
                "sqlite url {url:?}: expected sqlite://PATH"
            )));
        }
        Ok(Self::from_location(url.to_owned()))
    }

    fn from_location(url: String) -> Self {
        Self {
            url,
            message_bytes_max: MESSAGE_BYTES_MAX_DEFAULT,
            synchronous_full: true,
            retention: RETENTION_DEFAULT,
        }
    }

    /// Sets how long messages stay in the log once every group has admitted them and none
    /// holds them pending (default [`RETENTION_DEFAULT`]). A group created later sees only
    /// what is still retained.
    #[must_use]
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// Refuses messages over `bytes` serialized bytes (default 1 MiB).
    #[must_use]
    pub fn with_message_bytes_max(mut self, bytes: usize) -> Self {
        self.message_bytes_max = bytes;
        self
    }

    /// Uses `synchronous = NORMAL`: faster, and a power loss (not a process crash) may lose
    /// the last acknowledged commits.
    #[must_use]
    pub fn with_synchronous_normal(mut self) -> Self {
        self.synchronous_full = false;
        self
    }

    fn connect_options(&self) -> Result<SqliteConnectOptions, BusError> {
        let options = trellis_sqlite::connect_options(&self.url)
            .map_err(|error| BusError::InvalidConfig(error.to_string()))?;
        Ok(options
            .synchronous(if self.synchronous_full {
                SqliteSynchronous::Full
            } else {
                SqliteSynchronous::Normal
            })
            .busy_timeout(BUSY_TIMEOUT))
    }
}

/// The SQLite durable log. Clones share one writer task; open one per process.
#[derive(Debug, Clone)]
pub struct SqliteBus {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    commands: mpsc::Sender<Command>,
    changed: Arc<Notify>,
    pool: SqlitePool,
    message_bytes_max: usize,
    retention: Duration,
}

impl SqliteBus {
    /// Opens (creating if needed) the log and starts this process's writer task.
    ///
    /// # Errors
    /// The file cannot be opened or the schema cannot be created.
    pub async fn open(config: SqliteBusConfig) -> Result<Self, BusError> {
        crate::gauges::describe();
        let options = config.connect_options()?;
        let mut writer = SqliteConnection::connect_with(&options).await?;
        {
            let mut tx = writer.begin_with("BEGIN IMMEDIATE").await?;
            sqlx::raw_sql(SCHEMA).execute(&mut *tx).await?;
            tx.commit().await?;
        }
        let pool = trellis_sqlite::pool_options()
            .max_connections(READ_CONNECTIONS_MAX)
            .connect_with(options)
            .await?;
        let (commands, receiver) = mpsc::channel(WRITE_QUEUE_MAX);
        let changed = Arc::new(Notify::new());
        tokio::spawn(write_loop(
            writer,
            receiver,
            Arc::clone(&changed),
            config.retention,
        ));
        Ok(Self {
            inner: Arc::new(Inner {
                commands,
                changed,
                pool,
                message_bytes_max: config.message_bytes_max,
                retention: config.retention,
            }),
        })
    }

    /// Opens `path` with the default configuration.
    ///
    /// # Errors
    /// As [`SqliteBus::open`].
    pub async fn open_path(path: impl AsRef<Path>) -> Result<Self, BusError> {
        Self::open(SqliteBusConfig::from_path(path)).await
    }

    /// Removes up to 10,000 log rows past retention now (the writer also does this every
    /// [`PRUNE_INTERVAL`]); returns how many.
    ///
    /// # Errors
    /// Database errors.
    pub async fn prune(&self) -> Result<u64, BusError> {
        let mut connection = self.inner.pool.acquire().await?;
        prune(&mut connection, self.inner.retention).await
    }

    /// The read pool on the same file (for listing, tests and tools).
    #[must_use]
    pub fn pool(&self) -> &SqlitePool {
        &self.inner.pool
    }

    async fn send(&self, command: Command) -> Result<(), BusError> {
        self.inner
            .commands
            .send(command)
            .await
            .map_err(|_| BusError::Closed)
    }
}

impl Bus for SqliteBus {
    async fn publish(&self, topic: &str, mut envelope: Envelope) -> Result<(), BusError> {
        let bytes = prepare_publish(topic, &mut envelope, self.inner.message_bytes_max)?;
        let text = String::from_utf8(bytes).map_err(BusError::corrupt)?;
        let (reply, answer) = oneshot::channel();
        self.send(Command::Publish {
            topic: topic.to_owned(),
            subject: envelope.subject,
            envelope: text,
            reply,
        })
        .await?;
        answer.await.map_err(|_| BusError::Closed)??;
        count_published(topic);
        // Committed (group commit answers after the commit); the publisher has not heard yet.
        failpoint!(crate::failpoints::PUBLISH_AFTER_COMMIT, topic);
        Ok(())
    }

    async fn subscribe(
        &self,
        pattern: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, BusError> {
        validate_subscription(pattern, group)?;
        let pattern = crate::topic::canonical_pattern_list(pattern);
        let mut connection = self.inner.pool.acquire().await?;
        let mut tx = connection.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query("INSERT OR IGNORE INTO bus_groups (name, pattern, cursor) VALUES (?, ?, 0)")
            .bind(group)
            .bind(&pattern)
            .execute(&mut *tx)
            .await?;
        let existing: String = sqlx::query_scalar("SELECT pattern FROM bus_groups WHERE name = ?")
            .bind(group)
            .fetch_one(&mut *tx)
            .await?;
        if existing != pattern {
            if !options.replace_patterns {
                return Err(BusError::GroupConflict {
                    group: group.to_owned(),
                    existing,
                    requested: pattern,
                });
            }
            // Admission reads the list on each pass: messages past the cursor meet the new one.
            sqlx::query("UPDATE bus_groups SET pattern = ? WHERE name = ?")
                .bind(&pattern)
                .bind(group)
                .execute(&mut *tx)
                .await?;
            tracing::info!(group, from = %existing, to = %pattern, "bus group's pattern list replaced");
        }
        tx.commit().await?;
        let source = SqliteSource {
            bus: self.clone(),
            group: group.to_owned(),
            ack_wait: options.ack_wait,
            ordered: options.per_subject_order,
        };
        Ok(Subscription::new(
            group,
            Box::new(source),
            Arc::new(self.clone()),
            options,
        ))
    }
}
