//! A simulated external card processor for the reference shop: the payments service charges
//! and refunds through it, and tests, `trellis chaos` and operators inject latency, failures,
//! outages and lost answers into it at run time.
//!
//! # API
//! - `POST /v1/charges` `{idempotency_key, amount_cents, currency?}`: 201 a captured charge;
//!   the same key again answers the same charge (200) and never captures twice; the same key
//!   with another amount is 422 `idempotency_key_reused`. A charge above `card_limit_cents`,
//!   or with probability `decline_rate`, is declined: 402 `card_declined` (and the key stays
//!   declined).
//! - `POST /v1/refunds` `{charge_id, idempotency_key}`: 201 a refund; idempotent by key; a
//!   charge is refunded at most once (409 `charge_already_refunded` for another key); 404 for
//!   an unknown charge.
//! - `GET /v1/charges?idempotency_key=K` (`{"items":[…]}`), `GET /v1/charges/{id}`,
//!   `GET /v1/stats` (`{captures, refunds, declines, failures_injected, charges_kept}`).
//! - `GET /admin/config`, `PUT /admin/config` (a partial [`ProviderConfigUpdate`], validated:
//!   400 `invalid_<field>`), and `/openapi.json`.
//!
//! # Faults
//! Every `/v1` call except `/v1/stats` first waits `latency_ms`, then answers 503 when
//! `outage` is on, or with probability `failure_rate`, before it reads or changes any state.
//! The one fault injected after a state change is `fail_after_capture_rate`: a new charge is
//! captured and then answered with 500, as when the answer is lost on the way back, so callers
//! must settle the outcome (`GET /v1/charges?idempotency_key=`) or retry with the same key.
//! The settings change at run time through `PUT /admin/config` or [`ProviderHandle`].
//!
//! # The failure contract
//! What a caller may conclude from an answer that is not a success:
//! - **503**: the provider refused the call before doing anything (an outage, or an injected
//!   `failure_rate` failure). Nothing was captured or refunded, and the idempotency key is
//!   still unused. A caller whose every attempt got a 503 (or never connected) knows for
//!   certain that nothing happened.
//! - **500 or any other 5xx**, a timeout, a reset connection or an unreadable answer: the
//!   outcome is unknown. The call may have been carried out; repeat it with the same key, or
//!   look the charge up with `GET /v1/charges?idempotency_key=`.
//! - **4xx**: a final answer; the call did what the error says (402: declined, and the key
//!   stays declined; 409/422: refused; 400/404: bad input or unknown id).
//!
//! The admin routes answer only an administrator: a request whose identity token (signed with
//! the shop's [`ServiceKey`], see [`trellis_service::auth`])
//! names the admin role; 401 without one, 403 for anyone else. The shop's gateway exposes them
//! as `/api/admin/provider` to administrators and signs that token. The `/v1` routes stand in
//! for a vendor's public API and check no identity.
//!
//! # The ledger
//! Charges and refunds live in a [`Ledger`]: a SQLite file (`payment-provider.db` in the shop's
//! data directory), so the simulator's memory stays flat however many orders it serves, and
//! its charges outlive a restart; [`Ledger::in_memory`] for tests. At most the ledger's
//! capacity ([`CHARGES_KEPT_MAX`], 1,000,000, for the shop) charges are kept, with their
//! refunds; past that the oldest charge is deleted, after which its idempotency key is unknown
//! (a repeat would charge again) and its id answers 404. Keep the window far longer than any
//! caller retries. A failure of the ledger itself answers 500 `ledger_failed` (outcome
//! unknown).
//!
//! # Example
//! ```
//! use shop_payment_provider::{CHARGES_KEPT_MAX, Ledger, ProviderConfig, app};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let key = trellis_service::auth::ServiceKey::generate()?;
//! let ledger = Ledger::in_memory(CHARGES_KEPT_MAX).await?;
//! let (router, handle) = app(ProviderConfig::default(), ledger, &key);
//! // Chaos: the next calls fail as during an outage.
//! handle.set_config(ProviderConfig { outage: true, ..handle.config() })?;
//! assert!(handle.config().outage);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! trellis_service::serve(listener, router, None, None, async {}).await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod config;
mod error;
mod routes;
mod store;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use trellis_service::auth::ServiceKey;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};

pub use crate::config::{
    CARD_LIMIT_CENTS_DEFAULT, ConfigError, LATENCY_MS_MAX, ProviderConfig, ProviderConfigUpdate,
};
pub use crate::error::{ErrorBody, ErrorDetail};
pub use crate::routes::{
    AMOUNT_CENTS_MAX, ChargeList, ChargeRequest, IDEMPOTENCY_KEY_MAX, RefundRequest,
};
pub use crate::store::{Charge, ChargeStatus, Ledger, LedgerError, Refund};

/// Most charges the shop's ledger keeps; the oldest is deleted past it (a few hundred bytes
/// each on disk).
pub const CHARGES_KEPT_MAX: usize = 1_000_000;
/// Largest request body, in bytes.
pub const BODY_BYTES_MAX: usize = 16 * 1024;

