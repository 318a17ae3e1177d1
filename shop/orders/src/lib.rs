//! The reference shop's orders service.
//!
//! - The Order aggregate ([`aggregate`]) lives in trellis-eventstore: every change is an event
//!   in the order's stream, and the streams are the system of record.
//! - The read model ([`projection`]) answers `GET /api/orders/{id}` and
//!   `GET /api/orders?status=`: a projection of the event log kept by trellis-eventstore's
//!   `ProjectionRunner`. It is eventually consistent; an order the projection has not reached
//!   yet is read from its stream instead, so a client never sees a 404 for an order it just
//!   placed.
//! - The order saga runs in one of two styles ([`Config::saga`]). Orchestrated (default,
//!   [`saga`]): trellis-saga's engine reserves stock, charges, creates the shipment (the
//!   pivot), commits the stock and confirms over gRPC; a failure before the pivot refunds,
//!   releases and cancels the order with the reason noted by the failing step.
//!   Choreographed ([`choreography`]): the participants react to each other's events on the
//!   bus, and this service only reacts too: it records their progress, decides between a
//!   customer's cancel and shipping, and confirms or cancels the order last.
//! - `POST /api/orders` needs an `Idempotency-Key`: the same key and body answer the first
//!   answer again, the same key with another body is a 422.
//!
//! - With a bus configured, order events (`order.created`, `order.confirmed`,
//!   `order.cancelled`, and for choreographed orders `order.shipping_started` and
//!   `order.failed`) reach it through an outbox (module `outbox`): the event store's log is
//!   followed at least once from a checkpoint, each event published with its id as the
//!   envelope id.
//!
//! Orchestrated, start-up runs saga recovery (sagas a previous process left are finished)
//! and a sweeper starts the saga of any order accepted without one (a crash between the two
//! writes). Choreographed, there is no saga log: the bus and the participants' inboxes and
//! outboxes carry an order's progress across restarts.
//!
//! # Layout
//! Private modules, one concern each: `rest` (the handlers and the OpenAPI document), `admin`
//! (the operator endpoints for sagas), `state`
//! (what the handlers share), `placement` (placing an order once per idempotency key),
//! `read_model` (reading the projection's rows), `saga_runner` (the saga engine, its queue
//! and slots, the sweeper) and `outbox` (order events from the event store to the bus).
//!
//! # Example
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let service_key = trellis_service::auth::ServiceKey::from_env_or_file("trellis-data".as_ref())?;
//! let config = shop_orders::Config::new("sqlite://trellis-data/orders.db", [
//!     "127.0.0.1:8101", "127.0.0.1:8102", "127.0.0.1:8103", "127.0.0.1:8105", "127.0.0.1:8106",
//! ], service_key);
//! let orders = shop_orders::start(config).await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8104").await?;
//! trellis_service::serve(listener, orders.router(), Some(orders.db()), None, async {}).await?;
//! orders.shutdown().await;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod admin;
pub mod aggregate;
pub mod choreography;
mod outbox;
mod placement;
pub mod projection;
mod read_model;
mod rest;
pub mod saga;
mod saga_runner;
mod state;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use shop_contracts::events::SagaStyle;
use trellis_eventstore::{AnyStore, ProjectionRunner, Repository};
use trellis_service::{Db, GrpcClientConfig, grpc_channel, on_db};
use trellis_telemetry::service::ServiceScopeExt as _;

use crate::aggregate::{Order, SharedClock, SystemClock};
use crate::projection::OrderView;
use crate::saga::Participants;
use crate::saga_runner::{OrderSagaEngine, SagaQueue};

pub use placement::IDEMPOTENCY_KEY_MAX;
pub use rest::openapi;

