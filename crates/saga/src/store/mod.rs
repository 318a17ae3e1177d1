//! The saga log: its records and the [`SagaStore`] trait, with in-memory, SQLite and
//! PostgreSQL implementations.

mod memory;
mod postgres;
mod rows;
mod sqlite;

use std::fmt;
use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::SagaError;

pub use memory::InMemorySagaStore;
pub use postgres::{PG_GROUP_COMMIT_MAX, PostgresSagaStore};
pub use sqlite::{GROUP_COMMIT_MAX, SqliteSagaStore};

/// The most sagas one [`SagaStore::list_active`] or [`SagaStore::list`] call returns.
pub const LIST_ACTIVE_MAX: usize = 10_000;
/// The most terminal sagas one [`SagaStore::purge`] call deletes.
pub const PURGE_BATCH_MAX: usize = 10_000;

/// A claim on sagas: who holds it and for how long each claim, renewal or append extends it.
///
/// Owners must be unique among live engines sharing a log. A process that restarts under the
/// same owner (a pod or host name, say) takes its own sagas back at once; under a new owner
/// it waits for their leases to expire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    owner: String,
    duration: Duration,
}

impl Lease {
    /// A lease held by `owner` for `duration` after each claim, renewal or append.
    pub fn new(owner: impl Into<String>, duration: Duration) -> Self {
        Self {
            owner: owner.into(),
            duration,
        }
    }

    /// The owner's name.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// How long a claim lasts without renewal.
    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// The duration in whole milliseconds, for SQL.
    pub(crate) fn duration_ms(&self) -> i64 {
        i64::try_from(self.duration.as_millis()).unwrap_or(i64::MAX)
    }
}

/// One saga as [`SagaStore::list`] shows it, without its log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaSummary {
    /// The id.
    pub id: SagaId,
    /// The definition's name.
    pub definition: String,
    /// The definition's version.
    pub version: u32,
    /// The status after the last record.
    pub status: SagaStatus,
    /// The number of records in its log.
    pub transitions: u64,
    /// When it started.
    pub created_at: DateTime<Utc>,
    /// When its last record was written.
    pub updated_at: DateTime<Utc>,
    /// Who holds its lease, if anyone (the lease may have expired).
    pub lease_owner: Option<String>,
}

/// Which sagas [`SagaStore::list`] returns: every condition set must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use]
pub struct SagaFilter {
    /// Only these statuses (any status when empty).
    pub statuses: Vec<SagaStatus>,
    /// Only this definition name.
    pub definition: Option<String>,
    /// Only sagas started before this instant (older than an age).
    pub created_before: Option<DateTime<Utc>>,
    /// Only sagas started at or after this instant (younger than an age).
    pub created_after: Option<DateTime<Utc>>,
    /// At most this many, oldest first (capped at [`LIST_ACTIVE_MAX`]; 0 means the cap).
    pub limit: usize,
}

impl SagaFilter {
    /// Every saga, up to [`LIST_ACTIVE_MAX`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `status` to the statuses kept.
    pub fn with_status(mut self, status: SagaStatus) -> Self {
        self.statuses.push(status);
        self
    }

    /// Keeps only sagas of `definition`.
    pub fn with_definition(mut self, definition: impl Into<String>) -> Self {
        self.definition = Some(definition.into());
        self
    }

    /// Keeps only sagas started before `instant`.
    pub fn with_created_before(mut self, instant: DateTime<Utc>) -> Self {
        self.created_before = Some(instant);
        self
    }

    /// Keeps only sagas started at or after `instant`.
    pub fn with_created_after(mut self, instant: DateTime<Utc>) -> Self {
        self.created_after = Some(instant);
        self
    }

    /// Returns at most `limit` sagas.
    pub fn with_limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    /// The effective limit.
    pub(crate) fn limit_or_max(&self) -> usize {
        if self.limit == 0 {
            LIST_ACTIVE_MAX
        } else {
            self.limit.min(LIST_ACTIVE_MAX)
        }
    }

