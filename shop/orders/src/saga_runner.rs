//! Running the orchestrated order saga: the engine on whichever saga log the URL names, the
//! queue that hands placed orders to a bounded number of saga slots, and the sweeper that
//! starts the saga of an order accepted without one.
//!
//! # Why a queue and a sweeper
//! Placing an order appends its `Created` event and then queues its saga; the two writes are
//! not one transaction, and the queue is bounded ([`SAGA_QUEUE_MAX`]) so a burst cannot grow
//! memory without limit. An order left without a saga (a crash between the writes, or a full
//! queue) stays `PENDING` in the read model with no saga id, and the sweeper starts its saga
//! once it is older than [`crate::SWEEP_AGE`]. Orders queued or running in this process are
//! remembered, so the sweeper does not start them twice; and a saga's id is its order's id, so
//! an order whose saga exists but has not attached itself yet (its process died, its lease
//! not yet expired for recovery) gets no second saga: the sweeper's start finds the id taken.
//!
//! # Lease owner
//! Each saga is leased to the engine running it (trellis-saga's `Lease`, 30 s). An engine
//! with a fresh owner id after a restart would find its own sagas leased to its previous
//! incarnation and wait out the lease before recovering them. On SQLite the saga log is a
//! file of this process's data directory, and no two live processes use one data directory,
//! so the owner is derived from the file's canonical path (`orders@/…/orders-saga.db`): the
//! same after every restart, and the restarted engine takes its sagas back on its first
//! recovery pass. On PostgreSQL several orders processes share one log, and a derived id could
//! name two live engines at once (which the engine forbids): there the owner is what the
//! operator names (`Config::saga_owner`, `trellis serve orders --saga-owner`, one stable name
//! per replica, such as its host and port), and without a name each engine gets a fresh one
//! and a dead process's sagas are taken over when their leases expire.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shop_contracts::api::OrderStatus;
use tokio::sync::{Semaphore, mpsc, watch};
use trellis_eventstore::{AnyStore, Repository};
use trellis_saga::{AnySagaStore, Inspector, SagaDefinition, SagaEngine, SagaError, SagaId};
use trellis_service::{Db, on_db};
use trellis_telemetry::service::ServiceScopeExt as _;

use crate::aggregate::Order;
use crate::saga::{OrderSagaContext, SAGA_NAME};

/// Orders that may wait for a saga slot before the queue refuses more (the sweeper then
/// starts them).
const SAGA_QUEUE_MAX: usize = 10_000;
/// Orders the sweeper starts per pass.
const SWEEP_BATCH: i64 = 200;

/// The order saga's engine, on the saga log its URL names (trellis-saga's [`AnySagaStore`]:
/// SQLite or PostgreSQL).
#[derive(Debug, Clone)]
pub(crate) struct OrderSagaEngine(Arc<SagaEngine<AnySagaStore>>);

/// The stable lease owner of the engine on the SQLite saga log `url` (opened, so the file
/// exists): derived from the file's canonical path. `None` for another log.
fn sqlite_owner(url: &str) -> Option<String> {
    let path = url.strip_prefix("sqlite://")?;
    let path = path.split_once('?').map_or(path, |(path, _)| path);
    let path = std::fs::canonicalize(path).ok()?;
    Some(format!("orders@{}", path.display()))
}

impl OrderSagaEngine {
    /// Opens the saga log `url` (`sqlite://PATH` or `postgres://…`) and registers
    /// `definitions` (every version that may have sagas in the log); the engine's lease owner is `owner` when given, else derived from a
    /// SQLite log's path, else fresh (see the module docs).
    pub(crate) async fn open(
        url: &str,
        definitions: Vec<SagaDefinition<OrderSagaContext>>,
        owner: Option<String>,
    ) -> Result<Self, SagaError> {
        let mut engine = SagaEngine::new(AnySagaStore::open(url).await?);
        if let Some(owner) = owner.or_else(|| sqlite_owner(url)) {
            engine = engine.with_owner(owner);
        }
        for definition in definitions {
            engine = engine.register(definition);
        }
        Ok(Self(Arc::new(engine)))
    }

