//! One seed's run: set-up, the placed orders, the customer's cancels, the orchestrator's
//! crashes and restarts, quiescence, the operator's retry of stuck sagas, and the checks.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shop_contracts::api::OrderStatus;
use shop_contracts::proto::SetStockRequest;
use shop_contracts::proto::inventory_client::InventoryClient;
use shop_orders::aggregate::{Line, OrderCommand, SharedClock};
use shop_orders::saga::OrderSagaContext;
use tokio::sync::Notify;
use trellis_eventstore::Metadata;
use trellis_saga::{Inspector, SagaFilter, SagaStatus, SagaStore as _};
use trellis_service::auth::ServiceKey;

use crate::check::{self, PlacedOrder, SagaEnd};
use crate::host::{Host, Service};
use crate::net::{Channel, Net, NetFaults};
use crate::orders::{CrashPlan, Durable, Incarnation, participants};
use crate::provider::{Ledger, Provider, ProviderFaults};
use crate::rng::{self, Rng, SharedRng};
use crate::trace::{SimClock, Trace};
use crate::{Config, Outcome, Stats};

/// Simulated time after which a run that has not settled is a violation.
const SETTLE_LIMIT: Duration = Duration::from_secs(4 * 3600);
/// How often the driver looks at the world.
const TICK: Duration = Duration::from_millis(100);

/// The fault profile of a seed: calm, mild, heavy or storm.
fn profile(level: u64) -> (NetFaults, ProviderFaults) {
    let i = level as usize;
    let pick = |values: [f64; 4]| values[i];
    (
        NetFaults {
            refuse: pick([0.0, 0.03, 0.08, 0.15]),
            lose_answer: pick([0.0, 0.03, 0.08, 0.15]),
            duplicate: pick([0.0, 0.05, 0.15, 0.3]),
            delay_max: Duration::from_millis([5, 50, 300, 1_000][i]),
            stall: pick([0.0, 0.01, 0.03, 0.06]),
            crash: pick([0.0, 0.01, 0.03, 0.06]),
        },
        ProviderFaults {
            refuse: pick([0.0, 0.03, 0.1, 0.2]),
            fail_after_capture: pick([0.0, 0.03, 0.1, 0.2]),
            decline: 0.1,
            kill_payments: pick([0.0, 0.02, 0.05, 0.1]),
        },
    )
}

/// What the driver does at a time.
#[derive(Debug)]
enum Event {
    Place(usize),
    Cancel(usize),
}

/// One planned crash of the orders process.
#[derive(Debug, Clone, Copy)]
struct OrdersCrash {
    /// At the n-th saga-log write of the incarnation (`None`: at `at`).
    writes: Option<u64>,
    commit: bool,
    at: Duration,
    /// Down time before the restart.
    down: Duration,
}

fn directory(seed: u64) -> std::path::PathBuf {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let base = std::path::Path::new("/dev/shm");
    let base = if base.is_dir() {
        base.to_owned()
    } else {
        std::env::temp_dir()
    };
    base.join(format!(
        "trellis-sim-{}-{seed}-{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::SeqCst)
    ))
}

