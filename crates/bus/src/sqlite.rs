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

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures_util::future::BoxFuture;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{Connection, Row, SqliteConnection, SqlitePool};
use tokio::sync::{Notify, mpsc, oneshot};
use uuid::Uuid;

use crate::bus::{
    Bus, DeliveryKey, Message, RawDelivery, Settle, Settlement, Source, Subscription, from_millis,
    millis,
};
use crate::dlq::{
    ACTIONS_LIMIT_MAX, DeadLetter, DeadLetterFilter, DeadLetterPage, DeadLetterReason,
    DeadLetterState, DeadLetters, DlqAction, DlqActionKind, id_cursor, log_action, not_found,
    page_of, redriven_envelope,
};
use crate::envelope::{Envelope, MESSAGE_BYTES_MAX_DEFAULT};
use crate::error::BusError;
use crate::policy::SubscribeOptions;
use crate::topic;

/// Most operations one group commit holds.
pub const WRITE_BATCH_MAX: usize = 1_024;
/// Most operations waiting for the writer task; callers wait for room beyond it.
pub const WRITE_QUEUE_MAX: usize = 16_384;
/// How often an idle consumer looks for messages written by other processes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long a writer waits for another process's lock before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a message stays in the log (7 days; rows still pending or not yet admitted
/// by every group stay longer).
pub const RETENTION_DEFAULT: Duration = Duration::from_secs(7 * 24 * 60 * 60);
/// How often the writer removes log rows past retention.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(10);
/// Most log rows one prune pass removes.
const PRUNE_ROWS_MAX: i64 = 10_000;
/// Most rows in one multi-row insert (4 bound values each).
const INSERT_ROWS_MAX: usize = 200;
/// Most log rows one fetch admits into a group's pending set.
const ADMIT_BATCH_MAX: i64 = 8_192;
/// Most dead-letter rows one list page reads (only a topic pattern's wildcards are checked
/// outside SQL); past it the page ends early, with a cursor to continue.
const DLQ_SCAN_MAX: i64 = 100_000;
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

