//! A flow's timeline, rebuilt from what happened in it (its events or its log entries) as
//! the orchestrator's [`SagaTimeline`].

use chrono::{DateTime, Utc};
use trellis_bus::Envelope;
use uuid::Uuid;

use super::COMPENSATION_HEADER;
use crate::inspector::SagaTimeline;
use crate::store::{SagaId, SagaInstance, SagaRecord, SagaStatus, Transition};

/// What happened in a flow, in order, whether read from its events or from the log.
pub(super) enum Fact {
    /// A handler started on its trigger.
    Ran { step: String, compensating: bool },
    /// A handler finished (with the emitted failure's `error` for a failed step).
    Done {
        step: String,
        compensating: bool,
        error: Option<String>,
    },
}

/// The `error` of a failure event (`*.failed`, not from a compensation): its `error` field,
/// else its type.
pub(super) fn failure_error(event: &Envelope) -> Option<String> {
    (event.kind.ends_with(".failed") && !event.headers.contains_key(COMPENSATION_HEADER)).then(
        || {
            event.data["error"]
                .as_str()
                .map_or_else(|| event.kind.clone(), str::to_owned)
        },
    )
}

/// The timeline of flow `correlation_id` of choreography `name` (forward `steps`) from its
/// facts, in order.
pub(super) fn build_timeline(
    name: &str,
    correlation_id: Uuid,
    steps: &[String],
    facts: Vec<(DateTime<Utc>, Fact)>,
) -> SagaTimeline {
    let started_at = facts.first().map_or_else(Utc::now, |(at, _)| *at);
    let mut transitions = vec![(
        started_at,
        Transition::Started {
            steps: steps.to_vec(),
            pivot: None,
        },
    )];
    let mut failure: Option<(String, String)> = None;
    let mut compensations_open = 0_i64;
    for (at, fact) in facts {
        match fact {
            Fact::Ran { step, compensating } => {
                let transition = if compensating {
                    compensations_open += 1;
                    Transition::StepCompensating { step, attempt: 1 }
                } else {
                    Transition::StepExecuting { step, attempt: 1 }
                };
                transitions.push((at, transition));
            }
            Fact::Done {
                step, compensating, ..
            } if compensating => {
                compensations_open -= 1;
                transitions.push((at, Transition::StepCompensated { step }));
            }
            Fact::Done {
                step,
                error: Some(error),
                ..
            } => {
                transitions.push((
                    at,
                    Transition::StepFailed {
                        step: step.clone(),
                        attempt: 1,
                        retryable: false,
                        error: error.clone(),
                    },
                ));
                transitions.push((
                    at,
                    Transition::Compensating {
                        failed_step: step.clone(),
                        error: error.clone(),
                    },
                ));
                failure = Some((step, error));
            }
            Fact::Done { step, .. } => {
                let last = steps.last() == Some(&step);
                transitions.push((at, Transition::StepSucceeded { step }));
                if failure.is_none() && last {
                    transitions.push((at, Transition::Completed));
                }
            }
        }
    }
    let last_at = transitions.last().map_or(started_at, |(at, _)| *at);
    if let Some((step, error)) = failure
        && compensations_open <= 0
    {
        transitions.push((last_at, Transition::Failed { step, error }));
    }
    let status = transitions
        .last()
        .map_or(SagaStatus::Running, |(_, transition)| {
            transition.status_after()
        });
    let instance = SagaInstance {
        id: SagaId::from_uuid(correlation_id),
        definition: name.to_owned(),
        version: 0,
        status,
        records: transitions
            .into_iter()
            .enumerate()
            .map(|(index, (at, transition))| SagaRecord {
                seq: index as u64 + 1,
                transition,
                context: serde_json::Value::Null,
                at,
            })
            .collect(),
    };
    SagaTimeline::from_instance(&instance)
}
