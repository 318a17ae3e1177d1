//! A stand-in for the external payment provider, with the contract payments relies on
//! (`POST /v1/charges`, `GET /v1/charges?idempotency_key=`, `POST /v1/refunds`, as the
//! simulator in `shop/payment-provider` serves it) and faults drawn from the run's RNG.
//!
//! It is the ledger the invariants read: how many captures and refunds each order's key got.
//! The provider is an outside system, so it is simulated, not the shop's code under test.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::Notify;

use crate::rng::{self, SharedRng};
use crate::trace::Trace;

/// Fault rates of the provider, per call.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ProviderFaults {
    /// 503 before doing anything.
    pub(crate) refuse: f64,
    /// 500 after capturing (a lost answer).
    pub(crate) fail_after_capture: f64,
    /// Share of new charges declined.
    pub(crate) decline: f64,
    /// The payments process dies right after the provider captured, before it records the
    /// capture (its handler dropped at that await).
    pub(crate) kill_payments: f64,
}

/// One charge at the provider.
#[derive(Debug, Clone)]
pub(crate) struct Charge {
    pub(crate) id: String,
    pub(crate) amount_cents: i64,
    /// `captured`, `declined` or `refunded`.
    pub(crate) status: String,
}

/// What the provider holds: the invariants' ledger.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    /// Charges by idempotency key (the order id). With idempotency off a key may hold several.
    pub(crate) charges: BTreeMap<String, Vec<Charge>>,
    /// Refunds by charge id, each an effect applied.
    pub(crate) refunds: BTreeMap<String, u32>,
    next_id: u64,
}

/// The provider's state and knobs, shared with the participants' host.
#[derive(Debug, Clone)]
pub(crate) struct Provider {
    pub(crate) ledger: Arc<Mutex<Ledger>>,
    pub(crate) faults: Arc<Mutex<ProviderFaults>>,
    /// Dedupe charges by idempotency key (a real provider's promise; off only to prove the
    /// simulation notices double captures).
    pub(crate) idempotent: bool,
    pub(crate) rng: SharedRng,
    pub(crate) trace: Trace,
    /// Signalled to crash the payments process in the middle of its call.
    pub(crate) kill_payments: Arc<Notify>,
}

impl Provider {
    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn faults(&self) -> ProviderFaults {
        *self.faults.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn error(status: StatusCode, code: &str) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": code}})),
    )
        .into_response()
}

fn charge_json(charge: &Charge) -> serde_json::Value {
    json!({"id": charge.id, "status": charge.status, "amount_cents": charge.amount_cents})
}

#[derive(Debug, Deserialize)]
struct ChargeRequest {
    idempotency_key: String,
    amount_cents: i64,
}

#[derive(Debug, Deserialize)]
struct RefundRequest {
    charge_id: String,
}

#[derive(Debug, Deserialize)]
struct KeyQuery {
    idempotency_key: String,
}

async fn create_charge(
    State(provider): State<Provider>,
    Json(request): Json<ChargeRequest>,
) -> Response {
    let faults = provider.faults();
    let key = request.idempotency_key;
    if rng::with(&provider.rng, |r| r.chance(faults.refuse)) {
        provider.trace.log(format!("provider charge {key}: 503"));
        return error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    }
    let mut ledger = provider.ledger();
    if provider.idempotent
        && let Some(existing) = ledger.charges.get(&key).and_then(|c| c.first()).cloned()
    {
        drop(ledger);
        provider.trace.log(format!(
            "provider charge {key}: repeat, {}",
            existing.status
        ));
        if existing.status == "declined" {
            return error(StatusCode::PAYMENT_REQUIRED, "card_declined");
        }
        return (StatusCode::OK, Json(charge_json(&existing))).into_response();
    }
    let declined = rng::with(&provider.rng, |r| r.chance(faults.decline));
    ledger.next_id += 1;
    let charge = Charge {
        id: format!("ch_{}", ledger.next_id),
        amount_cents: request.amount_cents,
        status: if declined { "declined" } else { "captured" }.to_owned(),
    };
    ledger
        .charges
        .entry(key.clone())
        .or_default()
        .push(charge.clone());
    drop(ledger);
    if declined {
        provider
            .trace
            .log(format!("provider charge {key}: declined"));
        return error(StatusCode::PAYMENT_REQUIRED, "card_declined");
    }
    let (kill, lost) = rng::with(&provider.rng, |r| {
        (
            r.chance(faults.kill_payments),
            r.chance(faults.fail_after_capture),
        )
    });
    if kill {
        provider.trace.log(format!(
            "provider charge {key}: captured; payments crashes before recording it"
        ));
        provider.kill_payments.notify_one();
    } else if lost {
        provider.trace.log(format!(
            "provider charge {key}: captured, answer 500 (lost)"
        ));
        return error(StatusCode::INTERNAL_SERVER_ERROR, "failure_after_capture");
    } else {
        provider
            .trace
            .log(format!("provider charge {key}: captured"));
    }
    (StatusCode::CREATED, Json(charge_json(&charge))).into_response()
}

async fn list_charges(State(provider): State<Provider>, Query(query): Query<KeyQuery>) -> Response {
    let faults = provider.faults();
    let key = query.idempotency_key;
    if rng::with(&provider.rng, |r| r.chance(faults.refuse)) {
        provider.trace.log(format!("provider find {key}: 503"));
        return error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    }
    let items: Vec<serde_json::Value> = provider
        .ledger()
        .charges
        .get(&key)
        .map(|charges| charges.iter().take(1).map(charge_json).collect())
        .unwrap_or_default();
    provider
        .trace
        .log(format!("provider find {key}: {} found", items.len()));
    Json(json!({ "items": items })).into_response()
}

async fn create_refund(
    State(provider): State<Provider>,
    Json(request): Json<RefundRequest>,
) -> Response {
    let faults = provider.faults();
    let id = request.charge_id;
    if rng::with(&provider.rng, |r| r.chance(faults.refuse)) {
        provider.trace.log(format!("provider refund {id}: 503"));
        return error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    }
    let mut ledger = provider.ledger();
    let Some(charge) = ledger
        .charges
        .values_mut()
        .flatten()
        .find(|charge| charge.id == id)
    else {
        return error(StatusCode::NOT_FOUND, "not_found");
    };
    match charge.status.as_str() {
        "declined" => error(StatusCode::CONFLICT, "charge_not_captured"),
        "refunded" => {
            provider.trace.log(format!("provider refund {id}: repeat"));
            (StatusCode::OK, Json(json!({"id": format!("re_{id}")}))).into_response()
        }
        _ => {
            charge.status = "refunded".to_owned();
            *ledger.refunds.entry(id.clone()).or_default() += 1;
            drop(ledger);
            provider
                .trace
                .log(format!("provider refund {id}: refunded"));
            (StatusCode::CREATED, Json(json!({"id": format!("re_{id}")}))).into_response()
        }
    }
}

/// The provider's HTTP API.
pub(crate) fn router(provider: Provider) -> Router {
    Router::new()
        .route("/v1/charges", post(create_charge).get(list_charges))
        .route("/v1/refunds", post(create_refund))
        .with_state(provider)
}
