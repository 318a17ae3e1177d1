//! REST (admin): `GET /api/payments/{order_id}`, `/openapi.json`.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use shop_contracts::api::ErrorBody;
use trellis_service::{ApiError, Caller, Db};
use utoipa::ToSchema;

use crate::service::ID_BYTES_MAX;
use crate::store;

/// An order's payment as administrators see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PaymentView {
    /// The order.
    pub order_id: String,
    /// `pending` (a charge is in flight, or one was interrupted) or `unavailable` (the provider
    /// may have captured but its answer was lost: settled by a refund); `failed` (no charge
    /// reached the provider, which was down or refused: nothing was captured); `captured`,
    /// `declined`, or `refunded` (also an order cancelled before anything was captured: then
    /// `provider_charge_id` is null).
    pub status: String,
    /// Amount in cents.
    pub amount_cents: i64,
    /// The provider's charge id, once known.
    pub provider_charge_id: Option<String>,
    /// RFC 3339 time of the last change.
    pub updated_at: String,
}

pub(crate) fn router(db: Db) -> Router {
    Router::new()
        .route("/api/payments/{order_id}", get(get_payment))
        .route("/openapi.json", get(|| async { Json(crate::openapi()) }))
        .with_state(db)
}

/// An order's payment (admin).
#[utoipa::path(
    get,
    path = "/api/payments/{order_id}",
    params(("order_id" = String, Path, description = "Order id")),
    responses(
        (status = 200, description = "The payment", body = PaymentView),
        (status = 400, description = "An order id longer than any (`invalid_order_id`)", body = ErrorBody),
        (status = 401, description = "No verified caller (`unauthenticated`)", body = ErrorBody),
        (status = 403, description = "Not an administrator (`forbidden`)", body = ErrorBody),
        (status = 404, description = "No payment for this order (`not_found`)", body = ErrorBody),
        (status = 500, description = "Internal error (`internal`)", body = ErrorBody),
    )
)]
pub(crate) async fn get_payment(
    State(db): State<Db>,
    caller: Caller,
    Path(order_id): Path<String>,
) -> Result<Json<PaymentView>, ApiError> {
    caller.require_admin()?;
    if order_id.len() > ID_BYTES_MAX {
        return Err(ApiError::bad_request(
            "invalid_order_id",
            format!("an order id has at most {ID_BYTES_MAX} bytes"),
        ));
    }
    let payment = store::get(&db, &order_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no payment for order {order_id}")))?;
    Ok(Json(PaymentView {
        order_id: payment.order_id,
        status: payment.status.as_str().to_owned(),
        amount_cents: payment.amount_cents,
        provider_charge_id: payment.provider_charge_id,
        updated_at: payment.updated_at,
    }))
}
