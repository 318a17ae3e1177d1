//! The HTTP API: `/v1/*` (what a payments service calls) and `/admin/config`.

use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use trellis_service::Caller;
use utoipa::ToSchema;

use crate::config::{ProviderConfig, ProviderConfigUpdate};
use crate::error::{ErrorBody, ProviderError, ProviderJson};
use crate::store::{Charge, ChargeStatus, Inserted, Refund, RefundRefusal};
use crate::{ProviderHandle, ProviderStats};

/// Longest idempotency key, in bytes.
pub const IDEMPOTENCY_KEY_MAX: usize = 255;
/// Largest amount one charge may ask for, in cents (beyond any card limit).
pub const AMOUNT_CENTS_MAX: i64 = 1_000_000_000_000;

/// `POST /v1/charges`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChargeRequest {
    /// 1 to 255 bytes; the same key always means the same charge.
    pub idempotency_key: String,
    /// 1 to 1,000,000,000,000.
    pub amount_cents: i64,
    /// ISO 4217 code, three upper-case letters; `USD` when absent.
    pub currency: Option<String>,
}

/// `POST /v1/refunds`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefundRequest {
    /// The charge to refund.
    pub charge_id: String,
    /// 1 to 255 bytes; the same key always means the same refund.
    pub idempotency_key: String,
}

/// `GET /v1/charges` query.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ChargeQuery {
    idempotency_key: Option<String>,
}

/// `GET /v1/charges?idempotency_key=K` answer: the charge made with that key, if any.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ChargeList {
    /// Zero or one charge.
    pub items: Vec<Charge>,
}

fn check_key(field: &str, key: &str) -> Result<(), ProviderError> {
    if key.is_empty() || key.len() > IDEMPOTENCY_KEY_MAX {
        return Err(ProviderError::bad_request(
            format!("invalid_{field}"),
            format!("{field} must be 1 to {IDEMPOTENCY_KEY_MAX} bytes"),
        ));
    }
    Ok(())
}

/// The run-time faults every `/v1` call goes through before it touches any state: latency,
/// then outage, then random failure.
async fn inject_faults(handle: &ProviderHandle) -> Result<ProviderConfig, ProviderError> {
    let config = handle.config();
    if config.latency_ms > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(config.latency_ms)).await;
    }
    if config.outage {
        handle
            .inner
            .failures_injected
            .fetch_add(1, Ordering::Relaxed);
        return Err(ProviderError::unavailable(
            "provider_outage",
            "the payment provider is down (simulated outage)",
        ));
    }
    if config.failure_rate > 0.0 && handle.roll(config.failure_rate) {
        handle
            .inner
            .failures_injected
            .fetch_add(1, Ordering::Relaxed);
        return Err(ProviderError::unavailable(
            "injected_failure",
            "the payment provider failed (simulated failure); nothing was done",
        ));
    }
    Ok(config)
}

fn declined(message: impl Into<String>) -> ProviderError {
    ProviderError::new(StatusCode::PAYMENT_REQUIRED, "card_declined", message)
}

