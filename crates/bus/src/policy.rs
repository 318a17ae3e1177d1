//! Per-subscription settings: the retry policy and the consumer's limits.

use std::time::Duration;

use crate::error::BusError;

/// Largest `max_deliveries` a policy accepts.
pub const DELIVERIES_MAX: u32 = 1_000;
/// Shortest ack wait (the lease a delivery holds before it is redelivered).
pub const ACK_WAIT_MIN: Duration = Duration::from_millis(10);
/// Longest ack wait.
pub const ACK_WAIT_MAX: Duration = Duration::from_secs(12 * 60 * 60);
/// Most messages one consumer may hold unsettled.
pub const IN_FLIGHT_MAX: usize = 4_096;
/// Longest retry delay a policy or a nack may ask for.
pub const RETRY_DELAY_MAX: Duration = Duration::from_secs(24 * 60 * 60);

/// How often a failing message is tried and how long to wait between tries.
///
/// Delivery `n` that fails is retried after a delay drawn from `[ceiling/2, ceiling]`
/// ("equal jitter"), where `ceiling = min(backoff_max, backoff_initial * multiplier^(n-1))`.
/// The delivery numbered `max_deliveries` that fails goes to the dead-letter queue.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    max_deliveries: u32,
    backoff_initial: Duration,
    backoff_max: Duration,
    multiplier: f64,
    jitter: bool,
}

impl Default for RetryPolicy {
    /// Five deliveries, backoff from 200 ms doubling up to 30 s, with jitter.
    fn default() -> Self {
        Self {
            max_deliveries: 5,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            multiplier: 2.0,
            jitter: true,
        }
    }
}

impl RetryPolicy {
    /// A policy with `max_deliveries` deliveries and the default backoff.
    ///
    /// # Errors
    /// [`BusError::InvalidConfig`] unless `1 <= max_deliveries <= DELIVERIES_MAX`.
    pub fn new(max_deliveries: u32) -> Result<Self, BusError> {
        if !(1..=DELIVERIES_MAX).contains(&max_deliveries) {
            return Err(BusError::InvalidConfig(format!(
                "max_deliveries must be 1..={DELIVERIES_MAX}, got {max_deliveries}"
            )));
        }
        Ok(Self {
            max_deliveries,
            ..Self::default()
        })
    }

    /// Sets the exponential backoff (initial ceiling, cap, growth factor).
    ///
    /// # Errors
    /// [`BusError::InvalidConfig`] when `initial > max`, `max` exceeds [`RETRY_DELAY_MAX`] or
    /// `multiplier` is below 1 or not finite.
    pub fn with_backoff(
        mut self,
        initial: Duration,
        max: Duration,
        multiplier: f64,
    ) -> Result<Self, BusError> {
        if initial > max || max > RETRY_DELAY_MAX || !(1.0..=100.0).contains(&multiplier) {
            return Err(BusError::InvalidConfig(format!(
                "backoff needs initial <= max <= 24 h and 1 <= multiplier <= 100, got {initial:?}, {max:?}, {multiplier}"
            )));
        }
        self.backoff_initial = initial;
        self.backoff_max = max;
        self.multiplier = multiplier;
        Ok(self)
    }

    /// Turns jitter off (delays equal their ceiling), for deterministic tests.
    #[must_use]
    pub fn without_jitter(mut self) -> Self {
        self.jitter = false;
        self
    }

    /// The number of deliveries before a failing message is dead-lettered.
    #[must_use]
    pub fn max_deliveries(&self) -> u32 {
        self.max_deliveries
    }

    /// The delay before retrying after failed delivery number `delivery` (1-based).
    #[must_use]
    pub fn delay(&self, delivery: u32) -> Duration {
        let exponent = i32::try_from(delivery.saturating_sub(1)).unwrap_or(i32::MAX);
        let factor = self.multiplier.powi(exponent);
        let ceiling_nanos = (self.backoff_initial.as_nanos() as f64 * factor)
            .min(self.backoff_max.as_nanos() as f64);
        let ceiling = Duration::from_nanos(ceiling_nanos as u64).min(self.backoff_max);
        if !self.jitter || ceiling.is_zero() {
            return ceiling;
        }
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(fastrand::u64(nanos / 2..=nanos))
    }
}

/// How a consumer group's subscription behaves. Build with [`SubscribeOptions::default`] and
/// the `with_*` steps.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscribeOptions {
    pub(crate) retry: RetryPolicy,
    pub(crate) ack_wait: Duration,
    pub(crate) in_flight_max: usize,
    pub(crate) per_subject_order: bool,
    pub(crate) replace_patterns: bool,
}

