//! What the bus exports as metrics beyond its counters: the `# HELP` text of every bus metric,
//! and the dead-letter gauges a service samples (docs/metrics.md is the catalog).

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::dlq::{DeadLetterStats, DeadLetters};
use crate::error::BusError;

/// Dead letters waiting in a group's queue (a gauge, by `group`).
pub const DLQ_MESSAGES: &str = "trellis_bus_dlq_messages";
/// Seconds since a group's oldest waiting dead letter was dead-lettered (a gauge, by `group`;
/// 0 when its queue is empty).
pub const DLQ_OLDEST_AGE: &str = "trellis_bus_dlq_oldest_age_seconds";
/// How often a service samples its dead-letter queue unless told otherwise.
pub const DLQ_SAMPLE_INTERVAL_DEFAULT: Duration = Duration::from_secs(15);

/// Describes the bus's metrics to the installed recorder. Every backend calls it when it
/// opens, so a scrape explains them; describing twice is harmless.
pub(crate) fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "trellis_bus_published_total",
        "Messages a bus backend stored durably, by topic"
    );
    describe_counter!(
        "trellis_bus_delivered_total",
        "Deliveries handed to a consumer (redeliveries included), by group"
    );
    describe_counter!(
        "trellis_bus_acked_total",
        "Deliveries a consumer acknowledged as handled, by group"
    );
    describe_counter!(
        "trellis_bus_retried_total",
        "Failed deliveries scheduled for another attempt by the retry policy, by group"
    );
    describe_counter!(
        "trellis_bus_dead_lettered_total",
        "Messages moved to the dead-letter queue, by group and reason"
    );
    describe_histogram!(
        "trellis_bus_consumer_lag_seconds",
        "Seconds from a message's envelope time to its first delivery to a group, by group"
    );
    describe_gauge!(DLQ_MESSAGES, "Dead letters waiting in a group's queue");
    describe_gauge!(
        DLQ_OLDEST_AGE,
        "Seconds since the oldest dead letter waiting in a group's queue was dead-lettered (0 when empty)"
    );
    describe_counter!(
        "trellis_bus_dlq_actions_total",
        "Operator actions on dead letters, by action (redrive, discard, archive)"
    );
    describe_counter!(
        "trellis_bus_inbox_duplicates_total",
        "Messages an inbox skipped because their id was already handled"
    );
    describe_gauge!(
        "trellis_bus_outbox_lag_seconds",
        "Age of the oldest outbox row not yet relayed to the bus (0 when caught up)"
    );
    describe_counter!(
        "trellis_bus_publish_refused_total",
        "Publishes the NATS stream refused, by reason"
    );
    describe_gauge!(
        "trellis_bus_stream_max_age_seconds",
        "The NATS stream's retention (max_age) in seconds"
    );
}

/// Exports a dead-letter queue's depth and oldest age per group as the gauges
/// [`DLQ_MESSAGES`] and [`DLQ_OLDEST_AGE`].
///
/// The service that owns a bus connection runs one ([`DlqGauges::run`]) beside its consumers,
/// so the gauges also move when nothing is consumed (a queue nobody drains still ages).
/// A group whose queue empties keeps its series at 0 rather than vanishing, so an alert on it
/// resolves instead of going stale.
///
/// ```
/// # async fn demo() -> Result<(), trellis_bus::BusError> {
/// let bus = trellis_bus::InMemoryBus::new();
/// let mut gauges = trellis_bus::DlqGauges::new();
/// gauges.sample(&bus).await?; // sets the gauges of every group with dead letters
/// # Ok(()) }
/// ```
#[derive(Debug, Default)]
pub struct DlqGauges {
    /// Every group sampled so far, so an emptied queue is set back to 0.
    groups: BTreeSet<String>,
}

impl DlqGauges {
    /// A sampler that has seen no group yet.
    #[must_use]
    pub fn new() -> Self {
        describe();
        Self::default()
    }

    /// Reads `dlq`'s [`stats`](DeadLetters::stats) once and sets the gauges as of now.
    ///
    /// # Errors
    /// The store's fault; the gauges keep their last values.
    pub async fn sample(&mut self, dlq: &impl DeadLetters) -> Result<(), BusError> {
        let stats = dlq.stats().await?;
        self.set(&stats, Utc::now());
        Ok(())
    }

    fn set(&mut self, stats: &[DeadLetterStats], now: DateTime<Utc>) {
        for (name, group, value) in self.readings(stats, now) {
            metrics::gauge!(name, "group" => group).set(value);
        }
    }

    /// The gauge values a sample sets: each group in `stats`, then 0 for every group seen
    /// before and empty now.
    fn readings(
        &mut self,
        stats: &[DeadLetterStats],
        now: DateTime<Utc>,
    ) -> Vec<(&'static str, String, f64)> {
        let mut readings = Vec::new();
        let mut seen = BTreeSet::new();
        for group in stats {
            let age = group
                .oldest_dead_lettered_at
                .map_or(0.0, |oldest| seconds_between(oldest, now));
            readings.push((DLQ_MESSAGES, group.group.clone(), group.dead as f64));
            readings.push((DLQ_OLDEST_AGE, group.group.clone(), age));
            seen.insert(group.group.clone());
        }
        for gone in self.groups.difference(&seen) {
            readings.push((DLQ_MESSAGES, gone.clone(), 0.0));
            readings.push((DLQ_OLDEST_AGE, gone.clone(), 0.0));
        }
        self.groups.extend(seen);
        readings
    }

    /// Samples `dlq` every `interval` until the future is dropped; a failed sample is logged
    /// and the next one tried.
    pub async fn run(mut self, dlq: impl DeadLetters, interval: Duration) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if let Err(error) = self.sample(&dlq).await {
                tracing::warn!(%error, "cannot sample the dead-letter queue for its gauges");
            }
        }
    }
}

/// Seconds from `earlier` to `later`, 0 when the clocks disagree the other way.
fn seconds_between(earlier: DateTime<Utc>, later: DateTime<Utc>) -> f64 {
    (later - earlier)
        .to_std()
        .map_or(0.0, |age| age.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_whose_queue_empties_drops_to_zero_instead_of_vanishing() {
        // Two samples: billing has letters, then none; its gauges must read 0, not stay at 3.
        let now = DateTime::from_timestamp(1_000, 0).expect("a valid time");
        let oldest = DateTime::from_timestamp(940, 0).expect("a valid time");
        let mut gauges = DlqGauges::default();
        let billing = DeadLetterStats {
            group: "billing".to_owned(),
            dead: 3,
            oldest_dead_lettered_at: Some(oldest),
        };
        assert_eq!(
            gauges.readings(&[billing], now),
            vec![
                (DLQ_MESSAGES, "billing".to_owned(), 3.0),
                (DLQ_OLDEST_AGE, "billing".to_owned(), 60.0),
            ]
        );
        assert_eq!(
            gauges.readings(&[], now),
            vec![
                (DLQ_MESSAGES, "billing".to_owned(), 0.0),
                (DLQ_OLDEST_AGE, "billing".to_owned(), 0.0),
            ]
        );
    }
}
