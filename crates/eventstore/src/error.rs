//! Errors of the event store, its repositories and projections.

use crate::types::{ExpectedVersion, StreamId};

/// What went wrong in the event store. Variants say who has to act.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EventStoreError {
    /// The stream was not at the expected version: reload it and decide again.
    #[error("stream `{stream}` is at version {actual}, not {expected}")]
    WrongExpectedVersion {
        /// The stream.
        stream: StreamId,
        /// What the caller expected.
        expected: ExpectedVersion,
        /// The stream's actual version (0: no events).
        actual: u64,
    },
    /// Some of the event ids of an append are already stored, but not as this exact append:
    /// the request is not a retry of an earlier one.
    #[error("stream `{stream}`: event id {event_id} is already stored elsewhere")]
    IdempotencyConflict {
        /// The stream appended to.
        stream: StreamId,
        /// The first clashing id.
        event_id: uuid::Uuid,
    },
    /// The caller sent something the store cannot take (empty append, bad name, oversize).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A stored event could not be turned into a domain event: an unknown type, malformed
    /// JSON or a failing upcaster.
    #[error(
        "cannot decode event {event_type} v{schema_version} at `{stream}` version {version}: {reason}"
    )]
    Decode {
        /// The stream.
        stream: StreamId,
        /// The event's version in the stream.
        version: u64,
        /// The event's type.
        event_type: String,
        /// The schema version it was stored with.
        schema_version: u32,
        /// What failed.
        reason: String,
    },
    /// The database failed or could not be reached.
    #[error("event store backend error: {0}")]
    Backend(#[from] sqlx::Error),
    /// A group-commit transaction failed; the append was not stored and may be retried.
    #[error("the append's transaction failed: {0}")]
    Unavailable(String),
    /// The store is shutting down and took no more work.
    #[error("the event store is closed")]
    Closed,
    /// Something that cannot happen did: a bug.
    #[error("internal error: {0}")]
    Internal(String),
}

impl EventStoreError {
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::InvalidInput(message.into())
    }

    /// Whether trying again can succeed: a version conflict (after reloading) or a transient
    /// database failure.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::WrongExpectedVersion { .. } | Self::Unavailable(_) => true,
            Self::Backend(error) => {
                matches!(
                    error,
                    sqlx::Error::Io(_)
                        | sqlx::Error::PoolTimedOut
                        | sqlx::Error::PoolClosed
                        | sqlx::Error::WorkerCrashed
                ) || is_busy(error)
            }
            _ => false,
        }
    }

    /// Whether this is a version conflict.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Self::WrongExpectedVersion { .. })
    }
}

/// SQLite's "database is locked" / PostgreSQL serialization failures are transient.
fn is_busy(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => {
            let code = db.code();
            let code = code.as_deref().unwrap_or_default();
            // SQLite SQLITE_BUSY (5) / SQLITE_LOCKED (6); PostgreSQL 40001 / 40P01.
            matches!(code, "5" | "6" | "517" | "40001" | "40P01")
        }
        _ => false,
    }
}
