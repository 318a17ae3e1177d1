//! The saga log: its records and the [`SagaStore`] trait, with in-memory, SQLite and
//! PostgreSQL implementations.

mod memory;
mod postgres;
mod sqlite;

use std::fmt;
use std::future::Future;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::SagaError;

pub use memory::InMemorySagaStore;
pub use postgres::PostgresSagaStore;
pub use sqlite::SqliteSagaStore;

/// The most sagas one [`SagaStore::list_active`] call returns.
pub const LIST_ACTIVE_MAX: usize = 10_000;

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
    /// The saga was created with its initial context.
    Started,
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
            Self::Started
            | Self::StepExecuting { .. }
            | Self::StepSucceeded { .. }
            | Self::StepFailed { .. } => SagaStatus::Running,
            Self::Compensating { .. }
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

/// The durable saga log.
///
/// Contract: a record is durable when `create` / `append` return `Ok`. `append` is
/// optimistic: it writes only when `record.seq` is exactly one past the saga's last record, and
/// returns [`SagaError::Conflict`] otherwise, so two writers can never interleave one saga's log.
/// A store error leaves the log as it was or with the record fully written, never half of it.
pub trait SagaStore: Send + Sync + 'static {
    /// Creates an instance whose log holds `first` (a `Started` record with `seq` 1).
    ///
    /// # Errors
    /// [`SagaError::Conflict`] when the id exists, or a storage error.
    fn create(
        &self,
        id: SagaId,
        definition: &str,
        version: u32,
        first: &SagaRecord,
    ) -> impl Future<Output = Result<(), SagaError>> + Send;

    /// Appends `record` to the saga's log and sets its status to `record.transition.status_after()`.
    ///
    /// # Errors
    /// [`SagaError::NotFound`], [`SagaError::Conflict`] (the log is not at `record.seq - 1`), or
    /// a storage error.
    fn append(
        &self,
        id: SagaId,
        record: &SagaRecord,
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
    /// (`Running` or `Compensating`), oldest first.
    ///
    /// # Errors
    /// A storage error.
    fn list_active(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<SagaId>, SagaError>> + Send;
}

/// Decodes a transition stored as JSON text.
fn decode_transition(id: SagaId, text: &str) -> Result<Transition, SagaError> {
    serde_json::from_str(text).map_err(|error| SagaError::CorruptLog {
        id,
        reason: format!("unreadable transition: {error}"),
    })
}

/// Converts a sequence number or count for a signed 64-bit column.
fn to_i64(id: SagaId, value: u64) -> Result<i64, SagaError> {
    i64::try_from(value).map_err(|_| SagaError::CorruptLog {
        id,
        reason: format!("sequence {value} out of range"),
    })
}

/// Converts a signed 64-bit column back.
fn to_u64(id: SagaId, value: i64) -> Result<u64, SagaError> {
    u64::try_from(value).map_err(|_| SagaError::CorruptLog {
        id,
        reason: format!("negative sequence {value}"),
    })
}

/// Assembles an instance from its row and its log, checking the log has no gap.
fn instance(
    id: SagaId,
    definition: String,
    version: i64,
    status: &str,
    records: Vec<SagaRecord>,
) -> Result<SagaInstance, SagaError> {
    let corrupt = |reason: String| SagaError::CorruptLog { id, reason };
    let version = u32::try_from(version).map_err(|_| corrupt(format!("version {version}")))?;
    let status = SagaStatus::parse(status).ok_or_else(|| corrupt(format!("status {status}")))?;
    if records.is_empty() {
        return Err(corrupt("empty log".to_owned()));
    }
    for (index, record) in records.iter().enumerate() {
        if record.seq != index as u64 + 1 {
            return Err(corrupt(format!("gap before sequence {}", record.seq)));
        }
    }
    Ok(SagaInstance {
        id,
        definition,
        version,
        status,
        records,
    })
}