#[derive(Debug)]
enum Command {
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

impl SqliteBus {
    /// Opens (creating if needed) the log and starts this process's writer task.
    ///
    /// # Errors
    /// The file cannot be opened or the schema cannot be created.
    pub async fn open(config: SqliteBusConfig) -> Result<Self, BusError> {
        let options = config.connect_options()?;
        let mut writer = SqliteConnection::connect_with(&options).await?;
        {
            let mut tx = writer.begin_with("BEGIN IMMEDIATE").await?;
            sqlx::raw_sql(SCHEMA).execute(&mut *tx).await?;
            tx.commit().await?;
        }
        let pool = SqlitePoolOptions::new()
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

async fn write_loop(
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
async fn prune(connection: &mut SqliteConnection, retention: Duration) -> Result<u64, BusError> {
    let cutoff =
        millis(Utc::now()).saturating_sub(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX));
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

async fn fetch_in(
    tx: &mut SqliteConnection,
    group: &str,
    max: usize,
    ack_wait: Duration,
    ordered: bool,
    now: i64,
) -> Result<Vec<RawDelivery>, BusError> {
    let Some(row) = sqlx::query("SELECT pattern, cursor FROM bus_groups WHERE name = ?")
        .bind(group)
        .fetch_optional(&mut *tx)
        .await?
    else {
        return Ok(Vec::new());
    };
    let pattern: String = row.try_get("pattern")?;
    let cursor: i64 = row.try_get("cursor")?;
    let rows = sqlx::query(
        "SELECT seq, topic, only_group FROM bus_log WHERE seq > ? ORDER BY seq LIMIT ?",
    )
    .bind(cursor)
    .bind(ADMIT_BATCH_MAX)
    .fetch_all(&mut *tx)
    .await?;
    if let Some(last) = rows.last() {
        let last_seq: i64 = last.try_get("seq")?;
        let mut admitted = Vec::with_capacity(rows.len());
        for row in &rows {
            let topic: &str = row.try_get("topic")?;
            let only_group: Option<&str> = row.try_get("only_group")?;
            if only_group.is_none_or(|only| only == group) && topic::matches(&pattern, topic) {
                admitted.push(row.try_get::<i64, _>("seq")?);
            }
        }
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
    let visible_ms = now.saturating_add(i64::try_from(ack_wait.as_millis()).unwrap_or(i64::MAX));
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

async fn settle_in(
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
        Settlement::Nack { delay, error } => {
            let visible_ms =
                now.saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
            sqlx::query(
                "UPDATE bus_pending SET visible_ms = ?, lease = NULL, \
                 first_failure_ms = CASE WHEN ? THEN COALESCE(first_failure_ms, ?) ELSE first_failure_ms END \
                 WHERE grp = ? AND seq = ? AND lease = ?",
            )
            .bind(visible_ms)
            .bind(error.is_some())
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

impl Bus for SqliteBus {
    async fn publish(&self, topic: &str, mut envelope: Envelope) -> Result<(), BusError> {
        topic::validate_topic(topic)?;
        envelope.fill_trace_context();
        let bytes = envelope.to_bytes_limited(self.inner.message_bytes_max)?;
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
        metrics::counter!("trellis_bus_published_total").increment(1);
        Ok(())
    }

    async fn subscribe(
        &self,
        pattern: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, BusError> {
        topic::validate_pattern(pattern)?;
        topic::validate_group(group)?;
        let mut connection = self.inner.pool.acquire().await?;
        let mut tx = connection.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query("INSERT OR IGNORE INTO bus_groups (name, pattern, cursor) VALUES (?, ?, 0)")
            .bind(group)
            .bind(pattern)
            .execute(&mut *tx)
            .await?;
        let existing: String = sqlx::query_scalar("SELECT pattern FROM bus_groups WHERE name = ?")
            .bind(group)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        if existing != pattern {
            return Err(BusError::GroupConflict {
                group: group.to_owned(),
                existing,
                requested: pattern.to_owned(),
            });
        }
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

#[derive(Debug)]
struct SqliteSource {
    bus: SqliteBus,
    group: String,
    ack_wait: Duration,
    ordered: bool,
}

impl Source for SqliteSource {
    fn fetch(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<RawDelivery>, BusError>> {
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                let notified = self.bus.inner.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let (reply, answer) = oneshot::channel();
                self.bus
                    .send(Command::Fetch {
                        group: self.group.clone(),
                        max,
                        ack_wait: self.ack_wait,
                        ordered: self.ordered,
                        reply,
                    })
                    .await?;
                let deliveries = answer.await.map_err(|_| BusError::Closed)??;
                if !deliveries.is_empty() {
                    return Ok(deliveries);
                }
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    return Ok(Vec::new());
                }
                let wake = (now + POLL_INTERVAL).min(deadline);
                tokio::select! {
                    () = &mut notified => {}
                    () = tokio::time::sleep_until(wake) => {}
                }
            }
        })
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

/// A `LIKE` pattern for the topics a topic pattern can match: its literal part up to the
/// first wildcard token, then anything (`orders.*` → `orders.%`).
fn like_prefix(pattern: &str) -> String {
    let literal_end = pattern
        .split('.')
        .take_while(|token| *token != "*" && *token != ">")
        .map(|token| token.len() + 1)
        .sum::<usize>()
        .min(pattern.len());
    let mut like = String::with_capacity(literal_end + 2);
    for c in pattern[..literal_end].chars() {
        if matches!(c, '%' | '_' | '\\') {
            like.push('\\');
        }
        like.push(c);
    }
    like.push('%');
    like
}

/// Stores a new dead letter.
async fn insert_letter(tx: &mut SqliteConnection, letter: &DeadLetter) -> Result<(), BusError> {
    let envelope = serde_json::to_string(&letter.envelope).map_err(BusError::corrupt)?;
    sqlx::query(
        "INSERT INTO bus_dead_letters (id, grp, topic, envelope, reason, attempts, \
         first_failure_ms, last_failure_ms, error_kind, error, fingerprint, state, redrive_count) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(letter.id.to_string())
    .bind(&letter.group)
    .bind(&letter.topic)
    .bind(envelope)
    .bind(letter.reason.as_str())
    .bind(i64::from(letter.attempts))
    .bind(millis(letter.first_failure_at))
    .bind(millis(letter.last_failure_at))
    .bind(&letter.error_kind)
    .bind(&letter.error)
    .bind(&letter.fingerprint)
    .bind(letter.state.as_str())
    .bind(i64::from(letter.redrive_count))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

fn letter_from_row(row: &SqliteRow) -> Result<DeadLetter, BusError> {
    let id: String = row.try_get("id")?;
    let envelope: String = row.try_get("envelope")?;
    let reason: String = row.try_get("reason")?;
    let state: String = row.try_get("state")?;
    let attempts: i64 = row.try_get("attempts")?;
    let redrive_count: i64 = row.try_get("redrive_count")?;
    Ok(DeadLetter {
        id: Uuid::parse_str(&id).map_err(BusError::corrupt)?,
        group: row.try_get("grp")?,
        topic: row.try_get("topic")?,
        envelope: serde_json::from_str(&envelope).map_err(BusError::corrupt)?,
        reason: DeadLetterReason::parse(&reason)?,
        attempts: u32::try_from(attempts).map_err(BusError::corrupt)?,
        first_failure_at: from_millis(row.try_get("first_failure_ms")?),
        last_failure_at: from_millis(row.try_get("last_failure_ms")?),
        error_kind: row.try_get("error_kind")?,
        error: row.try_get("error")?,
        fingerprint: row.try_get("fingerprint")?,
        state: DeadLetterState::parse(&state)?,
        redrive_count: u32::try_from(redrive_count).map_err(BusError::corrupt)?,
    })
}

impl SqliteBus {
    async fn act(&self, id: Uuid, actor: &str, action: DlqActionKind) -> Result<(), BusError> {
        let mut connection = self.inner.pool.acquire().await?;
        let mut tx = connection.begin_with("BEGIN IMMEDIATE").await?;
        let row = sqlx::query("SELECT * FROM bus_dead_letters WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| not_found(id))?;
        let letter = letter_from_row(&row)?;
        let entry = DlqAction::new(action, &letter, actor);
        let now = millis(entry.at);
        match action {
            DlqActionKind::Redrive => {
                let envelope = serde_json::to_string(&redriven_envelope(&letter))
                    .map_err(BusError::corrupt)?;
                sqlx::query(
                    "INSERT INTO bus_log (topic, subject, only_group, envelope, published_ms) VALUES (?, ?, ?, ?, ?)",
                )
                .bind(&letter.topic)
                .bind(&letter.envelope.subject)
                .bind(&letter.group)
                .bind(envelope)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                sqlx::query("DELETE FROM bus_dead_letters WHERE id = ?")
                    .bind(id.to_string())
                    .execute(&mut *tx)
                    .await?;
            }
            DlqActionKind::Discard => {
                sqlx::query("DELETE FROM bus_dead_letters WHERE id = ?")
                    .bind(id.to_string())
                    .execute(&mut *tx)
                    .await?;
            }
            DlqActionKind::Archive => {
                sqlx::query("UPDATE bus_dead_letters SET state = 'archived' WHERE id = ?")
                    .bind(id.to_string())
                    .execute(&mut *tx)
                    .await?;
            }
        }
        sqlx::query(
            "INSERT INTO bus_dlq_actions (at_ms, action, dead_letter_id, message_id, actor) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(now)
        .bind(entry.action.as_str())
        .bind(entry.dead_letter_id.to_string())
        .bind(entry.message_id.to_string())
        .bind(&entry.actor)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        log_action(action, &letter, actor);
        self.inner.changed.notify_waiters();
        Ok(())
    }
}

impl DeadLetters for SqliteBus {
    async fn list_page(&self, filter: &DeadLetterFilter) -> Result<DeadLetterPage, BusError> {
        filter.validate()?;
        let mut after = id_cursor(filter)?.map(|id| id.to_string());
        let now = Utc::now();
        let age_bound = |age: Option<Duration>| {
            age.map(|age| {
                millis(now).saturating_sub(i64::try_from(age.as_millis()).unwrap_or(i64::MAX))
            })
        };
        let topic_prefix = filter.topic.as_deref().map(like_prefix);
        // Every filter but the topic pattern's wildcards runs in SQL; `accepts` checks the
        // rest. Rows are read in chunks of one page, until the page is full or the scan
        // budget is spent (then the page ends early with a cursor).
        let chunk = i64::try_from(filter.limit() + 1).unwrap_or(i64::MAX);
        let mut found = Vec::new();
        let mut scanned = 0_i64;
        loop {
            let rows = sqlx::query(
                "SELECT * FROM bus_dead_letters WHERE state = ?1 \
                 AND (?2 IS NULL OR grp = ?2) AND (?3 IS NULL OR fingerprint = ?3) \
                 AND (?4 IS NULL OR reason = ?4) AND (?5 IS NULL OR instr(error, ?5) > 0) \
                 AND (?6 IS NULL OR json_extract(envelope, '$.type') = ?6) \
                 AND (?7 IS NULL OR last_failure_ms <= ?7) \
                 AND (?8 IS NULL OR last_failure_ms >= ?8) \
                 AND (?9 IS NULL OR topic LIKE ?9 ESCAPE '\\') \
                 AND (?10 IS NULL OR id > ?10) \
                 ORDER BY id LIMIT ?11",
            )
            .bind(filter.state.unwrap_or_default().as_str())
            .bind(filter.group.as_deref())
            .bind(filter.fingerprint.as_deref())
            .bind(filter.reason.map(DeadLetterReason::as_str))
            .bind(filter.error_contains.as_deref())
            .bind(filter.kind.as_deref())
            .bind(age_bound(filter.older_than))
            .bind(age_bound(filter.newer_than))
            .bind(topic_prefix.as_deref())
            .bind(after.as_deref())
            .bind(chunk)
            .fetch_all(&self.inner.pool)
            .await?;
            let exhausted = i64::try_from(rows.len()).unwrap_or(i64::MAX) < chunk;
            for row in &rows {
                let letter = letter_from_row(row)?;
                let id = letter.id.to_string();
                after = Some(id.clone());
                scanned += 1;
                if filter.accepts(&letter, now) {
                    found.push((letter, id));
                    if found.len() > filter.limit() {
                        return Ok(page_of(found, filter.limit(), None));
                    }
                }
            }
            if exhausted {
                return Ok(page_of(found, filter.limit(), None));
            }
            if scanned >= DLQ_SCAN_MAX {
                return Ok(page_of(found, filter.limit(), after));
            }
        }
    }

    async fn get(&self, id: Uuid) -> Result<DeadLetter, BusError> {
        let row = sqlx::query("SELECT * FROM bus_dead_letters WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.inner.pool)
            .await?
            .ok_or_else(|| not_found(id))?;
        letter_from_row(&row)
    }

    async fn redrive(&self, id: Uuid, actor: &str) -> Result<(), BusError> {
        self.act(id, actor, DlqActionKind::Redrive).await
    }

    async fn discard(&self, id: Uuid, actor: &str) -> Result<(), BusError> {
        self.act(id, actor, DlqActionKind::Discard).await
    }

    async fn archive(&self, id: Uuid, actor: &str) -> Result<(), BusError> {
        self.act(id, actor, DlqActionKind::Archive).await
    }

    async fn actions(&self, limit: usize) -> Result<Vec<DlqAction>, BusError> {
        let limit = i64::try_from(limit.min(ACTIONS_LIMIT_MAX)).unwrap_or(0);
        let rows = sqlx::query("SELECT * FROM bus_dlq_actions ORDER BY id DESC LIMIT ?")
            .bind(limit)
            .fetch_all(&self.inner.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let action: String = row.try_get("action")?;
                let dead_letter_id: String = row.try_get("dead_letter_id")?;
                let message_id: String = row.try_get("message_id")?;
                Ok(DlqAction {
                    at: from_millis(row.try_get("at_ms")?),
                    action: DlqActionKind::parse(&action)?,
                    dead_letter_id: Uuid::parse_str(&dead_letter_id).map_err(BusError::corrupt)?,
                    message_id: Uuid::parse_str(&message_id).map_err(BusError::corrupt)?,
                    actor: row.try_get("actor")?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_topic_pattern_narrows_the_sql_scan_to_its_literal_prefix() {
        assert_eq!(like_prefix("orders.*"), "orders.%");
        assert_eq!(like_prefix("orders.created"), "orders.created%");
        assert_eq!(like_prefix(">"), "%");
        assert_eq!(like_prefix("a_b.*.c"), "a\\_b.%");
    }
}
