//! The orchestrator: runs sagas step by step, writing each transition before acting on it.

mod decide;
mod drive;
mod saga_metrics;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::Utc;
use serde::Serialize;
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::definition::{SagaContext, SagaDefinition};
use crate::error::SagaError;
use crate::store::{
    LIST_ACTIVE_MAX, Lease, SagaFilter, SagaId, SagaInstance, SagaRecord, SagaStatus, SagaStore,
    Transition,
};

pub(crate) use decide::INTERRUPTED;
use drive::drive;

/// The most transitions one saga's log may hold; a definition that would exceed it (every step
/// using all its attempts, twice for compensation) is still far below it. It guards against a
/// bug looping forever.
pub const TRANSITIONS_MAX: u64 = 100_000;
/// The first pause before a saga-log write that failed for a transient reason is tried
/// again (doubling each time, up to [`APPEND_RETRY_PAUSE_MAX`], while the lease lasts).
pub const APPEND_RETRY_PAUSE_FIRST: Duration = Duration::from_millis(50);
/// The longest pause between two tries of a saga-log write.
pub const APPEND_RETRY_PAUSE_MAX: Duration = Duration::from_secs(1);
/// How many sagas a recovery pass drives at once, unless told otherwise
/// ([`SagaEngine::with_recovery_concurrency`]). Kept near the PostgreSQL store's pool (8
/// connections): a storm run at 64 saw the recovered sagas and the new ones time out waiting
/// for a connection, and each timeout left one more saga to recovery.
pub const RECOVERY_CONCURRENCY_DEFAULT: usize = 16;
/// How long an engine's claim on a saga lasts without renewal, unless told otherwise.
pub const LEASE_DEFAULT: Duration = Duration::from_secs(30);
/// The shortest lease an engine accepts (renewals happen every third of it).
pub const LEASE_MIN: Duration = Duration::from_millis(100);
/// How often [`SagaEngine::run_recovery`] looks for sagas to take over unless told otherwise.
pub const POLL_INTERVAL_DEFAULT: Duration = Duration::from_secs(1);

type DriveFuture<'a> = Pin<Box<dyn Future<Output = Result<SagaStatus, SagaError>> + Send + 'a>>;

/// A definition with its context type erased, so one engine runs definitions of any context.
trait Runner<S: SagaStore>: Send + Sync {
    fn check_context(&self, context: &serde_json::Value) -> Result<(), SagaError>;
    fn started(&self) -> Transition;
    fn drive<'a>(&'a self, keeper: Keeper<'a, S>, instance: SagaInstance) -> DriveFuture<'a>;
}

impl<S: SagaStore, C: SagaContext> Runner<S> for SagaDefinition<C> {
    fn check_context(&self, context: &serde_json::Value) -> Result<(), SagaError> {
        serde_json::from_value::<C>(context.clone())?;
        Ok(())
    }

    fn started(&self) -> Transition {
        Transition::Started {
            steps: self.step_names().map(str::to_owned).collect(),
            pivot: self.pivot().map(str::to_owned),
        }
    }

    fn drive<'a>(&'a self, keeper: Keeper<'a, S>, instance: SagaInstance) -> DriveFuture<'a> {
        let span = tracing::info_span!(
            "saga",
            id = %instance.id,
            definition = %self.name,
            version = self.version
        );
        Box::pin(drive(self, keeper, instance).instrument(span))
    }
}

/// Runs and recovers sagas against one [`SagaStore`].
///
/// Every decision is a pure function of the saga's log: a fresh run and a
/// recovery after a crash take the same path.
///
/// Several engines may share one log. Each saga is leased to one engine at a time
/// ([`Lease`]: an owner and a duration): `start` creates the saga leased to its engine, and
/// [`recover`](Self::recover) / [`run_recovery`](Self::run_recovery) claim sagas whose lease is
/// free or expired. While a step runs, the engine renews its lease every third of the
/// duration; should it fail to renew before its own deadline (measured from when it sent the
/// last successful claim, append or renewal, so never later than the store's expiry), it
/// drops the step in flight and leaves the saga, so no other engine runs the saga's steps
/// while this one does (see docs/decisions/0006-saga-leasing.md for the clock assumptions).
/// Every append is fenced by the owner: an engine that lost its lease cannot write.
pub struct SagaEngine<S> {
    store: Arc<S>,
    definitions: BTreeMap<(String, u32), Arc<dyn Runner<S>>>,
    lease: Lease,
    driving: Arc<Mutex<HashSet<SagaId>>>,
    /// Sagas a recovery pass drives at once.
    recovery_concurrency: usize,
    /// Definitions [`SagaEngine::export_status_gauges`] has set a gauge for, so one whose
    /// sagas are all resolved goes back to 0.
    gauged: Arc<Mutex<BTreeSet<String>>>,
}

