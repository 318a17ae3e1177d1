//! The inspector: list sagas, show one saga's timeline, and the operator's actions (cancel,
//! retry, skip, purge).
//!
//! It needs only the store, not the definitions: the `Started` record names the steps and the
//! pivot. An action is a transition written to the log under a short operator lease, which is
//! then released; an engine's [`run_recovery`](crate::SagaEngine::run_recovery) loop (or
//! [`resume`](crate::SagaEngine::resume)) picks the saga up and acts on it. While an engine
//! holds a live lease on the saga, actions fail with [`SagaError::Leased`].

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::engine::INTERRUPTED;
use crate::error::SagaError;
use crate::store::{
    Lease, PURGE_BATCH_MAX, SagaFilter, SagaId, SagaInstance, SagaRecord, SagaStatus, SagaStore,
    SagaSummary, Transition,
};

/// How long an operator action holds a saga's lease (it releases it as soon as it is done).
pub const OPERATOR_LEASE: Duration = Duration::from_secs(60);
/// The most purge batches one [`Inspector::purge`] call runs.
pub const PURGE_BATCHES_MAX: usize = 100;

/// Lists, shows and acts on the sagas of one store.
#[derive(Debug)]
pub struct Inspector<S> {
    store: Arc<S>,
    operator: String,
}

impl<S> Clone for Inspector<S> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            operator: self.operator.clone(),
        }
    }
}

impl<S: SagaStore> Inspector<S> {
    /// An inspector over `store`, acting as operator `operator`.
    pub fn new(store: S) -> Self {
        Self::from_arc(Arc::new(store))
    }

    /// An inspector over a shared store.
    pub fn from_arc(store: Arc<S>) -> Self {
        Self {
            store,
            operator: "operator".to_owned(),
        }
    }

