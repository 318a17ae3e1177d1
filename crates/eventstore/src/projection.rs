//! CQRS projections: read models in SQL, fed by the global log, exactly once.
//!
//! A [`ProjectionRunner`] reads [`read_all`](crate::EventStore::read_all) from the projection's
//! checkpoint, applies a batch of events to the read model inside one database transaction,
//! and writes the new checkpoint in that same transaction. A crash before the commit loses the
//! batch's writes *and* its checkpoint, so the batch is applied again; a crash after it keeps
//! both. No event is applied twice and none is skipped.
//!
//! # Several runners on one read model
//! Two runners may feed one generation at once: two processes sharing a PostgreSQL read model,
//! or [`ProjectionRunner::rebuild`]'s final catch-up beside the live runner. Each batch's
//! transaction therefore reads the checkpoint again *under a lock* before applying anything
//! (PostgreSQL: an upsert that creates the checkpoint row if missing and otherwise locks it,
//! returning it and the active generation in one statement; SQLite: `BEGIN IMMEDIATE` already
//! holds the file's only write lock) and skips the events at or below it. The events
//! themselves are read before the transaction, from the checkpoint the runner last committed,
//! so the lock is held only while the batch is applied; a runner that lost the race reads the
//! batch in vain and applies nothing of it.
//!
//! # Rebuilds without downtime
//! Read models are versioned by *generation*: the projection keeps one set of tables per
//! generation (for example `order_summaries_g1`), and [`Projection::activate`] points readers
//! at one (for example by recreating a view). [`ProjectionRunner::rebuild`] sets up generation
//! `n + 1`, replays the whole log into it while generation `n` keeps serving (and keeps being
//! updated by the live runner), then, once the new generation has caught up with the head,
//! activates it in one transaction and drops the old one.

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::{Pool, Postgres, Sqlite, Transaction};

use crate::error::EventStoreError;
use crate::store::EventStore;
use crate::types::RecordedEvent;

/// Events applied per transaction.
pub const PROJECTION_BATCH: usize = 500;
/// The longest a caught-up runner waits before checking for new events without a wake-up.
const IDLE_POLL: Duration = Duration::from_millis(250);
/// How long a woken runner lets more events arrive before it reads a batch, so one
/// transaction carries the events of many writers.
pub const PROJECTION_LINGER: Duration = Duration::from_millis(2);

/// Why a projection stopped.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    /// Reading the log failed.
    #[error(transparent)]
    Store(#[from] EventStoreError),
    /// The read model's database failed.
    #[error("read model database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The projection's handler refused an event; the batch was rolled back and the
    /// checkpoint did not move.
    #[error("projection `{projection}` failed on {event_type} at position {position}: {reason}")]
    Handler {
        /// The projection.
        projection: String,
        /// The event's global position.
        position: u64,
        /// The event's type.
        event_type: String,
        /// What failed.
        reason: String,
    },
}

/// The SQL databases a read model can live in; implemented for SQLite and PostgreSQL.
pub trait ReadModelDatabase: sqlx::Database {
    /// The statement that opens the runner's transactions. A transaction that reads its
    /// checkpoint and then writes must take SQLite's write lock up front (`BEGIN IMMEDIATE`):
    /// a deferred one fails with `SQLITE_BUSY` when another connection writes the same file
    /// in between, whatever the busy timeout.
    const BEGIN_WRITE: &'static str;

