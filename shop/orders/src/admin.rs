//! The operator endpoints for sagas, to administrators only: trellis-saga's inspector
//! endpoints over the order saga's log (list, show, retry, cancel, skip) under
//! [`SAGAS_PATH`](crate::SAGAS_PATH), and `GET /admin/orders/{id}/saga`, which names the saga
//! of an order so an operator can search sagas by order id. The shop's gateway exposes them
//! as `/api/admin/sagas/...` and `/api/admin/orders/{id}/saga`; the admin console uses them.
//!
//! The caller's id reaches the saga log as the operator of each action: `admin_only` sets
//! `x-actor` from the verified caller, and the inspector's router records it.

use axum::extract::{Path, State as AxumState};
use axum::routing::get;
use axum::{Json, Router};
use trellis_saga::{AnySagaStore, Inspector};
use trellis_service::ApiError;

use crate::rest::order_id_of;
use crate::state::State;

/// The operator routes: the order-to-saga lookup, and the saga inspector when the saga is
/// orchestrated (`inspector` is `None` for the choreographed style, which has no saga log).
/// Wrapped in `admin_only`; the caller wraps the service in `protect`.
pub(crate) fn router(state: State, inspector: Option<Inspector<AnySagaStore>>) -> Router {
    let mut router = Router::new()
        .route("/admin/orders/{id}/saga", get(saga_of_order))
        .with_state(state);
    if let Some(inspector) = inspector {
        router = router.nest(crate::SAGAS_PATH, trellis_saga::http::router(inspector));
    }
    trellis_service::auth::admin_only(router)
}

/// `GET /admin/orders/{id}/saga`: `{"order_id", "saga_id"}`; 404 `not_found` when there is no
/// such order or no saga has been attached to it yet.
async fn saga_of_order(
    AxumState(state): AxumState<State>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = order_id_of(&id)?;
    let order = state
        .orders()
        .load(&id)
        .await
        .map_err(ApiError::internal)?
        .state;
    if !order.exists {
        return Err(ApiError::not_found("no such order"));
    }
    let saga_id = order.saga_id.ok_or_else(|| {
        ApiError::not_found("the order has no saga (yet, or it is choreographed)")
    })?;
    Ok(Json(
        serde_json::json!({ "order_id": id, "saga_id": saga_id }),
    ))
}