/// Orders whose state is kept in memory (about 1 KB each).
pub const ORDER_CACHE_ENTRIES: usize = 20_000;
/// Where the orders service serves the bus's dead-letter endpoints (trellis-bus's DLQ
/// router), to administrators only; the gateway maps `/api/admin/dlq` here.
pub const DLQ_PATH: &str = "/admin/dlq";
/// Where the orders service serves trellis-saga's inspector endpoints (`/sagas`,
/// `/sagas/{id}`, `/sagas/{id}/retry`, ...) over the order saga's log, to administrators only;
/// the gateway maps `/api/admin/sagas` to `SAGAS_PATH/sagas`. Beside them,
/// `GET /admin/orders/{id}/saga` names an order's saga.
pub const SAGAS_PATH: &str = "/admin/saga";
/// Default number of sagas running at once in one process.
pub const SAGA_CONCURRENCY_DEFAULT: usize = 512;
/// Default time between sweeps for orders accepted without a saga.
pub const SWEEP_INTERVAL_DEFAULT: Duration = Duration::from_secs(5);
/// How old an order without a saga must be before the sweeper starts one.
pub const SWEEP_AGE: Duration = Duration::from_secs(10);
/// How often the service samples the gauges nothing else keeps moving: the read model's
/// projection lag, the compensating and stuck sagas, the bus's dead-letter queues.
pub const GAUGE_SAMPLE_INTERVAL: Duration = Duration::from_secs(15);

/// What the orders service needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// `sqlite://DIR/orders.db` (the event store; the read model and the saga log go to
    /// `orders-read.db` and `orders-saga.db` beside it) or `postgres://…` (all three in it).
    pub database_url: String,
    /// gRPC address of the users service.
    pub users_addr: String,
    /// gRPC address of the products service.
    pub products_addr: String,
    /// gRPC address of the inventory service.
    pub inventory_addr: String,
    /// gRPC address of the payments service.
    pub payments_addr: String,
    /// gRPC address of the shipping service.
    pub shipping_addr: String,
    /// Sagas running at once; orders beyond it wait for the sweeper.
    pub saga_concurrency: usize,
    /// Time between sweeps.
    pub sweep_interval: Duration,
    /// Time between saga recovery passes (sagas of dead engines sharing a PostgreSQL log).
    pub recovery_interval: Duration,
    /// The bus order events are published to through the outbox (`nats://…`, `sqlite://…`,
    /// `memory://`); no outbox when `None`.
    pub bus_url: Option<String>,
    /// Prefix of the NATS streams and subjects (`[a-z0-9_]`).
    pub bus_prefix: String,
    /// How the order saga runs; [`SagaStyle::Choreography`] needs `bus_url`.
    pub saga: SagaStyle,
    /// The shop's key: the service believes only callers whose identity token it signed, and
    /// signs its own calls to the other services with it.
    pub service_key: trellis_service::auth::ServiceKey,
    /// The saga engine's lease owner on a PostgreSQL saga log: a stable name per replica (its
    /// host and port, say), so a restarted replica takes its sagas back at once. `None`: a
    /// fresh owner per start (a SQLite log derives a stable one from its path).
    pub saga_owner: Option<String>,
}