impl<S> fmt::Debug for SagaEngine<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SagaEngine")
            .field("definitions", &self.definitions.keys().collect::<Vec<_>>())
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

/// What [`SagaEngine::recover`] did with each active saga it found.
#[derive(Debug, Default)]
pub struct RecoveryReport {
    /// Sagas run to a terminal status, with that status.
    pub resumed: Vec<(SagaId, SagaStatus)>,
    /// Sagas left untouched or interrupted, with why: an unknown definition version
    /// ([`SagaError::UnknownDefinition`]) or a store error (run `recover` again later).
    pub refused: Vec<(SagaId, SagaError)>,
}

impl<S: SagaStore> SagaEngine<S> {
    /// An engine with no definitions over `store`.
    ///
    /// Its lease owner is `engine-<uuid>`, fresh for each engine, with [`LEASE_DEFAULT`]; give
    /// a stable owner with [`with_owner`](Self::with_owner) so a restarted process takes its
    /// sagas back without waiting for their leases to expire.
    pub fn new(store: S) -> Self {
        saga_metrics::describe();
        Self {
            store: Arc::new(store),
            definitions: BTreeMap::new(),
            lease: Lease::new(format!("engine-{}", uuid::Uuid::now_v7()), LEASE_DEFAULT),
            driving: Arc::default(),
            recovery_concurrency: RECOVERY_CONCURRENCY_DEFAULT,
            gauged: Arc::default(),
        }
    }

    /// How many sagas one recovery pass drives at once (at least 1; default
    /// [`RECOVERY_CONCURRENCY_DEFAULT`]). A process that died with thousands of sagas in
    /// flight leaves them all to the next pass: one at a time, each waiting out its steps'
    /// latencies, they would take as many times longer.
    #[must_use]
    pub fn with_recovery_concurrency(mut self, sagas: usize) -> Self {
        self.recovery_concurrency = sagas.max(1);
        self
    }

    /// Names this engine's lease owner. Owners must be unique among the live engines sharing
    /// a log: two live engines with one owner may run a saga's step concurrently.
    #[must_use]
    pub fn with_owner(mut self, owner: impl Into<String>) -> Self {
        self.lease = Lease::new(owner, self.lease.duration());
        self
    }

    /// How long a claim lasts without renewal (at least [`LEASE_MIN`]; shorter is raised to
    /// it). A longer lease means fewer renewals and a slower takeover when an engine dies.
    #[must_use]
    pub fn with_lease_duration(mut self, duration: Duration) -> Self {
        self.lease = Lease::new(self.lease.owner(), duration.max(LEASE_MIN));
        self
    }