/// Creates a charge, or answers the one made earlier with the same key.
#[utoipa::path(
    post,
    path = "/v1/charges",
    request_body = ChargeRequest,
    responses(
        (status = 201, description = "Captured now", body = Charge),
        (status = 200, description = "Captured earlier with this key", body = Charge),
        (status = 400, description = "Bad input", body = ErrorBody),
        (status = 402, description = "Declined (`card_declined`), now or earlier with this key", body = ErrorBody),
        (status = 422, description = "The key was used with another amount or currency", body = ErrorBody),
        (status = 500, description = "The outcome is unknown: the charge may have been captured (`injected_failure_after_capture`, or `ledger_failed` when the provider's ledger failed). Repeat with the same key or look it up with `GET /v1/charges?idempotency_key=`", body = ErrorBody),
        (status = 503, description = "Refused before anything was done (outage or injected failure): nothing was captured, and the key is still unused", body = ErrorBody),
    )
)]
pub(crate) async fn create_charge(
    State(handle): State<ProviderHandle>,
    ProviderJson(request): ProviderJson<ChargeRequest>,
) -> Result<Response, ProviderError> {
    let config = inject_faults(&handle).await?;
    check_key("idempotency_key", &request.idempotency_key)?;
    if !(1..=AMOUNT_CENTS_MAX).contains(&request.amount_cents) {
        return Err(ProviderError::bad_request(
            "invalid_amount_cents",
            format!("amount_cents must be between 1 and {AMOUNT_CENTS_MAX}"),
        ));
    }
    let currency = request.currency.unwrap_or_else(|| "USD".to_owned());
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(ProviderError::bad_request(
            "invalid_currency",
            "currency must be three upper-case letters (ISO 4217)",
        ));
    }
    let inner = &handle.inner;
    let decline = if request.amount_cents > config.card_limit_cents {
        Some(format!(
            "the amount exceeds the card limit of {} cents",
            config.card_limit_cents
        ))
    } else if config.decline_rate > 0.0 && handle.roll(config.decline_rate) {
        Some("the issuer declined the card (simulated)".to_owned())
    } else {
        None
    };
    let charge = Charge {
        id: format!("ch_{}", uuid::Uuid::now_v7().simple()),
        status: if decline.is_some() {
            ChargeStatus::Declined
        } else {
            ChargeStatus::Captured
        },
        amount_cents: request.amount_cents,
        currency,
        idempotency_key: request.idempotency_key,
        refund_id: None,
    };
    if let Inserted::Existing(existing) = inner.ledger.insert(&charge).await? {
        if existing.amount_cents != charge.amount_cents || existing.currency != charge.currency {
            return Err(ProviderError::unprocessable(
                "idempotency_key_reused",
                format!(
                    "idempotency_key was used for charge {} of {} {}",
                    existing.id, existing.amount_cents, existing.currency
                ),
            ));
        }
        if existing.status == ChargeStatus::Declined {
            return Err(declined(format!(
                "charge {} was declined earlier with this idempotency_key",
                existing.id
            )));
        }
        return Ok((StatusCode::OK, Json(existing)).into_response());
    }
    if let Some(reason) = decline {
        inner.declines.fetch_add(1, Ordering::Relaxed);
        return Err(declined(format!("charge {}: {reason}", charge.id)));
    }
    inner.captures.fetch_add(1, Ordering::Relaxed);
    if config.fail_after_capture_rate > 0.0 && handle.roll(config.fail_after_capture_rate) {
        inner.failures_injected.fetch_add(1, Ordering::Relaxed);
        // 500, not 503: a 503 promises that nothing was done, and this charge was captured.
        return Err(ProviderError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "injected_failure_after_capture",
            "the payment provider failed after capturing (simulated lost answer); \
             look the charge up by its idempotency_key",
        ));
    }
    Ok((StatusCode::CREATED, Json(charge)).into_response())
}

/// Refunds a captured charge, at most once.
#[utoipa::path(
    post,
    path = "/v1/refunds",
    request_body = RefundRequest,
    responses(
        (status = 201, description = "Refunded now", body = Refund),
        (status = 200, description = "Refunded earlier with this key", body = Refund),
        (status = 400, description = "Bad input", body = ErrorBody),
        (status = 404, description = "No such charge", body = ErrorBody),
        (status = 409, description = "Already refunded with another key (`charge_already_refunded`) or never captured (`charge_not_captured`)", body = ErrorBody),
        (status = 422, description = "The key was used for another charge", body = ErrorBody),
        (status = 500, description = "The provider's ledger failed (`ledger_failed`); the outcome is unknown: repeat with the same key", body = ErrorBody),
        (status = 503, description = "Refused before anything was done (outage or injected failure); safe to repeat", body = ErrorBody),
    )
)]
pub(crate) async fn create_refund(
    State(handle): State<ProviderHandle>,
    ProviderJson(request): ProviderJson<RefundRequest>,
) -> Result<Response, ProviderError> {
    inject_faults(&handle).await?;
    check_key("idempotency_key", &request.idempotency_key)?;
    check_key("charge_id", &request.charge_id)?;
    let inner = &handle.inner;
    let result = inner
        .ledger
        .refund(&request.charge_id, &request.idempotency_key, || {
            format!("re_{}", uuid::Uuid::now_v7().simple())
        })
        .await?;
    match result {
        Ok((refund, true)) => {
            inner.refunds.fetch_add(1, Ordering::Relaxed);
            Ok((StatusCode::CREATED, Json(refund)).into_response())
        }
        Ok((refund, false)) => Ok((StatusCode::OK, Json(refund)).into_response()),
        Err(RefundRefusal::UnknownCharge) => Err(ProviderError::not_found(format!(
            "no charge {}",
            request.charge_id
        ))),
        Err(RefundRefusal::NotCaptured) => Err(ProviderError::conflict(
            "charge_not_captured",
            format!(
                "charge {} was declined; there is nothing to refund",
                request.charge_id
            ),
        )),
        Err(RefundRefusal::AlreadyRefunded) => Err(ProviderError::conflict(
            "charge_already_refunded",
            format!(
                "charge {} was already refunded with another idempotency_key",
                request.charge_id
            ),
        )),
        Err(RefundRefusal::KeyReused { charge_id }) => Err(ProviderError::unprocessable(
            "idempotency_key_reused",
            format!("idempotency_key was used to refund charge {charge_id}"),
        )),
    }
}

