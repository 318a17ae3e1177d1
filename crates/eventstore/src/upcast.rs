//! Upcasting: old stored event shapes turned into today's, one schema version at a time.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use crate::aggregate::DomainEvent;

/// One step: the data of schema version `n` in, version `n + 1` out.
pub type UpcastFn =
    Arc<dyn Fn(serde_json::Value) -> Result<serde_json::Value, String> + Send + Sync>;

/// A chain of upcasters per event type (v1 → v2 → v3 …), applied on read.
///
/// # Examples
/// ```
/// use serde_json::json;
/// use trellis_eventstore::Upcasters;
///
/// // v1 had `amount` in whole euros; v2 has `amount_cents`.
/// let upcasters = Upcasters::new().register("PaymentCaptured", 1, |mut data| {
///     let euros = data["amount"].as_i64().ok_or("missing amount")?;
///     data["amount_cents"] = json!(euros * 100);
///     data.as_object_mut().ok_or("not an object")?.remove("amount");
///     Ok(data)
/// });
/// let v2 = upcasters.upcast("PaymentCaptured", 1, 2, json!({"amount": 12})).expect("upcasts");
/// assert_eq!(v2, json!({"amount_cents": 1200}));
/// ```
#[derive(Clone, Default)]
pub struct Upcasters {
    chains: HashMap<String, BTreeMap<u32, UpcastFn>>,
}

impl fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let steps: BTreeMap<&str, Vec<u32>> = self
            .chains
            .iter()
            .map(|(t, chain)| (t.as_str(), chain.keys().copied().collect()))
            .collect();
        f.debug_struct("Upcasters").field("steps", &steps).finish()
    }
}

/// A chain with a hole or a step past today's schema, found at start-up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("upcasters for `{event_type}`: {problem}")]
pub struct UpcastChainError {
    /// The event type.
    pub event_type: String,
    /// What is wrong.
    pub problem: String,
}

impl Upcasters {
    /// No upcasters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the step from `from_version` to `from_version + 1` for `event_type`.
    #[must_use]
    pub fn register<F>(mut self, event_type: &str, from_version: u32, step: F) -> Self
    where
        F: Fn(serde_json::Value) -> Result<serde_json::Value, String> + Send + Sync + 'static,
    {
        self.chains
            .entry(event_type.to_owned())
            .or_default()
            .insert(from_version, Arc::new(step));
        self
    }

    /// Checks every chain against the schema versions `E` writes today: each must be a run
    /// of consecutive steps ending at today's version. Call it at start-up.
    ///
    /// # Errors
    /// The first chain with a gap, a step from version 0, or a step at or past today's version.
    pub fn check<E: DomainEvent>(&self) -> Result<(), UpcastChainError> {
        for (event_type, chain) in &self.chains {
            let current = E::schema_version(event_type);
            let problem = |problem: String| UpcastChainError {
                event_type: event_type.clone(),
                problem,
            };
            let versions: Vec<u32> = chain.keys().copied().collect();
            if versions.first() == Some(&0) {
                return Err(problem("schema versions start at 1".to_owned()));
            }
            if let Some(last) = versions.last().filter(|last| **last + 1 != current) {
                return Err(problem(format!(
                    "the last step goes from v{last} to v{}, but today's schema is v{current}",
                    last + 1
                )));
            }
            if let Some(pair) = versions.windows(2).find(|pair| pair[1] != pair[0] + 1) {
                return Err(problem(format!(
                    "no step from v{} to v{}",
                    pair[0] + 1,
                    pair[1]
                )));
            }
        }
        Ok(())
    }

    /// Upcasts `data` of `event_type` from schema `from` to `to`.
    ///
    /// # Errors
    /// A message naming the missing or failing step.
    pub fn upcast(
        &self,
        event_type: &str,
        from: u32,
        to: u32,
        mut data: serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        for version in from..to {
            let step = self
                .chains
                .get(event_type)
                .and_then(|chain| chain.get(&version))
                .ok_or_else(|| format!("no upcaster from v{version} to v{}", version + 1))?;
            data = step(data).map_err(|reason| {
                format!("upcaster v{version} -> v{} failed: {reason}", version + 1)
            })?;
        }
        Ok(data)
    }
}
