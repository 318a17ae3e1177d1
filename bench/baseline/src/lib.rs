//! The shop's order transaction in one process on one SQLite database: the baseline that
//! the distributed shop's CPU per order and highest rate are reported against (issue 19).
//!
//! # Why it exists
//! The reference shop runs an order through a gateway, six services, gRPC, an event store, a
//! saga log, outboxes and read models. This crate does the same business transaction with
//! none of that: the price of the distributed design is the shop's CPU per order (and its
//! highest rate under a p99 of 100 ms) divided by this baseline's, measured in the same run
//! by the same unchanged `trellis load` (`bench/baseline/run.sh`).
//!
//! # What it keeps from the shop, so the comparison is fair
//! - The subset of the shop's public HTTP API that `trellis load --mix order=1` with admin
//!   credentials calls, with the shop's JSON shapes ([`shop_contracts::api`]), status codes
//!   and `{"error":{"code","message"}}` errors ([`trellis_service::ApiError`]):
//!   `POST /api/users`, `POST /api/auth/token`, `GET /api/products`,
//!   `GET|PUT /api/inventory/{id}` (admin), `POST /api/orders` (with `Idempotency-Key`),
//!   `GET /api/orders/{id}` (owner or admin), `GET /api/payments/{order_id}` and
//!   `GET /api/shipments/{order_id}` (admin).
//! - Passwords hashed with Argon2id at the users service's parameters, at most 8 at a time,
//!   so a registration or a login costs what it costs in the shop.
//! - Durability: SQLite in WAL with `synchronous = FULL` ([`trellis_sqlite::connect_options`],
//!   as every shop database), and each step of an order committed before the next.
//! - The payment provider simulator ([`shop_payment_provider`]) in the same process on its
//!   own loopback port, with `trellis up`'s default settings, called over HTTP with the
//!   order id as idempotency key as shop/payments calls it.
//!
//! # What it leaves out, on purpose
//! Bearer tokens are opaque random strings kept in memory (no JWT signing or verification);
//! there is no login rate limiting, no common-password list, no refresh tokens, no circuit
//! breaker, no crash recovery of orders in flight (every run starts on a fresh database), no
//! metrics and no tracing export. Those are parts of the distributed design's price, or
//! protections the load never triggers.
//!
//! # One order, five commits
//! 1. **accept** (`POST /api/orders`): the idempotency record, the order `PENDING` and its
//!    `order/created` timeline entry; answered 202.
//! 2. **reserve**: every line's stock held, `inventory/reserved` (out of stock: the order
//!    `CANCELLED` `out_of_stock` in the same commit).
//! 3. **charge** the provider (HTTP), then **record the payment** `captured`,
//!    `payment/captured` (declined or unavailable: stock released, the order `CANCELLED`).
//! 4. **ship**: the shipment `created`, `shipping/created`.
//! 5. **confirm**: the reserved stock taken out of the total (`inventory/committed`, the
//!    shop's stock commit) and the order `CONFIRMED`, `order/confirmed`.
//!
//! Steps 2 to 5 run in a background task per order, at most [`ORDERS_IN_FLIGHT_MAX`] at once,
//! fed by a queue of at most [`ORDER_QUEUE_MAX`] orders.
//!
//! # Example
//! ```no_run
//! # #[tokio::main] async fn main() -> anyhow::Result<()> {
//! let config = trellis_bench_baseline::Config::new("baseline-data", "admin@example.com", "a long password");
//! let baseline = trellis_bench_baseline::start(config).await?;
//! println!("serving {}", baseline.url());
//! baseline.shutdown().await;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod api;
mod auth;
mod flow;
mod provider;
mod store;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use shop_payment_provider::ProviderConfig;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use trellis_service::auth::ServiceKey;

use crate::auth::{Hasher, Sessions};
use crate::flow::{Flow, OrderQueue};
use crate::store::Db;

pub use crate::flow::{ORDER_QUEUE_MAX, ORDERS_IN_FLIGHT_MAX};

/// The database file's name in the data directory.
pub const DATABASE_FILE: &str = "baseline.db";
/// The provider simulator's ledger in the data directory (the shop's `trellis up` keeps the
/// same file, so both pay for the same simulator).
pub const PROVIDER_LEDGER_FILE: &str = "payment-provider.db";
/// Stock each seed product starts with: enough that no run sells out.
pub const SEED_STOCK: i64 = 1_000_000;
/// The catalogue `trellis up` seeds (shop/app's `seed::CATALOG`): name and price in cents.
pub const CATALOGUE: &[(&str, i64)] = &[
    ("Trellis mug", 1_200),
    ("Circuit breaker t-shirt", 2_500),
    ("Saga sticker pack", 400),
    ("Event-sourced notebook", 1_800),
    ("Idempotent hoodie", 5_500),
];
/// How long shutdown waits for the orders in flight to finish their steps.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What the baseline needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address the API listens on.
    pub bind: IpAddr,
    /// Port of the API; 0 picks a free one.
    pub port: u16,
    /// Where the database lives; created when missing. A database left there is removed:
    /// every start is a fresh one.
    pub data_dir: PathBuf,
    /// The administrator's login email.
    pub admin_email: String,
    /// The administrator's password.
    pub admin_password: String,
    /// The provider simulator's settings (`trellis up`'s defaults: no latency, no faults).
    pub provider: ProviderConfig,
}