/// Finds the charge made with an idempotency key (how a caller settles an unknown outcome).
#[utoipa::path(
    get,
    path = "/v1/charges",
    params(("idempotency_key" = String, Query, description = "The key the charge was made with")),
    responses(
        (status = 200, description = "The charge made with the key, if any", body = ChargeList),
        (status = 400, description = "Missing or bad key", body = ErrorBody),
        (status = 500, description = "The provider's ledger failed (`ledger_failed`); safe to repeat", body = ErrorBody),
        (status = 503, description = "Refused before anything was done (outage or injected failure); safe to repeat", body = ErrorBody),
    )
)]
pub(crate) async fn list_charges(
    State(handle): State<ProviderHandle>,
    query: Result<Query<ChargeQuery>, QueryRejection>,
) -> Result<Json<ChargeList>, ProviderError> {
    let Query(query) =
        query.map_err(|e| ProviderError::bad_request("invalid_query", e.body_text()))?;
    let Some(key) = query.idempotency_key else {
        return Err(ProviderError::bad_request(
            "missing_idempotency_key",
            "GET /v1/charges needs ?idempotency_key=",
        ));
    };
    inject_faults(&handle).await?;
    check_key("idempotency_key", &key)?;
    let found = handle.inner.ledger.by_key(&key).await?;
    Ok(Json(ChargeList {
        items: found.into_iter().collect(),
    }))
}

/// One charge by id.
#[utoipa::path(
    get,
    path = "/v1/charges/{id}",
    params(("id" = String, Path, description = "Charge id")),
    responses(
        (status = 200, description = "The charge", body = Charge),
        (status = 404, description = "No such charge", body = ErrorBody),
        (status = 500, description = "The provider's ledger failed (`ledger_failed`); safe to repeat", body = ErrorBody),
        (status = 503, description = "Refused before anything was done (outage or injected failure); safe to repeat", body = ErrorBody),
    )
)]
pub(crate) async fn get_charge(
    State(handle): State<ProviderHandle>,
    Path(id): Path<String>,
) -> Result<Json<Charge>, ProviderError> {
    inject_faults(&handle).await?;
    handle
        .inner
        .ledger
        .by_id(&id)
        .await?
        .map(Json)
        .ok_or_else(|| ProviderError::not_found(format!("no charge {id}")))
}

/// Counters since start. Not subject to injected faults, so it can be read during an outage.
#[utoipa::path(
    get,
    path = "/v1/stats",
    responses((status = 200, description = "Counters", body = ProviderStats))
)]
pub(crate) async fn stats(State(handle): State<ProviderHandle>) -> Json<ProviderStats> {
    Json(handle.stats())
}

/// The current run-time settings.
#[utoipa::path(
    get,
    path = "/admin/config",
    responses(
        (status = 200, description = "Settings", body = ProviderConfig),
        (status = 401, description = "No valid identity token", body = ErrorBody),
        (status = 403, description = "The caller is not an administrator", body = ErrorBody),
    )
)]
pub(crate) async fn get_config(
    caller: Caller,
    State(handle): State<ProviderHandle>,
) -> Result<Json<ProviderConfig>, ProviderError> {
    caller.require_admin().map_err(ProviderError::from)?;
    Ok(Json(handle.config()))
}

/// Changes some settings; absent fields keep their value.
#[utoipa::path(
    put,
    path = "/admin/config",
    request_body = ProviderConfigUpdate,
    responses(
        (status = 200, description = "The settings now in force", body = ProviderConfig),
        (status = 400, description = "A setting out of range (`invalid_<field>`) or an unknown field", body = ErrorBody),
        (status = 401, description = "No valid identity token", body = ErrorBody),
        (status = 403, description = "The caller is not an administrator", body = ErrorBody),
    )
)]
pub(crate) async fn put_config(
    caller: Caller,
    State(handle): State<ProviderHandle>,
    ProviderJson(update): ProviderJson<ProviderConfigUpdate>,
) -> Result<Json<ProviderConfig>, ProviderError> {
    caller.require_admin().map_err(ProviderError::from)?;
    handle
        .update_config(&update)
        .map(Json)
        .map_err(|e| ProviderError::bad_request(format!("invalid_{}", e.field), e.to_string()))
}