    /// Whether `summary` passes the filter (the in-memory store's query).
    pub(crate) fn keeps(&self, summary: &SagaSummary) -> bool {
        (self.statuses.is_empty() || self.statuses.contains(&summary.status))
            && self
                .definition
                .as_ref()
                .is_none_or(|definition| *definition == summary.definition)
            && self
                .created_before
                .is_none_or(|before| summary.created_at < before)
            && self
                .created_after
                .is_none_or(|after| summary.created_at >= after)
    }
}

/// A saga instance's id (a UUID v7, so ids sort by creation time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SagaId(Uuid);

impl SagaId {
    /// A fresh time-ordered id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// Wraps an existing UUID.
    pub fn from_uuid(id: Uuid) -> Self {
        Self(id)
    }

    /// The UUID.
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl Default for SagaId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for SagaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Where a saga stands, derived from its last transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaStatus {
    /// Going forward through its steps.
    Running,
    /// Undoing completed steps in reverse order.
    Compensating,
    /// Every step succeeded (terminal).
    Completed,
    /// A step failed and every completed step was compensated (terminal).
    Failed,
    /// A compensation, or a step after the pivot, kept failing past its retry budget. The engine
    /// does not touch it again: an operator must resolve it.
    Stuck,
}

impl SagaStatus {
    /// Whether the engine still has work to do on this saga (`Running` or `Compensating`).
    pub fn is_active(self) -> bool {
        matches!(self, Self::Running | Self::Compensating)
    }

    /// Whether the saga reached an end: `Completed`, `Failed`, or `Stuck` (which waits for an
    /// operator, not for the engine).
    pub fn is_terminal(self) -> bool {
        !self.is_active()
    }

    /// The name stored in the log's `status` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Compensating => "compensating",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Stuck => "stuck",
        }
    }

    /// Parses [`as_str`](Self::as_str)'s output.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "running" => Self::Running,
            "compensating" => Self::Compensating,
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            "stuck" => Self::Stuck,
            _ => return None,
        })
    }
}

/// One transition of a saga, written to the log before the engine acts on it. Steps are named,
/// so a log reads on its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Transition {
    /// The saga was created with its initial context. The definition's step names and pivot
    /// are recorded so the log (and the inspector) reads without the definition.
    Started {
        /// The definition's steps, in order.
        #[serde(default)]
        steps: Vec<String>,
        /// The definition's pivot step, if any.
        #[serde(default)]
        pivot: Option<String>,
    },
    /// The step's `execute` is about to run (attempt 1-based).
    StepExecuting {
        /// The step.
        step: String,
        /// The attempt, first one is 1.
        attempt: u32,
    },
    /// The step's `execute` succeeded.
    StepSucceeded {
        /// The step.
        step: String,
    },
    /// The step's `execute` failed (or timed out).
    StepFailed {
        /// The step.
        step: String,
        /// The attempt that failed.
        attempt: u32,
        /// Whether the failure may go away on retry.
        retryable: bool,
        /// The failure's message.
        error: String,
    },
    /// The saga gave up going forward and starts compensating.
    Compensating {
        /// The step whose failure caused the compensation.
        failed_step: String,
        /// That step's last error.
        error: String,
    },
    /// The step's `compensate` is about to run.
    StepCompensating {
        /// The step.
        step: String,
        /// The attempt, first one is 1.
        attempt: u32,
    },
    /// The step's `compensate` succeeded.
    StepCompensated {
        /// The step.
        step: String,
    },
    /// The step's `compensate` failed (or timed out).
    CompensationFailed {
        /// The step.
        step: String,
        /// The attempt that failed.
        attempt: u32,
        /// Whether the failure may go away on retry.
        retryable: bool,
        /// The failure's message.
        error: String,
    },
    /// Every step succeeded.
    Completed,
    /// Every completed step was compensated after `step` failed.
    Failed {
        /// The step whose failure failed the saga.
        step: String,
        /// Its last error.
        error: String,
    },
    /// An operator cancelled the saga: the steps up to and including `step` (the last one
    /// that succeeded or was in flight; `None` before the first step) are compensated in
    /// reverse order, then it fails. A step in flight may or may not have had its effect, so
    /// its compensation must accept undoing nothing (as every compensation should).
    Cancelled {
        /// The step compensation starts from, inclusive.
        step: Option<String>,
        /// Who cancelled, and why.
        reason: String,
    },
    /// An operator gave a stuck or failing step (or its compensation) a fresh retry budget.
    Retried {
        /// The step.
        step: String,
        /// Whether its compensation is retried (true) or its execution.
        compensating: bool,
        /// Who retried it.
        operator: String,
    },
    /// An operator skipped a step (or its compensation): the saga goes on as if it succeeded.
    Skipped {
        /// The step.
        step: String,
        /// Whether its compensation was skipped (true) or its execution.
        compensating: bool,
        /// Who skipped it.
        operator: String,
    },
    /// The engine gave up on `step`; an operator must act.
    Stuck {
        /// The step.
        step: String,
        /// Whether it was the step's compensation (true) or its execution after the pivot.
        compensating: bool,
        /// The last error.
        error: String,
    },
}

