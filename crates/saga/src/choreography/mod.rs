//! Choreography helpers: sagas without an orchestrator, as event handlers on `trellis-bus`.
//!
//! A [`Choreography`] declares handlers: `on` an event type, run a side effect and emit the
//! next event ([`Choreography::step`]); compensating handlers run on a failure event (by
//! convention `*.failed`) and undo a step ([`Choreography::compensation`]). A service calls
//! [`Choreography::handle`] for each delivery (from [`trellis_bus::Subscription::run`]):
//! the effect and the next event commit together, exactly once per message, through the bus
//! inbox ([`SqliteInbox::handle_once`] / [`PgInbox::handle_once`]) and outbox
//! ([`SqliteOutbox::enqueue`] / [`PgOutbox::enqueue`]), so a redelivered message has no second
//! effect and the next event is never lost or doubled.
//!
//! The database is the type parameter, a [`ChoreographyDb`]: [`Sqlite`] (the default; effects
//! get a `&mut SqliteConnection`, `handle` takes a [`SqliteInbox`]) or [`Postgres`] (effects get
//! a `&mut PgConnection`, `handle` takes a [`PgInbox`]): `Choreography::<Postgres>::new(..)`.
//!
//! Each handler run is also recorded, in the same transaction, in the table
//! `saga_choreography_log` (correlation id, event type, step, outcome, time; created on the
//! first [`Choreography::handle`] or by [`ChoreographyLog::new`]), so [`ChoreographyLog`]
//! rebuilds a flow's timeline from the database alone: what the inspector's HTTP endpoint
//! (`http::choreography_router`) and `trellis saga choreography show` serve.
//!
//! Every event a handler emits carries the correlation id of its trigger, its trigger as
//! causation, and the handler's step name in [`STEP_HEADER`] ([`COMPENSATION_HEADER`] for an
//! undo). [`Choreography::timeline`] rebuilds one flow's progress from its events (all events
//! with one correlation id) as the same [`SagaTimeline`] the orchestrator's inspector shows.
//!
//! # Local and remote effects: what holds where
//!
//! - **Local effect**, exactly once by transaction. The effect writes to the service's own
//!   tables in the database the inbox is in, on the connection the effect gets (in a function
//!   generic over the database: [`ChoreographyDb::tx`] gives it as a [`Tx`], and
//!   [`on_tx!`](crate::on_tx) writes the SQL once for both). The inbox record, the effect's
//!   writes, the log entry and the next event (an outbox row) commit in one transaction. An
//!   error or a crash anywhere before the commit rolls all of them back, and the redelivery
//!   runs the effect again on the state as it was; a delivery after the commit is a
//!   duplicate and runs nothing. The effect needs no idempotency of its own.
//! - **Remote effect**, at least once, made idempotent at the remote side; its outcome
//!   recorded once. A call to another service or a provider (or work in code that opens its
//!   own transactions) cannot join the transaction: the caller makes it first, with a
//!   business key (the order id) the remote side deduplicates on, and hands its outcome to
//!   [`Choreography::handle_prepared`]. A crash between the call and the commit makes the
//!   redelivery call again: the call is at least once, and only the key at the remote side
//!   keeps its effect to one. The outcome, the log entry and the next event commit with the
//!   inbox record exactly once, as for a local effect.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row, SqliteConnection};
/// The databases a [`Choreography`] runs on (sqlx's markers, re-exported).
pub use sqlx::{Postgres, Sqlite};
use trellis_bus::inbox::{Handled, PgInbox, SqliteInbox};
use trellis_bus::outbox::{PgOutbox, SqliteOutbox};
use trellis_bus::{BusError, Envelope, HandlerError, Message};
use uuid::Uuid;

use crate::bus::STEP_HEADER;
use crate::error::SagaError;
use crate::inspector::SagaTimeline;
use crate::store::{SagaId, SagaInstance, SagaRecord, SagaStatus, Transition};

/// The header marking an event emitted by a compensating handler.
pub const COMPENSATION_HEADER: &str = "trellis-saga-compensation";

/// The header through which [`Choreography::handle_prepared`] hands the outcome of the work
/// done before the transaction to the effects (read it with [`prepared`]). It is set on the
/// trigger as the effects see it, never on a published event.
pub const PREPARED_HEADER: &str = "trellis-saga-prepared";

/// The outcome [`Choreography::handle_prepared`] was given, as the effects see it on their
/// trigger (`None` under [`Choreography::handle`]).
pub fn prepared(trigger: &Envelope) -> Option<serde_json::Value> {
    trigger
        .headers
        .get(PREPARED_HEADER)
        .and_then(|text| serde_json::from_str(text).ok())
}

