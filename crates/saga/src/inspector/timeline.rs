//! [`SagaTimeline`]: one saga's log read as steps, attempts, timings, errors and compensation,
//! what the inspector shows (and the choreography timeline reuses).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::pivot;
use crate::engine::INTERRUPTED;
use crate::store::{SagaId, SagaInstance, SagaStatus, Transition};

/// One saga as the inspector shows it: its steps with their attempts, and its log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaTimeline {
    /// The id.
    pub id: SagaId,
    /// The definition's name.
    pub definition: String,
    /// The definition's version.
    pub version: u32,
    /// Where the saga stands.
    pub status: SagaStatus,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When its last record was written.
    pub updated_at: DateTime<Utc>,
    /// The pivot step, if the definition has one.
    pub pivot: Option<String>,
    /// Every step, in definition order (steps the log names but `Started` does not come last).
    pub steps: Vec<StepTimeline>,
    /// Why the saga failed or is stuck, when it did or is.
    pub outcome: Option<String>,
    /// The context as of the last record.
    pub context: serde_json::Value,
    /// The log, without the context snapshots.
    pub log: Vec<TimelineEntry>,
}

/// One step of a [`SagaTimeline`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepTimeline {
    /// The step's name.
    pub step: String,
    /// Where the step stands.
    pub state: StepState,
    /// Its `execute` attempts, in order.
    pub attempts: Vec<Attempt>,
    /// Its `compensate` attempts, in order.
    pub compensation: Vec<Attempt>,
    /// Whether an operator skipped its execution.
    pub skipped: bool,
    /// Whether an operator skipped its compensation.
    pub compensation_skipped: bool,
}

/// Where a step stands in a [`StepTimeline`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    /// Not run yet.
    Pending,
    /// An attempt is (or was, when its engine died) in flight.
    Running,
    /// Its last attempt succeeded.
    Succeeded,
    /// Its last attempt failed.
    Failed,
    /// An operator skipped it.
    Skipped,
    /// Its compensation is (or was) in flight.
    Compensating,
    /// Its compensation succeeded, or an operator skipped the compensation.
    Compensated,
    /// Its last compensation attempt failed.
    CompensationFailed,
    /// The saga is stuck on it.
    Stuck,
}

/// One attempt of a step's `execute` or `compensate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// The attempt number, from 1 (a fresh budget after an operator's retry starts at 1 again).
    pub attempt: u32,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it ended, if it did.
    pub ended_at: Option<DateTime<Utc>>,
    /// How long it took, if it ended.
    pub duration_ms: Option<i64>,
    /// How it ended.
    pub outcome: AttemptOutcome,
    /// Its error, when it failed.
    pub error: Option<String>,
}

/// How an [`Attempt`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    /// Not ended (in flight, or its engine died and no one resumed it yet).
    Running,
    /// Succeeded.
    Succeeded,
    /// Failed (or timed out).
    Failed,
    /// Its engine stopped (crashed, shut down or lost its lease) during it. It counts against
    /// the step's attempts; the engine that resumed the saga recorded it as failed with the
    /// error `interrupted: …`. (In logs from before that, the same attempt ran again.)
    Interrupted,
}

/// One record of the log in a [`SagaTimeline`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineEntry {
    /// The position in the log.
    pub seq: u64,
    /// When it was written.
    pub at: DateTime<Utc>,
    /// What happened.
    pub transition: Transition,
}