    /// Starts the order saga and runs it to its end. The saga's id is the order's, so an order
    /// gets one saga however often this is called: the sweeper may take an order whose saga
    /// exists but has not attached itself yet (its process died, and its lease has not
    /// expired for recovery to take it over) for one accepted without a saga; its start then
    /// finds the id taken ([`SagaError::Conflict`]) and runs nothing.
    pub(crate) async fn run(&self, context: &OrderSagaContext) -> Result<SagaId, SagaError> {
        let id = uuid::Uuid::parse_str(&context.order_id)
            .map_or_else(|_| SagaId::new(), SagaId::from_uuid);
        self.0.start_with_id(SAGA_NAME, id, context).await
    }

    /// Recovers at once, then every `interval`.
    pub(crate) async fn run_recovery(&self, interval: Duration) {
        self.0.run_recovery(interval).await;
    }

    /// Counts compensating and stuck sagas into their gauges at once, then every `interval`.
    pub(crate) async fn run_status_gauges(&self, interval: Duration) {
        self.0.run_status_gauges(interval).await;
    }

    /// An inspector over this engine's saga log (the operator endpoints of [`crate::admin`]).
    pub(crate) fn inspector(&self) -> Inspector<AnySagaStore> {
        Inspector::new(self.0.store().clone()).with_operator("orders-admin-api")
    }
}

/// Orders queued for, or holding, one of this process's saga slots.
#[derive(Debug, Clone)]
pub(crate) struct SagaQueue {
    /// Orders waiting for a slot, in arrival order.
    queue: mpsc::Sender<OrderSagaContext>,
    /// Orders queued or with a saga running in this process (the sweeper skips them).
    active: Arc<Mutex<HashSet<String>>>,
}

impl SagaQueue {
    /// Starts the dispatcher: queued sagas run on `engine`, at most `saga_concurrency` at
    /// once, until `stop` turns true.
    pub(crate) fn start(
        engine: OrderSagaEngine,
        saga_concurrency: usize,
        stop: watch::Receiver<bool>,
    ) -> Self {
        let active = Arc::new(Mutex::new(HashSet::new()));
        let (queue, waiting) = mpsc::channel(SAGA_QUEUE_MAX);
        tokio::spawn(
            dispatch(
                waiting,
                Arc::new(Semaphore::new(saga_concurrency.max(1))),
                engine,
                active.clone(),
                stop,
            )
            .in_current_service(),
        );
        Self { queue, active }
    }

    /// Queues the order's saga; it starts as soon as one of the `saga_concurrency` slots is
    /// free. When the queue is full the sweeper starts it later.
    pub(crate) fn submit(&self, order_id: &str, order: &Order) {
        if order.choreographed {
            return;
        }
        {
            let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
            if !active.insert(order_id.to_owned()) {
                return; // already queued or running here
            }
        }
        let context = OrderSagaContext {
            order_id: order_id.to_owned(),
            user_id: order.user_id.clone(),
            lines: order.items.clone(),
            total_cents: order.total_cents,
            traceparent: trellis_telemetry::propagation::current_traceparent(),
        };
        if self.queue.try_send(context).is_err() {
            self.active
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(order_id);
            tracing::warn!(order = %order_id, "saga queue full; the sweeper will start it");
        }
    }

    /// Starts sagas for orders accepted without one (a crash between the order's creation
    /// and its saga's start) more than [`crate::SWEEP_AGE`] before `now`, found in the read
    /// model `db`.
    pub(crate) async fn sweep(
        &self,
        orders: &Repository<Order, AnyStore>,
        db: &Db,
        now: chrono::DateTime<chrono::Utc>,
    ) {
        let cutoff = now - chrono::Duration::from_std(crate::SWEEP_AGE).unwrap_or_default();
        let cutoff = cutoff.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let ids: Result<Vec<String>, sqlx::Error> = on_db!(db, |pool| {
            sqlx::query_scalar(
                "SELECT id FROM order_view WHERE status = 'PENDING' AND saga_id IS NULL
                 AND created_at < $1 ORDER BY id LIMIT $2",
            )
            .bind(&cutoff)
            .bind(SWEEP_BATCH)
            .fetch_all(pool)
            .await
        });
        let ids = match ids {
            Ok(ids) => ids,
            Err(error) => {
                tracing::debug!(%error, "order sweep skipped");
                return;
            }
        };
        for id in ids {
            if self
                .active
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&id)
            {
                continue;
            }
            match orders.load(&id).await {
                Ok(loaded)
                    if loaded.state.saga_id.is_none()
                        && loaded.state.status() == OrderStatus::Pending =>
                {
                    tracing::info!(order = %id, "starting the saga of an order accepted without one");
                    self.submit(&id, &loaded.state);
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(order = %id, %error, "sweep could not load the order"),
            }
        }
    }
}

