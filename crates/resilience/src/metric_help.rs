//! The `# HELP` text of every metric the resilience policies record (docs/metrics.md is the
//! catalog).

/// Describes the policies' metrics to the installed recorder; each policy's constructor calls
/// it, so a scrape explains them. Building policies is rare, and describing twice is harmless.
pub(crate) fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_counter!(
        "trellis_breaker_calls_total",
        "Calls a circuit breaker admitted and recorded, by breaker and outcome"
    );
    describe_counter!(
        "trellis_breaker_rejections_total",
        "Calls a circuit breaker refused without running them (open, or half-open and full)"
    );
    describe_gauge!(
        "trellis_breaker_state",
        "A circuit breaker's state: 0 closed, 1 open, 2 half-open, 3 forced open, 4 forced closed"
    );
    describe_counter!(
        "trellis_breaker_transitions_total",
        "Circuit breaker state changes, by breaker, from and to"
    );
    describe_counter!(
        "trellis_retry_retries_total",
        "Retries a retry policy made (attempts after the first), by policy"
    );
    describe_counter!(
        "trellis_retry_budget_exhausted_total",
        "Retries a retry policy skipped because its retry budget was spent, by policy"
    );
    describe_counter!(
        "trellis_bulkhead_rejections_total",
        "Calls a bulkhead refused because its slots and queue were full or the wait ran out"
    );
    describe_counter!(
        "trellis_rate_limiter_rejections_total",
        "Calls a rate limiter refused, by limiter"
    );
}