impl SagaTimeline {
    /// Builds the timeline of `instance` from its log.
    ///
    /// An instance with an empty log (no store returns one;
    /// [`Inspector::show`](super::Inspector::show) refuses it with
    /// [`SagaError::CorruptLog`](crate::SagaError::CorruptLog)) gives a timeline with no steps
    /// and no log, dated at the Unix epoch, and a null context.
    pub fn from_instance(instance: &SagaInstance) -> Self {
        let (Some(first), Some(last)) = (instance.records.first(), instance.records.last()) else {
            return Self {
                id: instance.id,
                definition: instance.definition.clone(),
                version: instance.version,
                status: instance.status,
                started_at: DateTime::<Utc>::UNIX_EPOCH,
                updated_at: DateTime::<Utc>::UNIX_EPOCH,
                pivot: None,
                steps: Vec::new(),
                outcome: None,
                context: serde_json::Value::Null,
                log: Vec::new(),
            };
        };
        let mut steps: Vec<StepTimeline> = match &first.transition {
            Transition::Started { steps, .. } => steps.iter().map(|step| pending(step)).collect(),
            _ => Vec::new(),
        };
        let mut outcome = None;
        for record in &instance.records {
            let at = record.at;
            match &record.transition {
                Transition::StepExecuting { step, attempt } => {
                    let entry = entry(&mut steps, step);
                    interrupt(&mut entry.attempts);
                    entry.attempts.push(started(*attempt, at));
                    entry.state = StepState::Running;
                }
                Transition::StepSucceeded { step } => {
                    let entry = entry(&mut steps, step);
                    end(&mut entry.attempts, at, AttemptOutcome::Succeeded, None);
                    entry.state = StepState::Succeeded;
                }
                Transition::StepFailed { step, error, .. } => {
                    let entry = entry(&mut steps, step);
                    end(&mut entry.attempts, at, failed(error), Some(error));
                    entry.state = StepState::Failed;
                }
                Transition::StepCompensating { step, attempt } => {
                    let entry = entry(&mut steps, step);
                    interrupt(&mut entry.compensation);
                    entry.compensation.push(started(*attempt, at));
                    entry.state = StepState::Compensating;
                }
                Transition::StepCompensated { step } => {
                    let entry = entry(&mut steps, step);
                    end(&mut entry.compensation, at, AttemptOutcome::Succeeded, None);
                    entry.state = StepState::Compensated;
                }
                Transition::CompensationFailed { step, error, .. } => {
                    let entry = entry(&mut steps, step);
                    end(&mut entry.compensation, at, failed(error), Some(error));
                    entry.state = StepState::CompensationFailed;
                }
                Transition::Skipped {
                    step, compensating, ..
                } => {
                    let entry = entry(&mut steps, step);
                    if *compensating {
                        entry.compensation_skipped = true;
                        entry.state = StepState::Compensated;
                    } else {
                        entry.skipped = true;
                        entry.state = StepState::Skipped;
                    }
                }
                Transition::Stuck { step, error, .. } => {
                    entry(&mut steps, step).state = StepState::Stuck;
                    outcome = Some(format!("stuck on {step}: {error}"));
                }
                Transition::Failed { step, error } => {
                    outcome = Some(format!("failed at {step}: {error}"));
                }
                Transition::Started { .. }
                | Transition::Compensating { .. }
                | Transition::Cancelled { .. }
                | Transition::Retried { .. }
                | Transition::Completed => {}
            }
        }
        if instance.status.is_active() {
            outcome = None;
        }
        Self {
            id: instance.id,
            definition: instance.definition.clone(),
            version: instance.version,
            status: instance.status,
            started_at: first.at,
            updated_at: last.at,
            pivot: pivot(instance).map(str::to_owned),
            steps,
            outcome,
            context: last.context.clone(),
            log: instance
                .records
                .iter()
                .map(|record| TimelineEntry {
                    seq: record.seq,
                    at: record.at,
                    transition: record.transition.clone(),
                })
                .collect(),
        }
    }
}

fn pending(step: &str) -> StepTimeline {
    StepTimeline {
        step: step.to_owned(),
        state: StepState::Pending,
        attempts: Vec::new(),
        compensation: Vec::new(),
        skipped: false,
        compensation_skipped: false,
    }
}

fn entry<'a>(steps: &'a mut Vec<StepTimeline>, step: &str) -> &'a mut StepTimeline {
    let index = match steps.iter().position(|entry| entry.step == step) {
        Some(index) => index,
        None => {
            steps.push(pending(step));
            steps.len() - 1
        }
    };
    &mut steps[index]
}

fn started(attempt: u32, at: DateTime<Utc>) -> Attempt {
    Attempt {
        attempt,
        started_at: at,
        ended_at: None,
        duration_ms: None,
        outcome: AttemptOutcome::Running,
        error: None,
    }
}

/// How a failed attempt ended: `Interrupted` when the engine recorded that it stopped during
/// it (the failure an engine resuming the saga writes), otherwise `Failed`.
fn failed(error: &str) -> AttemptOutcome {
    if error == INTERRUPTED {
        AttemptOutcome::Interrupted
    } else {
        AttemptOutcome::Failed
    }
}

/// A new attempt begins while the previous one never ended: its engine died during it (logs
/// written before interrupted attempts were recorded as failures).
fn interrupt(attempts: &mut [Attempt]) {
    if let Some(last) = attempts.last_mut()
        && last.outcome == AttemptOutcome::Running
    {
        last.outcome = AttemptOutcome::Interrupted;
    }
}

fn end(
    attempts: &mut [Attempt],
    at: DateTime<Utc>,
    outcome: AttemptOutcome,
    error: Option<&String>,
) {
    if let Some(last) = attempts.last_mut() {
        last.ended_at = Some(at);
        last.duration_ms = Some((at - last.started_at).num_milliseconds());
        last.outcome = outcome;
        last.error = error.cloned();
    }
}