/// The inbox transaction's connection on either database, as [`ChoreographyDb::tx`] gives
/// it to an effect declared once for both (in a function generic over `D: ChoreographyDb`).
/// Write the effect's SQL once with [`on_tx!`](crate::on_tx), which compiles it for each
/// arm, using `$1` placeholders and the SQL both engines accept.
#[derive(Debug)]
pub enum Tx<'t> {
    /// A SQLite connection, inside the inbox's `BEGIN IMMEDIATE` transaction.
    Sqlite(&'t mut SqliteConnection),
    /// A PostgreSQL connection, inside the inbox's transaction.
    Postgres(&'t mut PgConnection),
}

impl Tx<'_> {
    /// The same connection for a shorter borrow, to pass it to several helpers in turn.
    pub fn reborrow(&mut self) -> Tx<'_> {
        match self {
            Self::Sqlite(connection) => Tx::Sqlite(connection),
            Self::Postgres(connection) => Tx::Postgres(connection),
        }
    }
}

/// Runs `body` with `$connection` bound to the connection inside a [`Tx`], compiled once per
/// database (as `trellis_service::on_db!` does for pools); both arms must give one type.
///
/// # Examples
/// ```
/// use trellis_saga::choreography::{Choreography, ChoreographyDb, NextEvent};
/// use trellis_saga::on_tx;
///
/// /// On `order.placed`, hold the order's stock in the inbox's transaction.
/// fn flow<D: ChoreographyDb>() -> Choreography<D> {
///     Choreography::new("place-order", "shop.inventory").step(
///         "order.placed",
///         "reserve",
///         |connection, trigger| {
///             let tx = D::tx(connection);
///             Box::pin(async move {
///                 on_tx!(tx, |connection| {
///                     sqlx::query("INSERT INTO holds (order_id) VALUES ($1)")
///                         .bind(&trigger.subject)
///                         .execute(&mut *connection)
///                         .await?
///                         .rows_affected()
///                 });
///                 Ok(Some(NextEvent::new("shop.events", "stock.reserved", trigger.data.clone())))
///             })
///         },
///     )
/// }
/// # let _ = flow::<sqlx::Sqlite>();
/// ```
#[macro_export]
macro_rules! on_tx {
    ($tx:expr, |$connection:ident| $body:expr) => {
        match $tx {
            $crate::choreography::Tx::Sqlite($connection) => $body,
            $crate::choreography::Tx::Postgres($connection) => $body,
        }
    };
}

/// The event a handler emits: its type and data, published on `topic`.
#[derive(Debug, Clone, PartialEq)]
pub struct NextEvent {
    /// The topic to publish on.
    pub topic: String,
    /// The event type (`stock.reserved`, or `payment.failed` to start compensation).
    pub kind: String,
    /// The body.
    pub data: serde_json::Value,
}

impl NextEvent {
    /// The event `kind` with `data` on `topic`.
    pub fn new(topic: impl Into<String>, kind: impl Into<String>, data: serde_json::Value) -> Self {
        Self {
            topic: topic.into(),
            kind: kind.into(),
            data,
        }
    }
}

/// What a handler's effect returns: the next event, if any.
pub type EffectFuture<'t> =
    Pin<Box<dyn Future<Output = Result<Option<NextEvent>, HandlerError>> + Send + 't>>;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The work [`ChoreographyDb::handle_once`] runs in the inbox's transaction.
type Run<'a, D> = Box<
    dyn for<'t> FnOnce(
            &'t mut <D as sqlx::Database>::Connection,
        ) -> BoxFuture<'t, Result<(), HandlerError>>
        + Send
        + 'a,
>;

/// A flow's log entries in order, and the declared steps (JSON) of their choreography.
type Loaded = (Vec<ChoreographyLogEntry>, Option<String>);

type Effect<D> = Arc<
    dyn for<'t> Fn(&'t mut <D as sqlx::Database>::Connection, &'t Envelope) -> EffectFuture<'t>
        + Send
        + Sync,
>;

mod sealed {
    /// Only this crate implements [`super::ChoreographyDb`].
    #[allow(unreachable_pub)]
    pub trait Sealed {}
    impl Sealed for sqlx::Sqlite {}
    impl Sealed for sqlx::Postgres {}
}