/// Starts queued sagas as slots free up, until the service stops.
async fn dispatch(
    mut waiting: mpsc::Receiver<OrderSagaContext>,
    slots: Arc<Semaphore>,
    engine: OrderSagaEngine,
    active: Arc<Mutex<HashSet<String>>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let context = tokio::select! {
            next = waiting.recv() => match next {
                Some(context) => context,
                None => return,
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        let engine = engine.clone();
        let active = active.clone();
        let mut stop = stop.clone();
        tokio::spawn(
            async move {
                let _permit = permit;
                // On shutdown the saga stops where it is, as in a crash: its log has every
                // transition, and the next start's recovery finishes it.
                // The saga continues the trace of the request that placed the order; its gRPC
                // calls carry it to the participants.
                let span = tracing::info_span!("order.saga", order = %context.order_id);
                if let Some(traceparent) = &context.traceparent {
                    let carrier = HashMap::from([(
                        trellis_telemetry::propagation::TRACEPARENT.to_owned(),
                        traceparent.clone(),
                    )]);
                    trellis_telemetry::propagation::set_parent_from_map(&span, &carrier);
                }
                tokio::select! {
                    result = tracing::Instrument::instrument(engine.run(&context), span) => {
                        match result {
                            Ok(_) => {}
                            Err(SagaError::Conflict { seq: 1, .. }) => tracing::debug!(
                                order = %context.order_id,
                                "the order's saga was started before; it runs there or in recovery"
                            ),
                            Err(error) => tracing::warn!(order = %context.order_id, %error, "order saga did not finish; recovery will"),
                        }
                    }
                    _ = stop.wait_for(|s| *s) => {}
                }
                active
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&context.order_id);
            }
            .in_current_service(),
        );
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::{Notify, mpsc};
    use trellis_saga::{SagaDefinition, SagaError, SagaStatus, SagaStore as _, Step, StepContext};

    use super::OrderSagaEngine;
    use crate::saga::{OrderSagaContext, SAGA_NAME, SAGA_VERSION};

    /// The order saga's name and version with one step that announces each run on `runs`
    /// and then, when `hang`, never finishes (the process dies during it).
    fn definition(runs: mpsc::UnboundedSender<()>, hang: bool) -> SagaDefinition<OrderSagaContext> {
        let step = Step::new(
            "only",
            move |_ctx: &mut OrderSagaContext, _step: StepContext| {
                let runs = runs.clone();
                Box::pin(async move {
                    let _ = runs.send(());
                    if hang {
                        Notify::new().notified().await;
                    }
                    Ok(())
                })
            },
        );
        SagaDefinition::builder(SAGA_NAME, SAGA_VERSION)
            .step(step)
            .build()
            .expect("a valid definition")
    }

    /// A fresh order's saga context.
    fn order_context() -> OrderSagaContext {
        OrderSagaContext {
            order_id: uuid::Uuid::now_v7().to_string(),
            user_id: "user-1".to_owned(),
            lines: Vec::new(),
            total_cents: 0,
            traceparent: None,
        }
    }

    /// A saga log in a fresh temporary directory: the directory and the log's URL.
    fn sqlite_log() -> (std::path::PathBuf, String) {
        let dir = std::env::temp_dir().join(format!("orders-engine-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let url = format!("sqlite://{}", dir.join("orders-saga.db").display());
        (dir, url)
    }

    /// Runs `context`'s saga on `engine` and "crashes" it once its (hanging) step has started.
    async fn crash_in_the_step(
        engine: &OrderSagaEngine,
        context: &OrderSagaContext,
        ran: &mut mpsc::UnboundedReceiver<()>,
    ) {
        let running = {
            let engine = engine.clone();
            let context = context.clone();
            tokio::spawn(async move { engine.run(&context).await })
        };
        ran.recv().await.expect("the step started");
        running.abort();
        let _ = running.await;
    }

    #[tokio::test]
    async fn a_restarted_engine_resumes_its_sagas_on_the_first_recovery_pass() {
        // Engine 1 starts a saga and "crashes" in its step; engine 2, opened on the same saga
        // log as a restarted process would, must take the saga back on its first recovery
        // pass instead of waiting out engine 1's lease.
        let (dir, url) = sqlite_log();
        let context = order_context();

        let (runs, mut ran) = mpsc::unbounded_channel();
        let first = OrderSagaEngine::open(&url, vec![definition(runs, true)], None)
            .await
            .expect("engine 1");
        crash_in_the_step(&first, &context, &mut ran).await;
        drop(first);

        let (runs, mut ran) = mpsc::unbounded_channel();
        let second = OrderSagaEngine::open(&url, vec![definition(runs, false)], None)
            .await
            .expect("engine 2");
        let report = second.0.recover().await.expect("recovery pass");
        assert!(report.refused.is_empty(), "{:?}", report.refused);
        assert_eq!(
            report
                .resumed
                .iter()
                .map(|(_, status)| *status)
                .collect::<Vec<_>>(),
            [SagaStatus::Completed],
            "the saga is taken back at once"
        );
        assert!(ran.try_recv().is_ok(), "the step ran again in engine 2");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn an_order_whose_saga_waits_for_recovery_gets_no_second_saga() {
        // The sweeper's race, seen in a chaos storm on PostgreSQL: an orders process dies with
        // a saga started but not yet attached to its order; until its lease expires nobody
        // drives it, and the sweeper, finding the order without a saga, starts it again. The
        // second start must find the order's saga and run nothing (before the fix it ran a
        // second saga, whose first step then failed on "order is driven by saga …").
        let (dir, url) = sqlite_log();
        let context = order_context();
        let (runs, mut ran) = mpsc::unbounded_channel();
        let first = OrderSagaEngine::open(&url, vec![definition(runs, true)], Some("a".to_owned()))
            .await
            .expect("engine 1");
        crash_in_the_step(&first, &context, &mut ran).await;

        // Another engine (a fresh owner, so engine 1's lease still holds the saga).
        let (runs, mut ran) = mpsc::unbounded_channel();
        let second =
            OrderSagaEngine::open(&url, vec![definition(runs, false)], Some("b".to_owned()))
                .await
                .expect("engine 2");
        let again = second.run(&context).await;
        assert!(
            matches!(again, Err(SagaError::Conflict { seq: 1, .. })),
            "{again:?}"
        );
        assert!(ran.try_recv().is_err(), "no second saga ran the step");
        let sagas = second.0.store().list_active(10).await.expect("list");
        assert_eq!(sagas.len(), 1, "one saga for the order: {sagas:?}");
        drop(first);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_named_replica_resumes_its_sagas_on_postgres_at_once() {
        // On a shared PostgreSQL log a replica restarted under its operator-given owner name
        // takes back the saga its previous incarnation left in a step, on its first recovery
        // pass (without the name it would wait out the 30 s lease).
        let Some(pg) = trellis_testkit::postgres("orders_named_owner").await else {
            return;
        };
        let context = order_context();
        let owner = || Some("orders@10.0.0.7:8104".to_owned());
        let (runs, mut ran) = mpsc::unbounded_channel();
        let first = OrderSagaEngine::open(&pg.url, vec![definition(runs, true)], owner())
            .await
            .expect("engine 1");
        crash_in_the_step(&first, &context, &mut ran).await;
        drop(first);

        let (runs, mut ran) = mpsc::unbounded_channel();
        let second = OrderSagaEngine::open(&pg.url, vec![definition(runs, false)], owner())
            .await
            .expect("engine 2");
        let report = second.0.recover().await.expect("recovery pass");
        assert_eq!(
            report
                .resumed
                .iter()
                .map(|(_, status)| *status)
                .collect::<Vec<_>>(),
            [SagaStatus::Completed],
            "the saga is taken back at once: {:?}",
            report.refused
        );
        assert!(ran.try_recv().is_ok(), "the step ran again in engine 2");
    }
}
