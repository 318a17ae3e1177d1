//! The reference shop's inventory service: how many units of each product exist and how many
//! are held for orders in progress.
//!
//! - gRPC `Inventory` (called by orders and products): `Reserve` holds every line of an order
//!   or none (not enough stock is the answer `reserved = false, reason = "out_of_stock"`, and
//!   is recorded, so a repeat answers the same); `Release` gives held stock back; `Commit`
//!   turns it into a sale; `SetStock` and `GetStock`. Every call is idempotent by order id.
//!   `Release` answers the state after the call: `released`, or unchanged `committed` or
//!   `rejected` (a refused reservation holds nothing). Releasing an unknown order records it
//!   as `released`, so a `Reserve` arriving after its `Release` (delayed, or retried by a
//!   saga that gave up) is refused and holds nothing. `Commit`
//!   answers `committed`, NOT_FOUND for an unknown order and FAILED_PRECONDITION for a
//!   released or refused one. `GetStock` (and the REST `GET`) shows zeros for a product
//!   never stocked.
//! - REST (admin, through the gateway): `GET` and `PUT /api/inventory/{product_id}`.
//! - In the choreographed order saga ([`app_choreographed`]), the same operations run on bus
//!   events instead of gRPC calls ([`choreography`]).
//!
//! Stock never goes negative and `reserved + available = total` always holds: the database
//! checks `0 <= reserved <= total`, and reservations change stock with guarded updates inside
//! write transactions (`BEGIN IMMEDIATE` on SQLite, row locks on PostgreSQL).
//!
//! The service follows the shape every shop service has (see `shop/README.md`): [`app`]
//! returns the router (REST, gRPC and `/openapi.json`) and the database for `/readyz`;
//! [`openapi`] is its part of the public API document.
//!
//! # Example
//! ```no_run
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // The key the gateway and the other services of this shop share.
//! let service_key = trellis_service::auth::ServiceKey::from_env_or_file("trellis-data".as_ref())?;
//! let config = shop_inventory::Config {
//!     database_url: "sqlite://trellis-data/inventory.db".into(),
//!     service_key,
//! };
//! let (router, db) = shop_inventory::app(config).await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8103").await?;
//! trellis_service::serve(listener, router, Some(db), None, std::future::pending()).await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod choreography;
mod grpc;
mod rest;
mod stock;

use axum::Router;
use trellis_service::{Db, OpenError};

pub use stock::{GET_STOCK_IDS_MAX, ID_BYTES_MAX};

/// Largest request body, bytes.
pub const BODY_BYTES_MAX: usize = 4 * 1024;

/// What the service needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// `sqlite://PATH` or `postgres://…`.
    pub database_url: String,
    /// The shop's key: the service believes only callers whose identity token it signed.
    pub service_key: trellis_service::auth::ServiceKey,
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database could not be opened or its schema applied; the message names the URL
    /// without its password.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// The choreography participant could not start.
    #[error("the inventory choreography could not start: {0}")]
    Choreography(#[from] trellis_service::choreography::ChoreographyError),
}

/// Opens the database, runs the schema, and returns the router to serve plus the database
/// (for `/readyz`).
///
/// # Errors
/// [`Error::Open`] naming the URL when the database cannot be opened or its schema applied.
pub async fn app(config: Config) -> Result<(Router, Db), Error> {
    describe_metrics();
    let db = Db::open_with_schema(&config.database_url, stock::SCHEMA).await?;
    let router = rest::router(db.clone()).merge(grpc::router(db.clone()));
    let router = trellis_service::auth::protect(router, &config.service_key);
    Ok((router, db))
}

/// [`app`], taking part in the choreographed order saga on `bus` too (see [`choreography`])
/// until `stop` turns `true`; await the returned tasks after that.
///
/// # Errors
/// As [`app`]; [`Error::Choreography`] when the bus subscription or the inbox, outbox and log
/// tables cannot be set up.
pub async fn app_choreographed(
    config: Config,
    bus: trellis_service::choreography::AnyBus,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(Router, Db, Vec<tokio::task::JoinHandle<()>>), Error> {
    let (router, db) = app(config).await?;
    let participant = std::sync::Arc::new(choreography::InventoryParticipant);
    let tasks = trellis_service::choreography::start(&db, bus, participant, stop).await?;
    Ok((router, db, tasks))
}

/// Describes the service's metrics to the installed recorder (docs/metrics.md).
fn describe_metrics() {
    metrics::describe_counter!(
        "shop_inventory_reservations_total",
        "Stock reservations the inventory service decided, by outcome (reserved, out_of_stock)"
    );
}

/// The service's part of the public OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    rest::openapi()
}