    /// This engine's lease owner and duration.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Registers a definition. Register every version that may still have instances in the
    /// log; [`start`](Self::start) uses the highest version of a name. Registering the same
    /// `(name, version)` again replaces it.
    #[must_use]
    pub fn register<C: SagaContext>(mut self, definition: SagaDefinition<C>) -> Self {
        self.definitions.insert(
            (definition.name.clone(), definition.version),
            Arc::new(definition),
        );
        self
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Starts a saga of the highest registered version of `definition` with `context`, and runs
    /// it until it is terminal (`Completed`, `Failed` or `Stuck`). A step's failure is not an
    /// error here: it shows in the saga's status ([`status`](Self::status)). The saga runs in
    /// the caller's task, backoff waits included: spawn the call when the caller must not wait.
    ///
    /// # Errors
    /// [`SagaError::UnknownDefinition`], [`SagaError::Context`] when `context` does not
    /// serialize into the definition's context type, or a store error. After a store error
    /// the saga may exist and stay active: [`recover`](Self::recover) finishes it.
    pub async fn start<T: Serialize>(
        &self,
        definition: &str,
        context: &T,
    ) -> Result<SagaId, SagaError> {
        self.start_with_id(definition, SagaId::new(), context).await
    }

    /// [`start`](Self::start) with an id the caller chooses: at most one saga is ever started
    /// per id, however often (or from however many processes) this is called. A business
    /// key makes the start idempotent: one saga per order, with the order's id. The log is
    /// the judge: a second start finds the id taken and runs nothing, whatever state the first
    /// saga is in (running in another process, waiting for recovery, or ended).
    ///
    /// # Errors
    /// As [`start`](Self::start), and [`SagaError::Conflict`] (with `seq` 1) when a saga with
    /// `id` exists.
    pub async fn start_with_id<T: Serialize>(
        &self,
        definition: &str,
        id: SagaId,
        context: &T,
    ) -> Result<SagaId, SagaError> {
        let ((name, version), runner) = self
            .definitions
            .range((definition.to_owned(), 0)..=(definition.to_owned(), u32::MAX))
            .next_back()
            .ok_or_else(|| self.unknown(definition, 0))?;
        let context = serde_json::to_value(context)?;
        runner.check_context(&context)?;
        let first = SagaRecord {
            seq: 1,
            transition: runner.started(),
            context,
            at: Utc::now(),
        };
        let sent = Instant::now();
        self.store
            .create(id, name, *version, &first, &self.lease)
            .await?;
        tracing::debug!(saga = %id, definition = %name, version, "saga started");
        saga_metrics::count_transition(name, &first.transition);
        let instance = SagaInstance {
            id,
            definition: name.clone(),
            version: *version,
            status: SagaStatus::Running,
            records: vec![first],
        };
        // The store created the saga for this caller (it refuses a taken id), so nothing in
        // this process drives it yet, unless recovery claimed it in the instant since.
        let Some(_driving) = self.mark_driving(id) else {
            return Ok(id);
        };
        runner.drive(self.keeper(id, sent), instance).await?;
        Ok(id)
    }

    /// The saga's current status.
    ///
    /// # Errors
    /// [`SagaError::NotFound`] or a store error.
    pub async fn status(&self, id: SagaId) -> Result<SagaStatus, SagaError> {
        Ok(self.load(id).await?.status)
    }

    /// Loads a saga with its log.
    ///
    /// # Errors
    /// [`SagaError::NotFound`] or a store error.
    pub async fn load(&self, id: SagaId) -> Result<SagaInstance, SagaError> {
        self.store.load(id).await?.ok_or(SagaError::NotFound(id))
    }

    /// Claims one saga and runs it from its log until it is terminal. A terminal saga is
    /// returned as it is.
    ///
    /// # Errors
    /// [`SagaError::Leased`] when another engine holds the saga (or this engine is already
    /// driving it); [`SagaError::UnknownDefinition`] when this engine does not know the saga's
    /// `(name, version)` (the saga is not touched and its lease is released). Otherwise as
    /// [`start`](Self::start).
    pub async fn resume(&self, id: SagaId) -> Result<SagaStatus, SagaError> {
        let Some(_driving) = self.mark_driving(id) else {
            return Err(SagaError::Leased {
                id,
                owner: self.lease.owner().to_owned(),
            });
        };
        let sent = Instant::now();
        self.store.claim(id, &self.lease).await?;
        self.drive_claimed(id, sent).await
    }

    /// Claims every active saga whose lease is free, expired or this engine's, oldest first
    /// (at most [`LIST_ACTIVE_MAX`] per call), and runs each until it is terminal, up to
    /// [`with_recovery_concurrency`](Self::with_recovery_concurrency) of them at once (a saga
    /// is claimed only when a slot is free, so no claim waits unrenewed). An attempt (of a step or a compensation) that was in flight is recorded as
    /// a retryable failure and counts against the step's attempts; the next attempt, if the
    /// budget allows one, carries the same idempotency key. Sagas another live engine holds are left to it.
    /// Call it at start-up, and keep calling it ([`run_recovery`](Self::run_recovery)) when
    /// several engines share a log, so sagas of an engine that died are taken over.
    ///
    /// # Errors
    /// A store error while claiming; errors of single sagas are in the report.
    pub async fn recover(&self) -> Result<RecoveryReport, SagaError> {
        use futures_util::StreamExt as _;

        let mut report = RecoveryReport::default();
        let mut after = None;
        let mut driving = futures_util::stream::FuturesUnordered::new();
        let mut claim_error = None;
        for _ in 0..LIST_ACTIVE_MAX {
            while driving.len() >= self.recovery_concurrency {
                if let Some((id, result)) = driving.next().await {
                    record(&mut report, id, result);
                }
            }
            let sent = Instant::now();
            let id = match self.store.claim_next(&self.lease, after).await {
                Ok(Some(id)) => id,
                Ok(None) => break,
                Err(error) => {
                    // Finish what is running before answering: dropping it would abandon
                    // sagas mid-step until the next pass.
                    claim_error = Some(error);
                    break;
                }
            };
            after = Some(id);
            let Some(guard) = self.mark_driving(id) else {
                continue; // this engine's own `start` or `resume` is driving it
            };
            driving.push(async move {
                let _guard = guard;
                (id, self.drive_claimed(id, sent).await)
            });
        }
        while let Some((id, result)) = driving.next().await {
            record(&mut report, id, result);
        }
        if let Some(error) = claim_error {
            return Err(error);
        }
        if !report.resumed.is_empty() || !report.refused.is_empty() {
            tracing::info!(
                owner = %self.lease.owner(),
                resumed = report.resumed.len(),
                refused = report.refused.len(),
                "saga recovery done"
            );
        }
        Ok(report)
    }

    /// Runs [`recover`](Self::recover) every `interval`, forever: the loop through which an
    /// engine takes over the sagas of engines that died, and picks up sagas an operator
    /// retried, skipped or cancelled. Spawn it and abort the task (or drop the future) to stop.
    pub async fn run_recovery(&self, interval: Duration) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if let Err(error) = self.recover().await {
                tracing::warn!(%error, owner = %self.lease.owner(), "saga recovery failed; trying again");
            }
        }
    }

    /// Sets the `trellis_saga_instances` gauge: how many sagas of each definition are
    /// compensating and how many are stuck, as the log says now (counted up to
    /// [`LIST_ACTIVE_MAX`] per status). Every registered definition gets a series, 0 when it
    /// has none, and so does a definition that had some before, so an alert on stuck sagas
    /// resolves once an operator has dealt with them. Running sagas are not listed (there may
    /// be thousands); the started and ended counters count them.
    ///
    /// # Errors
    /// A store error; the gauges keep their last values.
    pub async fn export_status_gauges(&self) -> Result<(), SagaError> {
        let mut counts: BTreeMap<(String, &'static str), u64> = BTreeMap::new();
        for status in saga_metrics::WATCHED_STATUSES {
            let filter = SagaFilter::new().with_status(status);
            for saga in self.store.list(&filter).await? {
                *counts
                    .entry((saga.definition, status.as_str()))
                    .or_default() += 1;
            }
        }
        let mut gauged = self.gauged.lock().unwrap_or_else(PoisonError::into_inner);
        gauged.extend(self.definitions.keys().map(|(name, _)| name.clone()));
        gauged.extend(counts.keys().map(|(name, _)| name.clone()));
        for definition in gauged.iter() {
            for status in saga_metrics::WATCHED_STATUSES {
                let count = counts
                    .get(&(definition.clone(), status.as_str()))
                    .copied()
                    .unwrap_or_default();
                metrics::gauge!(
                    saga_metrics::INSTANCES,
                    "definition" => definition.clone(), "status" => status.as_str()
                )
                .set(count as f64);
            }
        }
        Ok(())
    }

    /// Runs [`export_status_gauges`](Self::export_status_gauges) every `interval`, forever;
    /// a failed pass is logged and the next one tried. Spawn it and abort the task (or drop
    /// the future) to stop.
    pub async fn run_status_gauges(&self, interval: Duration) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if let Err(error) = self.export_status_gauges().await {
                tracing::warn!(%error, "cannot count compensating and stuck sagas for the gauges");
            }
        }
    }

    /// Runs a saga this engine has just claimed (the claim was sent at `sent`).
    async fn drive_claimed(&self, id: SagaId, sent: Instant) -> Result<SagaStatus, SagaError> {
        let instance = match self.load(id).await {
            Ok(instance) => instance,
            Err(error) => {
                self.release(id).await;
                return Err(error);
            }
        };
        let Some(runner) = self
            .definitions
            .get(&(instance.definition.clone(), instance.version))
        else {
            let error = self.unknown(&instance.definition, instance.version);
            tracing::error!(saga = %id, %error, "saga refused");
            self.release(id).await;
            return Err(error);
        };
        if instance.status.is_terminal() {
            self.release(id).await;
            return Ok(instance.status);
        }
        runner.drive(self.keeper(id, sent), instance).await
    }

    /// Gives the lease back so an engine that can run the saga may claim it at once.
    async fn release(&self, id: SagaId) {
        if let Err(error) = self.store.release(id, self.lease.owner()).await {
            tracing::warn!(saga = %id, %error, "could not release the saga's lease; it will expire");
        }
    }

    fn keeper(&self, id: SagaId, sent: Instant) -> Keeper<'_, S> {
        Keeper {
            store: &self.store,
            id,
            lease: &self.lease,
            deadline: Mutex::new(sent + self.lease.duration()),
        }
    }

    /// Marks `id` as driven by this engine until the guard drops; `None` when it already is.
    fn mark_driving(&self, id: SagaId) -> Option<Driving> {
        let mut driving = self
            .driving
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        driving.insert(id).then(|| Driving {
            id,
            driving: self.driving.clone(),
        })
    }

    fn unknown(&self, name: &str, version: u32) -> SagaError {
        let known = self
            .definitions
            .keys()
            .map(|(name, version)| format!("{name}@{version}"))
            .collect::<Vec<_>>()
            .join(", ");
        SagaError::UnknownDefinition {
            name: name.to_owned(),
            version,
            known,
        }
    }
}

