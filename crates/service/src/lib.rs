//! What every trellis service needs around its handlers, so a service crate holds only its
//! domain: a database chosen by URL, one listener for REST and gRPC, JSON errors, the caller's
//! identity as the gateway forwards it, and gRPC clients that carry the trace.
//!
//! - [`Db`] opens `sqlite://path` (WAL, `synchronous = FULL`, busy timeout, `BEGIN IMMEDIATE`
//!   for writes) or `postgres://…` from one URL. Services write their SQL once, with `$1`
//!   placeholders and the subset both engines accept, and run it through [`on_db!`], which
//!   compiles the same body for each pool type. The alternatives were sqlx's `Any` driver
//!   (no uuid/json types, see DEPENDENCIES.md) or a trait generic over `sqlx::Database`
//!   (bounds that drown the query code); the macro keeps queries plain.
//! - [`ApiError`] is the error body every service answers with:
//!   `{"error":{"code":"snake_case","message":"…"}}`. [`ApiJson`] is axum's `Json` extractor
//!   whose rejections become such errors (400 `invalid_json`, 415, 413) instead of text.
//! - [`Caller`] is who called, as a verified identity token names it: [`auth::protect`] wraps
//!   a service's router so it believes only tokens signed with the shop's [`auth::ServiceKey`]
//!   (the gateway signs one for the user it authenticated, a service one for itself);
//!   identity headers such as `x-user-id` are never read, so a process that reaches a
//!   service's port directly gets 401, not admin. [`auth::admin_only`] guards operator
//!   surfaces (the DLQ endpoints) with the admin role.
//! - [`serve`] runs an axum router (REST, and tonic services merged with
//!   [`tonic::service::Routes::into_axum_router`]) on one listener speaking HTTP/1.1 and h2c,
//!   adds `/healthz`, `/readyz` (which pings the database) and `/metrics`, continues the W3C
//!   trace context from each request, and drains on shutdown.
//! - [`grpc_channel`] makes a lazily connecting tonic channel with connect and request
//!   timeouts, wrapped so every call sends the calling service's identity and the current
//!   `traceparent`.
//! - [`choreography::start`] runs a service's part in a choreographed saga on its own
//!   database: the bus consumer, the inbox, the outbox relay and the choreography log.
//!
//! # Example
//! ```
//! use axum::{Router, routing::get};
//! use trellis_service::auth::{IDENTITY_HEADER, ServiceKey, protect};
//! use trellis_service::{ApiError, Caller, Db, on_db};
//!
//! async fn whoami(caller: Caller) -> Result<String, ApiError> {
//!     Ok(caller.user_id)
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let db = Db::connect(&format!("sqlite://{}/demo.db", dir.path().display())).await?;
//! db.run_schema("CREATE TABLE IF NOT EXISTS notes (id TEXT PRIMARY KEY, body TEXT NOT NULL)")
//!     .await?;
//! on_db!(&db, |pool| {
//!     sqlx::query("INSERT INTO notes (id, body) VALUES ($1, $2)")
//!         .bind("n1")
//!         .bind("hello")
//!         .execute(pool)
//!         .await
//!         .map(|r| r.rows_affected())
//! })?;
//! // Only callers with a token signed by the shop's key reach `whoami`.
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

pub mod auth;
pub mod choreography;
mod db;
mod grpc;
mod http_api;
mod server;

pub use db::{
    ACQUIRE_TIMEOUT, Db, DbError, POOL_CONNECTIONS_MAX, SQLITE_BUSY_TIMEOUT, SQLITE_CONNECTIONS_MAX,
};
pub use grpc::{GrpcChannel, GrpcClientConfig, grpc_channel, status_to_api_error};
pub use http_api::{
    ApiError, ApiJson, Caller, ROLE_ADMIN, ROLE_CUSTOMER, USER_ID_HEADER, USER_ROLE_HEADER,
};
pub use server::{ServeError, serve};
