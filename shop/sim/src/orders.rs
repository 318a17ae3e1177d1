//! The orders process, as far as the order saga goes: trellis-saga's engine over the saga
//! log (an [`InMemorySagaStore`] that outlives every incarnation: the durable state), the
//! Order aggregate over an in-memory event store (also durable across incarnations), the
//! mirrored saga definition, recovery at start and every 10 s, and the sweeper that starts
//! the saga of an order accepted without one, as `shop/orders` runs them.
//!
//! A crash aborts every task of the incarnation (each saga stops at whatever await it was
//! in) and drops its engine and its order cache; the next incarnation opens the same logs
//! under the same lease owner (as orders does on SQLite) and recovers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use shop_contracts::api::OrderStatus;
use shop_orders::aggregate::{Order, SharedClock};
use shop_orders::saga::{OrderSagaContext, SAGA_NAME};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use trellis_eventstore::{AnyStore, MemoryStore, Repository};
use trellis_saga::{
    InMemorySagaStore, Lease, SagaEngine, SagaError, SagaFilter, SagaId, SagaInstance, SagaRecord,
    SagaStore, SagaSummary,
};

use crate::saga::{Participants, Safeguards, definitions};
use crate::trace::Trace;

/// The lease owner of every incarnation (orders derives one stable owner from its SQLite
/// saga log's path, so a restarted process takes its sagas back at once).
const OWNER: &str = "orders@sim";
/// Time between recovery passes (`shop_orders::Config::new`'s default).
const RECOVERY_INTERVAL: Duration = Duration::from_secs(10);

/// When an incarnation dies, counted in saga-log writes.
#[derive(Debug)]
pub(crate) struct CrashPlan {
    /// Writes (creates and appends) left before the crash; `u64::MAX`: none planned.
    writes_left: AtomicU64,
    /// Whether the fatal write commits before the process dies.
    commit: bool,
    /// Set once the incarnation is dead: its writes never return.
    dead: AtomicBool,
    trace: Trace,
}

impl CrashPlan {
    pub(crate) fn new(writes: Option<u64>, commit: bool, trace: Trace) -> Self {
        Self {
            writes_left: AtomicU64::new(writes.unwrap_or(u64::MAX)),
            commit,
            dead: AtomicBool::new(false),
            trace,
        }
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    pub(crate) fn kill(&self) {
        self.dead.store(true, Ordering::SeqCst);
    }

    /// Before a write: `Some(commit)` when this write is the fatal one.
    fn fatal(&self) -> Option<bool> {
        if self.is_dead() {
            return Some(false);
        }
        let left = self.writes_left.load(Ordering::SeqCst);
        if left == u64::MAX {
            return None;
        }
        if left == 0 {
            self.kill();
            self.trace.now(format!(
                "orders crashes at a saga-log write ({})",
                if self.commit {
                    "after it commits"
                } else {
                    "before it commits"
                }
            ));
            return Some(self.commit);
        }
        self.writes_left.store(left - 1, Ordering::SeqCst);
        None
    }
}

/// The saga log as one incarnation sees it: the shared log, and its crash plan.
#[derive(Debug, Clone)]
pub(crate) struct SimSagaStore {
    inner: InMemorySagaStore,
    plan: Arc<CrashPlan>,
}

macro_rules! alive {
    ($self:ident) => {
        if $self.plan.is_dead() {
            return std::future::pending().await;
        }
    };
}

impl SagaStore for SimSagaStore {
    async fn create(
        &self,
        id: SagaId,
        definition: &str,
        version: u32,
        first: &SagaRecord,
        lease: &Lease,
    ) -> Result<(), SagaError> {
        if let Some(commit) = self.plan.fatal() {
            if commit {
                let _ = self
                    .inner
                    .create(id, definition, version, first, lease)
                    .await;
            }
            return std::future::pending().await;
        }
        self.inner
            .create(id, definition, version, first, lease)
            .await
    }

    async fn append(
        &self,
        id: SagaId,
        record: &SagaRecord,
        lease: &Lease,
    ) -> Result<(), SagaError> {
        if let Some(commit) = self.plan.fatal() {
            if commit {
                let _ = self.inner.append(id, record, lease).await;
            }
            return std::future::pending().await;
        }
        self.inner.append(id, record, lease).await
    }