impl Transition {
    /// The saga's status once this transition is written.
    pub fn status_after(&self) -> SagaStatus {
        match self {
            Self::Started { .. }
            | Self::StepExecuting { .. }
            | Self::StepSucceeded { .. }
            | Self::StepFailed { .. } => SagaStatus::Running,
            Self::Retried { compensating, .. } | Self::Skipped { compensating, .. } => {
                if *compensating {
                    SagaStatus::Compensating
                } else {
                    SagaStatus::Running
                }
            }
            Self::Cancelled { .. }
            | Self::Compensating { .. }
            | Self::StepCompensating { .. }
            | Self::StepCompensated { .. }
            | Self::CompensationFailed { .. } => SagaStatus::Compensating,
            Self::Completed => SagaStatus::Completed,
            Self::Failed { .. } => SagaStatus::Failed,
            Self::Stuck { .. } => SagaStatus::Stuck,
        }
    }
}

/// One entry of a saga's log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaRecord {
    /// The position in this saga's log, from 1 (the `Started` record) without gaps.
    pub seq: u64,
    /// What happened.
    pub transition: Transition,
    /// The saga context as it stood when the transition was written.
    pub context: serde_json::Value,
    /// When it was written.
    pub at: DateTime<Utc>,
}

/// A saga instance with its whole log.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaInstance {
    /// The id.
    pub id: SagaId,
    /// The definition's name.
    pub definition: String,
    /// The definition's version the instance was started with.
    pub version: u32,
    /// The status after the last record.
    pub status: SagaStatus,
    /// The log, in `seq` order; never empty.
    pub records: Vec<SagaRecord>,
}

impl SagaInstance {
    /// The last record.
    ///
    /// # Panics
    /// Never for an instance a store returned: every instance starts with its `Started` record.
    pub fn last(&self) -> &SagaRecord {
        self.records
            .last()
            .expect("a saga instance always holds its Started record")
    }

    /// The context as of the last record.
    ///
    /// # Errors
    /// [`SagaError::Context`] when the stored context does not fit `C`.
    pub fn context<C: serde::de::DeserializeOwned>(&self) -> Result<C, SagaError> {
        Ok(serde_json::from_value(self.last().context.clone())?)
    }
}