/// A database a [`Choreography`] runs on, with its bus inbox and outbox: [`Sqlite`]
/// ([`SqliteInbox`], [`SqliteOutbox`]) or [`Postgres`] ([`PgInbox`], [`PgOutbox`]). Sealed.
pub trait ChoreographyDb: sqlx::Database + sealed::Sealed {
    /// The bus inbox on this database, which [`Choreography::handle`] takes.
    type Inbox: fmt::Debug + Send + Sync;

    /// The connection an effect gets (inside the inbox's transaction) as a [`Tx`], so an
    /// effect declared in a function generic over `D` writes its SQL once for both databases.
    fn tx(connection: &mut Self::Connection) -> Tx<'_>;

    /// Runs `run` once per message id and consumer group in the inbox's transaction.
    #[doc(hidden)]
    fn handle_once<'a>(
        inbox: &'a Self::Inbox,
        message: &'a Message,
        run: Run<'a, Self>,
    ) -> BoxFuture<'a, Result<Handled<()>, HandlerError>>;

    /// Writes `event` to the outbox in the caller's transaction.
    #[doc(hidden)]
    fn enqueue<'t>(
        tx: &'t mut Self::Connection,
        topic: &'t str,
        event: &'t Envelope,
    ) -> BoxFuture<'t, Result<(), BusError>>;

    /// Creates the choreography tables if missing; records `definition`'s steps if given.
    #[doc(hidden)]
    fn install<'t>(
        tx: &'t mut Self::Connection,
        definition: Option<(&'t str, &'t str)>,
    ) -> BoxFuture<'t, Result<(), sqlx::Error>>;

    /// Appends one handler run to the log in the caller's transaction.
    #[doc(hidden)]
    fn record<'t>(
        tx: &'t mut Self::Connection,
        entry: &'t ChoreographyLogEntry,
    ) -> BoxFuture<'t, Result<(), sqlx::Error>>;

    /// The log entries of one correlation id in order, and the declared steps (JSON) of the
    /// choreography they name.
    #[doc(hidden)]
    fn load(
        pool: &sqlx::Pool<Self>,
        correlation_id: Uuid,
    ) -> BoxFuture<'_, Result<Loaded, sqlx::Error>>;
}

const SQLITE_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS saga_choreography_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    choreography TEXT NOT NULL,
    correlation_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    step TEXT NOT NULL,
    compensating INTEGER NOT NULL,
    outcome TEXT,
    error TEXT,
    at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS saga_choreography_log_by_correlation
    ON saga_choreography_log (correlation_id, id);
CREATE TABLE IF NOT EXISTS saga_choreographies (name TEXT PRIMARY KEY, steps TEXT NOT NULL)";