    async fn load(&self, id: SagaId) -> Result<Option<SagaInstance>, SagaError> {
        alive!(self);
        self.inner.load(id).await
    }

    async fn list_active(&self, limit: usize) -> Result<Vec<SagaId>, SagaError> {
        alive!(self);
        self.inner.list_active(limit).await
    }

    async fn claim_next(
        &self,
        lease: &Lease,
        after: Option<SagaId>,
    ) -> Result<Option<SagaId>, SagaError> {
        alive!(self);
        self.inner.claim_next(lease, after).await
    }

    async fn claim(&self, id: SagaId, lease: &Lease) -> Result<(), SagaError> {
        alive!(self);
        self.inner.claim(id, lease).await
    }

    async fn renew(&self, id: SagaId, lease: &Lease) -> Result<bool, SagaError> {
        alive!(self);
        self.inner.renew(id, lease).await
    }

    async fn release(&self, id: SagaId, owner: &str) -> Result<(), SagaError> {
        alive!(self);
        self.inner.release(id, owner).await
    }

    async fn list(&self, filter: &SagaFilter) -> Result<Vec<SagaSummary>, SagaError> {
        alive!(self);
        self.inner.list(filter).await
    }

    async fn purge(&self, before: DateTime<Utc>) -> Result<u64, SagaError> {
        alive!(self);
        self.inner.purge(before).await
    }
}

/// The durable state of the orders process: what survives a crash.
#[derive(Debug, Clone)]
pub(crate) struct Durable {
    pub(crate) sagas: InMemorySagaStore,
    pub(crate) events: AnyStore,
    /// Order id → when it was accepted (the read model's `created_at`, for the sweeper).
    pub(crate) accepted: Arc<Mutex<BTreeMap<String, tokio::time::Instant>>>,
}

impl Durable {
    pub(crate) fn new() -> Self {
        Self {
            sagas: InMemorySagaStore::new(),
            events: AnyStore::Memory(MemoryStore::new()),
            accepted: Arc::default(),
        }
    }
}

/// One incarnation of the orders process.
#[derive(Debug)]
pub(crate) struct Incarnation {
    pub(crate) plan: Arc<CrashPlan>,
    pub(crate) orders: Arc<Repository<Order, AnyStore>>,
    engine: Arc<SagaEngine<SimSagaStore>>,
    /// Orders with a saga started (or queued) in this incarnation: the sweeper skips them.
    active: Arc<Mutex<BTreeSet<String>>>,
    /// The saga queue; its dispatcher runs each saga in a task of its own `JoinSet`, so
    /// aborting the dispatcher aborts them all.
    queue: mpsc::UnboundedSender<OrderSagaContext>,
    tasks: JoinSet<()>,
    trace: Trace,
}

/// Where an incarnation gets its participants' clients.
pub(crate) type Clients = dyn Fn(Arc<Repository<Order, AnyStore>>) -> Participants + Send + Sync;

impl Incarnation {
    /// Starts incarnation `number` on `durable`: recovery at once and every 10 s, the
    /// sweeper every 5 s.
    pub(crate) fn start(
        number: u32,
        durable: &Durable,
        plan: Arc<CrashPlan>,
        clients: &Clients,
        trace: Trace,
    ) -> Result<Self, SagaError> {
        // As orders opens it: snapshots every 50 events and a cache of orders in progress.
        let orders = Arc::new(
            Repository::<Order, AnyStore>::new(durable.events.clone())
                .with_snapshots(50)
                .with_cache(shop_orders::ORDER_CACHE_ENTRIES),
        );
        let store = SimSagaStore {
            inner: durable.sagas.clone(),
            plan: plan.clone(),
        };
        let mut engine = SagaEngine::new(store).with_owner(OWNER);
        for definition in definitions(&clients(orders.clone()))? {
            engine = engine.register(definition);
        }
        let engine = Arc::new(engine);
        let (queue, mut waiting) = mpsc::unbounded_channel::<OrderSagaContext>();
        trace.now(format!("orders incarnation {number} starts"));
        let mut incarnation = Self {
            plan,
            orders,
            engine,
            active: Arc::default(),
            queue,
            tasks: JoinSet::new(),
            trace,
        };
        let (engine, active) = (incarnation.engine.clone(), incarnation.active.clone());
        incarnation.tasks.spawn(async move {
            let mut sagas = JoinSet::new();
            loop {
                tokio::select! {
                    biased;
                    Some(context) = waiting.recv() => {
                        let (engine, active) = (engine.clone(), active.clone());
                        sagas.spawn(async move {
                            let _ = engine.start(SAGA_NAME, &context).await;
                            active
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .remove(&context.order_id);
                        });
                    }
                    Some(_) = sagas.join_next() => {}
                    else => std::future::pending::<()>().await,
                }
            }
        });
        let engine = incarnation.engine.clone();
        incarnation
            .tasks
            .spawn(async move { engine.run_recovery(RECOVERY_INTERVAL).await });
        let (queue, orders, active, accepted, trace) = (
            incarnation.queue.clone(),
            incarnation.orders.clone(),
            incarnation.active.clone(),
            durable.accepted.clone(),
            incarnation.trace.clone(),
        );
        incarnation.tasks.spawn(async move {
            let mut ticks = tokio::time::interval(shop_orders::SWEEP_INTERVAL_DEFAULT);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                sweep(&queue, &orders, &active, &accepted, &trace).await;
            }
        });
        Ok(incarnation)
    }