/// The durable saga log, with leases so several engines can share it.
///
/// Contract: a record is durable when `create` / `append` return `Ok`. `append` is
/// optimistic: it writes only when `record.seq` is exactly one past the saga's last record, and
/// returns [`SagaError::Conflict`] otherwise, so two writers can never interleave one saga's log.
/// A store error leaves the log as it was or with the record fully written, never half of it.
///
/// Contexts: `load` returns every record with the context it was written with. Most
/// transitions change no context, so the SQL stores keep a record's context only when it
/// differs from the last one they kept (the order saga's never changes: one copy per saga
/// instead of one per transition).
///
/// Leases: each saga has at most one lease owner at a time. `create` and the `claim` methods
/// make the caller the owner until `now + lease.duration()` (the store's clock); `append` and
/// `renew` extend it and are fenced: they fail when another owner holds the saga. A lease whose
/// expiry has passed stays with its owner until someone else claims the saga. A terminal
/// append (`Completed`, `Failed`, `Stuck`) releases the lease.
pub trait SagaStore: Send + Sync + 'static {
    /// Creates an instance whose log holds `first` (a `Started` record with `seq` 1), leased to
    /// `lease`'s owner.
    ///
    /// # Errors
    /// [`SagaError::Conflict`] when the id exists, or a storage error.
    fn create(
        &self,
        id: SagaId,
        definition: &str,
        version: u32,
        first: &SagaRecord,
        lease: &Lease,
    ) -> impl Future<Output = Result<(), SagaError>> + Send;

    /// Appends `record` to the saga's log, sets its status to
    /// `record.transition.status_after()` and extends the lease (or releases it when the status
    /// is terminal).
    ///
    /// # Errors
    /// [`SagaError::NotFound`], [`SagaError::Conflict`] (the log is not at `record.seq - 1`),
    /// [`SagaError::Leased`] (another owner holds the saga), or a storage error.
    fn append(
        &self,
        id: SagaId,
        record: &SagaRecord,
        lease: &Lease,
    ) -> impl Future<Output = Result<(), SagaError>> + Send;

    /// Loads an instance with its whole log; `None` when it does not exist.
    ///
    /// # Errors
    /// A storage error, or [`SagaError::CorruptLog`] when a stored record cannot be read.
    fn load(
        &self,
        id: SagaId,
    ) -> impl Future<Output = Result<Option<SagaInstance>, SagaError>> + Send;

    /// The ids of up to `limit` (at most [`LIST_ACTIVE_MAX`]) sagas whose status is active
    /// (`Running` or `Compensating`), oldest first, leased or not.
    ///
    /// # Errors
    /// A storage error.
    fn list_active(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<SagaId>, SagaError>> + Send;

    /// Claims the oldest active saga with an id above `after` (all when `None`) whose lease is
    /// free, expired or already `lease`'s owner's, skipping sagas another claimer has locked
    /// (`FOR UPDATE SKIP LOCKED` on PostgreSQL). `None` when there is none.
    ///
    /// # Errors
    /// A storage error.
    fn claim_next(
        &self,
        lease: &Lease,
        after: Option<SagaId>,
    ) -> impl Future<Output = Result<Option<SagaId>, SagaError>> + Send;

    /// Claims one saga, whatever its status, if its lease is free, expired or `lease`'s
    /// owner's: operators use it before writing to a saga.
    ///
    /// # Errors
    /// [`SagaError::NotFound`], [`SagaError::Leased`] naming the live owner, or a storage error.
    fn claim(
        &self,
        id: SagaId,
        lease: &Lease,
    ) -> impl Future<Output = Result<(), SagaError>> + Send;

    /// Extends the lease `lease`'s owner holds on the saga. `false` when the owner no longer
    /// holds it (another engine claimed it, or it ended).
    ///
    /// # Errors
    /// A storage error.
    fn renew(
        &self,
        id: SagaId,
        lease: &Lease,
    ) -> impl Future<Output = Result<bool, SagaError>> + Send;

    /// Gives up `owner`'s lease on the saga, if it holds one, so another engine may claim it
    /// at once.
    ///
    /// # Errors
    /// A storage error.
    fn release(
        &self,
        id: SagaId,
        owner: &str,
    ) -> impl Future<Output = Result<(), SagaError>> + Send;

    /// The sagas `filter` selects, oldest first, without their logs.
    ///
    /// # Errors
    /// A storage error.
    fn list(
        &self,
        filter: &SagaFilter,
    ) -> impl Future<Output = Result<Vec<SagaSummary>, SagaError>> + Send;

    /// Deletes up to [`PURGE_BATCH_MAX`] `Completed` or `Failed` sagas (never `Stuck` ones)
    /// whose last record is older than `before`, with their logs; returns how many.
    ///
    /// # Errors
    /// A storage error.
    fn purge(&self, before: DateTime<Utc>) -> impl Future<Output = Result<u64, SagaError>> + Send;
}