impl Config {
    /// A configuration with defaults; `addrs` are users, products, inventory, payments,
    /// shipping.
    pub fn new(
        database_url: impl Into<String>,
        addrs: [&str; 5],
        service_key: trellis_service::auth::ServiceKey,
    ) -> Self {
        let [users, products, inventory, payments, shipping] = addrs;
        Self {
            database_url: database_url.into(),
            users_addr: users.to_owned(),
            products_addr: products.to_owned(),
            inventory_addr: inventory.to_owned(),
            payments_addr: payments.to_owned(),
            shipping_addr: shipping.to_owned(),
            saga_concurrency: SAGA_CONCURRENCY_DEFAULT,
            sweep_interval: SWEEP_INTERVAL_DEFAULT,
            recovery_interval: Duration::from_secs(10),
            bus_url: None,
            bus_prefix: "shop".to_owned(),
            saga: SagaStyle::Orchestrated,
            service_key,
            saga_owner: None,
        }
    }
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A database could not be opened.
    #[error("cannot open {url}: {message}")]
    Open {
        /// The URL.
        url: String,
        /// The cause.
        message: String,
    },
    /// A dependency address is malformed.
    #[error("bad address: {0}")]
    Address(String),
    /// The saga definition is invalid (a bug).
    #[error(transparent)]
    Saga(#[from] trellis_saga::SagaError),
    /// The choreographed saga was asked for without a bus.
    #[error("the choreographed saga needs a bus (set bus_url)")]
    NoBus,
    /// The choreography participant could not start.
    #[error("the orders choreography could not start: {0}")]
    Choreography(#[from] trellis_service::choreography::ChoreographyError),
}

/// The running service: its router, its read-model database and its background tasks.
#[derive(Debug)]
pub struct Orders {
    router: Router,
    db: Db,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Orders {
    /// The REST router (public API and `/openapi.json`).
    pub fn router(&self) -> Router {
        self.router.clone()
    }

    /// The read-model database (for `/readyz`).
    pub fn db(&self) -> Db {
        self.db.clone()
    }

    /// Stops the projection, the sweeper and the recovery loop. Sagas in flight stop where
    /// they are; the next start's recovery finishes them.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            task.abort();
            let _ = task.await;
        }
        self.db.close().await;
    }
}

/// The sibling SQLite file `name` of `url`, or `url` itself for PostgreSQL.
fn sibling(url: &str, name: &str) -> String {
    if let Some(path) = url.strip_prefix("sqlite://") {
        let path = std::path::Path::new(path);
        let dir = path
            .parent()
            .map(|d| d.display().to_string())
            .unwrap_or_default();
        if dir.is_empty() {
            format!("sqlite://{name}")
        } else {
            format!("sqlite://{dir}/{name}")
        }
    } else {
        url.to_owned()
    }
}

/// Describes the service's metrics to the installed recorder (docs/metrics.md).
fn describe_metrics() {
    metrics::describe_counter!(
        "shop_orders_placed_total",
        "Orders accepted (202), once per idempotency key"
    );
    metrics::describe_counter!(
        "shop_orders_events_relayed_total",
        "Order events the outbox published to the bus"
    );
    metrics::describe_counter!(
        "trellis_orders_relay_dead_letters_total",
        "Order events the outbox could not decode and set aside in relay_dead_letters"
    );
}

/// Opens the databases, runs recovery, and starts the projection, sweeper and recovery loop.
///
/// # Errors
/// [`Error`] naming what could not be opened.
pub async fn start(config: Config) -> Result<Orders, Error> {
    describe_metrics();
    let open_err = |url: &str, e: &dyn std::fmt::Display| Error::Open {
        url: url.to_owned(),
        message: e.to_string(),
    };
    let events_url = config.database_url.clone();
    let read_url = sibling(&events_url, "orders-read.db");
    let saga_url = sibling(&events_url, "orders-saga.db");
    let store = AnyStore::open(&events_url)
        .await
        .map_err(|e| open_err(&events_url, &e))?;
    let db = Db::connect(&read_url)
        .await
        .map_err(|e| open_err(&read_url, &e))?;
    db.run_schema(placement::SCHEMA)
        .await
        .map_err(|e| open_err(&read_url, &e))?;
    db.run_schema(outbox::SCHEMA)
        .await
        .map_err(|e| open_err(&read_url, &e))?;
    // Orders in progress stay in memory: a saga step's command appends without reading the
    // stream first (another writer shows as a version conflict, and the command reruns).
    let repository = Arc::new(
        Repository::<Order, AnyStore>::new(store.clone())
            .with_snapshots(50)
            .with_cache(ORDER_CACHE_ENTRIES),
    );

    let identity = config.service_key.service_identity("orders");
    let channel = |addr: &str| {
        grpc_channel(addr, GrpcClientConfig::default(), identity.clone())
            .map_err(|e| Error::Address(e.message))
    };
    // The one clock of the process: the order's events record its time.
    let clock: SharedClock = Arc::new(SystemClock);
    let participants = Participants {
        orders: repository.clone(),
        clock: clock.clone(),
        inventory: shop_contracts::proto::inventory_client::InventoryClient::new(channel(
            &config.inventory_addr,
        )?),
        payments: shop_contracts::proto::payments_client::PaymentsClient::new(channel(
            &config.payments_addr,
        )?),
        shipping: shop_contracts::proto::shipping_client::ShippingClient::new(channel(
            &config.shipping_addr,
        )?),
    };
    let choreographed = config.saga == SagaStyle::Choreography;
    if choreographed && config.bus_url.is_none() {
        return Err(Error::NoBus);
    }
    let engine = if choreographed {
        None
    } else {
        let definitions = saga::definitions(&participants)?;
        Some(
            OrderSagaEngine::open(&saga_url, definitions, config.saga_owner.clone())
                .await
                .map_err(|e| open_err(&saga_url, &e))?,
        )
    };

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();

    // The read model.
    let projection_task = on_db!(&db, |pool| {
        let view = OrderView::with_upcasters(repository.upcasters());
        let runner = ProjectionRunner::new(view, store.clone(), pool.clone())
            .await
            .map_err(|e| open_err(&read_url, &e))?;
        let runner = Arc::new(runner);
        // The runner sets its lag after each catch-up; this keeps the gauge moving while the
        // projection is failing (and restarting) or stopped.
        let sampled = runner.clone();
        tasks.push(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(GAUGE_SAMPLE_INTERVAL);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                if let Err(error) = sampled.lag().await {
                    tracing::warn!(%error, "cannot read the order read model's lag");
                }
            }
        }));
        let mut stopped = stopped.clone();
        tokio::spawn(
            async move {
                loop {
                    let shutdown = async {
                        let _ = stopped.wait_for(|s| *s).await;
                    };
                    match runner.run(shutdown).await {
                        Ok(()) => return,
                        Err(error) => {
                            tracing::error!(%error, "order read model stopped; restarting in 1 s");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
            }
            .in_current_service(),
        )
    });
    tasks.push(projection_task);

    let sagas = engine
        .clone()
        .map(|engine| SagaQueue::start(engine, config.saga_concurrency, stopped.clone()));
    let state = state::State::new(
        repository.clone(),
        db.clone(),
        clock.clone(),
        sagas.clone(),
        shop_contracts::proto::users_client::UsersClient::new(channel(&config.users_addr)?),
        shop_contracts::proto::products_client::ProductsClient::new(channel(
            &config.products_addr,
        )?),
    );

    let inspector = engine.as_ref().map(OrderSagaEngine::inspector);
    // Recovery, then the loops.
    if let Some(recovery_engine) = engine {
        let gauges_engine = recovery_engine.clone();
        tasks.push(tokio::spawn(async move {
            gauges_engine.run_status_gauges(GAUGE_SAMPLE_INTERVAL).await;
        }));
        let interval = config.recovery_interval;
        let mut recovery_stop = stopped.clone();
        tasks.push(tokio::spawn(
            async move {
                tokio::select! {
                    () = recovery_engine.run_recovery(interval) => {}
                    _ = recovery_stop.wait_for(|s| *s) => {}
                }
            }
            .in_current_service(),
        ));
    }
    if let Some(sagas) = sagas {
        let (orders, read_db, sweep_clock) = (repository.clone(), db.clone(), clock.clone());
        let sweep_interval = config.sweep_interval;
        tasks.push(tokio::spawn(
            async move {
                let mut ticks = tokio::time::interval(sweep_interval);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticks.tick().await;
                    sagas.sweep(&orders, &read_db, sweep_clock.now()).await;
                }
            }
            .in_current_service(),
        ));
    }