pub(crate) async fn simulate(seed: u64, config: &Config) -> Outcome {
    let rng: SharedRng = Arc::new(Mutex::new(Rng::new(seed)));
    let clock = SimClock::start();
    let trace = Trace::new(clock.clone(), config.echo);
    let mut stats = Stats::default();
    let mut violations = Vec::new();

    let level = rng::with(&rng, |r| r.below(4));
    let (net_faults, provider_faults) = profile(level);
    trace.now(format!(
        "seed {seed}: fault level {level} ({:?}; {:?})",
        net_faults, provider_faults
    ));

    let provider = Provider {
        ledger: Arc::new(Mutex::new(Ledger::default())),
        faults: Arc::new(Mutex::new(provider_faults)),
        idempotent: config.safeguards.provider_idempotency,
        rng: rng.clone(),
        trace: trace.clone(),
        kill_payments: Arc::new(Notify::new()),
    };
    let key = match ServiceKey::from_secret(b"trellis simulation shop key 0123") {
        Ok(key) => key,
        Err(e) => return Outcome::failed(seed, &trace, format!("service key: {e}")),
    };
    let dir = directory(seed);
    let host = match Host::start(
        &dir,
        provider.clone(),
        key.clone(),
        clock.clone(),
        trace.clone(),
    ) {
        Ok(host) => host,
        Err(e) => return Outcome::failed(seed, &trace, format!("participants: {e}")),
    };
    let net = Arc::new(Net::new(
        host,
        rng.clone(),
        trace.clone(),
        clock.clone(),
        net_faults,
    ));
    let identity = key.service_identity("orders");

    // Stock, set by an operator before any order.
    let mut stock = BTreeMap::new();
    let products = ["p-1", "p-2", "p-3"];
    for product in products {
        let total = rng::with(&rng, |r| r.range(2, 8)) as i64;
        stock.insert(product.to_owned(), total);
        let mut admin = InventoryClient::new(trellis_service::auth::ServiceIdentityClient::new(
            Channel::clean(net.clone(), Service::Inventory),
            key.service_identity("products"),
        ));
        if let Err(status) = admin
            .set_stock(SetStockRequest {
                product_id: product.to_owned(),
                total,
            })
            .await
        {
            return Outcome::failed(seed, &trace, format!("set stock: {status}"));
        }
    }
    trace.now(format!("stock {stock:?}"));

    // The orders, their placement times and the customers' cancels.
    let mut orders = Vec::new();
    let mut agenda: BTreeMap<(Duration, usize), Event> = BTreeMap::new();
    for i in 0..config.orders {
        let (lines, at, cancel) = rng::with(&rng, |r| {
            let mut lines = Vec::new();
            let first = r.below(3) as usize;
            let count = r.range(1, 2) as usize;
            for k in 0..count {
                lines.push(Line {
                    product_id: products[(first + k) % 3].to_owned(),
                    quantity: r.range(1, 3) as i64,
                    price_cents: r.range(100, 5_000) as i64,
                });
            }
            let at = Duration::from_millis(r.range(0, 3_000));
            let cancel = r
                .chance(0.25)
                .then(|| at + Duration::from_millis(r.range(0, 6_000)));
            (lines, at, cancel)
        });
        let id = uuid::Uuid::from_u128((u128::from(seed) << 64) | i as u128).to_string();
        agenda.insert((at, agenda.len()), Event::Place(i));
        if let Some(cancel) = cancel {
            agenda.insert((cancel, agenda.len()), Event::Cancel(i));
        }
        orders.push(PlacedOrder {
            id,
            user_id: format!("user-{}", i % 3),
            lines,
            placed: false,
        });
    }

    // The orders process's crashes.
    let crashes: Vec<OrdersCrash> = rng::with(&rng, |r| {
        let count = if level == 0 { 0 } else { r.below(3) };
        (0..count)
            .map(|_| OrdersCrash {
                writes: r.chance(0.6).then(|| r.range(0, 40)),
                commit: r.chance(0.5),
                at: Duration::from_millis(r.range(0, 20_000)),
                down: Duration::from_millis(r.range(0, 15_000)),
            })
            .collect()
    });
    let mut crashes: VecDeque<OrdersCrash> = crashes.into();

    let durable = Durable::new();
    let order_clock: SharedClock = Arc::new(clock.clone());
    let clients = {
        let (net, identity, clock, safeguards) = (
            net.clone(),
            identity.clone(),
            order_clock.clone(),
            config.safeguards,
        );
        move |repository| participants(repository, clock.clone(), &net, &identity, safeguards)
    };
    let mut number = 0u32;
    let start = |number: &mut u32, crash: Option<OrdersCrash>| {
        *number += 1;
        let plan = Arc::new(CrashPlan::new(
            crash.and_then(|c| c.writes),
            crash.is_some_and(|c| c.commit),
            trace.clone(),
        ));
        Incarnation::start(*number, &durable, plan, &clients, trace.clone())
    };
    let mut next_crash = crashes.pop_front();
    let mut incarnation = match start(&mut number, next_crash) {
        Ok(incarnation) => Some(incarnation),
        Err(e) => return Outcome::failed(seed, &trace, format!("orders: {e}")),
    };
    let mut crash_clock_origin = Duration::ZERO;
    let mut restart_at = None;
    let mut healed = false;

    loop {
        tokio::time::sleep(TICK).await;
        let now = clock.sync();

        // A crash: planned at a write (the plan is dead) or at a time.
        if let Some(current) = &incarnation {
            let timed =
                next_crash.is_some_and(|c| c.writes.is_none() && now >= crash_clock_origin + c.at);
            if current.plan.is_dead() || timed {
                if timed {
                    trace.now("orders crashes (at a planned time)");
                }
                let down = next_crash.map_or(Duration::ZERO, |c| c.down);
                if let Some(current) = incarnation.take() {
                    current.crash();
                }
                stats.orchestrator_crashes += 1;
                restart_at = Some(now + down);
            }
        }
        if incarnation.is_none() && restart_at.is_some_and(|at| now >= at) {
            next_crash = crashes.pop_front();
            crash_clock_origin = now;
            trace.now(format!(
                "orders restarts (incarnation {}) and recovers",
                number + 1
            ));
            match start(&mut number, next_crash) {
                Ok(started) => incarnation = Some(started),
                Err(e) => return Outcome::failed(seed, &trace, format!("orders restart: {e}")),
            }
            restart_at = None;
        }

        // Due events, while the orders process is up (a client retries until it is).
        if let Some(current) = &incarnation {
            while let Some(entry) = agenda.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                let event = entry.remove();
                handle(event, current, &mut orders, &durable, &trace).await;
            }
        }

        // Settled?
        if !agenda.is_empty() || incarnation.is_none() || net.in_flight() > 0 {
            if now > SETTLE_LIMIT {
                violations.push("the run did not settle within the limit".to_owned());
                break;
            }
            continue;
        }
        let Some(current) = &incarnation else {
            continue;
        };
        let sagas = durable
            .sagas
            .list(&SagaFilter::new())
            .await
            .unwrap_or_default();
        if sagas.iter().any(|s| s.status.is_active()) {
            if now > SETTLE_LIMIT {
                violations.push("sagas still active at the limit".to_owned());
                break;
            }
            continue;
        }
        let mut pending = 0;
        for order in orders.iter().filter(|o| o.placed) {
            let status = current
                .orders
                .load(&order.id)
                .await
                .map(|l| l.state.status())
                .unwrap_or(OrderStatus::Pending);
            if status == OrderStatus::Pending {
                pending += 1;
            }
        }
        let stuck: Vec<_> = sagas
            .iter()
            .filter(|s| s.status == SagaStatus::Stuck)
            .map(|s| s.id)
            .collect();
        if pending == 0 && stuck.is_empty() {
            break;
        }
        if !healed {
            // The faults end; an operator retries every stuck saga (trellis saga retry).
            healed = true;
            trace.now(format!(
                "all quiet with {pending} order(s) pending and {} stuck saga(s): faults healed, operator retries the stuck sagas",
                stuck.len()
            ));
            net.set_faults(NetFaults {
                delay_max: Duration::from_millis(5),
                ..NetFaults::default()
            });
            *provider.faults.lock().unwrap_or_else(|p| p.into_inner()) = ProviderFaults::default();
            let inspector = Inspector::new(durable.sagas.clone());
            for id in stuck {
                stats.operator_retries += 1;
                if let Err(e) = inspector.retry(id).await {
                    trace.log(format!("operator retry refused: {e}"));
                }
            }
            continue;
        }
        if now > SETTLE_LIMIT {
            break;
        }
        // Healed and still not settled: let recovery and the sweeper run, up to the limit.
        if !stuck.is_empty() {
            let inspector = Inspector::new(durable.sagas.clone());
            for id in stuck {
                stats.operator_retries += 1;
                let _ = inspector.retry(id).await;
            }
        }
    }

    // The checks.
    let end = clock.sync();
    stats.sim_time = end;
    let Some(current) = incarnation else {
        return Outcome::failed(
            seed,
            &trace,
            "the orders process is down at the end".to_owned(),
        );
    };
    let mut states = BTreeMap::new();
    for order in orders.iter().filter(|o| o.placed) {
        match current.orders.load(&order.id).await {
            Ok(loaded) => {
                states.insert(order.id.clone(), loaded.state);
            }
            Err(e) => violations.push(format!("order {} cannot be loaded: {e}", order.id)),
        }
    }
    let mut sagas = Vec::new();
    for summary in durable
        .sagas
        .list(&SagaFilter::new())
        .await
        .unwrap_or_default()
    {
        if let Ok(Some(instance)) = durable.sagas.load(summary.id).await {
            let order_id = instance
                .records
                .last()
                .and_then(|r| serde_json::from_value::<OrderSagaContext>(r.context.clone()).ok())
                .map(|c| c.order_id)
                .unwrap_or_default();
            sagas.push(SagaEnd {
                order_id,
                saga_id: summary.id.to_string(),
                status: summary.status,
            });
        }
    }
    let facts = match net.host.facts() {
        Ok(facts) => facts,
        Err(e) => return Outcome::failed(seed, &trace, format!("facts: {e}")),
    };
    check::all(&orders, &states, &sagas, &facts, &stock, &mut violations);
    for order in orders.iter().filter(|o| o.placed) {
        match states.get(&order.id).map(|o| o.status()) {
            Some(OrderStatus::Confirmed) => stats.confirmed += 1,
            Some(OrderStatus::Cancelled) => stats.cancelled += 1,
            _ => {}
        }
    }
    for (order, state) in &states {
        trace.log(format!(
            "end: order {order} {:?} reason {:?}",
            state.status(),
            state.reason
        ));
    }
    let mut ends: Vec<_> = sagas
        .iter()
        .map(|s| (s.order_id.clone(), format!("{:?}", s.status)))
        .collect();
    ends.sort();
    for (order, status) in ends {
        trace.log(format!("end: saga of {order} {status}"));
    }
    trace.log(format!("end: stock {:?}", facts.stock));
    stats.orders = orders.iter().filter(|o| o.placed).count();
    current.crash();
    drop(net);
    Outcome {
        seed,
        trace: trace.lines(),
        violations,
        stats,
    }
}

