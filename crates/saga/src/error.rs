//! The crate's one error type.

use crate::store::SagaId;

/// Everything that can go wrong in the engine or a saga store.
///
/// A step's own failure is not a `SagaError`: it is a [`StepError`](crate::StepError), recorded
/// in the saga log, and it decides between retry, compensation and `Stuck`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SagaError {
    /// The caller built an invalid definition (no steps, duplicate names, a bad pivot...).
    #[error("invalid saga definition {definition}: {reason}")]
    InvalidDefinition {
        /// The definition's name.
        definition: String,
        /// What is wrong.
        reason: String,
    },
    /// No registered definition has this name (and version). The instance, if any, is left
    /// untouched: deploy an engine that registers this version to run it.
    #[error(
        "saga definition {name} version {version} is not registered with this engine (known: {known}); the instance is left untouched"
    )]
    UnknownDefinition {
        /// The definition name asked for.
        name: String,
        /// The version asked for (0 when starting by name only).
        version: u32,
        /// The `name@version` pairs this engine knows.
        known: String,
    },
    /// No saga with this id is in the store.
    #[error("saga {0} not found")]
    NotFound(SagaId),
    /// Another writer appended to this saga's log first (expected sequence number `seq`).
    #[error("saga {id}: log conflict, expected to write sequence {seq}")]
    Conflict {
        /// The saga.
        id: SagaId,
        /// The sequence number this writer tried to write.
        seq: u64,
    },
    /// Another engine (or operator) holds this saga's lease: leave the saga to it, or wait for
    /// the lease to expire.
    #[error("saga {id} is leased by {owner}")]
    Leased {
        /// The saga.
        id: SagaId,
        /// The lease's current owner.
        owner: String,
    },
    /// This engine could not renew its lease before it ran out, so it stopped driving the saga
    /// (the step in flight was abandoned): another engine may have taken it over.
    #[error("saga {id}: lease expired before it could be renewed; the saga was left to others")]
    LeaseExpired {
        /// The saga.
        id: SagaId,
    },
    /// An operator action does not fit the saga's state (cancel past the pivot, skip a step
    /// that is not the current one, retry a saga that is not stuck...).
    #[error("saga {id}: {reason}")]
    Rejected {
        /// The saga.
        id: SagaId,
        /// Why the action does not apply.
        reason: String,
    },
    /// The context could not be converted to or from JSON.
    #[error("saga context (de)serialization failed: {0}")]
    Context(#[from] serde_json::Error),
    /// The saga log holds something this engine cannot interpret (a bug or a hand edit).
    #[error("saga {id}: corrupt log: {reason}")]
    CorruptLog {
        /// The saga.
        id: SagaId,
        /// What is wrong.
        reason: String,
    },
    /// The database failed.
    #[error("saga store: {0}")]
    Storage(#[from] sqlx::Error),
    /// The store is unavailable for another reason (transient).
    #[error("saga store unavailable: {0}")]
    Unavailable(String),
    /// The caller named a saga log by a URL whose scheme no backend serves.
    #[error("{0}")]
    InvalidUrl(String),
}

impl SagaError {
    /// Whether trying the same operation again may succeed: transient storage faults. After
    /// such an error a saga stays non-terminal in the log and [`recover`](crate::SagaEngine::recover)
    /// resumes it.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Unavailable(_) => true,
            Self::Storage(error) => {
                matches!(
                    error,
                    sqlx::Error::Io(_)
                        | sqlx::Error::PoolTimedOut
                        | sqlx::Error::PoolClosed
                        | sqlx::Error::WorkerCrashed
                ) || error.as_database_error().is_some_and(|db| {
                    matches!(db.code().as_deref(), Some("40001" | "40P01" | "5" | "6"))
                })
            }
            Self::InvalidDefinition { .. }
            | Self::UnknownDefinition { .. }
            | Self::NotFound(_)
            | Self::Conflict { .. }
            | Self::Leased { .. }
            | Self::LeaseExpired { .. }
            | Self::Rejected { .. }
            | Self::Context(_)
            | Self::CorruptLog { .. }
            | Self::InvalidUrl(_) => false,
        }
    }
}