    /// Names the operator recorded with every action (and in the operator's lease owner,
    /// `operator:<name>`).
    #[must_use]
    pub fn with_operator(mut self, operator: impl Into<String>) -> Self {
        self.operator = operator.into();
        self
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The sagas `filter` selects, oldest first.
    ///
    /// # Errors
    /// A store error.
    pub async fn list(&self, filter: &SagaFilter) -> Result<Vec<SagaSummary>, SagaError> {
        self.store.list(filter).await
    }

    /// One saga's timeline.
    ///
    /// # Errors
    /// [`SagaError::NotFound`] or a store error.
    pub async fn show(&self, id: SagaId) -> Result<SagaTimeline, SagaError> {
        let instance = self.load(id).await?;
        Ok(SagaTimeline::from_instance(&instance))
    }

    /// Loads a saga, refusing an empty log: every saga starts with its `Started` record, so
    /// a store returning none is broken, and the inspector says so rather than guess.
    async fn load(&self, id: SagaId) -> Result<SagaInstance, SagaError> {
        let instance = self.store.load(id).await?.ok_or(SagaError::NotFound(id))?;
        if instance.records.is_empty() {
            return Err(SagaError::CorruptLog {
                id,
                reason: "empty log".to_owned(),
            });
        }
        Ok(instance)
    }

    /// Cancels a running saga: compensates now, in reverse order, every step up to the one
    /// that last succeeded or was in flight, then fails it. Returns the transition written.
    ///
    /// # Errors
    /// [`SagaError::Rejected`] when the saga is not running or has passed its pivot (it only
    /// goes forward then), [`SagaError::Leased`] while an engine holds it, or as
    /// [`show`](Self::show).
    pub async fn cancel(&self, id: SagaId, reason: &str) -> Result<Transition, SagaError> {
        let reason = format!("{reason} (by {})", self.operator);
        self.act(id, |instance| decide_cancel(instance, &reason))
            .await
    }

    /// Gives a stuck saga's step (or compensation), or one whose last attempt failed, a fresh
    /// retry budget. Returns the transition written.
    ///
    /// # Errors
    /// [`SagaError::Rejected`] for any other saga, otherwise as [`cancel`](Self::cancel).
    pub async fn retry(&self, id: SagaId) -> Result<Transition, SagaError> {
        let operator = self.operator.clone();
        self.act(id, |instance| decide_retry(instance, operator))
            .await
    }

    /// Skips `step`, the saga's current step (stuck, failed, or in flight when its engine
    /// died): the saga goes on as if it succeeded, or as if its compensation did. The skip is
    /// recorded in the log. Returns the transition written.
    ///
    /// # Errors
    /// [`SagaError::Rejected`] when `step` is not the current step, otherwise as
    /// [`cancel`](Self::cancel).
    pub async fn skip(&self, id: SagaId, step: &str) -> Result<Transition, SagaError> {
        let operator = self.operator.clone();
        self.act(id, |instance| decide_skip(instance, step, operator))
            .await
    }

    /// Deletes `Completed` and `Failed` sagas whose last record is older than `older_than`
    /// (`Stuck` ones wait for an operator and are kept); returns how many.
    ///
    /// # Errors
    /// A store error (sagas deleted by earlier batches stay deleted).
    pub async fn purge(&self, older_than: Duration) -> Result<u64, SagaError> {
        let age = chrono::Duration::from_std(older_than).unwrap_or(chrono::Duration::MAX);
        let before = Utc::now()
            .checked_sub_signed(age)
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let mut purged = 0;
        for _ in 0..PURGE_BATCHES_MAX {
            let batch = self.store.purge(before).await?;
            purged += batch;
            if batch < PURGE_BATCH_MAX as u64 {
                break;
            }
        }
        tracing::info!(purged, operator = %self.operator, "terminal sagas purged");
        Ok(purged)
    }

    /// Claims the saga under the operator's lease, writes what `decide` returns, and releases
    /// the lease so an engine picks the saga up.
    async fn act(
        &self,
        id: SagaId,
        decide: impl FnOnce(&SagaInstance) -> Result<Transition, String>,
    ) -> Result<Transition, SagaError> {
        let lease = Lease::new(format!("operator:{}", self.operator), OPERATOR_LEASE);
        self.store.claim(id, &lease).await?;
        let outcome = self.act_claimed(id, &lease, decide).await;
        if let Err(error) = self.store.release(id, lease.owner()).await {
            tracing::warn!(saga = %id, %error, "could not release the operator's lease; it will expire");
        }
        outcome
    }

    async fn act_claimed(
        &self,
        id: SagaId,
        lease: &Lease,
        decide: impl FnOnce(&SagaInstance) -> Result<Transition, String>,
    ) -> Result<Transition, SagaError> {
        let instance = self.load(id).await?;
        let transition = decide(&instance).map_err(|reason| SagaError::Rejected { id, reason })?;
        let last = instance.last();
        let record = SagaRecord {
            seq: last.seq + 1,
            transition: transition.clone(),
            context: last.context.clone(),
            at: Utc::now(),
        };
        self.store.append(id, &record, lease).await?;
        tracing::info!(saga = %id, operator = %self.operator, ?transition, "operator action recorded");
        Ok(transition)
    }
}

/// The pivot recorded in the `Started` record, if any.
fn pivot(instance: &SagaInstance) -> Option<&str> {
    match &instance.records.first()?.transition {
        Transition::Started { pivot, .. } => pivot.as_deref(),
        _ => None,
    }
}

fn decide_cancel(instance: &SagaInstance, reason: &str) -> Result<Transition, String> {
    if instance.status != SagaStatus::Running {
        return Err(format!(
            "only a running saga can be cancelled; this one is {}",
            instance.status.as_str()
        ));
    }
    if let Some(pivot) = pivot(instance) {
        let passed = instance.records.iter().any(|record| {
            matches!(&record.transition,
                Transition::StepSucceeded { step }
                | Transition::Skipped { step, compensating: false, .. } if step == pivot)
        });
        if passed {
            return Err(format!(
                "the saga passed its pivot step {pivot} and only goes forward: retry or skip instead"
            ));
        }
    }
    let step = match &instance.last().transition {
        Transition::Started { .. } => None,
        Transition::StepExecuting { step, .. }
        | Transition::StepSucceeded { step }
        | Transition::StepFailed { step, .. }
        | Transition::Retried { step, .. }
        | Transition::Skipped { step, .. } => Some(step.clone()),
        other => return Err(format!("cannot cancel after {other:?}")),
    };
    Ok(Transition::Cancelled {
        step,
        reason: reason.to_owned(),
    })
}

fn decide_retry(instance: &SagaInstance, operator: String) -> Result<Transition, String> {
    let (step, compensating) = match &instance.last().transition {
        Transition::Stuck {
            step, compensating, ..
        } => (step.clone(), *compensating),
        Transition::StepFailed { step, .. } => (step.clone(), false),
        Transition::CompensationFailed { step, .. } => (step.clone(), true),
        _ => {
            return Err(format!(
                "only a stuck saga, or one whose last attempt failed, can be retried; this one is {}",
                instance.status.as_str()
            ));
        }
    };
    Ok(Transition::Retried {
        step,
        compensating,
        operator,
    })
}

fn decide_skip(
    instance: &SagaInstance,
    wanted: &str,
    operator: String,
) -> Result<Transition, String> {
    let (step, compensating) = match &instance.last().transition {
        Transition::Stuck {
            step, compensating, ..
        } => (step, *compensating),
        Transition::StepExecuting { step, .. } | Transition::StepFailed { step, .. } => {
            (step, false)
        }
        Transition::StepCompensating { step, .. } | Transition::CompensationFailed { step, .. } => {
            (step, true)
        }
        _ => {
            return Err(format!(
                "no step is stuck, failing or in flight in this {} saga",
                instance.status.as_str()
            ));
        }
    };
    if step != wanted {
        return Err(format!("the current step is {step}, not {wanted}"));
    }
    Ok(Transition::Skipped {
        step: step.clone(),
        compensating,
        operator,
    })
}

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
    /// An instance with an empty log (no store returns one; [`Inspector::show`] refuses it
    /// with [`SagaError::CorruptLog`]) gives a timeline with no steps and no log, dated at the
    /// Unix epoch, and a null context.
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

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::{
        AttemptOutcome, SagaTimeline, StepState, decide_cancel, decide_retry, decide_skip,
    };
    use crate::store::{SagaId, SagaInstance, SagaRecord, SagaStatus, Transition};

