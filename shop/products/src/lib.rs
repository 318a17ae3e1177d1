//! The reference shop's product catalogue.
//!
//! - `GET /api/products?limit=&cursor=&q=` lists products in creation order (ids are
//!   UUIDv7), a page at a time behind an opaque cursor, optionally filtered by a
//!   case-insensitive substring of the name; each item's `available` comes from the
//!   inventory service in one `GetStock` call per page.
//! - `GET /api/products/{id}` shows one product.
//! - `POST /api/products` (admin) creates a product and sets its initial stock through the
//!   inventory service's `SetStock`. With an `Idempotency-Key` header a retry of the same
//!   body answers the same product (finishing the stock update if the first try could not),
//!   and a different body under a used key is refused (422 `idempotency_key_reused`).
//!   Without a key, a creation whose stock update fails (503) leaves the product listed with
//!   nothing available; send a key to make the call safe to retry.
//! - gRPC `Products.PriceItems` prices an order's products for the orders service.
//!
//! The service follows the shape every shop service has (see `shop/README.md`): [`app`]
//! returns the router (REST, gRPC and `/openapi.json`) and the database for `/readyz`;
//! [`openapi`] is its part of the public API document.
//!
//! # Example
//! ```no_run
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = shop_products::Config {
//!     database_url: "sqlite://trellis-data/products.db".into(),
//!     inventory_addr: "127.0.0.1:8103".into(),
//!     service_key: trellis_service::auth::ServiceKey::from_env_or_file("trellis-data".as_ref())?,
//! };
//! let (router, db) = shop_products::app(config).await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8102").await?;
//! trellis_service::serve(listener, router, Some(db), None, std::future::pending()).await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod catalogue;
mod grpc;
mod rest;

use axum::Router;
use shop_contracts::proto::inventory_client::InventoryClient;
use trellis_service::{Db, GrpcChannel, GrpcClientConfig, OpenError, grpc_channel};

/// Largest request body, bytes.
pub const BODY_BYTES_MAX: usize = 16 * 1024;
/// Longest `Idempotency-Key`, bytes.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 128;
/// Longest search string `q`, characters.
pub const QUERY_CHARS_MAX: usize = 200;
/// Most products one `PriceItems` call may ask about.
pub const PRICE_ITEMS_IDS_MAX: usize = 1_000;

/// What the service needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// `sqlite://PATH` or `postgres://…`.
    pub database_url: String,
    /// The inventory service's gRPC address (`host:port` or `http://host:port`).
    pub inventory_addr: String,
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
    /// The inventory address is not a gRPC address.
    #[error("inventory_addr {addr:?}: {message}")]
    InventoryAddr {
        /// The address given.
        addr: String,
        /// Why it is refused.
        message: String,
    },
}

/// Shared state of the handlers.
#[derive(Debug, Clone)]
pub(crate) struct State {
    pub(crate) db: Db,
    pub(crate) inventory: InventoryClient<GrpcChannel>,
}

/// Opens the database, runs the schema, prepares the (lazily connecting) inventory client,
/// and returns the router to serve plus the database (for `/readyz`).
///
/// # Errors
/// [`Error::Open`] naming the URL when the database cannot be opened or its schema applied;
/// [`Error::InventoryAddr`].
pub async fn app(config: Config) -> Result<(Router, Db), Error> {
    metrics::describe_counter!(
        "shop_products_created_total",
        "Products an administrator created"
    );
    let channel = grpc_channel(
        &config.inventory_addr,
        GrpcClientConfig::default(),
        config.service_key.service_identity("products"),
    )
    .map_err(|e| Error::InventoryAddr {
        addr: config.inventory_addr.clone(),
        message: e.message,
    })?;
    let db = Db::open_with_schema(&config.database_url, catalogue::SCHEMA).await?;
    let state = State {
        db: db.clone(),
        inventory: InventoryClient::new(channel),
    };
    let router = rest::router(state.clone()).merge(grpc::router(state));
    let router = trellis_service::auth::protect(router, &config.service_key);
    Ok((router, db))
}

/// The service's part of the public OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    rest::openapi()
}