    /// Starts the order's saga in a task of this incarnation (what `SagaQueue::submit`
    /// does).
    pub(crate) fn submit(&self, context: OrderSagaContext) {
        submit(&self.queue, &self.active, context);
    }

    /// Kills the incarnation: every task stops at its current await.
    pub(crate) fn crash(mut self) {
        self.plan.kill();
        self.tasks.abort_all();
    }
}

fn submit(
    queue: &mpsc::UnboundedSender<OrderSagaContext>,
    active: &Mutex<BTreeSet<String>>,
    context: OrderSagaContext,
) {
    if active
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(context.order_id.clone())
    {
        let _ = queue.send(context);
    }
}

/// The sweeper: starts the saga of every order accepted more than `SWEEP_AGE` ago that is
/// still pending without a saga and not queued or running here (`SagaQueue::sweep`).
async fn sweep(
    queue: &mpsc::UnboundedSender<OrderSagaContext>,
    orders: &Repository<Order, AnyStore>,
    active: &Arc<Mutex<BTreeSet<String>>>,
    accepted: &Mutex<BTreeMap<String, tokio::time::Instant>>,
    trace: &Trace,
) {
    let now = tokio::time::Instant::now();
    let old: Vec<String> = accepted
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|(_, at)| now.duration_since(**at) > shop_orders::SWEEP_AGE)
        .map(|(id, _)| id.clone())
        .collect();
    for id in old {
        if active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&id)
        {
            continue;
        }
        let Ok(loaded) = orders.load(&id).await else {
            continue;
        };
        let order = loaded.state;
        if order.saga_id.is_none() && order.status() == OrderStatus::Pending {
            trace.now(format!("sweeper starts the saga of {id}"));
            let context = OrderSagaContext {
                order_id: id.clone(),
                user_id: order.user_id.clone(),
                lines: order.items.clone(),
                total_cents: order.total_cents,
                traceparent: None,
            };
            submit(queue, active, context);
        }
    }
}

/// The participants' clients for one incarnation.
pub(crate) fn participants(
    orders: Arc<Repository<Order, AnyStore>>,
    clock: SharedClock,
    net: &Arc<crate::net::Net>,
    identity: &trellis_service::auth::ServiceIdentity,
    safeguards: Safeguards,
) -> Participants {
    use crate::host::Service;
    use crate::net::Channel;
    use shop_contracts::proto::{
        inventory_client::InventoryClient, payments_client::PaymentsClient,
        shipping_client::ShippingClient,
    };
    let channel = |service| {
        trellis_service::auth::ServiceIdentityClient::new(
            Channel::new(net.clone(), service),
            identity.clone(),
        )
    };
    Participants {
        orders,
        clock,
        inventory: InventoryClient::new(channel(Service::Inventory)),
        payments: PaymentsClient::new(channel(Service::Payments)),
        shipping: ShippingClient::new(channel(Service::Shipping)),
        safeguards,
    }
}
