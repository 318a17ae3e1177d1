//! Saga definitions: ordered steps with `execute`, optional `compensate`, retry and timeout.

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use trellis_resilience::Backoff;

use crate::error::SagaError;
use crate::store::SagaId;

/// The most steps a definition may have.
pub const STEPS_MAX: usize = 64;
/// The most attempts a step (or a compensation) may make, the first included.
pub const STEP_ATTEMPTS_MAX: u32 = trellis_resilience::ATTEMPTS_MAX;
/// Attempts a step makes unless told otherwise.
pub const STEP_ATTEMPTS_DEFAULT: u32 = 3;
/// How long one attempt of a step may run unless told otherwise.
pub const STEP_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);
/// The longest timeout a step may set.
pub const STEP_TIMEOUT_MAX: Duration = Duration::from_secs(3600);

/// What a step's `execute` or `compensate` returns.
pub type StepFuture<'a> = Pin<Box<dyn Future<Output = Result<(), StepError>> + Send + 'a>>;

pub(crate) type StepFn<C> =
    Arc<dyn for<'a> Fn(&'a mut C, StepContext) -> StepFuture<'a> + Send + Sync>;

/// Bounds a saga context must meet: JSON-serializable (it is snapshotted into the log with
/// every transition) and sendable between tasks.
pub trait SagaContext: Serialize + DeserializeOwned + Send + Sync + 'static {}

impl<T: Serialize + DeserializeOwned + Send + Sync + 'static> SagaContext for T {}

/// What a step knows about the saga it runs in. Hand the idempotency key to the participant so
/// that a step run again after a crash or a retry has no second effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepContext {
    saga_id: SagaId,
    step: String,
    attempt: u32,
}

impl StepContext {
    pub(crate) fn new(saga_id: SagaId, step: &str, attempt: u32) -> Self {
        Self {
            saga_id,
            step: step.to_owned(),
            attempt,
        }
    }

    /// The saga instance.
    pub fn saga_id(&self) -> SagaId {
        self.saga_id
    }

    /// The step's name.
    pub fn step(&self) -> &str {
        &self.step
    }

    /// The attempt of this execution or compensation, the first is 1. A run resumed after a
    /// crash repeats the attempt number it crashed in.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// `{saga_id}:{step}`: the same for every attempt and every recovery of this step, in
    /// `execute` and `compensate` alike (a participant keys its undo by the same key).
    pub fn idempotency_key(&self) -> String {
        format!("{}:{}", self.saga_id, self.step)
    }
}

/// A step's failure: retryable (a transient fault, tried again within the step's budget) or
/// permanent (retrying cannot help).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StepError {
    retryable: bool,
    message: String,
}

impl StepError {
    /// A failure that may go away when tried again.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            retryable: true,
            message: message.into(),
        }
    }

    /// A failure retrying cannot fix.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            retryable: false,
            message: message.into(),
        }
    }

    /// Whether the engine should try again (within the step's attempts).
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// The message recorded in the saga log.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// How often a step (and its compensation) is attempted and how long it waits between
/// attempts. The engine drives the attempts itself, rather than through
/// [`trellis_resilience::RetryPolicy`], because each attempt is a transition written to the
/// log; it uses the same [`Backoff`] (its ceiling, without jitter).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepRetry {
    /// Attempts in all, the first included (1 to [`STEP_ATTEMPTS_MAX`]).
    pub attempts_max: u32,
    /// The wait before each retry.
    pub backoff: Backoff,
}

impl Default for StepRetry {
    /// [`STEP_ATTEMPTS_DEFAULT`] attempts with [`Backoff::default`].
    fn default() -> Self {
        Self {
            attempts_max: STEP_ATTEMPTS_DEFAULT,
            backoff: Backoff::default(),
        }
    }
}

impl StepRetry {
    /// `attempts_max` attempts with `backoff` between them.
    pub fn new(attempts_max: u32, backoff: Backoff) -> Self {
        Self {
            attempts_max,
            backoff,
        }
    }

    /// The wait before the attempt following attempt `failed_attempt` (1-based).
    pub fn delay_after(&self, failed_attempt: u32) -> Duration {
        self.backoff.ceiling(failed_attempt)
    }
}

