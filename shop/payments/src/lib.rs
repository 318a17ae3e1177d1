//! The reference shop's payments service: captures an order's amount at the external payment
//! provider at most once, refunds it at most once, and settles outcomes it could not see.
//!
//! # How it keeps one capture per order
//! - The provider's idempotency key is the order id, so every repeat (a retried attempt, a
//!   repeated `Charge`, a restart) names the same charge and the provider never captures twice.
//! - A `payments` row is written (`pending`) before the provider is called, and a recorded
//!   `captured` or `declined` answers repeats without calling the provider again.
//! - Calls for one order run one at a time in this process, so concurrent repeats wait and
//!   then answer the recorded result.
//! - When the provider's answer is lost (timeout, a 5xx other than 503, a reset connection, a
//!   crash), the row stays `pending` or `unavailable`. `Refund` settles it first with
//!   `GET /v1/charges?idempotency_key=<order id>` and refunds a capture found there, so a
//!   cancelled order never keeps a net charge. A refunded (or cancelled-before-capture) order
//!   is never charged again.
//!
//! # Failing fast during an outage
//! Each `Charge` tracks whether any of its attempts may have reached the provider's
//! processing. An attempt refused here (breaker open, bulkhead full), one that failed to
//! connect, and one answered 503 did not: the provider's contract is that a 503 means it
//! refused the call before doing anything. When no attempt of this call (nor of any earlier
//! one) may have reached it, the row becomes `failed` (nothing captured) and `Charge` answers
//! `unavailable`; a `Refund` of a `failed` order answers `none` at once without calling the
//! provider, and records the order as cancelled so a late `Charge` cannot capture. So while
//! the provider is down, orders fail and compensate at once. A repeated `Charge` of a
//! `failed` order tries again (the row is `pending` while it does). Any attempt that may have
//! reached the provider (a timeout, a 5xx other than 503, a 429, a reset connection, an
//! unreadable or unexpected answer) keeps the outcome unknown (`unavailable`), settled by
//! `Refund` as above.
//!
//! # Resilience
//! Every provider call goes through a [`trellis_resilience::Resilience`] stack: a 2 s timeout
//! per attempt, 3 attempts with jittered exponential backoff under a shared retry budget and an
//! overall 4 s deadline, a circuit breaker for the provider and a bulkhead
//! ([`ResilienceConfig`]). Transport errors, timeouts and 5xx/429 answers count as failures;
//! 402 and other 4xx answers are final. When the provider is down the breaker opens and
//! `Charge` answers `unavailable` at once, recording `failed` (the saga compensates, and the
//! refund answers `none` without waiting for the provider); after the open duration,
//! half-open trial calls close it again once the provider answers.
//!
//! # API
//! gRPC `trellis.shop.v1.Payments` (`Charge`, `Refund`, `GetPayment`), and REST (admin)
//! `GET /api/payments/{order_id}` and `/openapi.json`, on one router. In the choreographed
//! order saga ([`app_choreographed`]) the same charges and refunds run on bus events
//! ([`choreography`]).
//!
//! Metrics: `shop_payments_charges_total{outcome}` (`captured`, `declined`, `unavailable`)
//! and `shop_payments_refunds_total{outcome}` (`refunded`, `none`, `unavailable`).
//!
//! # Example
//! ```no_run
//! use shop_payments::{Config, app};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // The key the gateway and the other services of this shop share.
//! let service_key = trellis_service::auth::ServiceKey::from_env_or_file("trellis-data".as_ref())?;
//! let config = Config::new(
//!     "sqlite://trellis-data/payments.db",
//!     "http://127.0.0.1:8190",
//!     service_key,
//! );
//! let (router, db) = app(config).await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8105").await?;
//! trellis_service::serve(listener, router, Some(db), None, async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod choreography;
mod locks;
mod provider;
mod rest;
mod service;
mod store;

use std::time::Duration;

use axum::Router;
use shop_contracts::proto::payments_server::PaymentsServer;
use trellis_resilience::SharedClock;
use trellis_service::{Db, OpenError};
use utoipa::OpenApi;

pub use crate::rest::PaymentView;
pub use crate::service::{AMOUNT_CENTS_MAX, ID_BYTES_MAX};

/// Largest gRPC request accepted, in bytes.
pub const GRPC_MESSAGE_BYTES_MAX: usize = 64 * 1024;

/// What the payments service needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// `sqlite://PATH` or `postgres://…`.
    pub database_url: String,
    /// The payment provider's base URL, `http://host:port`.
    pub provider_url: String,
    /// How the provider is called.
    pub resilience: ResilienceConfig,
    /// The shop's key: the service believes only callers whose identity token it signed.
    pub service_key: trellis_service::auth::ServiceKey,
}

impl Config {
    /// A configuration with the default [`ResilienceConfig`].
    pub fn new(
        database_url: impl Into<String>,
        provider_url: impl Into<String>,
        service_key: trellis_service::auth::ServiceKey,
    ) -> Self {
        Self {
            database_url: database_url.into(),
            provider_url: provider_url.into(),
            resilience: ResilienceConfig::default(),
            service_key,
        }
    }
}

