//! The reference shop's shipping service: the last step of the order saga creates an order's
//! shipment, and compensation cancels it.
//!
//! - gRPC `trellis.shop.v1.Shipping`: `CreateShipment` is idempotent by order id (a repeat
//!   answers the same shipment; a cancelled shipment stays cancelled and the answer says
//!   `cancelled`), `CancelShipment` is idempotent (no shipment: status `none`), `GetShipment`.
//! - REST (admin): `GET /api/shipments/{order_id}` → `{id, order_id, status, …}`, 404 when
//!   none; `/openapi.json`.
//! - A cancellation that arrives before its shipment (a compensation overtaking a slow
//!   create) is recorded, so the late `CreateShipment` answers `cancelled` instead of
//!   shipping a cancelled order. Until then the order has no shipment: `GetShipment` and
//!   `CancelShipment` answer `none` and the REST route 404.
//! - Table `shipments(order_id PK, id, user_id, lines JSON, status created|cancelled,
//!   created_at, updated_at)` on SQLite or PostgreSQL.
//! - Metrics: `shop_shipping_shipments_total{outcome}` (`created`, `cancelled`).
//! - In the choreographed order saga ([`app_choreographed`]), `order.shipping_started` on the
//!   bus creates the shipment ([`choreography`]).
//!
//! # Example
//! ```no_run
//! use shop_shipping::{Config, app};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // The key the gateway and the other services of this shop share.
//! let service_key = trellis_service::auth::ServiceKey::from_env_or_file("trellis-data".as_ref())?;
//! let (router, db) = app(Config {
//!     database_url: "sqlite://trellis-data/shipping.db".into(),
//!     service_key,
//! })
//! .await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8106").await?;
//! trellis_service::serve(listener, router, Some(db), None, async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod choreography;
mod rest;
mod service;
mod store;

use axum::Router;
use shop_contracts::proto::shipping_server::ShippingServer;
use trellis_service::{Db, OpenError};
use utoipa::OpenApi;

pub use crate::rest::ShipmentView;
pub use crate::service::ID_BYTES_MAX;

/// Largest gRPC request accepted, in bytes.
pub const GRPC_MESSAGE_BYTES_MAX: usize = 64 * 1024;

/// What the shipping service needs to run.
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
    #[error("the shipping choreography could not start: {0}")]
    Choreography(#[from] trellis_service::choreography::ChoreographyError),
}

/// Opens the database, applies the schema, and returns the router (gRPC `Shipping` and the
/// REST admin routes) and the database.
///
/// # Errors
/// [`Error::Open`] naming the URL when the database cannot be opened or its schema applied.
pub async fn app(config: Config) -> Result<(Router, Db), Error> {
    describe_metrics();
    let db = Db::open_with_schema(&config.database_url, store::SCHEMA).await?;
    let grpc = ShippingServer::new(service::ShippingService { db: db.clone() })
        .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX);
    let router =
        rest::router(db.clone()).merge(tonic::service::Routes::new(grpc).into_axum_router());
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
    let participant = std::sync::Arc::new(choreography::ShippingParticipant);
    let tasks = trellis_service::choreography::start(&db, bus, participant, stop).await?;
    Ok((router, db, tasks))
}

/// Describes the service's metrics to the installed recorder (docs/metrics.md).
fn describe_metrics() {
    metrics::describe_counter!(
        "shop_shipping_shipments_total",
        "Shipments the shipping service created or cancelled, by outcome"
    );
}

#[derive(OpenApi)]
#[openapi(
    info(title = "shipping", description = "The shop's shipments (admin view)"),
    paths(rest::get_shipment),
    components(schemas(ShipmentView, shop_contracts::api::ErrorBody))
)]
struct ApiDoc;

/// The service's part of the public OpenAPI document (also served at `/openapi.json`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