/// Removes a saga from the engine's set of sagas in flight when dropped (also when the
/// driving future is cancelled).
struct Driving {
    id: SagaId,
    driving: Arc<Mutex<HashSet<SagaId>>>,
}

impl Drop for Driving {
    fn drop(&mut self) {
        self.driving
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&self.id);
    }
}

/// Holds one saga's lease while the engine drives it: fences appends by the owner, and
/// renews the lease while a step (or a backoff) runs.
struct Keeper<'a, S> {
    store: &'a S,
    id: SagaId,
    lease: &'a Lease,
    /// When this engine must consider the lease gone: the send time of the last successful
    /// claim, append or renewal plus the lease duration. The store computed its expiry from a
    /// later instant, so this deadline is never later than the store's (clock rates agreeing).
    deadline: Mutex<Instant>,
}

impl<S: SagaStore> Keeper<'_, S> {
    fn deadline(&self) -> Instant {
        *self
            .deadline
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn extend(&self, sent: Instant) {
        let mut deadline = self
            .deadline
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *deadline = (*deadline).max(sent + self.lease.duration());
    }

    /// Appends `record`, extending the lease. A write the database failed for a transient
    /// reason (a cut connection, no pooled connection in time: [`SagaError::is_retryable`]
    /// on a storage error) is tried again with a doubling pause, from
    /// [`APPEND_RETRY_PAUSE_FIRST`] up to [`APPEND_RETRY_PAUSE_MAX`], while the lease lasts:
    /// giving the saga up at the first cut connection would leave it to a recovery pass,
    /// and a database blip would hand every running saga to recovery at once. A retried
    /// append that had in fact committed is refused by the store as a conflict (the log's
    /// next sequence is taken), so a retry never records a transition twice; the saga is
    /// then left to recovery as before.
    async fn append(&self, record: &SagaRecord) -> Result<(), SagaError> {
        let mut pause = APPEND_RETRY_PAUSE_FIRST;
        loop {
            let sent = Instant::now();
            match self.store.append(self.id, record, self.lease).await {
                Ok(()) => {
                    self.extend(sent);
                    return Ok(());
                }
                Err(error @ SagaError::Storage(_))
                    if error.is_retryable() && Instant::now() + pause < self.deadline() =>
                {
                    tracing::warn!(saga = %self.id, %error, ?pause, "saga log write failed; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(APPEND_RETRY_PAUSE_MAX);
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Runs `work` while renewing the lease; drops it and fails when the lease is lost or
    /// cannot be renewed before the deadline.
    async fn guard<T>(&self, work: impl Future<Output = T>) -> Result<T, SagaError> {
        tokio::select! {
            output = work => Ok(output),
            lost = self.heartbeat() => Err(lost),
        }
    }

    /// Renews the lease every third of its duration; returns only when it is lost.
    async fn heartbeat(&self) -> SagaError {
        let duration = self.lease.duration();
        loop {
            let deadline = self.deadline();
            let renew_at = deadline.checked_sub(duration * 2 / 3).unwrap_or(deadline);
            tokio::time::sleep_until(renew_at).await;
            let sent = Instant::now();
            if sent >= self.deadline() {
                return SagaError::LeaseExpired { id: self.id };
            }
            let left = self.deadline() - sent;
            match tokio::time::timeout(left, self.store.renew(self.id, self.lease)).await {
                Ok(Ok(true)) => self.extend(sent),
                Ok(Ok(false)) => {
                    tracing::warn!(saga = %self.id, owner = %self.lease.owner(), "saga lease lost to another engine; abandoning the step");
                    return SagaError::Leased {
                        id: self.id,
                        owner: "another engine".to_owned(),
                    };
                }
                Ok(Err(error)) => {
                    tracing::warn!(saga = %self.id, %error, "saga lease renewal failed; retrying until the lease runs out");
                    // Wait a little before trying again, never past the deadline.
                    let pause = (duration / 10)
                        .min(self.deadline().saturating_duration_since(Instant::now()));
                    tokio::time::sleep(pause).await;
                }
                Err(_) => return SagaError::LeaseExpired { id: self.id },
            }
        }
    }
}

/// Files one recovered saga's outcome in `report`.
fn record(report: &mut RecoveryReport, id: SagaId, result: Result<SagaStatus, SagaError>) {
    match result {
        Ok(status) => report.resumed.push((id, status)),
        Err(error) => report.refused.push((id, error)),
    }
}