const PG_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS saga_choreography_log (
    id BIGSERIAL PRIMARY KEY,
    choreography TEXT NOT NULL,
    correlation_id UUID NOT NULL,
    event_id UUID NOT NULL,
    event_type TEXT NOT NULL,
    step TEXT NOT NULL,
    compensating BOOLEAN NOT NULL,
    outcome TEXT,
    error TEXT,
    at TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS saga_choreography_log_by_correlation
    ON saga_choreography_log (correlation_id, id);
CREATE TABLE IF NOT EXISTS saga_choreographies (name TEXT PRIMARY KEY, steps TEXT NOT NULL)";

const UPSERT_DEFINITION: &str = "INSERT INTO saga_choreographies (name, steps) VALUES ($1, $2) \
     ON CONFLICT (name) DO UPDATE SET steps = excluded.steps";

impl ChoreographyDb for Sqlite {
    type Inbox = SqliteInbox;

    fn tx(connection: &mut SqliteConnection) -> Tx<'_> {
        Tx::Sqlite(connection)
    }

    fn handle_once<'a>(
        inbox: &'a SqliteInbox,
        message: &'a Message,
        run: Run<'a, Self>,
    ) -> BoxFuture<'a, Result<Handled<()>, HandlerError>> {
        Box::pin(inbox.handle_once(message, move |tx| run(tx)))
    }

    fn enqueue<'t>(
        tx: &'t mut SqliteConnection,
        topic: &'t str,
        event: &'t Envelope,
    ) -> BoxFuture<'t, Result<(), BusError>> {
        Box::pin(SqliteOutbox::enqueue(tx, topic, event))
    }

    fn install<'t>(
        tx: &'t mut SqliteConnection,
        definition: Option<(&'t str, &'t str)>,
    ) -> BoxFuture<'t, Result<(), sqlx::Error>> {
        Box::pin(async move {
            sqlx::raw_sql(SQLITE_SCHEMA).execute(&mut *tx).await?;
            if let Some((name, steps)) = definition {
                sqlx::query(UPSERT_DEFINITION)
                    .bind(name)
                    .bind(steps)
                    .execute(&mut *tx)
                    .await?;
            }
            Ok(())
        })
    }

    fn record<'t>(
        tx: &'t mut SqliteConnection,
        entry: &'t ChoreographyLogEntry,
    ) -> BoxFuture<'t, Result<(), sqlx::Error>> {
        Box::pin(async move {
            sqlx::query(
                "INSERT INTO saga_choreography_log (choreography, correlation_id, event_id, \
                 event_type, step, compensating, outcome, error, at_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            )
            .bind(&entry.choreography)
            .bind(entry.correlation_id.to_string())
            .bind(entry.event_id.to_string())
            .bind(&entry.event_type)
            .bind(&entry.step)
            .bind(entry.compensating)
            .bind(&entry.outcome)
            .bind(&entry.error)
            .bind(entry.at.timestamp_millis())
            .execute(&mut *tx)
            .await?;
            Ok(())
        })
    }

    fn load(
        pool: &sqlx::SqlitePool,
        correlation_id: Uuid,
    ) -> BoxFuture<'_, Result<Loaded, sqlx::Error>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT choreography, event_id, event_type, step, compensating, outcome, error, \
                 at_ms FROM saga_choreography_log WHERE correlation_id = $1 ORDER BY id",
            )
            .bind(correlation_id.to_string())
            .fetch_all(pool)
            .await?;
            let mut entries = Vec::with_capacity(rows.len());
            for row in rows {
                let event_id: String = row.try_get("event_id")?;
                let at_ms: i64 = row.try_get("at_ms")?;
                entries.push(ChoreographyLogEntry {
                    choreography: row.try_get("choreography")?,
                    correlation_id,
                    event_id: Uuid::parse_str(&event_id)
                        .map_err(|error| sqlx::Error::Decode(Box::new(error)))?,
                    event_type: row.try_get("event_type")?,
                    step: row.try_get("step")?,
                    compensating: row.try_get("compensating")?,
                    outcome: row.try_get("outcome")?,
                    error: row.try_get("error")?,
                    at: DateTime::from_timestamp_millis(at_ms).unwrap_or_default(),
                });
            }
            let steps = match entries.first() {
                Some(entry) => {
                    sqlx::query_scalar("SELECT steps FROM saga_choreographies WHERE name = $1")
                        .bind(&entry.choreography)
                        .fetch_optional(pool)
                        .await?
                }
                None => None,
            };
            Ok((entries, steps))
        })
    }
}

impl ChoreographyDb for Postgres {
    type Inbox = PgInbox;

    fn tx(connection: &mut PgConnection) -> Tx<'_> {
        Tx::Postgres(connection)
    }

    fn handle_once<'a>(
        inbox: &'a PgInbox,
        message: &'a Message,
        run: Run<'a, Self>,
    ) -> BoxFuture<'a, Result<Handled<()>, HandlerError>> {
        Box::pin(inbox.handle_once(message, move |tx| run(tx)))
    }

    fn enqueue<'t>(
        tx: &'t mut PgConnection,
        topic: &'t str,
        event: &'t Envelope,
    ) -> BoxFuture<'t, Result<(), BusError>> {
        Box::pin(PgOutbox::enqueue(tx, topic, event))
    }

    fn install<'t>(
        tx: &'t mut PgConnection,
        definition: Option<(&'t str, &'t str)>,
    ) -> BoxFuture<'t, Result<(), sqlx::Error>> {
        Box::pin(async move {
            sqlx::raw_sql(PG_SCHEMA).execute(&mut *tx).await?;
            if let Some((name, steps)) = definition {
                sqlx::query(UPSERT_DEFINITION)
                    .bind(name)
                    .bind(steps)
                    .execute(&mut *tx)
                    .await?;
            }
            Ok(())
        })
    }

    fn record<'t>(
        tx: &'t mut PgConnection,
        entry: &'t ChoreographyLogEntry,
    ) -> BoxFuture<'t, Result<(), sqlx::Error>> {
        Box::pin(async move {
            sqlx::query(
                "INSERT INTO saga_choreography_log (choreography, correlation_id, event_id, \
                 event_type, step, compensating, outcome, error, at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            )
            .bind(&entry.choreography)
            .bind(entry.correlation_id)
            .bind(entry.event_id)
            .bind(&entry.event_type)
            .bind(&entry.step)
            .bind(entry.compensating)
            .bind(&entry.outcome)
            .bind(&entry.error)
            .bind(entry.at)
            .execute(&mut *tx)
            .await?;
            Ok(())
        })
    }

    fn load(
        pool: &sqlx::PgPool,
        correlation_id: Uuid,
    ) -> BoxFuture<'_, Result<Loaded, sqlx::Error>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT choreography, event_id, event_type, step, compensating, outcome, error, \
                 at FROM saga_choreography_log WHERE correlation_id = $1 ORDER BY id",
            )
            .bind(correlation_id)
            .fetch_all(pool)
            .await?;
            let mut entries = Vec::with_capacity(rows.len());
            for row in rows {
                entries.push(ChoreographyLogEntry {
                    choreography: row.try_get("choreography")?,
                    correlation_id,
                    event_id: row.try_get("event_id")?,
                    event_type: row.try_get("event_type")?,
                    step: row.try_get("step")?,
                    compensating: row.try_get("compensating")?,
                    outcome: row.try_get("outcome")?,
                    error: row.try_get("error")?,
                    at: row.try_get("at")?,
                });
            }
            let steps = match entries.first() {
                Some(entry) => {
                    sqlx::query_scalar("SELECT steps FROM saga_choreographies WHERE name = $1")
                        .bind(&entry.choreography)
                        .fetch_optional(pool)
                        .await?
                }
                None => None,
            };
            Ok((entries, steps))
        })
    }
}