    fn instance(pivot: Option<&str>, rest: Vec<Transition>) -> SagaInstance {
        let mut transitions = vec![Transition::Started {
            steps: vec!["a".to_owned(), "b".to_owned(), "c".to_owned()],
            pivot: pivot.map(str::to_owned),
        }];
        transitions.extend(rest);
        let status = transitions.last().expect("one").status_after();
        SagaInstance {
            id: SagaId::new(),
            definition: "d".to_owned(),
            version: 1,
            status,
            records: transitions
                .into_iter()
                .enumerate()
                .map(|(index, transition)| SagaRecord {
                    seq: index as u64 + 1,
                    transition,
                    context: serde_json::json!(null),
                    at: Utc::now(),
                })
                .collect(),
        }
    }

    fn executing(step: &str, attempt: u32) -> Transition {
        Transition::StepExecuting {
            step: step.to_owned(),
            attempt,
        }
    }

    fn succeeded(step: &str) -> Transition {
        Transition::StepSucceeded {
            step: step.to_owned(),
        }
    }

    #[test]
    fn cancel_compensates_from_the_step_in_flight_but_never_past_the_pivot() {
        // Goal: cancel names the step in flight; after the pivot succeeded it is refused.
        let running = instance(None, vec![succeeded("a"), executing("b", 1)]);
        assert_eq!(
            decide_cancel(&running, "why"),
            Ok(Transition::Cancelled {
                step: Some("b".to_owned()),
                reason: "why".to_owned()
            })
        );
        let past_pivot = instance(Some("a"), vec![executing("a", 1), succeeded("a")]);
        assert!(
            decide_cancel(&past_pivot, "why")
                .expect_err("refused")
                .contains("pivot")
        );
        let fresh = instance(None, vec![]);
        assert!(matches!(
            decide_cancel(&fresh, "why"),
            Ok(Transition::Cancelled { step: None, .. })
        ));
    }

    #[test]
    fn retry_and_skip_apply_to_the_current_stuck_step_only() {
        // Goal: a stuck compensation is retried or skipped as a compensation; another step
        // name is refused; a completed saga has nothing to retry.
        let stuck = instance(
            None,
            vec![Transition::Stuck {
                step: "b".to_owned(),
                compensating: true,
                error: "down".to_owned(),
            }],
        );
        assert_eq!(stuck.status, SagaStatus::Stuck);
        assert!(matches!(
            decide_retry(&stuck, "ops".to_owned()),
            Ok(Transition::Retried {
                compensating: true,
                ..
            })
        ));
        assert!(matches!(
            decide_skip(&stuck, "b", "ops".to_owned()),
            Ok(Transition::Skipped {
                compensating: true,
                ..
            })
        ));
        assert!(decide_skip(&stuck, "a", "ops".to_owned()).is_err());
        let done = instance(None, vec![Transition::Completed]);
        assert!(decide_retry(&done, "ops".to_owned()).is_err());
    }

    #[test]
    fn the_timeline_groups_attempts_by_step_and_marks_interrupted_ones() {
        // Goal: a failed attempt, a crash (the same attempt logged twice) and a success read
        // as three attempts of one step; untouched steps are pending.
        let saga = instance(
            None,
            vec![
                executing("a", 1),
                Transition::StepFailed {
                    step: "a".to_owned(),
                    attempt: 1,
                    retryable: true,
                    error: "busy".to_owned(),
                },
                executing("a", 2),
                executing("a", 2),
                succeeded("a"),
            ],
        );
        let timeline = SagaTimeline::from_instance(&saga);
        let a = &timeline.steps[0];
        assert_eq!(a.state, StepState::Succeeded);
        let outcomes: Vec<_> = a.attempts.iter().map(|attempt| attempt.outcome).collect();
        assert_eq!(
            outcomes,
            [
                AttemptOutcome::Failed,
                AttemptOutcome::Interrupted,
                AttemptOutcome::Succeeded
            ]
        );
        assert_eq!(a.attempts[0].error.as_deref(), Some("busy"));
        assert_eq!(timeline.steps[1].state, StepState::Pending);
        assert_eq!(timeline.log.len(), 6);
    }
}
