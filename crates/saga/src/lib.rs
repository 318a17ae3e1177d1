//! Durable saga orchestration: ordered steps with compensation, a pivot, retries and
//! timeouts, a saga log written before every action, and crash recovery.
//!
//! A [`SagaDefinition`] is a name, a version and ordered [`Step`]s over a context type `C`
//! (anything serde can write as JSON). Each step has an `execute`, an optional `compensate`,
//! a [`StepRetry`] (attempts and a [`trellis_resilience::Backoff`]) and a timeout. The
//! [`SagaEngine`] runs the steps in order; when a step fails for good before the pivot, it
//! compensates the completed steps in reverse order and the saga ends `Failed` (a step marked
//! [`Step::compensate_on_failure`] is compensated first itself: its effect may exist with
//! its answer lost). After the
//! pivot the saga only goes forward; a step, or a compensation, that exhausts its attempts
//! leaves the saga `Stuck` (metric `trellis_saga_stuck_total`, an error log line) for an
//! operator. The engine also counts sagas started, completed and failed, step compensations,
//! and each step attempt's duration, and [`SagaEngine::export_status_gauges`] counts the
//! compensating and stuck sagas in the log (docs/metrics.md lists them all).
//!
//! Every transition is appended to a [`SagaStore`] with a snapshot of the context *before*
//! the engine acts on it, and the engine decides its next move from the log alone, so
//! [`SagaEngine::recover`] resumes every active saga after a crash. An attempt is logged
//! (`StepExecuting`, `StepCompensating`) before it runs, so an attempt that was in flight when
//! its engine died is known: the resuming engine records it as a retryable failure
//! (`interrupted: …`) and it counts against the step's attempts. The next attempt runs after
//! the backoff, and a step that kills its engine every time fails for good once its budget is
//! spent (compensation, or `Stuck` after the pivot) instead of running forever. Whether an
//! interrupted attempt had its effect is unknown, so steps must be idempotent: hand
//! [`StepContext::idempotency_key`] (`{saga_id}:{step}`) to the participant.
//!
//! Stores: [`InMemorySagaStore`] (tests), [`SqliteSagaStore`] (WAL, `synchronous = FULL`,
//! `BEGIN IMMEDIATE`, group commit: many sagas' transitions share one transaction, each caller
//! answered after the commit), [`PostgresSagaStore`] (group commit too: one writer task per
//! store turns the creates and appends queued meanwhile into one transaction);
//! [`AnySagaStore`] opens the one a URL names (`memory://`, `sqlite://PATH`, `postgres://…`).
//! Both SQL stores keep a record's context only when it changed since the last one kept.
//!
//! Several engines may share one log: each saga is leased to one engine at a time (a
//! [`Lease`]: owner and expiry, claimed with `FOR UPDATE SKIP LOCKED` on PostgreSQL, renewed
//! while a step runs, every append fenced by the owner). An engine that dies loses its sagas
//! when their leases expire, and another engine's [`SagaEngine::run_recovery`] loop takes them
//! over. See docs/decisions/0006-saga-leasing.md.
//!
//! The [`Inspector`] lists sagas (by status, definition, age), shows one saga's
//! [`SagaTimeline`] (each step's attempts, timings, errors and compensation) and records
//! operator actions: cancel (compensate now), retry a stuck or failed step, skip a step, purge
//! old terminal sagas. [`http::router`] serves it as JSON endpoints; `trellis saga` is its CLI.
//!
//! Asynchronous steps ([`command_step::command_step`]) publish a command on `trellis-bus` and
//! wait for the reply correlated with the saga and step ([`command_step::Replies`]), under the
//! step's timeout.
//! Choreographed sagas ([`choreography::Choreography`]) are event handlers (`on` an event
//! type: a side effect and the next event; compensating handlers on `*.failed` events), each
//! exactly once per message through the bus inbox and outbox, on SQLite or PostgreSQL (the
//! [`choreography::ChoreographyDb`] type parameter; an effect on the service's own tables is
//! written once for both with [`choreography::Tx`] and [`on_tx!`], and commits with the inbox
//! record; a remote call goes before, through `handle_prepared`, idempotent by key at the
//! remote side); a flow's progress is rebuilt per
//! correlation id, from its events or from the choreography log each handler run writes with
//! its inbox entry ([`choreography::ChoreographyLog`]), as the same [`SagaTimeline`] the
//! inspector shows, also served by `http::choreography_router` and
//! `trellis saga choreography show`.
//!
//! How it fits: participants are called through `trellis-resilience` (HTTP/gRPC clients with
//! circuit breakers and timeouts) from a step's `execute`, or over `trellis-bus`; the saga log
//! is its own store, separate from `trellis-eventstore`.
//!
//! Feature flags (both default): `http` adds [`http`], the inspector's axum router; `bus` adds
//! [`command_step`] and [`choreography`] (trellis-bus).
//!
//! # Examples
//! ```
//! use serde::{Deserialize, Serialize};
//! use trellis_saga::{InMemorySagaStore, SagaDefinition, SagaEngine, SagaStatus, Step};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Order { reserved: bool, charged: bool }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), trellis_saga::SagaError> {
//! let definition = SagaDefinition::builder("place-order", 1)
//!     .step(
//!         Step::new("reserve", |order: &mut Order, _step| Box::pin(async move {
//!             order.reserved = true; // call the inventory service with _step.idempotency_key()
//!             Ok(())
//!         }))
//!         .compensate(|order: &mut Order, _step| Box::pin(async move {
//!             order.reserved = false;
//!             Ok(())
//!         })),
//!     )
//!     .pivot_step(Step::new("charge", |order: &mut Order, _step| Box::pin(async move {
//!         order.charged = true;
//!         Ok(())
//!     })))
//!     .build()?;
//!
//! let engine = SagaEngine::new(InMemorySagaStore::new()).register(definition);
//! engine.recover().await?; // at start-up: finish what a previous process left
//! let id = engine.start("place-order", &Order { reserved: false, charged: false }).await?;
//! assert_eq!(engine.status(id).await?, SagaStatus::Completed);
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