/// Counters since the simulator started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ProviderStats {
    /// Charges captured (repeats of a key not counted).
    pub captures: u64,
    /// Charges refunded (repeats of a key not counted).
    pub refunds: u64,
    /// Charges declined (repeats of a key not counted).
    pub declines: u64,
    /// Calls answered with an injected fault: 503 (outage, failure rate) or 500 (failure after
    /// capture).
    pub failures_injected: u64,
    /// Charges in the ledger now.
    pub charges_kept: u64,
}

#[derive(Debug)]
struct Inner {
    config: RwLock<ProviderConfig>,
    ledger: Ledger,
    rng: Mutex<fastrand::Rng>,
    captures: AtomicU64,
    refunds: AtomicU64,
    declines: AtomicU64,
    failures_injected: AtomicU64,
}

/// Controls a running simulator: its settings and counters. Cheap to clone; clones share the
/// simulator.
#[derive(Debug, Clone)]
pub struct ProviderHandle {
    inner: Arc<Inner>,
}

impl ProviderHandle {
    /// The settings in force.
    pub fn config(&self) -> ProviderConfig {
        self.inner
            .config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces every setting; calls arriving afterwards see the new ones.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the first setting out of range; nothing changes then.
    pub fn set_config(&self, config: ProviderConfig) -> Result<(), ConfigError> {
        config.validate()?;
        *self.inner.config.write().unwrap_or_else(|p| p.into_inner()) = config;
        Ok(())
    }

    /// Changes the given settings and answers the settings now in force.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the first setting out of range; nothing changes then.
    pub fn update_config(
        &self,
        update: &ProviderConfigUpdate,
    ) -> Result<ProviderConfig, ConfigError> {
        let mut config = self.inner.config.write().unwrap_or_else(|p| p.into_inner());
        let next = config.updated(update)?;
        *config = next.clone();
        Ok(next)
    }

    /// The counters.
    pub fn stats(&self) -> ProviderStats {
        let inner = &self.inner;
        ProviderStats {
            captures: inner.captures.load(Ordering::Relaxed),
            refunds: inner.refunds.load(Ordering::Relaxed),
            declines: inner.declines.load(Ordering::Relaxed),
            failures_injected: inner.failures_injected.load(Ordering::Relaxed),
            charges_kept: inner.ledger.len(),
        }
    }

    /// True with probability `p`.
    fn roll(&self, p: f64) -> bool {
        self.inner
            .rng
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .f64()
            < p
    }
}

/// The simulator's router (`/v1/*`, `/admin/config`, `/openapi.json`) over `ledger`, and a
/// handle to control it.
///
/// A setting out of range is brought into range ([`ProviderConfig::clamped`]) with a warning
/// in the log; check user input with [`ProviderConfig::validate`] first to refuse it instead.
pub fn app(
    config: ProviderConfig,
    ledger: Ledger,
    service_key: &ServiceKey,
) -> (Router, ProviderHandle) {
    let config = match config.validate() {
        Ok(()) => config,
        Err(e) => {
            tracing::warn!(error = %e, "payment provider setting out of range; clamped");
            config.clamped()
        }
    };
    let handle = ProviderHandle {
        inner: Arc::new(Inner {
            config: RwLock::new(config),
            ledger,
            rng: Mutex::new(fastrand::Rng::new()),
            captures: AtomicU64::new(0),
            refunds: AtomicU64::new(0),
            declines: AtomicU64::new(0),
            failures_injected: AtomicU64::new(0),
        }),
    };
    let router = Router::new()
        .route(
            "/v1/charges",
            post(routes::create_charge).get(routes::list_charges),
        )
        .route("/v1/charges/{id}", get(routes::get_charge))
        .route("/v1/refunds", post(routes::create_refund))
        .route("/v1/stats", get(routes::stats))
        .route(
            "/admin/config",
            get(routes::get_config).put(routes::put_config),
        )
        .route("/openapi.json", get(|| async { axum::Json(openapi()) }))
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(handle.clone());
    (trellis_service::auth::protect(router, service_key), handle)
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "payment provider simulator",
        description = "A simulated card processor with run-time fault injection. A 503 answer means the call was refused before anything was done (nothing captured or refunded, the key still unused); a 500 or other 5xx, a timeout or a lost connection leaves the outcome unknown: repeat with the same idempotency key or look the charge up with `GET /v1/charges?idempotency_key=`."
    ),
    paths(
        routes::create_charge,
        routes::list_charges,
        routes::get_charge,
        routes::create_refund,
        routes::stats,
        routes::get_config,
        routes::put_config
    ),
    components(schemas(
        ChargeRequest,
        Charge,
        ChargeStatus,
        ChargeList,
        RefundRequest,
        Refund,
        ProviderStats,
        ProviderConfig,
        ProviderConfigUpdate,
        ErrorBody,
        ErrorDetail
    ))
)]
struct ApiDoc;

/// The simulator's OpenAPI document (also served at `/openapi.json`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
