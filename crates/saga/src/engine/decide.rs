//! The engine's decisions: what to do next, from a saga's log alone (pure, no I/O).

use std::time::Duration;

use crate::definition::SagaDefinition;
use crate::error::SagaError;
use crate::store::{SagaId, SagaRecord, SagaStatus, Transition};

/// What the engine does next, decided from the log alone.
#[derive(Debug, PartialEq)]
pub(super) enum Next {
    /// Write this transition, after waiting `after` (a retry's backoff).
    Write {
        transition: Transition,
        after: Duration,
    },
    /// Run the step's `execute` (its `StepExecuting` is the last record).
    Execute { step: usize, attempt: u32 },
    /// Run the step's `compensate` (its `StepCompensating` is the last record).
    Compensate { step: usize, attempt: u32 },
    /// Nothing: the saga is terminal.
    Done(SagaStatus),
}

pub(super) fn write(transition: Transition) -> Next {
    Next::Write {
        transition,
        after: Duration::ZERO,
    }
}

/// Decides the next move from the saga's log.
pub(super) fn next<C>(
    definition: &SagaDefinition<C>,
    id: SagaId,
    records: &[SagaRecord],
) -> Result<Next, SagaError> {
    let corrupt = |reason: String| SagaError::CorruptLog { id, reason };
    let last = records
        .last()
        .ok_or_else(|| corrupt("empty log".to_owned()))?;
    let index = |step: &str| {
        definition
            .index_of(step)
            .ok_or_else(|| corrupt(format!("unknown step {step}")))
    };
    let step_name = |index: usize| definition.steps[index].name.clone();
    // The highest compensable step below `below`, or the `Failed` transition.
    let compensate_below = |below: usize| -> Result<Next, SagaError> {
        if let Some(step) = (0..below)
            .rev()
            .find(|&step| definition.steps[step].compensate.is_some())
        {
            return Ok(write(Transition::StepCompensating {
                step: step_name(step),
                attempt: 1,
            }));
        }
        let cause = records
            .iter()
            .rev()
            .find_map(|record| match &record.transition {
                Transition::Compensating { failed_step, error } => {
                    Some((failed_step.clone(), error.clone()))
                }
                Transition::Cancelled { step, reason } => Some((
                    step.clone().unwrap_or_default(),
                    format!("cancelled: {reason}"),
                )),
                _ => None,
            })
            .ok_or_else(|| corrupt("compensation without a Compensating record".to_owned()))?;
        Ok(write(Transition::Failed {
            step: cause.0,
            error: cause.1,
        }))
    };
    Ok(match &last.transition {
        Transition::Started { .. } => write(Transition::StepExecuting {
            step: step_name(0),
            attempt: 1,
        }),
        Transition::StepExecuting { step, attempt } => Next::Execute {
            step: index(step)?,
            attempt: *attempt,
        },
        Transition::StepSucceeded { step }
        | Transition::Skipped {
            step,
            compensating: false,
            ..
        } => {
            let following = index(step)? + 1;
            if following < definition.steps.len() {
                write(Transition::StepExecuting {
                    step: step_name(following),
                    attempt: 1,
                })
            } else {
                write(Transition::Completed)
            }
        }
        Transition::StepFailed {
            step,
            attempt,
            retryable,
            error,
        } => {
            let position = index(step)?;
            let retry = definition.steps[position].retry;
            if *retryable && *attempt < retry.attempts_max {
                Next::Write {
                    transition: Transition::StepExecuting {
                        step: step.clone(),
                        attempt: attempt + 1,
                    },
                    after: retry.delay_after(*attempt),
                }
            } else if definition.pivot.is_some_and(|pivot| position > pivot) {
                write(Transition::Stuck {
                    step: step.clone(),
                    compensating: false,
                    error: error.clone(),
                })
            } else {
                write(Transition::Compensating {
                    failed_step: step.clone(),
                    error: error.clone(),
                })
            }
        }
        Transition::Compensating { failed_step, .. } => {
            let failed = index(failed_step)?;
            let own = &definition.steps[failed];
            if own.compensate_on_failure && own.compensate.is_some() {
                // The failed step's effect may exist (an answer lost): undo it first.
                write(Transition::StepCompensating {
                    step: failed_step.clone(),
                    attempt: 1,
                })
            } else {
                compensate_below(failed)?
            }
        }
        Transition::StepCompensating { step, attempt } => Next::Compensate {
            step: index(step)?,
            attempt: *attempt,
        },
        Transition::StepCompensated { step }
        | Transition::Skipped {
            step,
            compensating: true,
            ..
        } => compensate_below(index(step)?)?,
        Transition::Cancelled { step, .. } => match step {
            Some(step) => compensate_below(index(step)? + 1)?,
            None => compensate_below(0)?,
        },
        Transition::Retried {
            step,
            compensating: false,
            ..
        } => write(Transition::StepExecuting {
            step: step.clone(),
            attempt: 1,
        }),
        Transition::Retried {
            step,
            compensating: true,
            ..
        } => write(Transition::StepCompensating {
            step: step.clone(),
            attempt: 1,
        }),
        Transition::CompensationFailed {
            step,
            attempt,
            retryable,
            error,
        } => {
            let retry = definition.steps[index(step)?].compensation_retry();
            if *retryable && *attempt < retry.attempts_max {
                Next::Write {
                    transition: Transition::StepCompensating {
                        step: step.clone(),
                        attempt: attempt + 1,
                    },
                    after: retry.delay_after(*attempt),
                }
            } else {
                write(Transition::Stuck {
                    step: step.clone(),
                    compensating: true,
                    error: error.clone(),
                })
            }
        }
        Transition::Completed | Transition::Failed { .. } | Transition::Stuck { .. } => {
            Next::Done(last.transition.status_after())
        }
    })
}