async fn handle(
    event: Event,
    current: &Incarnation,
    orders: &mut [PlacedOrder],
    durable: &Durable,
    trace: &Trace,
) {
    let metadata = |id: &str| Metadata {
        correlation_id: uuid::Uuid::parse_str(id).ok(),
        ..Metadata::default()
    };
    match event {
        Event::Place(i) => {
            let order = &mut orders[i];
            let command = OrderCommand::Create {
                user_id: order.user_id.clone(),
                items: order.lines.clone(),
                choreographed: false,
            };
            let now = shop_orders::aggregate::Clock::now(&current_clock(trace));
            match current
                .orders
                .execute(&order.id, command.at(now), metadata(&order.id))
                .await
            {
                Ok(executed) => {
                    order.placed = true;
                    durable
                        .accepted
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(order.id.clone(), tokio::time::Instant::now());
                    trace.now(format!("order {} placed: {:?}", order.id, order.lines));
                    current.submit(OrderSagaContext {
                        order_id: order.id.clone(),
                        user_id: order.user_id.clone(),
                        lines: executed.state.items.clone(),
                        total_cents: executed.state.total_cents,
                        traceparent: None,
                    });
                }
                Err(e) => trace.now(format!("order {} refused: {e}", order.id)),
            }
        }
        Event::Cancel(i) => {
            let order = &orders[i];
            if !order.placed {
                return;
            }
            let now = shop_orders::aggregate::Clock::now(&current_clock(trace));
            let answer = current
                .orders
                .execute(
                    &order.id,
                    OrderCommand::RequestCancel.at(now),
                    metadata(&order.id),
                )
                .await;
            trace.now(format!(
                "customer cancels {}: {}",
                order.id,
                match answer {
                    Ok(_) => "accepted".to_owned(),
                    Err(e) => format!("refused ({e})"),
                }
            ));
        }
    }
}

fn current_clock(trace: &Trace) -> SimClock {
    trace.clock()
}
