//! The event store: append-only streams with optimistic concurrency and a commit-ordered
//! global log, catch-up subscriptions, event-sourced aggregates with snapshots and upcasting,
//! and CQRS projections into SQL read models.
//!
//! It is the system of record for the shop's orders service and the source of the events other
//! services see: the bus relays the global log, the saga engine reacts to it, and read models
//! are projections of it.
//!
//! # Pieces
//! - [`EventStore`]: `append` (atomic per batch, checked against an [`ExpectedVersion`],
//!   idempotent by event id), `read_stream` forwards and backwards, `read_all` in commit
//!   order, stream metadata (soft delete, truncate-before, max count), snapshots.
//!   Backends: [`MemoryStore`] (tests), [`SqliteStore`] (the embedded default),
//!   [`PostgresStore`] (the scale-out engine); [`AnyStore::open`] picks one by URL. Every
//!   backend passes the same conformance suite ([`conformance_tests!`], feature `testkit`).
//! - [`subscribe_all`] / [`subscribe_stream`]: catch-up subscriptions that replay history and
//!   then follow live appends without a gap or a duplicate.
//! - [`Aggregate`], [`Repository`]: `handle` decides, `apply` changes state; the repository
//!   loads (snapshot + newer events), runs the command, appends with the loaded version and
//!   retries on a conflict. Snapshots are taken every N events and ignored (then rebuilt) when
//!   their schema differs. [`Upcasters`] turn stored old event shapes into today's on read and
//!   are checked for gaps at start-up. [`AggregateTest`] gives given/when/then tests.
//! - [`ProjectionRunner`]: feeds a [`Projection`] with the log, committing its checkpoint in
//!   the read model's own transaction under a lock on the checkpoint (exactly once, even with
//!   several runners on one read model), rebuilds into a new generation while the old one
//!   serves, and reports lag.
//!
//! # Ordering: `read_all` never skips
//! Positions are assigned in commit order by every backend, so a reader that continues from
//! the last position it saw cannot miss an event that commits later with a lower position.
//! SQLite assigns `MAX(position) + 1` inside `BEGIN IMMEDIATE`, which holds the database's single
//! write lock. PostgreSQL assigns positions under a transaction-scoped advisory lock, which is
//! released only after the commit is visible, so visible positions always form a gap-free prefix
//! of the log (details in the PostgreSQL backend's module docs). Both would serialize commits;
//! a group-commit writer per store instance puts every append waiting in the process into one
//! transaction, so throughput does not pay for the ordering.
//!
//! # Durability
//! SQLite runs in WAL mode with `synchronous = FULL`: an acknowledged append survives power
//! loss. PostgreSQL uses the server's settings (`synchronous_commit = on` by default).
//!
//! # Example
//! ```
//! use serde::{Deserialize, Serialize};
//! use trellis_eventstore::{Aggregate, DomainEvent, MemoryStore, Metadata, Repository};
//!
//! #[derive(Debug, Default, Serialize, Deserialize)]
//! struct Cart { items: u32 }
//!
//! #[derive(Debug, Clone, Serialize, Deserialize)]
//! enum CartEvent { ItemAdded { sku: String } }
//! impl DomainEvent for CartEvent {}
//!
//! #[derive(Debug, thiserror::Error)]
//! #[error("a cart holds at most 3 items")]
//! struct CartFull;
//!
//! impl Aggregate for Cart {
//!     const TYPE: &'static str = "cart";
//!     type Command = String;
//!     type Event = CartEvent;
//!     type Error = CartFull;
//!     fn handle(&self, sku: String) -> Result<Vec<CartEvent>, CartFull> {
//!         if self.items >= 3 { return Err(CartFull) }
//!         Ok(vec![CartEvent::ItemAdded { sku }])
//!     }
//!     fn apply(&mut self, _: &CartEvent) { self.items += 1 }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let carts = Repository::<Cart, _>::new(MemoryStore::new()).with_snapshots(100);
//! carts.execute("c1", "sku-1".into(), Metadata::default()).await.expect("added");
//! let cart = carts.load("c1").await.expect("loaded");
//! assert_eq!((cart.state.items, cart.version), (1, 1));
//! # }
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

/// `failpoint!(NAME, scope)`: returns `Err(error.into())` from the enclosing function when
/// failpoint `NAME` fires for `scope` (feature `failpoints`, see `failpoints`); expands to
/// nothing without the feature.
macro_rules! failpoint {
    ($name:expr, $scope:expr) => {
        #[cfg(feature = "failpoints")]
        {
            if let Some(error) = $crate::failpoints::hit($name, $scope) {
                return Err(error.into());
            }
        }
    };
}

mod aggregate;
mod any;
mod error;
#[cfg(feature = "failpoints")]
pub mod failpoints;
mod memory;
mod metric_help;
mod projection;
mod repository;
mod sql;
mod store;
mod subscription;
mod testing;
#[cfg(feature = "testkit")]
pub mod testkit;
mod types;
mod upcast;

pub use aggregate::{Aggregate, DomainEvent, decode, encode};
pub use any::AnyStore;
pub use error::EventStoreError;
pub use memory::MemoryStore;
pub use projection::{
    LockedCheckpoint, PROJECTION_BATCH, PROJECTION_LINGER, Projection, ProjectionError,
    ProjectionRunner, ReadModelDatabase, RebuildProgress,
};
pub use repository::{CONFLICT_RETRIES_DEFAULT, Executed, Loaded, Repository, RepositoryError};
pub use sql::postgres::PostgresStore;
pub use sql::sqlite::SqliteStore;
pub use store::EventStore;
pub use subscription::{
    SUBSCRIPTION_BATCH, SUBSCRIPTION_LINGER, SUBSCRIPTION_POLL, subscribe_all, subscribe_stream,
};
pub use testing::{AggregateOutcome, AggregateTest};
pub use types::{
    APPEND_EVENTS_MAX, AppendResult, Direction, EVENT_BYTES_MAX, EVENT_TYPE_BYTES_MAX,
    ExpectedVersion, Metadata, NewEvent, READ_LIMIT_MAX, RecordedEvent, STREAM_ID_BYTES_MAX,
    Snapshot, StreamId, StreamInfo, StreamMetadata,
};
pub use upcast::{UpcastChainError, UpcastFn, Upcasters};