mod any;
/// The former name of [`command_step`], kept so existing `trellis_saga::bus::…` imports
/// compile.
#[cfg(feature = "bus")]
#[doc(hidden)]
pub mod bus {
    pub use crate::command_step::*;
}
#[cfg(feature = "bus")]
pub mod choreography;
#[cfg(feature = "bus")]
pub mod command_step;
mod definition;
mod engine;
mod error;
#[cfg(feature = "http")]
pub mod http;
mod inspector;
mod store;

#[cfg(feature = "bus")]
pub use any::AnyChoreographyLog;
pub use any::AnySagaStore;
pub use definition::{
    STEP_ATTEMPTS_DEFAULT, STEP_ATTEMPTS_MAX, STEP_TIMEOUT_DEFAULT, STEP_TIMEOUT_MAX, STEPS_MAX,
    SagaContext, SagaDefinition, SagaDefinitionBuilder, Step, StepContext, StepError, StepFuture,
    StepRetry,
};
pub use engine::{
    APPEND_RETRY_PAUSE_FIRST, APPEND_RETRY_PAUSE_MAX, LEASE_DEFAULT, LEASE_MIN,
    POLL_INTERVAL_DEFAULT, RECOVERY_CONCURRENCY_DEFAULT, RecoveryReport, SagaEngine,
    TRANSITIONS_MAX,
};
pub use error::SagaError;
pub use inspector::{
    Attempt, AttemptOutcome, Inspector, OPERATOR_LEASE, PURGE_BATCHES_MAX, SagaTimeline, StepState,
    StepTimeline, TimelineEntry,
};
pub use store::{
    GROUP_COMMIT_MAX, InMemorySagaStore, LIST_ACTIVE_MAX, Lease, PG_GROUP_COMMIT_MAX,
    PURGE_BATCH_MAX, PostgresSagaStore, SagaFilter, SagaId, SagaInstance, SagaRecord, SagaStatus,
    SagaStore, SagaSummary, SqliteSagaStore, Transition,
};
