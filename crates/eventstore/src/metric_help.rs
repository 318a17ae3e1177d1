//! The `# HELP` text of every metric the event store records (docs/metrics.md is the catalog).

/// Describes the event store's metrics to the installed recorder; the SQL stores and
/// projection runners call it when they start, so a scrape explains them.
pub(crate) fn describe() {
    metrics::describe_histogram!(
        "trellis_eventstore_append_duration_seconds",
        "Seconds an append to a SQL event store took: queueing, its batch's transaction and the commit"
    );
    metrics::describe_histogram!(
        "trellis_eventstore_append_batch_size",
        "Appends written in one event store transaction (group commit)"
    );
    metrics::describe_gauge!(
        "trellis_projection_lag_events",
        "Events in the global log a projection's active generation has not applied yet, by projection"
    );
}
