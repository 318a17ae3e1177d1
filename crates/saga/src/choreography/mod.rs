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
//!
//! [`SqliteInbox`]: trellis_bus::inbox::SqliteInbox
//! [`SqliteInbox::handle_once`]: trellis_bus::inbox::SqliteInbox::handle_once
//! [`PgInbox`]: trellis_bus::inbox::PgInbox
//! [`PgInbox::handle_once`]: trellis_bus::inbox::PgInbox::handle_once
//! [`SqliteOutbox::enqueue`]: trellis_bus::outbox::SqliteOutbox::enqueue
//! [`PgOutbox::enqueue`]: trellis_bus::outbox::PgOutbox::enqueue
//! [`STEP_HEADER`]: crate::command_step::STEP_HEADER
//! [`SagaTimeline`]: crate::SagaTimeline

mod db;
mod flow;
mod log;
mod timeline;
mod tx;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// The databases a [`Choreography`] runs on (sqlx's markers, re-exported).
pub use sqlx::{Postgres, Sqlite};
use trellis_bus::{Envelope, HandlerError};

pub use db::ChoreographyDb;
pub use flow::Choreography;
pub use log::{ChoreographyLog, ChoreographyLogEntry};
pub use tx::Tx;

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
