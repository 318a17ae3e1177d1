//! Driving one saga: decide, write the transition, run the step, until the saga is terminal.

use std::time::Duration;

use chrono::Utc;
use tracing::Instrument as _;

use super::decide::{Next, count_interrupted, next};
use super::saga_metrics;
use super::{Keeper, TRANSITIONS_MAX};
use crate::definition::{SagaContext, SagaDefinition, StepContext, StepError};
use crate::error::SagaError;
use crate::store::{SagaInstance, SagaRecord, SagaStatus, SagaStore, Transition};

/// Runs a saga from wherever its log stands until it is terminal.
pub(super) async fn drive<S: SagaStore, C: SagaContext>(
    definition: &SagaDefinition<C>,
    keeper: Keeper<'_, S>,
    instance: SagaInstance,
) -> Result<SagaStatus, SagaError> {
    let id = instance.id;
    let mut records = instance.records;
    let mut context: C = serde_json::from_value(
        records
            .last()
            .ok_or_else(|| SagaError::CorruptLog {
                id,
                reason: "empty log".to_owned(),
            })?
            .context
            .clone(),
    )?;
    // The log this drive starts from may end in an attempt another drive logged and never
    // finished; later iterations only see attempts this drive logged itself.
    let mut inherited = true;
    loop {
        let mut next = next(definition, id, &records)?;
        if std::mem::take(&mut inherited) {
            next = count_interrupted(definition, next);
        }
        let transition = match next {
            Next::Done(status) => return Ok(status),
            Next::Write { transition, after } => {
                if !after.is_zero() {
                    keeper.guard(tokio::time::sleep(after)).await?;
                }
                transition
            }
            Next::Execute { step, attempt } => {
                let step = &definition.steps[step];
                let before = records.last().map(|record| record.context.clone());
                let started = std::time::Instant::now();
                let outcome = keeper
                    .guard(run(
                        &step.execute,
                        &mut context,
                        StepContext::new(id, &step.name, attempt),
                        step.timeout,
                        Phase::Execute,
                    ))
                    .await?;
                saga_metrics::record_attempt(
                    &definition.name,
                    &step.name,
                    "execute",
                    outcome.is_ok(),
                    started.elapsed().as_secs_f64(),
                );
                match outcome {
                    Ok(()) => Transition::StepSucceeded {
                        step: step.name.clone(),
                    },
                    Err(error) => {
                        // A failed attempt leaves no trace in the context: the next attempt
                        // sees what a recovery would see.
                        if let Some(before) = before {
                            context = serde_json::from_value(before)?;
                        }
                        tracing::warn!(saga = %id, step = %step.name, attempt, %error, "saga step failed");
                        Transition::StepFailed {
                            step: step.name.clone(),
                            attempt,
                            retryable: error.is_retryable(),
                            error: error.message().to_owned(),
                        }
                    }
                }
            }
            Next::Compensate { step, attempt } => {
                let step = &definition.steps[step];
                let compensate = step
                    .compensate
                    .as_ref()
                    .ok_or_else(|| SagaError::CorruptLog {
                        id,
                        reason: format!("step {} has no compensation", step.name),
                    })?;
                let before = records.last().map(|record| record.context.clone());
                let started = std::time::Instant::now();
                let outcome = keeper
                    .guard(run(
                        compensate,
                        &mut context,
                        StepContext::new(id, &step.name, attempt),
                        step.timeout,
                        Phase::Compensate,
                    ))
                    .await?;
                saga_metrics::record_attempt(
                    &definition.name,
                    &step.name,
                    "compensate",
                    outcome.is_ok(),
                    started.elapsed().as_secs_f64(),
                );
                match outcome {
                    Ok(()) => Transition::StepCompensated {
                        step: step.name.clone(),
                    },
                    Err(error) => {
                        if let Some(before) = before {
                            context = serde_json::from_value(before)?;
                        }
                        tracing::warn!(saga = %id, step = %step.name, attempt, %error, "saga compensation failed");
                        Transition::CompensationFailed {
                            step: step.name.clone(),
                            attempt,
                            retryable: error.is_retryable(),
                            error: error.message().to_owned(),
                        }
                    }
                }
            }
        };
        let seq = records.len() as u64 + 1;
        if seq > TRANSITIONS_MAX {
            return Err(SagaError::CorruptLog {
                id,
                reason: format!("more than {TRANSITIONS_MAX} transitions"),
            });
        }
        let record = SagaRecord {
            seq,
            transition,
            context: serde_json::to_value(&context)?,
            at: Utc::now(),
        };
        keeper.append(&record).await?;
        saga_metrics::count_transition(&definition.name, &record.transition);
        if let Transition::Stuck {
            step,
            compensating,
            error,
        } = &record.transition
        {
            tracing::error!(
                saga = %id,
                definition = %definition.name,
                step = %step,
                compensating,
                %error,
                "saga stuck: retry budget exhausted, an operator must resolve it"
            );
        }
        records.push(record);
    }
}

/// Which of a step's functions an attempt runs.
#[derive(Debug, Clone, Copy)]
enum Phase {
    Execute,
    Compensate,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Self::Execute => "execute",
            Self::Compensate => "compensate",
        }
    }
}

/// Runs one attempt of `execute` or `compensate` under its timeout, in a `saga.step` span
/// (named `execute STEP` or `compensate STEP`, a child of the saga's span): the calls the step
/// makes join the saga's trace below it, and a failed attempt marks the span as an error.
async fn run<C>(
    function: &crate::definition::StepFn<C>,
    context: &mut C,
    step: StepContext,
    timeout: Duration,
    phase: Phase,
) -> Result<(), StepError> {
    let span = tracing::info_span!(
        "saga.step",
        otel.name = %format_args!("{} {}", phase.as_str(), step.step()),
        saga.step = %step.step(),
        saga.phase = phase.as_str(),
        saga.attempt = step.attempt(),
        otel.status_code = tracing::field::Empty,
        error.message = tracing::field::Empty,
    );
    let outcome = match tokio::time::timeout(timeout, function(context, step))
        .instrument(span.clone())
        .await
    {
        Ok(outcome) => outcome,
        Err(_) => Err(StepError::retryable(format!(
            "timed out after {} ms",
            timeout.as_millis()
        ))),
    };
    if let Err(error) = &outcome {
        span.record("otel.status_code", "ERROR");
        span.record("error.message", error.message());
    }
    outcome
}
