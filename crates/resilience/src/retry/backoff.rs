//! Exponential backoff with full jitter.

use std::sync::Mutex;
use std::time::Duration;

/// Exponential backoff: the ceiling for retry `n` (1-based) is
/// `min(max, initial * multiplier^(n-1))`, and with full jitter the delay is drawn uniformly
/// from `[0, ceiling]` (the "full jitter" of the AWS architecture blog's backoff study, which
/// spreads synchronized clients best).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// The ceiling of the first retry's delay.
    pub initial: Duration,
    /// The largest delay.
    pub max: Duration,
    /// The growth factor per retry (at least 1).
    pub multiplier: f64,
    /// Whether delays are drawn from `[0, ceiling]` (full jitter) or equal the ceiling.
    pub full_jitter: bool,
}

impl Default for Backoff {
    /// 50 ms doubling up to 5 s, with full jitter.
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(5),
            multiplier: 2.0,
            full_jitter: true,
        }
    }
}

impl Backoff {
    /// The delay ceiling before retry number `retry` (1 for the first retry).
    pub fn ceiling(&self, retry: u32) -> Duration {
        let exponent = i32::try_from(retry.saturating_sub(1)).unwrap_or(i32::MAX);
        let factor = self.multiplier.max(1.0).powi(exponent);
        let nanos = (self.initial.as_nanos() as f64 * factor).min(self.max.as_nanos() as f64);
        Duration::from_nanos(nanos as u64).min(self.max)
    }

    pub(crate) fn delay(&self, retry: u32, rng: &Mutex<fastrand::Rng>) -> Duration {
        let ceiling = self.ceiling(retry);
        if !self.full_jitter || ceiling.is_zero() {
            return ceiling;
        }
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        let mut rng = rng.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        Duration::from_nanos(rng.u64(0..=nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_until_the_cap() {
        let backoff = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            multiplier: 2.0,
            full_jitter: true,
        };
        let ceilings: Vec<_> = (1..=6).map(|n| backoff.ceiling(n).as_millis()).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff.ceiling(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn jittered_delays_stay_within_the_ceiling_and_vary() {
        let backoff = Backoff::default();
        let rng = Mutex::new(fastrand::Rng::with_seed(7));
        let delays: Vec<_> = (0..100).map(|_| backoff.delay(3, &rng)).collect();
        assert!(delays.iter().all(|d| *d <= backoff.ceiling(3)));
        let distinct: std::collections::HashSet<_> = delays.iter().collect();
        assert!(
            distinct.len() > 50,
            "full jitter spreads delays, got {} distinct",
            distinct.len()
        );
    }
}