/// The error recorded for an attempt whose engine stopped during it.
pub(crate) const INTERRUPTED: &str =
    "interrupted: the engine stopped during this attempt (crash, shutdown or lost lease)";

/// Turns the attempt a drive inherited in flight (its `StepExecuting` or `StepCompensating`
/// is the log's last record: the engine that logged it crashed, stopped or lost its lease
/// during it) into a retryable failure of that attempt, so it counts against the step's
/// budget. Re-running it under the same number would let a step that kills its engine every
/// time run forever; counted, it fails for good once its attempts are spent (compensation
/// before the pivot, `Stuck` after it, `Stuck` for a compensation). Whether the attempt had
/// its effect is unknown, as after a timeout: the next attempt carries the same idempotency
/// key.
pub(super) fn count_interrupted<C>(definition: &SagaDefinition<C>, next: Next) -> Next {
    match next {
        Next::Execute { step, attempt } => {
            tracing::warn!(step = %definition.steps[step].name, attempt, "saga step attempt interrupted; counted as failed");
            write(Transition::StepFailed {
                step: definition.steps[step].name.clone(),
                attempt,
                retryable: true,
                error: INTERRUPTED.to_owned(),
            })
        }
        Next::Compensate { step, attempt } => {
            tracing::warn!(step = %definition.steps[step].name, attempt, "saga compensation attempt interrupted; counted as failed");
            write(Transition::CompensationFailed {
                step: definition.steps[step].name.clone(),
                attempt,
                retryable: true,
                error: INTERRUPTED.to_owned(),
            })
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chrono::Utc;
    use trellis_resilience::Backoff;

    use super::{INTERRUPTED, Next, count_interrupted, next, write};
    use crate::definition::{SagaDefinition, Step, StepRetry};
    use crate::store::{SagaId, SagaRecord, SagaStatus, Transition};

    fn definition() -> SagaDefinition<u32> {
        let backoff = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            multiplier: 2.0,
            full_jitter: false,
        };
        SagaDefinition::builder("d", 1)
            .step(
                Step::new("a", |_: &mut u32, _| Box::pin(async { Ok(()) }))
                    .compensate(|_: &mut u32, _| Box::pin(async { Ok(()) })),
            )
            .step(Step::new("b", |_: &mut u32, _| Box::pin(async { Ok(()) })))
            .step(
                Step::new("c", |_: &mut u32, _| Box::pin(async { Ok(()) }))
                    .retry(StepRetry::new(3, backoff)),
            )
            .build()
            .expect("valid")
    }

    fn log(transitions: Vec<Transition>) -> Vec<SagaRecord> {
        transitions
            .into_iter()
            .enumerate()
            .map(|(index, transition)| SagaRecord {
                seq: index as u64 + 1,
                transition,
                context: serde_json::json!(0),
                at: Utc::now(),
            })
            .collect()
    }

    fn started() -> Transition {
        Transition::Started {
            steps: Vec::new(),
            pivot: None,
        }
    }

    fn decide(transitions: Vec<Transition>) -> Next {
        next(&definition(), SagaId::new(), &log(transitions)).expect("decidable")
    }

    #[test]
    fn a_log_ending_in_an_executing_step_runs_that_attempt() {
        // Goal: the attempt a drive has just logged is the one it runs next.
        let executing = Transition::StepExecuting {
            step: "b".to_owned(),
            attempt: 2,
        };
        assert_eq!(
            decide(vec![started(), executing]),
            Next::Execute {
                step: 1,
                attempt: 2
            }
        );
    }

    #[test]
    fn an_attempt_inherited_in_flight_is_logged_as_a_retryable_failure() {
        // Goal: a drive that starts on an attempt another drive left in flight writes that
        // attempt's failure (so it counts) instead of running it again; other moves pass.
        assert_eq!(
            count_interrupted(
                &definition(),
                Next::Execute {
                    step: 1,
                    attempt: 2
                }
            ),
            write(Transition::StepFailed {
                step: "b".to_owned(),
                attempt: 2,
                retryable: true,
                error: INTERRUPTED.to_owned(),
            })
        );
        assert_eq!(
            count_interrupted(
                &definition(),
                Next::Compensate {
                    step: 0,
                    attempt: 1
                }
            ),
            write(Transition::CompensationFailed {
                step: "a".to_owned(),
                attempt: 1,
                retryable: true,
                error: INTERRUPTED.to_owned(),
            })
        );
        assert_eq!(
            count_interrupted(&definition(), Next::Done(SagaStatus::Completed)),
            Next::Done(SagaStatus::Completed)
        );
    }

    #[test]
    fn a_retryable_failure_waits_for_the_backoff_ceiling_before_the_next_attempt() {
        // Goal: attempt 2 of `c` failing schedules attempt 3 after 100 ms * 2^(2-1).
        let failed = Transition::StepFailed {
            step: "c".to_owned(),
            attempt: 2,
            retryable: true,
            error: "busy".to_owned(),
        };
        assert_eq!(
            decide(vec![started(), failed]),
            Next::Write {
                transition: Transition::StepExecuting {
                    step: "c".to_owned(),
                    attempt: 3
                },
                after: Duration::from_millis(200),
            }
        );
    }

    #[test]
    fn compensation_skips_steps_without_a_compensate_and_then_fails_the_saga() {
        // Goal: after `c` fails, `b` (no compensation) is skipped, `a` compensates, then Failed.
        let compensating = Transition::Compensating {
            failed_step: "c".to_owned(),
            error: "gone".to_owned(),
        };
        assert_eq!(
            decide(vec![started(), compensating.clone()]),
            write(Transition::StepCompensating {
                step: "a".to_owned(),
                attempt: 1
            })
        );
        let compensated = Transition::StepCompensated {
            step: "a".to_owned(),
        };
        assert_eq!(
            decide(vec![started(), compensating, compensated]),
            write(Transition::Failed {
                step: "c".to_owned(),
                error: "gone".to_owned()
            })
        );
    }

    #[test]
    fn a_failed_step_that_compensates_its_own_failure_is_undone_first() {
        // Goal: `Compensating` after a step flagged `compensate_on_failure` starts with that
        // step's own compensation; once it is done, the steps below follow as usual.
        let definition = SagaDefinition::builder("d", 1)
            .step(
                Step::new("a", |_: &mut u32, _| Box::pin(async { Ok(()) }))
                    .compensate(|_: &mut u32, _| Box::pin(async { Ok(()) })),
            )
            .step(
                Step::new("b", |_: &mut u32, _| Box::pin(async { Ok(()) }))
                    .compensate(|_: &mut u32, _| Box::pin(async { Ok(()) }))
                    .compensate_on_failure(),
            )
            .build()
            .expect("valid");
        let compensating = Transition::Compensating {
            failed_step: "b".to_owned(),
            error: "lost".to_owned(),
        };
        let decide = |transitions| next(&definition, SagaId::new(), &log(transitions));
        assert_eq!(
            decide(vec![started(), compensating.clone()]).expect("decidable"),
            write(Transition::StepCompensating {
                step: "b".to_owned(),
                attempt: 1
            })
        );
        let own_done = Transition::StepCompensated {
            step: "b".to_owned(),
        };
        assert_eq!(
            decide(vec![started(), compensating, own_done]).expect("decidable"),
            write(Transition::StepCompensating {
                step: "a".to_owned(),
                attempt: 1
            })
        );
    }

    #[test]
    fn a_terminal_log_needs_nothing_more() {
        // Goal: Completed, Failed and Stuck logs are left alone.
        assert_eq!(
            decide(vec![started(), Transition::Completed]),
            Next::Done(SagaStatus::Completed)
        );
    }

    #[test]
    fn a_log_naming_an_unknown_step_is_corrupt() {
        // Goal: a step missing from the definition is reported, not guessed at.
        let records = log(vec![Transition::StepSucceeded {
            step: "zz".to_owned(),
        }]);
        assert!(next(&definition(), SagaId::new(), &records).is_err());
    }
}