impl Default for SubscribeOptions {
    /// The default retry policy, a 30 s ack wait and 64 messages in flight.
    fn default() -> Self {
        Self {
            retry: RetryPolicy::default(),
            ack_wait: Duration::from_secs(30),
            in_flight_max: 64,
            per_subject_order: true,
            replace_patterns: false,
        }
    }
}

impl SubscribeOptions {
    /// Sets the retry policy.
    #[must_use]
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Lets this subscription replace the group's pattern list when the group exists with
    /// another one, instead of failing with [`BusError::GroupConflict`]: for a service whose
    /// new release handles other topics. Messages the group already took in stay its own;
    /// those after its position are matched against the new list. Every member of a group
    /// should run the same list: one still on the old list, joining after the replacement,
    /// fails with the conflict (or, with this option too, puts its list back).
    #[must_use]
    pub fn replacing_patterns(mut self) -> Self {
        self.replace_patterns = true;
        self
    }

    /// Sets how long a delivery may stay unsettled before the message is redelivered.
    ///
    /// # Errors
    /// [`BusError::InvalidConfig`] outside [`ACK_WAIT_MIN`]..=[`ACK_WAIT_MAX`].
    pub fn with_ack_wait(mut self, ack_wait: Duration) -> Result<Self, BusError> {
        if !(ACK_WAIT_MIN..=ACK_WAIT_MAX).contains(&ack_wait) {
            return Err(BusError::InvalidConfig(format!(
                "ack_wait must be 10 ms ..= 12 h, got {ack_wait:?}"
            )));
        }
        self.ack_wait = ack_wait;
        Ok(self)
    }

    /// Sets the most messages this consumer holds unsettled (backpressure).
    ///
    /// # Errors
    /// [`BusError::InvalidConfig`] outside `1..=IN_FLIGHT_MAX`.
    pub fn with_in_flight_max(mut self, in_flight_max: usize) -> Result<Self, BusError> {
        if !(1..=IN_FLIGHT_MAX).contains(&in_flight_max) {
            return Err(BusError::InvalidConfig(format!(
                "in_flight_max must be 1..={IN_FLIGHT_MAX}, got {in_flight_max}"
            )));
        }
        self.in_flight_max = in_flight_max;
        Ok(self)
    }

    /// Drops the per-subject ordering guarantee: messages of one subject may be in flight on
    /// several consumers at once (and a retried message no longer holds back its successors).
    /// For throughput where handlers commute; on NATS it lifts the one-in-flight-per-partition
    /// limit.
    #[must_use]
    pub fn with_unordered(mut self) -> Self {
        self.per_subject_order = false;
        self
    }

    /// Whether messages of one subject are handled one at a time, in order (the default).
    #[must_use]
    pub fn per_subject_order(&self) -> bool {
        self.per_subject_order
    }

    /// The retry policy.
    #[must_use]
    pub fn retry(&self) -> &RetryPolicy {
        &self.retry
    }

    /// The ack wait.
    #[must_use]
    pub fn ack_wait(&self) -> Duration {
        self.ack_wait
    }

    /// The in-flight limit.
    #[must_use]
    pub fn in_flight_max(&self) -> usize {
        self.in_flight_max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_jitter_stays_in_the_upper_half() {
        let policy = RetryPolicy::new(10)
            .and_then(|p| p.with_backoff(Duration::from_millis(100), Duration::from_secs(1), 2.0))
            .expect("valid");
        let fixed = policy.clone().without_jitter();
        let ceilings: Vec<u128> = (1..=6).map(|n| fixed.delay(n).as_millis()).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        for _ in 0..100 {
            let delay = policy.delay(3);
            assert!(delay >= Duration::from_millis(200) && delay <= Duration::from_millis(400));
        }
    }

    #[test]
    fn out_of_range_settings_are_refused() {
        assert!(RetryPolicy::new(0).is_err());
        assert!(RetryPolicy::new(DELIVERIES_MAX + 1).is_err());
        assert!(
            RetryPolicy::default()
                .with_backoff(Duration::from_secs(2), Duration::from_secs(1), 2.0)
                .is_err()
        );
        assert!(
            SubscribeOptions::default()
                .with_ack_wait(Duration::from_millis(1))
                .is_err()
        );
        assert!(SubscribeOptions::default().with_in_flight_max(0).is_err());
    }
}