    /// Creates the checkpoint tables if needed.
    fn create_checkpoint_tables(
        pool: &Pool<Self>,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;
    /// The active generation of `projection` (0 when none is active yet).
    fn active_generation(
        pool: &Pool<Self>,
        projection: &str,
    ) -> impl Future<Output = Result<u32, sqlx::Error>> + Send;
    /// The position after which `generation` has applied nothing yet (0: nothing applied).
    fn checkpoint(
        pool: &Pool<Self>,
        projection: &str,
        generation: u32,
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send;
    /// The position after which `generation` has applied nothing yet, and the active
    /// generation (0 when none), read inside the batch's transaction in one statement, the
    /// checkpoint locked until the transaction ends: a second runner's batch waits here until
    /// this one commits, then sees the checkpoint it wrote. Creates the checkpoint (at 0) if
    /// missing, so there is a row to lock.
    fn lock_checkpoint(
        tx: &mut Transaction<'static, Self>,
        projection: &str,
        generation: u32,
    ) -> impl Future<Output = Result<LockedCheckpoint, sqlx::Error>> + Send;
    /// Records `position` as applied for `generation`, inside the batch's transaction.
    fn save_checkpoint(
        tx: &mut Transaction<'static, Self>,
        projection: &str,
        generation: u32,
        position: u64,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;
    /// Makes `generation` the active one, inside a transaction.
    fn set_active(
        tx: &mut Transaction<'static, Self>,
        projection: &str,
        generation: u32,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;
}

/// What [`ReadModelDatabase::lock_checkpoint`] read under the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockedCheckpoint {
    /// The position after which the generation has applied nothing yet.
    pub checkpoint: u64,
    /// The active generation (0 when none is active yet).
    pub active: u32,
}

macro_rules! read_model_database {
    ($db:ty, $int:literal, $begin:literal) => {
        impl ReadModelDatabase for $db {
            const BEGIN_WRITE: &'static str = $begin;

            async fn create_checkpoint_tables(pool: &Pool<Self>) -> Result<(), sqlx::Error> {
                sqlx::raw_sql(concat!(
                    "CREATE TABLE IF NOT EXISTS projection_checkpoints (name TEXT NOT NULL, generation INTEGER NOT NULL, position ",
                    $int,
                    " NOT NULL, PRIMARY KEY (name, generation));",
                    "CREATE TABLE IF NOT EXISTS projection_active (name TEXT PRIMARY KEY, generation INTEGER NOT NULL);"
                ))
                .execute(pool)
                .await?;
                Ok(())
            }

            async fn active_generation(pool: &Pool<Self>, projection: &str) -> Result<u32, sqlx::Error> {
                let generation: Option<i32> = sqlx::query_scalar("SELECT generation FROM projection_active WHERE name = $1")
                    .bind(projection)
                    .fetch_optional(pool)
                    .await?;
                Ok(generation.map_or(0, |g| u32::try_from(g).unwrap_or(0)))
            }

            async fn checkpoint(pool: &Pool<Self>, projection: &str, generation: u32) -> Result<u64, sqlx::Error> {
                let position: Option<i64> =
                    sqlx::query_scalar("SELECT position FROM projection_checkpoints WHERE name = $1 AND generation = $2")
                        .bind(projection)
                        .bind(i32::try_from(generation).unwrap_or(i32::MAX))
                        .fetch_optional(pool)
                        .await?;
                Ok(position.map_or(0, |p| u64::try_from(p).unwrap_or(0)))
            }

            async fn lock_checkpoint(
                tx: &mut Transaction<'static, Self>,
                projection: &str,
                generation: u32,
            ) -> Result<LockedCheckpoint, sqlx::Error> {
                // One statement: the upsert creates a missing row and, on the existing one,
                // takes its row lock (PostgreSQL locks a row `ON CONFLICT DO UPDATE` touches;
                // SQLite already holds the file's write lock) while returning it unchanged.
                let (position, active): (i64, Option<i32>) = sqlx::query_as(
                    "INSERT INTO projection_checkpoints (name, generation, position) VALUES ($1, $2, 0)
                     ON CONFLICT (name, generation) DO UPDATE SET position = projection_checkpoints.position
                     RETURNING position, (SELECT generation FROM projection_active WHERE name = $1)",
                )
                .bind(projection)
                .bind(i32::try_from(generation).unwrap_or(i32::MAX))
                .fetch_one(&mut **tx)
                .await?;
                Ok(LockedCheckpoint {
                    checkpoint: u64::try_from(position).unwrap_or(0),
                    active: active.map_or(0, |g| u32::try_from(g).unwrap_or(0)),
                })
            }

            async fn save_checkpoint(
                tx: &mut Transaction<'static, Self>,
                projection: &str,
                generation: u32,
                position: u64,
            ) -> Result<(), sqlx::Error> {
                sqlx::query(
                    "INSERT INTO projection_checkpoints (name, generation, position) VALUES ($1, $2, $3)
                     ON CONFLICT (name, generation) DO UPDATE SET position = excluded.position",
                )
                .bind(projection)
                .bind(i32::try_from(generation).unwrap_or(i32::MAX))
                .bind(i64::try_from(position).unwrap_or(i64::MAX))
                .execute(&mut **tx)
                .await?;
                Ok(())
            }

            async fn set_active(tx: &mut Transaction<'static, Self>, projection: &str, generation: u32) -> Result<(), sqlx::Error> {
                sqlx::query(
                    "INSERT INTO projection_active (name, generation) VALUES ($1, $2)
                     ON CONFLICT (name) DO UPDATE SET generation = excluded.generation",
                )
                .bind(projection)
                .bind(i32::try_from(generation).unwrap_or(i32::MAX))
                .execute(&mut **tx)
                .await?;
                Ok(())
            }
        }
    };
}

// SQLite needs no row lock: `BEGIN IMMEDIATE` holds the file's write lock for the whole
// transaction, so a second runner's batch cannot even start until this one commits.
read_model_database!(Sqlite, "INTEGER", "BEGIN IMMEDIATE");
read_model_database!(Postgres, "BIGINT", "BEGIN");

/// A read model fed by events.
///
/// Every method runs inside a transaction the runner commits together with the checkpoint.
pub trait Projection<DB: ReadModelDatabase>: Send + Sync + 'static {
    /// A stable, unique name: the checkpoint's key.
    fn name(&self) -> &str;

    /// Creates generation `generation`'s tables (idempotently).
    fn setup(
        &self,
        tx: &mut Transaction<'static, DB>,
        generation: u32,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    /// Applies one event to generation `generation`. Events the projection does not care
    /// about are simply ignored (return `Ok`).
    ///
    /// # Errors
    /// A message; the batch is rolled back and the runner stops.
    fn apply(
        &self,
        tx: &mut Transaction<'static, DB>,
        generation: u32,
        event: &RecordedEvent,
    ) -> impl Future<Output = Result<(), String>> + Send;

    /// Points readers at generation `generation` (for example by recreating a view).
    fn activate(
        &self,
        tx: &mut Transaction<'static, DB>,
        generation: u32,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    /// Drops generation `generation`'s tables, after a rebuild replaced it.
    fn teardown(
        &self,
        tx: &mut Transaction<'static, DB>,
        generation: u32,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;
}

/// Progress of a rebuild, reported after every batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebuildProgress {
    /// The generation being built.
    pub generation: u32,
    /// The last position applied to it.
    pub position: u64,
    /// The log's head when the batch was read.
    pub head: u64,
}

/// Feeds a [`Projection`] from an event store, exactly once per event.
#[derive(Debug)]
pub struct ProjectionRunner<P, S, DB: sqlx::Database> {
    projection: Arc<P>,
    store: S,
    pool: Pool<DB>,
    /// The checkpoint of a generation as this runner (or a clone) last committed it or read it
    /// under the lock: where the next batch's read starts, instead of one more query per batch.
    /// Only a hint: the locked read decides what is applied, and a checkpoint found below the
    /// hint (a generation reset) sends the runner back to read from there.
    hint: Arc<Mutex<Option<(u32, u64)>>>,
    /// The active generation as last read (0: not read yet), so a batch does not read it
    /// again: each batch's locked read returns it, and a batch that finds it changed applies
    /// nothing and goes again with the new one.
    active: Arc<AtomicU32>,
}

impl<P, S: Clone, DB: sqlx::Database> Clone for ProjectionRunner<P, S, DB> {
    fn clone(&self) -> Self {
        Self {
            projection: self.projection.clone(),
            store: self.store.clone(),
            pool: self.pool.clone(),
            hint: self.hint.clone(),
            active: self.active.clone(),
        }
    }
}

impl<P, S, DB> ProjectionRunner<P, S, DB>
where
    P: Projection<DB>,
    S: EventStore,
    DB: ReadModelDatabase,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
{
    /// Prepares the checkpoint tables and, on first use, generation 1 of the read model.
    ///
    /// # Errors
    /// A database error.
    pub async fn new(projection: P, store: S, pool: Pool<DB>) -> Result<Self, ProjectionError> {
        crate::metric_help::describe();
        DB::create_checkpoint_tables(&pool).await?;
        let runner = Self {
            projection: Arc::new(projection),
            store,
            pool,
            hint: Arc::new(Mutex::new(None)),
            active: Arc::new(AtomicU32::new(0)),
        };
        if DB::active_generation(&runner.pool, runner.projection.name()).await? == 0 {
            let mut tx = runner.pool.begin_with(DB::BEGIN_WRITE).await?;
            runner.projection.setup(&mut tx, 1).await?;
            runner.projection.activate(&mut tx, 1).await?;
            DB::set_active(&mut tx, runner.projection.name(), 1).await?;
            tx.commit().await?;
        }
        Ok(runner)
    }

    /// The generation readers see.
    ///
    /// # Errors
    /// A database error.
    pub async fn active_generation(&self) -> Result<u32, ProjectionError> {
        Ok(DB::active_generation(&self.pool, self.projection.name()).await?)
    }

    /// The last position the active generation has applied.
    ///
    /// # Errors
    /// A database error.
    pub async fn checkpoint(&self) -> Result<u64, ProjectionError> {
        let generation = self.active_generation().await?;
        Ok(DB::checkpoint(&self.pool, self.projection.name(), generation).await?)
    }

    /// How far the active generation is behind the log (head − checkpoint), also exported as
    /// the `trellis_projection_lag_events` gauge. The runner sets the gauge after each
    /// catch-up; a service calls this periodically too, so the gauge keeps moving while the
    /// projection is stopped or failing.
    ///
    /// # Errors
    /// A store or database error.
    pub async fn lag(&self) -> Result<u64, ProjectionError> {
        let head = self.store.head().await?;
        let lag = head.saturating_sub(self.checkpoint().await?);
        metrics::gauge!("trellis_projection_lag_events", "projection" => self.projection.name().to_owned()).set(lag as f64);
        Ok(lag)
    }

    /// Applies one batch to `generation` (events after its checkpoint), committing the
    /// checkpoint with it. Returns the new checkpoint and the number of events read from the
    /// log (some may have been skipped, applied meanwhile by another runner). With `live`,
    /// `generation` must be the active one: a batch that finds another active under the lock
    /// applies nothing (a rebuild switched readers meanwhile) and reports a full batch, so
    /// [`catch_up`](Self::catch_up) goes again with the new one.
    async fn step(&self, generation: u32, live: bool) -> Result<(u64, usize), ProjectionError> {
        let name = self.projection.name();
        // Unlocked: only chooses what to read. The locked read below decides what to apply.
        let hinted = self.hinted(generation);
        let seen = match hinted {
            Some(position) => position,
            None => DB::checkpoint(&self.pool, name, generation).await?,
        };
        let events = self.store.read_all(seen + 1, PROJECTION_BATCH).await?;
        let Some(last) = events.last().map(|e| e.position) else {
            // Caught up (or idle): read the checkpoint itself next time, so a hint never
            // outlives a change it cannot see while nothing is appended.
            self.set_hint(None);
            return Ok((seen, 0));
        };
        let mut tx = self.pool.begin_with(DB::BEGIN_WRITE).await?;
        let LockedCheckpoint { checkpoint, active } =
            DB::lock_checkpoint(&mut tx, name, generation).await?;
        if live && active != 0 && active != generation {
            tx.rollback().await?;
            self.active.store(active, Ordering::Relaxed);
            return Ok((seen, PROJECTION_BATCH));
        }
        if checkpoint < seen {
            // The checkpoint went back (the generation was set up again): the events between
            // it and the hint were not read. Apply nothing; the next batch reads from it.
            tx.rollback().await?;
            self.set_hint(Some((generation, checkpoint)));
            return Ok((checkpoint, PROJECTION_BATCH));
        }
        if checkpoint >= last {
            // Another runner applied the whole batch while this one read it.
            tx.rollback().await?;
            self.set_hint(Some((generation, checkpoint)));
            return Ok((checkpoint, events.len()));
        }
        for event in events.iter().filter(|e| e.position > checkpoint) {
            let span = apply_span(name, event);
            tracing::Instrument::instrument(
                self.projection.apply(&mut tx, generation, event),
                span,
            )
            .await
            .map_err(|reason| ProjectionError::Handler {
                projection: name.to_owned(),
                position: event.position,
                event_type: event.event_type.clone(),
                reason,
            })?;
        }
        // Applied, checkpoint not written: a crash here rolls both back (the batch reapplies).
        failpoint!(crate::failpoints::PROJECTION_BEFORE_CHECKPOINT, name);
        DB::save_checkpoint(&mut tx, name, generation, last).await?;
        tx.commit().await?;
        self.set_hint(Some((generation, last)));
        // Both committed: a crash here must not apply the batch again.
        failpoint!(crate::failpoints::PROJECTION_AFTER_COMMIT, name);
        Ok((last, events.len()))
    }

    /// The hinted checkpoint of `generation`, if the hint is about it.
    fn hinted(&self, generation: u32) -> Option<u64> {
        let hint = *self.hint.lock().unwrap_or_else(|p| p.into_inner());
        hint.and_then(|(hinted, position)| (hinted == generation).then_some(position))
    }

    fn set_hint(&self, hint: Option<(u32, u64)>) {
        *self.hint.lock().unwrap_or_else(|p| p.into_inner()) = hint;
    }

    /// Applies every event up to the current head to the active generation; returns the
    /// checkpoint reached.
    ///
    /// # Errors
    /// A store, database or handler error; the failed batch is not applied.
    pub async fn catch_up(&self) -> Result<u64, ProjectionError> {
        loop {
            let generation = match self.active.load(Ordering::Relaxed) {
                0 => {
                    let read = self.active_generation().await?;
                    self.active.store(read, Ordering::Relaxed);
                    read
                }
                known => known,
            };
            let (checkpoint, read) = self.step(generation, true).await?;
            // A short batch reached the head as it was when read: done, without reading an
            // empty batch to find out.
            if read < PROJECTION_BATCH {
                let head = *self.store.watch_head().borrow();
                metrics::gauge!("trellis_projection_lag_events", "projection" => self.projection.name().to_owned())
                    .set(head.saturating_sub(checkpoint) as f64);
                return Ok(checkpoint);
            }
        }
    }

    /// Keeps the active generation up to date until `shutdown` completes.
    ///
    /// # Errors
    /// The first store, database or handler error.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<(), ProjectionError> {
        let mut head = self.store.watch_head();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            head.borrow_and_update();
            self.catch_up().await?;
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                woken = tokio::time::timeout(IDLE_POLL, head.changed()) => {
                    if woken.is_ok() {
                        tokio::time::sleep(PROJECTION_LINGER).await;
                    }
                }
            }
        }
    }

    /// Rebuilds the read model from the start of the log into a new generation while the
    /// current one keeps serving, then switches readers to it and drops the old one.
    /// `progress` is called after every batch.
    ///
    /// # Errors
    /// A store, database or handler error; the active generation is untouched.
    pub async fn rebuild(
        &self,
        mut progress: impl FnMut(RebuildProgress),
    ) -> Result<u32, ProjectionError> {
        let name = self.projection.name();
        let old = self.active_generation().await?;
        let new = old + 1;
        {
            let mut tx = self.pool.begin_with(DB::BEGIN_WRITE).await?;
            self.projection.teardown(&mut tx, new).await?;
            self.projection.setup(&mut tx, new).await?;
            DB::save_checkpoint(&mut tx, name, new, 0).await?;
            tx.commit().await?;
            self.set_hint(Some((new, 0)));
        }
        loop {
            let head = self.store.head().await?;
            let (position, read) = self.step(new, false).await?;
            progress(RebuildProgress {
                generation: new,
                position,
                head,
            });
            if read == 0 {
                break;
            }
        }
        let mut tx = self.pool.begin_with(DB::BEGIN_WRITE).await?;
        self.projection.activate(&mut tx, new).await?;
        DB::set_active(&mut tx, name, new).await?;
        tx.commit().await?;
        self.active.store(new, Ordering::Relaxed);
        // Catch up anything that arrived between the last batch and the switch.
        self.catch_up().await?;
        let mut tx = self.pool.begin_with(DB::BEGIN_WRITE).await?;
        self.projection.teardown(&mut tx, old).await?;
        tx.commit().await?;
        tracing::info!(
            projection = name,
            generation = new,
            "projection rebuilt and activated"
        );
        Ok(new)
    }
}

/// The span of applying one event to a read model (`<projection> apply`): a child of the span
/// the event was recorded in (its metadata's `traceparent`), so the read model's update joins
/// the trace of the request or saga step that caused it.
fn apply_span(projection: &str, event: &RecordedEvent) -> tracing::Span {
    let span = tracing::info_span!(
        "projection.apply",
        otel.name = %format_args!("{projection} apply"),
        projection,
        event_type = %event.event_type,
        position = event.position,
    );
    if let Some(traceparent) = &event.metadata.traceparent {
        let carrier = std::collections::HashMap::from([(
            trellis_telemetry::propagation::TRACEPARENT.to_owned(),
            traceparent.clone(),
        )]);
        trellis_telemetry::propagation::set_parent_from_map(&span, &carrier);
    }
    span
}