/// One handler run, as recorded in `saga_choreography_log` with the inbox entry.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChoreographyLogEntry {
    /// The choreography's name.
    pub choreography: String,
    /// The flow: the trigger's correlation id (its own id when it had none).
    pub correlation_id: Uuid,
    /// The triggering event's id.
    pub event_id: Uuid,
    /// The triggering event's type.
    pub event_type: String,
    /// The handler's step.
    pub step: String,
    /// Whether the handler was a compensation.
    pub compensating: bool,
    /// The type of the event the handler emitted (`None`: it emitted none).
    pub outcome: Option<String>,
    /// The emitted failure's `error` field, for a `*.failed` outcome.
    pub error: Option<String>,
    /// When the handler ran.
    pub at: DateTime<Utc>,
}

struct Handler<D: ChoreographyDb> {
    on: String,
    step: String,
    compensating: bool,
    effect: Effect<D>,
}

/// A choreographed saga on database `D` ([`Sqlite`] by default, or [`Postgres`]): named
/// event handlers, forward and compensating.
pub struct Choreography<D: ChoreographyDb = Sqlite> {
    name: String,
    source: String,
    handlers: Vec<Handler<D>>,
    installed: AtomicBool,
}

impl<D: ChoreographyDb> fmt::Debug for Choreography<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let handlers: Vec<_> = self
            .handlers
            .iter()
            .map(|handler| (&handler.on, &handler.step, handler.compensating))
            .collect();
        f.debug_struct("Choreography")
            .field("name", &self.name)
            .field("handlers", &handlers)
            .finish()
    }
}

/// What happened in a flow, in order, whether read from its events or from the log.
enum Fact {
    /// A handler started on its trigger.
    Ran { step: String, compensating: bool },
    /// A handler finished (with the emitted failure's `error` for a failed step).
    Done {
        step: String,
        compensating: bool,
        error: Option<String>,
    },
}

