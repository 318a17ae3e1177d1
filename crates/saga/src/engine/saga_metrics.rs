//! What the orchestrator records as metrics (docs/metrics.md is the catalog): sagas started
//! and ended, steps compensated, step latency, and the sagas waiting in the compensating and
//! stuck statuses.

use crate::store::{SagaStatus, Transition};

/// Sagas started (a counter, by `definition`).
pub(crate) const STARTED: &str = "trellis_saga_started_total";
/// Sagas that ended with every step done (a counter, by `definition`).
pub(crate) const COMPLETED: &str = "trellis_saga_completed_total";
/// Sagas that ended failed: a step failed for good and every completed step was compensated
/// (a counter, by `definition` and the failed `step`).
pub(crate) const FAILED: &str = "trellis_saga_failed_total";
/// Step compensations that succeeded (a counter, by `definition` and `step`).
pub(crate) const COMPENSATED: &str = "trellis_saga_compensated_total";
/// Sagas that ran out of retries where only an operator can resolve them (a counter, by
/// `definition`).
pub(crate) const STUCK: &str = "trellis_saga_stuck_total";
/// Seconds one attempt of a step's execute or compensate took (a histogram, by `definition`,
/// `step`, `phase` and `outcome`).
pub(crate) const STEP_DURATION: &str = "trellis_saga_step_duration_seconds";
/// Sagas in a status that needs watching, `compensating` or `stuck` (a gauge, by `definition`
/// and `status`), sampled by [`SagaEngine::export_status_gauges`](crate::SagaEngine::export_status_gauges).
pub(crate) const INSTANCES: &str = "trellis_saga_instances";

/// The statuses [`INSTANCES`] counts. Running sagas are not listed (there may be thousands):
/// `started − completed − failed − stuck` counts them from the counters.
pub(crate) const WATCHED_STATUSES: [SagaStatus; 2] = [SagaStatus::Compensating, SagaStatus::Stuck];

/// Describes the orchestrator's metrics to the installed recorder; every engine calls it when
/// it is made, so a scrape explains them.
pub(crate) fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(STARTED, "Sagas started, by definition");
    describe_counter!(
        COMPLETED,
        "Sagas that ended with every step done, by definition"
    );
    describe_counter!(
        FAILED,
        "Sagas that ended failed: the step failed for good and every completed step was compensated"
    );
    describe_counter!(
        COMPENSATED,
        "Step compensations that succeeded, by definition and step"
    );
    describe_counter!(
        STUCK,
        "Sagas stuck: a compensation or a step after the pivot ran out of retries; an operator must resolve them"
    );
    describe_histogram!(
        STEP_DURATION,
        "Seconds one attempt of a saga step took, by definition, step, phase (execute, compensate) and outcome (ok, error)"
    );
    describe_gauge!(
        INSTANCES,
        "Sagas now compensating or stuck, by definition and status (sampled from the saga log)"
    );
}

/// Counts what a transition just written means for the saga's lifecycle.
pub(crate) fn count_transition(definition: &str, transition: &Transition) {
    let definition = definition.to_owned();
    match transition {
        Transition::Started { .. } => {
            metrics::counter!(STARTED, "definition" => definition).increment(1)
        }
        Transition::Completed => {
            metrics::counter!(COMPLETED, "definition" => definition).increment(1)
        }
        Transition::Failed { step, .. } => {
            metrics::counter!(FAILED, "definition" => definition, "step" => step.clone())
                .increment(1);
        }
        Transition::StepCompensated { step } => {
            metrics::counter!(COMPENSATED, "definition" => definition, "step" => step.clone())
                .increment(1);
        }
        Transition::Stuck { .. } => {
            metrics::counter!(STUCK, "definition" => definition).increment(1)
        }
        _ => {}
    }
}

/// Records one attempt of a step (`phase` is `execute` or `compensate`).
pub(crate) fn record_attempt(
    definition: &str,
    step: &str,
    phase: &'static str,
    ok: bool,
    seconds: f64,
) {
    metrics::histogram!(
        STEP_DURATION,
        "definition" => definition.to_owned(), "step" => step.to_owned(), "phase" => phase,
        "outcome" => if ok { "ok" } else { "error" }
    )
    .record(seconds);
}
