//! The trellis service kit: what a service needs around its handlers, so the service's crate
//! holds only its domain.
//!
//! A service built on the kit opens its database from one URL and applies its schema, serves
//! REST and gRPC on one port with health, readiness and metrics, answers errors as JSON,
//! believes only callers that present a verified identity token, calls other services over
//! gRPC with its own identity and the current trace, and (feature `choreography`) takes part
//! in a choreographed saga. The reference shop's services (`shop/*`) are built this way; the
//! kit itself knows nothing of a shop.
//!
//! - [`Db`] opens `sqlite://PATH` (WAL, `synchronous = FULL`, busy timeout, `BEGIN IMMEDIATE`
//!   for writes) or `postgres://…` from one URL; [`Db::open_with_schema`] also applies the
//!   service's schema script and names the database in its [`OpenError`] with the password
//!   hidden ([`redact_url`]). Services write their SQL once, with `$1` placeholders and the
//!   subset both engines accept, and run it through [`on_db!`], which compiles the same body
//!   for each pool type. The alternatives were sqlx's `Any` driver (no uuid/json types) or a
//!   trait generic over `sqlx::Database` (bounds that drown the query code); the macro keeps
//!   queries plain (docs/decisions/0007-shop-services.md).
//! - [`serve`] runs an axum router (REST, and tonic services merged with
//!   [`tonic::service::Routes::into_axum_router`]) on one listener speaking HTTP/1.1 and h2c,
//!   adds `/healthz`, `/readyz` (which pings the database) and `/metrics`, continues the W3C
//!   trace context from each request, and drains on shutdown.
//! - [`ApiError`] is the error body every service answers with:
//!   `{"error":{"code":"snake_case","message":"…"}}`. [`ApiJson`] is axum's `Json` extractor
//!   whose rejections become such errors (400 `invalid_json`, 415, 413) instead of text.
//! - [`Caller`] is who called, as a verified identity token names it: [`auth::protect`] wraps
//!   a service's router so it believes only tokens signed with the deployment's
//!   [`auth::ServiceKey`] (whatever authenticated the user, usually the gateway, signs one
//!   for that user; a service signs one for itself). Identity headers such as `x-user-id` are
//!   never read, so a process that reaches a service's port directly gets 401, not admin.
//!   [`auth::admin_only`] guards operator surfaces (a DLQ router, a console) with the admin
//!   role.
//! - [`grpc_channel`] makes a lazily connecting tonic channel with connect and request
//!   timeouts, wrapped so every call sends the calling service's identity and the current
//!   `traceparent`; [`status_to_api_error`] turns a callee's status into this service's
//!   answer.
//! - `choreography` (feature `choreography`): `choreography::start` runs a service's part in
//!   a choreographed saga on its own database: the bus consumer, the inbox, the outbox relay
//!   and the choreography log, around a `choreography::Participant` the service implements.
//!
//! # Roles
//! A [`Caller`] carries a role string; the kit gives meaning to two and names a third:
//! [`ROLE_ADMIN`] passes [`Caller::require_admin`] and [`auth::admin_only`],
//! [`auth::ROLE_SERVICE`] is what a service's own identity carries and what gRPC calls need,
//! and [`ROLE_CUSTOMER`] is the conventional role of an end user with no special rights.
//! Any other role is passed through for the service's own checks.
//!
//! # How it fits
//! - `trellis-sqlite` opens SQLite files the way every trellis crate does; [`Db`] uses it.
//! - `trellis-telemetry` provides the trace-context layers [`serve`] and [`grpc_channel`] add
//!   and the Prometheus handle `/metrics` renders.
//! - `trellis-gateway` authenticates end users at the edge; the deployment's gateway hooks
//!   sign the identity token for each forwarded request with an [`auth::Signer`] (the shop
//!   does this in `shop-app`).
//! - `trellis-resilience` wraps what a service calls out to (the shop's payments service
//!   calls its provider through it); the kit's gRPC channels only set timeouts.
//! - `trellis-bus` and `trellis-saga` are used only by the `choreography` feature; services
//!   that take part in no choreographed saga do not compile them.
//!
//! # Feature flags
//! - `choreography` (off by default): the `choreography` module, the participant runner on
//!   trellis-bus's inbox and outbox and trellis-saga's choreography log.
//!
//! # Example
//! A protected endpoint on a database, served with health and readiness (a runnable version
//! is `examples/hello_service.rs`):
//! ```
//! use axum::{Router, routing::get};
//! use trellis_service::auth::{IDENTITY_HEADER, ServiceKey, protect};
//! use trellis_service::{ApiError, Caller, Db, on_db};
//!
//! const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS notes (id TEXT PRIMARY KEY, body TEXT NOT NULL)";
//!
//! async fn whoami(caller: Caller) -> Result<String, ApiError> {
//!     Ok(caller.user_id)
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let db = Db::open_with_schema(&format!("sqlite://{}/demo.db", dir.path().display()), SCHEMA)
//!     .await?;
//! on_db!(&db, |pool| {
//!     sqlx::query("INSERT INTO notes (id, body) VALUES ($1, $2)")
//!         .bind("n1")
//!         .bind("hello")
//!         .execute(pool)
//!         .await
//!         .map(|r| r.rows_affected())
//! })?;
//! // Only callers with a token signed by the deployment's key reach `whoami`.
//! let key = ServiceKey::generate()?;
//! let app: Router = protect(Router::new().route("/whoami", get(whoami)), &key);
//! let _token = key.signer("gateway").token("user-1", "customer")?; // sent in IDENTITY_HEADER
//! # let _ = IDENTITY_HEADER;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! // Serves until the shutdown future completes (here: at once).
//! trellis_service::serve(listener, app, Some(db), None, async {}).await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod auth;
#[cfg(feature = "choreography")]
#[cfg_attr(docsrs, doc(cfg(feature = "choreography")))]
pub mod choreography;
mod db;
mod grpc;
mod http_api;
mod server;

pub use db::{
    ACQUIRE_TIMEOUT, Db, DbError, OpenError, PG_POOL_MAX_ENV, POOL_CONNECTIONS_MAX,
    SQLITE_BUSY_TIMEOUT, SQLITE_CONNECTIONS_MAX, create_postgres_database, drop_postgres_database,
    is_transient, pg_pool_max, postgres_database_url, redact_url,
};
pub use grpc::{
    GrpcChannel, GrpcClientConfig, REPLICA_DOWN_FOR, Replicas, grpc_channel, status_to_api_error,
};
pub use http_api::{
    ApiError, ApiJson, Caller, ROLE_ADMIN, ROLE_CUSTOMER, USER_ID_HEADER, USER_ROLE_HEADER,
};
pub use server::{ServeError, serve};