impl<D: ChoreographyDb> Choreography<D> {
    /// An empty choreography named `name`; events it emits have `source` as their source.
    /// Name the database when it is not SQLite: `Choreography::<Postgres>::new(..)`.
    pub fn new(name: impl Into<String>, source: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            source: source.into(),
            handlers: Vec::new(),
            installed: AtomicBool::new(false),
        }
    }

    /// Declares step `step`: on events of type `on`, run `effect` in the inbox's transaction
    /// and emit the event it returns. Steps appear in the timeline in declaration order. The
    /// effect's writes on its connection commit with the inbox record, or roll back with it
    /// (in a function generic over `D`, take the connection as a [`Tx`] with
    /// [`ChoreographyDb::tx`]).
    #[must_use]
    pub fn step<F>(mut self, on: impl Into<String>, step: impl Into<String>, effect: F) -> Self
    where
        F: for<'t> Fn(&'t mut D::Connection, &'t Envelope) -> EffectFuture<'t>
            + Send
            + Sync
            + 'static,
    {
        self.handlers.push(Handler {
            on: on.into(),
            step: step.into(),
            compensating: false,
            effect: Arc::new(effect),
        });
        self
    }

    /// Declares the compensation of `step`: on failure events of type `on`, run `effect`
    /// (the undo) and emit the event it returns.
    #[must_use]
    pub fn compensation<F>(
        mut self,
        on: impl Into<String>,
        step: impl Into<String>,
        effect: F,
    ) -> Self
    where
        F: for<'t> Fn(&'t mut D::Connection, &'t Envelope) -> EffectFuture<'t>
            + Send
            + Sync
            + 'static,
    {
        self.handlers.push(Handler {
            on: on.into(),
            step: step.into(),
            compensating: true,
            effect: Arc::new(effect),
        });
        self
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The forward steps, in declaration order.
    fn steps(&self) -> Vec<String> {
        self.handlers
            .iter()
            .filter(|handler| !handler.compensating)
            .map(|handler| handler.step.clone())
            .collect()
    }

    /// [`Choreography::handle`] for a step whose side effect is remote, so it cannot run
    /// inside the inbox's transaction: a call to another service or an external API (or work
    /// through code that opens its own transactions). The caller makes that call first,
    /// idempotent by a business key (the order id) at the remote side, and passes its outcome
    /// as `prepared`; the effects read it with [`prepared`] and return the event to emit,
    /// which commits with the inbox record and the log entry as in [`Choreography::handle`].
    /// Work on the service's own tables belongs in the effect instead, in the transaction
    /// (see the module's "Local and remote effects").
    ///
    /// What holds: the call is at least once (a process that stops between the call and the
    /// commit repeats it on redelivery), and the remote side's deduplication by the key keeps
    /// its effect to one, answering the first outcome again. The outcome and the next event
    /// are recorded exactly once (the inbox). Call and event are not atomic: without the key
    /// at the remote side, a redelivery acts twice.
    ///
    /// # Errors
    /// As [`Choreography::handle`].
    pub async fn handle_prepared(
        &self,
        inbox: &D::Inbox,
        message: &Message,
        prepared: &serde_json::Value,
    ) -> Result<usize, HandlerError> {
        let mut annotated = message.clone();
        annotated
            .envelope
            .headers
            .insert(PREPARED_HEADER.to_owned(), prepared.to_string());
        self.handle(inbox, &annotated).await
    }

    /// Runs every handler declared for `message`'s event type, each once per message id and
    /// consumer group: its effect, its next event (through the outbox) and its entry in
    /// `saga_choreography_log` commit with the inbox record. A redelivered message runs
    /// nothing. Returns how many handlers ran. The first run in a process also creates the
    /// log's tables if missing and records the declared steps (call [`ChoreographyLog::new`]
    /// at start-up to create them before concurrent handlers race to).
    ///
    /// # Errors
    /// A handler's error (its writes roll back, the bus retries per its policy) or a database
    /// error (transient).
    pub async fn handle(&self, inbox: &D::Inbox, message: &Message) -> Result<usize, HandlerError> {
        // Owned, because the inbox's transaction may outlive this borrow of `self`.
        let handlers: Vec<(Effect<D>, String, bool)> = self
            .handlers
            .iter()
            .filter(|handler| handler.on == message.envelope.kind)
            .map(|handler| {
                (
                    handler.effect.clone(),
                    handler.step.clone(),
                    handler.compensating,
                )
            })
            .collect();
        let count = handlers.len();
        if handlers.is_empty() {
            return Ok(0);
        }
        let install = !self.installed.load(Ordering::Acquire);
        let definition = (
            self.name.clone(),
            serde_json::to_string(&self.steps()).unwrap_or_else(|_| "[]".to_owned()),
        );
        let source = self.source.clone();
        let trigger = message.envelope.clone();
        let handled = D::handle_once(
            inbox,
            message,
            Box::new(move |tx| {
                Box::pin(async move {
                    if install {
                        D::install(&mut *tx, Some((&definition.0, &definition.1))).await?;
                    }
                    for (effect, step, compensating) in handlers {
                        let next = effect(&mut *tx, &trigger).await?;
                        let mut entry = ChoreographyLogEntry {
                            choreography: definition.0.clone(),
                            correlation_id: trigger.correlation_id.unwrap_or(trigger.id),
                            event_id: trigger.id,
                            event_type: trigger.kind.clone(),
                            step: step.clone(),
                            compensating,
                            outcome: None,
                            error: None,
                            at: Utc::now(),
                        };
                        if let Some(next) = next {
                            let event = follow(
                                &trigger,
                                &source,
                                &step,
                                compensating,
                                next.kind,
                                next.data,
                            );
                            D::enqueue(&mut *tx, &next.topic, &event)
                                .await
                                .map_err(HandlerError::from)?;
                            entry.error = failure_error(&event);
                            entry.outcome = Some(event.kind);
                        }
                        D::record(&mut *tx, &entry).await?;
                    }
                    Ok(())
                })
            }),
        )
        .await?;
        Ok(match handled {
            Handled::Done(()) => {
                // Only a committed run created the tables (a duplicate ran nothing).
                if install {
                    self.installed.store(true, Ordering::Release);
                }
                count
            }
            Handled::Duplicate => 0,
        })
    }

    /// Rebuilds the progress of the flow whose events are `events` (all carrying one
    /// correlation id, in any order) as a timeline: each declared step with its trigger
    /// (executing), its emitted event (succeeded, or failed for a `*.failed` type) and its
    /// compensation. `Completed` once the last step succeeded; `Failed` once every
    /// compensation that started has finished.
    pub fn timeline(&self, correlation_id: Uuid, events: &[Envelope]) -> SagaTimeline {
        let mut events: Vec<&Envelope> = events
            .iter()
            .filter(|event| event.correlation_id == Some(correlation_id))
            .collect();
        events.sort_by_key(|event| (event.time, event.id));
        let mut facts = Vec::new();
        for event in &events {
            for handler in self.handlers.iter().filter(|h| h.on == event.kind) {
                facts.push((
                    event.time,
                    Fact::Ran {
                        step: handler.step.clone(),
                        compensating: handler.compensating,
                    },
                ));
            }
            if let Some(step) = event.headers.get(STEP_HEADER) {
                facts.push((
                    event.time,
                    Fact::Done {
                        step: step.clone(),
                        compensating: event.headers.contains_key(COMPENSATION_HEADER),
                        error: failure_error(event),
                    },
                ));
            }
        }
        build_timeline(&self.name, correlation_id, &self.steps(), facts)
    }
}