impl Config {
    /// Loopback, a free port, the provider simulator as `trellis up` starts it.
    pub fn new(
        data_dir: impl Into<PathBuf>,
        admin_email: impl Into<String>,
        admin_password: impl Into<String>,
    ) -> Self {
        Self {
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 0,
            data_dir: data_dir.into(),
            admin_email: admin_email.into(),
            admin_password: admin_password.into(),
            provider: ProviderConfig::default(),
        }
    }
}

/// A running baseline: the API, the provider simulator and the order tasks.
#[derive(Debug)]
pub struct Baseline {
    addr: SocketAddr,
    provider_addr: SocketAddr,
    stop: watch::Sender<bool>,
    servers: Vec<JoinHandle<()>>,
    orders: OrderQueue,
    db: Db,
}

impl Baseline {
    /// Where the API listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, the base URL of the API.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Where the provider simulator listens (loopback).
    pub fn provider_addr(&self) -> SocketAddr {
        self.provider_addr
    }

    /// Stops accepting requests, lets the orders in flight finish for up to
    /// [`SHUTDOWN_GRACE`] (the rest stay `PENDING` in the database), and closes the database.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for server in self.servers {
            if tokio::time::timeout(SHUTDOWN_GRACE, server).await.is_err() {
                tracing::warn!("a server did not stop within the grace period");
            }
        }
        self.orders.drain(SHUTDOWN_GRACE).await;
        self.db.close().await;
    }
}

/// Starts the baseline: a fresh database in `config.data_dir` with the seed catalogue and
/// the administrator, the provider simulator on a loopback port, and the API.
///
/// # Errors
/// When the data directory, the database, a listener or the provider client cannot be set
/// up; whatever started is stopped.
pub async fn start(config: Config) -> anyhow::Result<Baseline> {
    if config.admin_email.trim().is_empty() || config.admin_password.is_empty() {
        anyhow::bail!("the administrator's email and password must not be empty");
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    let path = config.data_dir.join(DATABASE_FILE);
    let ledger_path = config.data_dir.join(PROVIDER_LEDGER_FILE);
    for suffix in ["", "-wal", "-shm"] {
        for start in [&path, &ledger_path] {
            let file = PathBuf::from(format!("{}{suffix}", start.display()));
            match std::fs::remove_file(&file) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", file.display())),
            }
        }
    }
    let db = Db::open(&path).await?;
    store::seed_catalogue(&db, CATALOGUE, SEED_STOCK)
        .await
        .context("seeding the catalogue")?;
    let hasher = Arc::new(Hasher::new().await.context("password hasher")?);
    let admin_hash = hasher
        .hash(config.admin_password.clone())
        .await
        .context("hashing the admin password")?;
    store::insert_admin(&db, &config.admin_email, &admin_hash)
        .await
        .context("creating the administrator")?;

    let (stop, stopped) = watch::channel(false);
    let mut servers = Vec::new();

    // The provider simulator, as `trellis up` starts it: its own loopback listener, served
    // by the service kit.
    let service_key = ServiceKey::generate().context("service key")?;
    let ledger = shop_payment_provider::Ledger::open(
        &format!("sqlite://{}", ledger_path.display()),
        shop_payment_provider::CHARGES_KEPT_MAX,
    )
    .await
    .context("opening the provider simulator's ledger")?;
    let (provider_router, _provider) =
        shop_payment_provider::app(config.provider, ledger, &service_key);
    let provider_listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .context("binding the provider simulator")?;
    let provider_addr = provider_listener.local_addr()?;
    let mut provider_stop = stopped.clone();
    servers.push(tokio::spawn(async move {
        let shutdown = async move {
            let _ = provider_stop.wait_for(|s| *s).await;
        };
        if let Err(e) =
            trellis_service::serve(provider_listener, provider_router, None, None, shutdown).await
        {
            tracing::error!(error = %e, "the provider simulator stopped");
        }
    }));

    let provider =
        provider::Provider::new(&format!("http://{provider_addr}")).context("provider client")?;
    let orders = OrderQueue::start(Flow::new(db.clone(), provider));
    let state = api::AppState {
        db: db.clone(),
        sessions: Arc::new(Sessions::default()),
        hasher,
        orders: orders.sender(),
    };
    let listener = match tokio::net::TcpListener::bind((config.bind, config.port)).await {
        Ok(listener) => listener,
        Err(e) => {
            let _ = stop.send(true);
            return Err(e).with_context(|| format!("binding {}:{}", config.bind, config.port));
        }
    };
    let addr = listener.local_addr()?;
    let router = api::router(state);
    let mut api_stop = stopped.clone();
    servers.push(tokio::spawn(async move {
        let shutdown = async move {
            let _ = api_stop.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "the API stopped");
        }
    }));
    Ok(Baseline {
        addr,
        provider_addr,
        stop,
        servers,
        orders,
        db,
    })
}