/// How the provider is called: timeout, retry, circuit breaker, bulkhead.
#[derive(Debug, Clone)]
pub struct ResilienceConfig {
    /// Limit of one attempt (default 2 s).
    pub call_timeout: Duration,
    /// Attempts per call, the first included (default 3, at most 100).
    pub attempts_max: u32,
    /// Backoff ceiling before the first retry, doubling per retry (default 50 ms).
    pub backoff_initial: Duration,
    /// Largest backoff (default 500 ms).
    pub backoff_max: Duration,
    /// Limit of a whole call, every attempt and wait included (default 4 s, under the 5 s a
    /// default trellis gRPC client waits).
    pub call_deadline: Duration,
    /// Retries allowed per call on average, shared by every call (default 0.2, with 10 banked).
    pub retry_budget_ratio: f64,
    /// The breaker judges the last this many attempts (default 20).
    pub breaker_window_calls: u32,
    /// Attempts the window must hold before the breaker may open (default 5).
    pub breaker_minimum_calls: u32,
    /// Failure rate at or above which the breaker opens (default 0.5).
    pub breaker_failure_rate: f64,
    /// How long the breaker stays open before trial calls (default 5 s).
    pub breaker_open: Duration,
    /// Trial calls in half-open; all must succeed to close (default 2).
    pub breaker_half_open_calls: u32,
    /// Provider calls in flight at once; as many more wait up to 500 ms (default 64).
    pub concurrent_calls_max: usize,
    /// The breaker's time source (tokio's clock by default; tests inject one).
    pub clock: SharedClock,
}

impl Default for ResilienceConfig {
    fn default() -> Self {
        Self {
            call_timeout: Duration::from_secs(2),
            attempts_max: 3,
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_millis(500),
            call_deadline: Duration::from_secs(4),
            retry_budget_ratio: 0.2,
            breaker_window_calls: 20,
            breaker_minimum_calls: 5,
            breaker_failure_rate: 0.5,
            breaker_open: Duration::from_secs(5),
            breaker_half_open_calls: 2,
            concurrent_calls_max: 64,
            clock: SharedClock::default(),
        }
    }
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database could not be opened or its schema applied; the message names the URL
    /// without its password.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// A setting is invalid.
    #[error("invalid payments configuration: {0}")]
    Config(String),
    /// The choreography participant could not start.
    #[error("the payments choreography could not start: {0}")]
    Choreography(#[from] trellis_service::choreography::ChoreographyError),
}

/// Opens the database, applies the schema, and returns the router (gRPC `Payments` and the
/// REST admin routes) and the database.
///
/// # Errors
/// [`Error::Open`] naming the URL when the database cannot be opened or its schema applied,
/// [`Error::Config`] for a bad provider URL or resilience setting.
pub async fn app(config: Config) -> Result<(Router, Db), Error> {
    let (router, db, _) = build(config).await?;
    Ok((router, db))
}

/// [`app`], taking part in the choreographed order saga on `bus` too (see [`choreography`])
/// until `stop` turns `true`; await the returned tasks after that. The charges it makes
/// share the gRPC service's per-order locks, breaker and retry budget.
///
/// # Errors
/// As [`app`]; [`Error::Choreography`] when the bus subscription or the inbox, outbox and log
/// tables cannot be set up.
pub async fn app_choreographed(
    config: Config,
    bus: trellis_service::choreography::AnyBus,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(Router, Db, Vec<tokio::task::JoinHandle<()>>), Error> {
    let (router, db, service) = build(config).await?;
    let participant = std::sync::Arc::new(choreography::PaymentsParticipant { service });
    let tasks = trellis_service::choreography::start(&db, bus, participant, stop).await?;
    Ok((router, db, tasks))
}

/// Describes the service's metrics to the installed recorder (docs/metrics.md).
fn describe_metrics() {
    metrics::describe_counter!(
        "shop_payments_charges_total",
        "Charges the payments service settled, by outcome (captured, declined, unavailable)"
    );
    metrics::describe_counter!(
        "shop_payments_refunds_total",
        "Refunds the payments service settled, by outcome"
    );
}

async fn build(config: Config) -> Result<(Router, Db, service::PaymentsService), Error> {
    describe_metrics();
    let provider = provider::ProviderClient::new(&config.provider_url, &config.resilience)?;
    let db = Db::open_with_schema(&config.database_url, store::SCHEMA).await?;
    let service = service::PaymentsService {
        db: db.clone(),
        provider,
        // Longer than any call: every attempt and wait of one is bounded by its deadline.
        locks: locks::OrderLocks::for_database(&db, config.resilience.call_deadline * 2),
    };
    let grpc =
        PaymentsServer::new(service.clone()).max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX);
    let router =
        rest::router(db.clone()).merge(tonic::service::Routes::new(grpc).into_axum_router());
    let router = trellis_service::auth::protect(router, &config.service_key);
    Ok((router, db, service))
}

#[derive(OpenApi)]
#[openapi(
    info(title = "payments", description = "The shop's payments (admin view)"),
    paths(rest::get_payment),
    components(schemas(PaymentView, shop_contracts::api::ErrorBody))
)]
struct ApiDoc;

/// The service's part of the public OpenAPI document (also served at `/openapi.json`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
