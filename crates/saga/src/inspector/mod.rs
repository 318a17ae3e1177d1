//! The inspector: list sagas, show one saga's timeline, and the operator's actions (cancel,
//! retry, skip, purge).
//!
//! It needs only the store, not the definitions: the `Started` record names the steps and the
//! pivot. An action is a transition written to the log under a short operator lease, which is
//! then released; an engine's [`run_recovery`](crate::SagaEngine::run_recovery) loop (or
//! [`resume`](crate::SagaEngine::resume)) picks the saga up and acts on it. While an engine
//! holds a live lease on the saga, actions fail with [`SagaError::Leased`].

mod timeline;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::error::SagaError;
use crate::store::{
    Lease, PURGE_BATCH_MAX, SagaFilter, SagaId, SagaInstance, SagaRecord, SagaStatus, SagaStore,
    SagaSummary, Transition,
};

pub use timeline::{Attempt, AttemptOutcome, SagaTimeline, StepState, StepTimeline, TimelineEntry};

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
pub(super) fn pivot(instance: &SagaInstance) -> Option<&str> {
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