    let mut router = rest::router(state.clone()).merge(admin::router(state, inspector));
    if let Some(url) = &config.bus_url {
        let bus = trellis_bus::AnyBus::connect(url, &config.bus_prefix)
            .await
            .map_err(|e| open_err(url, &e))?;
        // The bus's dead letters, for operators: the gateway exposes them to administrators as
        // /api/admin/dlq/...
        router = router.nest(
            DLQ_PATH,
            trellis_service::auth::admin_only(trellis_bus::http::router(bus.clone())),
        );
        // The dead-letter queues' depth and oldest age, for the DLQ alerts: every group's
        // letters are in this one bus, whichever service consumes for the group.
        tasks.push(tokio::spawn(
            trellis_bus::DlqGauges::new().run(bus.clone(), GAUGE_SAMPLE_INTERVAL),
        ));
        if choreographed {
            let participant = Arc::new(choreography::OrdersParticipant {
                orders: repository.clone(),
                clock: clock.clone(),
            });
            tasks.extend(
                trellis_service::choreography::start(
                    &db,
                    bus.clone(),
                    participant,
                    stopped.clone(),
                )
                .await?,
            );
        }
        let outbox = outbox::run(
            store.clone(),
            repository.clone(),
            db.clone(),
            bus,
            config.saga_owner.clone(),
        );
        let mut outbox_stop = stopped.clone();
        tasks.push(tokio::spawn(
            async move {
                tokio::select! {
                    () = outbox => {}
                    _ = outbox_stop.wait_for(|s| *s) => {}
                }
            }
            .in_current_service(),
        ));
    }

    Ok(Orders {
        router: trellis_service::auth::protect(router, &config.service_key),
        db,
        stop,
        tasks,
    })
}