/// One step of a saga: a name, `execute`, an optional `compensate`, a retry policy and a
/// per-attempt timeout.
#[must_use]
pub struct Step<C> {
    pub(crate) name: String,
    pub(crate) execute: StepFn<C>,
    pub(crate) compensate: Option<StepFn<C>>,
    pub(crate) retry: StepRetry,
    pub(crate) compensate_retry: Option<StepRetry>,
    /// Whether `compensate` also runs when the step itself fails for good.
    pub(crate) compensate_on_failure: bool,
    pub(crate) timeout: Duration,
}

impl<C> Step<C> {
    /// The step's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The retry policy of the step's compensation.
    pub(crate) fn compensation_retry(&self) -> StepRetry {
        self.compensate_retry.unwrap_or(self.retry)
    }
}

impl<C> fmt::Debug for Step<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Step")
            .field("name", &self.name)
            .field("compensable", &self.compensate.is_some())
            .field("retry", &self.retry)
            .field("compensate_retry", &self.compensate_retry)
            .field("compensate_on_failure", &self.compensate_on_failure)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl<C: SagaContext> Step<C> {
    /// A step named `name` running `execute`, with the default retry and timeout and no
    /// compensation.
    pub fn new<F>(name: impl Into<String>, execute: F) -> Self
    where
        F: for<'a> Fn(&'a mut C, StepContext) -> StepFuture<'a> + Send + Sync + 'static,
    {
        Self {
            name: name.into(),
            execute: Arc::new(execute),
            compensate: None,
            retry: StepRetry::default(),
            compensate_retry: None,
            compensate_on_failure: false,
            timeout: STEP_TIMEOUT_DEFAULT,
        }
    }

    /// Undoes the step's effect; runs, in reverse step order, when a later step fails before
    /// the pivot. It gets the context as it stood when the saga gave up going forward.
    pub fn compensate<F>(mut self, compensate: F) -> Self
    where
        F: for<'a> Fn(&'a mut C, StepContext) -> StepFuture<'a> + Send + Sync + 'static,
    {
        self.compensate = Some(Arc::new(compensate));
        self
    }

    /// The attempts and backoff, for `execute` (and `compensate`, unless
    /// [`compensate_retry`](Self::compensate_retry) says otherwise).
    pub fn retry(mut self, retry: StepRetry) -> Self {
        self.retry = retry;
        self
    }

    /// The attempts and backoff of `compensate` alone. A compensation that gives up leaves the
    /// saga `Stuck` with an effect in place (a captured payment, held stock) until an operator
    /// acts, so it usually deserves many more attempts, spread over minutes, than the forward
    /// step, whose failure only turns the saga back.
    pub fn compensate_retry(mut self, retry: StepRetry) -> Self {
        self.compensate_retry = Some(retry);
        self
    }

    /// Runs the step's compensation also when the step itself fails for good (its attempts
    /// spent, or a permanent error), first, before the earlier steps' compensations.
    ///
    /// For a step whose effect may exist although no attempt reported it: an attempt that
    /// timed out or lost its answer after the participant acted, or a delayed request that
    /// arrives after the saga gave up. Without this, a failed step is not compensated, and
    /// the usual remedy is an extra no-op step before it that carries the compensation (two
    /// more log records per saga). The compensation must then accept that there may be
    /// nothing to undo (undo by the idempotency key the step's attempts used).
    ///
    /// Allowed on the pivot too, where it is the only compensation the pivot can have: it
    /// runs only when the pivot fails, never after it succeeded.
    pub fn compensate_on_failure(mut self) -> Self {
        self.compensate_on_failure = true;
        self
    }

    /// How long one attempt may run; an attempt past it fails as retryable.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// A saga's definition: a name, a version and ordered steps, optionally with a pivot.
pub struct SagaDefinition<C> {
    pub(crate) name: String,
    pub(crate) version: u32,
    pub(crate) steps: Vec<Step<C>>,
    pub(crate) pivot: Option<usize>,
}

impl<C> fmt::Debug for SagaDefinition<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SagaDefinition")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("steps", &self.steps)
            .field("pivot", &self.pivot)
            .finish()
    }
}

impl<C: SagaContext> SagaDefinition<C> {
    /// Starts a definition named `name` at `version`. An instance records both, and an engine
    /// only runs instances of a `(name, version)` it has registered.
    pub fn builder(name: impl Into<String>, version: u32) -> SagaDefinitionBuilder<C> {
        SagaDefinitionBuilder {
            name: name.into(),
            version,
            steps: Vec::new(),
            pivot: None,
            pivot_twice: false,
            context: PhantomData,
        }
    }
}