/// The `error` of a failure event (`*.failed`, not from a compensation): its `error` field,
/// else its type.
fn failure_error(event: &Envelope) -> Option<String> {
    (event.kind.ends_with(".failed") && !event.headers.contains_key(COMPENSATION_HEADER)).then(
        || {
            event.data["error"]
                .as_str()
                .map_or_else(|| event.kind.clone(), str::to_owned)
        },
    )
}

/// The timeline of flow `correlation_id` of choreography `name` (forward `steps`) from its
/// facts, in order.
fn build_timeline(
    name: &str,
    correlation_id: Uuid,
    steps: &[String],
    facts: Vec<(DateTime<Utc>, Fact)>,
) -> SagaTimeline {
    let started_at = facts.first().map_or_else(Utc::now, |(at, _)| *at);
    let mut transitions = vec![(
        started_at,
        Transition::Started {
            steps: steps.to_vec(),
            pivot: None,
        },
    )];
    let mut failure: Option<(String, String)> = None;
    let mut compensations_open = 0_i64;
    for (at, fact) in facts {
        match fact {
            Fact::Ran { step, compensating } => {
                let transition = if compensating {
                    compensations_open += 1;
                    Transition::StepCompensating { step, attempt: 1 }
                } else {
                    Transition::StepExecuting { step, attempt: 1 }
                };
                transitions.push((at, transition));
            }
            Fact::Done {
                step, compensating, ..
            } if compensating => {
                compensations_open -= 1;
                transitions.push((at, Transition::StepCompensated { step }));
            }
            Fact::Done {
                step,
                error: Some(error),
                ..
            } => {
                transitions.push((
                    at,
                    Transition::StepFailed {
                        step: step.clone(),
                        attempt: 1,
                        retryable: false,
                        error: error.clone(),
                    },
                ));
                transitions.push((
                    at,
                    Transition::Compensating {
                        failed_step: step.clone(),
                        error: error.clone(),
                    },
                ));
                failure = Some((step, error));
            }
            Fact::Done { step, .. } => {
                let last = steps.last() == Some(&step);
                transitions.push((at, Transition::StepSucceeded { step }));
                if failure.is_none() && last {
                    transitions.push((at, Transition::Completed));
                }
            }
        }
    }
    let last_at = transitions.last().map_or(started_at, |(at, _)| *at);
    if let Some((step, error)) = failure
        && compensations_open <= 0
    {
        transitions.push((last_at, Transition::Failed { step, error }));
    }
    let status = transitions
        .last()
        .map_or(SagaStatus::Running, |(_, transition)| {
            transition.status_after()
        });
    let instance = SagaInstance {
        id: SagaId::from_uuid(correlation_id),
        definition: name.to_owned(),
        version: 0,
        status,
        records: transitions
            .into_iter()
            .enumerate()
            .map(|(index, (at, transition))| SagaRecord {
                seq: index as u64 + 1,
                transition,
                context: serde_json::Value::Null,
                at,
            })
            .collect(),
    };
    SagaTimeline::from_instance(&instance)
}

