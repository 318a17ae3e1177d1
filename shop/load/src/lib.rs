//! The workload generator behind `trellis load`: drives the reference shop through its public
//! API (through the gateway) at a constant arrival rate and reports how it held up.
//!
//! # What a run does
//!
//! 1. **Setup**: registers [`LoadConfig::users`] customers with emails unique to the run, logs
//!    each in, lists the catalogue (`GET /api/products`, following `next_cursor`, up to 1,000
//!    products) and keeps the products with `available > 0`; logs the admin in when
//!    credentials are given.
//! 2. **Drive**, in an *open* model like wrk2: arrival `i` is due at `start + i / rate` and is
//!    issued then, whether or not earlier requests have answered; its latency is measured from
//!    the due time, so a stall shows up as latency instead of silently lowering the rate (no
//!    coordinated omission). At most [`LoadConfig::max_in_flight`] requests are in flight: an
//!    arrival beyond that is counted as an `overloaded` error, never queued. Each arrival picks
//!    an operation by the [`Mix`]: browse (`GET /api/products?limit=20`, sometimes with a
//!    `cursor` or `q`), order (`POST /api/orders`, fresh `Idempotency-Key`, one in-stock
//!    product, quantity 1, a random customer), check (`GET /api/orders/{id}` of one of that
//!    customer's earlier orders at least 250 ms old, since the read model is eventually
//!    consistent; a browse when there is none yet).
//! 3. **Settle**: polls every placed order as its owner until it leaves `PENDING` or
//!    [`LoadConfig::settle_timeout`] passes.
//! 4. **Invariants** (DESIGN.md): every accepted order is terminal; with admin credentials
//!    also: a `CONFIRMED` order has a `captured` payment and a `created` shipment, a
//!    `CANCELLED` one neither a capture nor a live shipment, and every product ordered has
//!    `total, reserved, available >= 0`, `reserved + available == total`, and nothing
//!    reserved once every order is terminal.
//!
//! The [`Report`] has latency percentiles per operation (hdrhistogram), the achieved rate,
//! errors by kind (an HTTP status such as `429`, or `timeout`, `connect`, `transport`,
//! `overloaded`, `bad_response`), orders by outcome and the invariant violations.
//!
//! Only plain `http://` targets are supported: the HTTP client is built without TLS, as the
//! gateway it drives listens on loopback or a private network.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//!
//! # async fn example() -> Result<(), shop_load::LoadError> {
//! let mut config = shop_load::LoadConfig::new("http://127.0.0.1:8080", 200.0, Duration::from_secs(30))
//!     .with_admin("admin@example.com", "admin-password");
//! config.mix = "20/60/20".parse()?;
//! config.progress = true;
//! let report = shop_load::run(config).await?;
//! println!("{}", report.render());
//! std::process::exit(if report.ok() { 0 } else { 1 });
//! # }
//! ```
#![forbid(unsafe_code)]

mod client;
mod config;
mod driver;
mod invariants;
mod report;
mod setup;
mod stats;

pub use config::{
    ARRIVALS_MAX, DURATION_MAX, IN_FLIGHT_DEFAULT, IN_FLIGHT_MAX, LoadConfig, Mix, Op, RATE_MAX,
    REQUEST_TIMEOUT_DEFAULT, REQUEST_TIMEOUT_MAX, SETTLE_TIMEOUT_DEFAULT, SETTLE_TIMEOUT_MAX,
    USERS_DEFAULT, USERS_MAX, parse_duration,
};
pub use report::{
    Invariants, Latency, OpReport, OrderOutcomes, Report, VIOLATIONS_LISTED_MAX, Violation,
};

/// Why a run could not produce a report.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A [`LoadConfig`] field is out of range (the caller must fix it).
    #[error("invalid load config: {0}")]
    Config(String),
    /// Setup failed: the shop could not be reached, refused a registration or login, or has
    /// nothing in stock to order.
    #[error("load setup failed at {step}: {message}")]
    Setup {
        /// The step: `admin login`, `register`, `products`, `http client`.
        step: &'static str,
        /// What went wrong.
        message: String,
    },
}

impl LoadError {
    fn setup(step: &'static str, message: impl Into<String>) -> Self {
        LoadError::Setup {
            step,
            message: message.into(),
        }
    }
}

/// Runs a load test against `config.target` and reports what happened.
///
/// Errors during the run are counted in the [`Report`], not returned.
///
/// # Errors
/// [`LoadError::Config`] for a bad config, [`LoadError::Setup`] when the customers cannot be
/// registered or logged in, the admin cannot log in, the catalogue cannot be listed, or no
/// product is in stock while the mix places orders.
pub async fn run(config: LoadConfig) -> Result<Report, LoadError> {
    driver::run(config).await
}
