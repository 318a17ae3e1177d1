//! The event store: append-only streams with optimistic concurrency and a commit-ordered
//! global log, catch-up subscriptions, event-sourced aggregates with snapshots and upcasting,
//! and CQRS projections.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod aggregate;
mod any;
mod error;
mod memory;
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
    PROJECTION_BATCH, Projection, ProjectionError, ProjectionRunner, ReadModelDatabase,
    RebuildProgress,
};
pub use repository::{CONFLICT_RETRIES_DEFAULT, Executed, Loaded, Repository, RepositoryError};
pub use sql::postgres::PostgresStore;
pub use sql::sqlite::SqliteStore;
pub use store::EventStore;
pub use subscription::{SUBSCRIPTION_BATCH, SUBSCRIPTION_POLL, subscribe_all, subscribe_stream};
pub use testing::{AggregateOutcome, AggregateTest};
pub use types::{
    APPEND_EVENTS_MAX, AppendResult, Direction, EVENT_BYTES_MAX, EVENT_TYPE_BYTES_MAX,
    ExpectedVersion, Metadata, NewEvent, READ_LIMIT_MAX, RecordedEvent, STREAM_ID_BYTES_MAX,
    Snapshot, StreamId, StreamInfo, StreamMetadata,
};
pub use upcast::{UpcastChainError, UpcastFn, Upcasters};
