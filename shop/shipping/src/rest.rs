//! REST (admin): `GET /api/shipments/{order_id}`, `/openapi.json`.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use shop_contracts::api::{ErrorBody, OrderItem};
use trellis_service::{ApiError, Caller, Db};
use utoipa::ToSchema;

use crate::service::ID_BYTES_MAX;
use crate::store;

/// An order's shipment as administrators see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ShipmentView {
    /// Shipment id.
    pub id: String,
    /// The order.
    pub order_id: String,
    /// `created` or `cancelled`.
    pub status: String,
    /// The order's owner.
    pub user_id: String,
    /// What is shipped.
    pub lines: Vec<OrderItem>,
    /// RFC 3339 creation time.
    pub created_at: String,
    /// RFC 3339 time of the last change.
    pub updated_at: String,
}

pub(crate) fn router(db: Db) -> Router {
    Router::new()
        .route("/api/shipments/{order_id}", get(get_shipment))
        .route("/openapi.json", get(|| async { Json(crate::openapi()) }))
        .with_state(db)
}

/// An order's shipment (admin).
#[utoipa::path(
    get,
    path = "/api/shipments/{order_id}",
    params(("order_id" = String, Path, description = "Order id")),
    responses(
        (status = 200, description = "The shipment", body = ShipmentView),
        (status = 400, description = "An order id longer than any (`invalid_order_id`)", body = ErrorBody),
        (status = 401, description = "No verified caller (`unauthenticated`)", body = ErrorBody),
        (status = 403, description = "Not an administrator (`forbidden`)", body = ErrorBody),
        (status = 404, description = "No shipment for this order (`not_found`)", body = ErrorBody),
        (status = 500, description = "Internal error (`internal`)", body = ErrorBody),
    )
)]
pub(crate) async fn get_shipment(
    State(db): State<Db>,
    caller: Caller,
    Path(order_id): Path<String>,
) -> Result<Json<ShipmentView>, ApiError> {
    caller.require_admin()?;
    if order_id.len() > ID_BYTES_MAX {
        return Err(ApiError::bad_request(
            "invalid_order_id",
            format!("an order id has at most {ID_BYTES_MAX} bytes"),
        ));
    }
    let row = store::get(&db, &order_id)
        .await?
        .filter(store::Shipment::exists)
        .ok_or_else(|| ApiError::not_found(format!("no shipment for order {order_id}")))?;
    let lines = serde_json::from_str(&row.lines).map_err(ApiError::internal)?;
    Ok(Json(ShipmentView {
        id: row.id,
        order_id: row.order_id,
        status: row.status,
        user_id: row.user_id,
        lines,
        created_at: row.created_at,
        updated_at: row.updated_at,
    }))
}
