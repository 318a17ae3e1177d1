//! The simulator's run-time settings: declines and injected faults.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Default card limit: charges above it are declined (100,000.00).
pub const CARD_LIMIT_CENTS_DEFAULT: i64 = 10_000_000;
/// Largest latency that may be injected, in milliseconds.
pub const LATENCY_MS_MAX: u64 = 60_000;

/// How the simulated provider behaves. Every field may be changed at run time
/// (`PUT /admin/config` or [`ProviderHandle::set_config`](crate::ProviderHandle::set_config)).
///
/// The default is a healthy provider: no latency, no failures, no random declines.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Added to every `/v1` call before it is answered (0 to 60,000).
    pub latency_ms: u64,
    /// Probability (0 to 1) that a `/v1` call answers 503 without doing anything (the call
    /// is refused before it reads or changes any state).
    pub failure_rate: f64,
    /// When true every `/v1` call (except `/v1/stats`) answers 503 without doing anything.
    pub outage: bool,
    /// Probability (0 to 1) that a new charge is declined (402 `card_declined`).
    pub decline_rate: f64,
    /// Charges above this amount are declined (at least 0).
    pub card_limit_cents: i64,
    /// Probability (0 to 1) that a new charge is captured and then answered with 500
    /// (`injected_failure_after_capture`, an unknown outcome) anyway, as when the answer is
    /// lost on the way back. Tests that callers reconcile. Never 503: a 503 means nothing
    /// was done.
    pub fail_after_capture_rate: f64,
}

impl Default for ProviderConfig {
    fn default() -> Self {
        Self {
            latency_ms: 0,
            failure_rate: 0.0,
            outage: false,
            decline_rate: 0.0,
            card_limit_cents: CARD_LIMIT_CENTS_DEFAULT,
            fail_after_capture_rate: 0.0,
        }
    }
}

/// A partial update of [`ProviderConfig`] (`PUT /admin/config`): absent fields keep their value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfigUpdate {
    /// See [`ProviderConfig::latency_ms`].
    pub latency_ms: Option<u64>,
    /// See [`ProviderConfig::failure_rate`].
    pub failure_rate: Option<f64>,
    /// See [`ProviderConfig::outage`].
    pub outage: Option<bool>,
    /// See [`ProviderConfig::decline_rate`].
    pub decline_rate: Option<f64>,
    /// See [`ProviderConfig::card_limit_cents`].
    pub card_limit_cents: Option<i64>,
    /// See [`ProviderConfig::fail_after_capture_rate`].
    pub fail_after_capture_rate: Option<f64>,
}

/// A setting outside its allowed range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {reason}")]
pub struct ConfigError {
    /// The setting's name, as in the JSON body.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl ProviderConfig {
    /// Checks every setting.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the first setting out of range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let rate = |field: &'static str, value: f64| {
            if (0.0..=1.0).contains(&value) {
                Ok(())
            } else {
                Err(ConfigError {
                    field,
                    reason: format!("must be between 0 and 1, got {value}"),
                })
            }
        };
        if self.latency_ms > LATENCY_MS_MAX {
            return Err(ConfigError {
                field: "latency_ms",
                reason: format!("must be at most {LATENCY_MS_MAX}, got {}", self.latency_ms),
            });
        }
        rate("failure_rate", self.failure_rate)?;
        rate("decline_rate", self.decline_rate)?;
        rate("fail_after_capture_rate", self.fail_after_capture_rate)?;
        if self.card_limit_cents < 0 {
            return Err(ConfigError {
                field: "card_limit_cents",
                reason: format!("must not be negative, got {}", self.card_limit_cents),
            });
        }
        Ok(())
    }

    /// This configuration with every setting brought into its range (NaN rates become 0).
    pub fn clamped(&self) -> Self {
        let rate = |v: f64| if v.is_nan() { 0.0 } else { v.clamp(0.0, 1.0) };
        Self {
            latency_ms: self.latency_ms.min(LATENCY_MS_MAX),
            failure_rate: rate(self.failure_rate),
            outage: self.outage,
            decline_rate: rate(self.decline_rate),
            card_limit_cents: self.card_limit_cents.max(0),
            fail_after_capture_rate: rate(self.fail_after_capture_rate),
        }
    }

    /// This configuration with `update`'s fields applied, checked.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the first setting out of range; `self` is unchanged.
    pub fn updated(&self, update: &ProviderConfigUpdate) -> Result<Self, ConfigError> {
        let mut next = self.clone();
        if let Some(v) = update.latency_ms {
            next.latency_ms = v;
        }
        if let Some(v) = update.failure_rate {
            next.failure_rate = v;
        }
        if let Some(v) = update.outage {
            next.outage = v;
        }
        if let Some(v) = update.decline_rate {
            next.decline_rate = v;
        }
        if let Some(v) = update.card_limit_cents {
            next.card_limit_cents = v;
        }
        if let Some(v) = update.fail_after_capture_rate {
            next.fail_after_capture_rate = v;
        }
        next.validate()?;
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_update_changes_only_the_given_fields_and_names_a_bad_one() {
        let base = ProviderConfig::default();
        let next = base
            .updated(&ProviderConfigUpdate {
                outage: Some(true),
                ..ProviderConfigUpdate::default()
            })
            .expect("valid");
        assert!(next.outage);
        assert_eq!(next.card_limit_cents, CARD_LIMIT_CENTS_DEFAULT);
        let err = base
            .updated(&ProviderConfigUpdate {
                failure_rate: Some(1.5),
                ..ProviderConfigUpdate::default()
            })
            .unwrap_err();
        assert_eq!(err.field, "failure_rate");
        let nan = ProviderConfig {
            decline_rate: f64::NAN,
            ..ProviderConfig::default()
        };
        assert_eq!(nan.validate().unwrap_err().field, "decline_rate");
        let wild = ProviderConfig {
            latency_ms: u64::MAX,
            failure_rate: 3.0,
            card_limit_cents: -5,
            ..nan
        };
        let clamped = wild.clamped();
        assert!(clamped.validate().is_ok());
        assert_eq!(
            (
                clamped.latency_ms,
                clamped.failure_rate,
                clamped.decline_rate,
                clamped.card_limit_cents
            ),
            (LATENCY_MS_MAX, 1.0, 0.0, 0)
        );
    }
}