/// A choreography log on database `D`: rebuilds a flow's timeline from the entries
/// [`Choreography::handle`] recorded, without the choreography's code (what the inspector's
/// endpoint and CLI use).
#[derive(Debug, Clone)]
pub struct ChoreographyLog<D: ChoreographyDb = Sqlite> {
    pool: sqlx::Pool<D>,
    marker: PhantomData<fn() -> D>,
}

impl<D: ChoreographyDb> ChoreographyLog<D> {
    /// Uses `pool` (the database the choreography's inbox is in) and creates the log's tables
    /// if missing.
    ///
    /// # Errors
    /// The tables cannot be created.
    pub async fn new(pool: sqlx::Pool<D>) -> Result<Self, SagaError> {
        let mut connection = pool.acquire().await?;
        D::install(&mut connection, None).await?;
        drop(connection);
        Ok(Self {
            pool,
            marker: PhantomData,
        })
    }

    /// Connects to `url` (`sqlite://PATH` or `postgres://...`) and creates the log's tables if
    /// missing.
    ///
    /// # Errors
    /// The database is unreachable or the tables cannot be created.
    pub async fn connect(url: &str) -> Result<Self, SagaError> {
        Self::new(sqlx::Pool::<D>::connect(url).await?).await
    }

    /// The pool (the service's database, where its inbox and outbox also live).
    pub fn pool(&self) -> &sqlx::Pool<D> {
        &self.pool
    }

    /// Every handler run recorded for flow `correlation_id`, in order.
    ///
    /// # Errors
    /// Database errors.
    pub async fn entries(
        &self,
        correlation_id: Uuid,
    ) -> Result<Vec<ChoreographyLogEntry>, SagaError> {
        Ok(D::load(&self.pool, correlation_id).await?.0)
    }

    /// The timeline of flow `correlation_id`: each declared step (as of the choreography's
    /// last run) with when it ran, succeeded, failed or was compensated, and the flow's status
    /// (`Completed` once the last step succeeded; `Failed` once every started compensation
    /// finished after a failure). Its id is the correlation id.
    ///
    /// # Errors
    /// [`SagaError::NotFound`] when nothing was recorded for `correlation_id`; database errors.
    pub async fn timeline(&self, correlation_id: Uuid) -> Result<SagaTimeline, SagaError> {
        let (entries, steps) = D::load(&self.pool, correlation_id).await?;
        let Some(first) = entries.first() else {
            return Err(SagaError::NotFound(SagaId::from_uuid(correlation_id)));
        };
        let name = first.choreography.clone();
        let mut steps: Vec<String> = match steps {
            Some(text) => serde_json::from_str(&text)?,
            None => Vec::new(),
        };
        let mut facts = Vec::with_capacity(entries.len() * 2);
        for entry in entries {
            if !entry.compensating && !steps.contains(&entry.step) {
                steps.push(entry.step.clone());
            }
            facts.push((
                entry.at,
                Fact::Ran {
                    step: entry.step.clone(),
                    compensating: entry.compensating,
                },
            ));
            facts.push((
                entry.at,
                Fact::Done {
                    step: entry.step,
                    compensating: entry.compensating,
                    error: entry.error,
                },
            ));
        }
        Ok(build_timeline(&name, correlation_id, &steps, facts))
    }
}

/// The event a handler emits after `trigger`: same subject and correlation, caused by it,
/// naming the handler's step.
fn follow(
    trigger: &Envelope,
    source: &str,
    step: &str,
    compensating: bool,
    kind: String,
    data: serde_json::Value,
) -> Envelope {
    let mut event = Envelope::new(kind, source, trigger.subject.clone(), data);
    event.correlation_id = trigger.correlation_id.or(Some(trigger.id));
    event.causation_id = Some(trigger.id);
    event
        .headers
        .insert(STEP_HEADER.to_owned(), step.to_owned());
    if compensating {
        event
            .headers
            .insert(COMPENSATION_HEADER.to_owned(), "true".to_owned());
    }
    event
}