impl<C> SagaDefinition<C> {
    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The version.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The step names, in order.
    pub fn step_names(&self) -> impl Iterator<Item = &str> {
        self.steps.iter().map(|step| step.name.as_str())
    }

    /// The pivot step's name, if there is one.
    pub fn pivot(&self) -> Option<&str> {
        self.pivot.map(|index| self.steps[index].name.as_str())
    }

    pub(crate) fn index_of(&self, step: &str) -> Option<usize> {
        self.steps
            .iter()
            .position(|candidate| candidate.name == step)
    }
}

/// Builds a [`SagaDefinition`].
#[must_use]
pub struct SagaDefinitionBuilder<C> {
    name: String,
    version: u32,
    steps: Vec<Step<C>>,
    pivot: Option<usize>,
    pivot_twice: bool,
    context: PhantomData<fn() -> C>,
}

impl<C> fmt::Debug for SagaDefinitionBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SagaDefinitionBuilder")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("steps", &self.steps)
            .finish_non_exhaustive()
    }
}

impl<C: SagaContext> SagaDefinitionBuilder<C> {
    /// Appends a step.
    pub fn step(mut self, step: Step<C>) -> Self {
        self.steps.push(step);
        self
    }

    /// Appends the pivot step: once it succeeds the saga only goes forward. Steps from the
    /// pivot on have no compensation; their failures are retried within their budget and then
    /// leave the saga `Stuck`. A failure of the pivot itself compensates the steps before it.
    pub fn pivot_step(mut self, step: Step<C>) -> Self {
        self.pivot_twice |= self.pivot.is_some();
        self.pivot = Some(self.steps.len());
        self.steps.push(step);
        self
    }

    /// Checks the definition.
    ///
    /// # Errors
    /// [`SagaError::InvalidDefinition`]: an empty name, no steps or more than [`STEPS_MAX`],
    /// empty or duplicate step names (they key idempotency), two pivots, a compensation after
    /// the pivot or on it (unless it only covers the pivot's own failure), `compensate_on_failure`
    /// without a compensation, attempts outside 1..=[`STEP_ATTEMPTS_MAX`], or a zero timeout or one
    /// over [`STEP_TIMEOUT_MAX`].
    pub fn build(self) -> Result<SagaDefinition<C>, SagaError> {
        let invalid = |reason: String| SagaError::InvalidDefinition {
            definition: self.name.clone(),
            reason,
        };
        if self.name.is_empty() {
            return Err(invalid("the name is empty".to_owned()));
        }
        if self.steps.is_empty() || self.steps.len() > STEPS_MAX {
            return Err(invalid(format!("it needs 1 to {STEPS_MAX} steps")));
        }
        if self.pivot_twice {
            return Err(invalid("only one step can be the pivot".to_owned()));
        }
        let mut names = HashSet::new();
        for (index, step) in self.steps.iter().enumerate() {
            if step.name.is_empty() || !names.insert(step.name.as_str()) {
                return Err(invalid(format!(
                    "step {index} has an empty or duplicate name {:?}",
                    step.name
                )));
            }
            if !(1..=STEP_ATTEMPTS_MAX).contains(&step.retry.attempts_max)
                || !(1..=STEP_ATTEMPTS_MAX).contains(&step.compensation_retry().attempts_max)
            {
                return Err(invalid(format!(
                    "step {} needs 1 to {STEP_ATTEMPTS_MAX} attempts",
                    step.name
                )));
            }
            if step.timeout.is_zero() || step.timeout > STEP_TIMEOUT_MAX {
                return Err(invalid(format!(
                    "step {} needs a timeout between 0 and {STEP_TIMEOUT_MAX:?}",
                    step.name
                )));
            }
            if step.compensate_on_failure && step.compensate.is_none() {
                return Err(invalid(format!(
                    "step {} compensates its own failure but has no compensation",
                    step.name
                )));
            }
            // The pivot may carry a compensation of its own failure: it never runs after the
            // pivot succeeded, so the saga still only goes forward past it.
            let forward_only = self.pivot.is_some_and(|pivot| {
                index > pivot || (index == pivot && !step.compensate_on_failure)
            });
            if forward_only && step.compensate.is_some() {
                return Err(invalid(format!(
                    "step {} is on or after the pivot and cannot have a compensation (only the pivot may, for its own failure: `compensate_on_failure`)",
                    step.name
                )));
            }
        }
        Ok(SagaDefinition {
            name: self.name,
            version: self.version,
            steps: self.steps,
            pivot: self.pivot,
        })
    }
}
