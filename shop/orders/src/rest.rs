//! The REST API: place, read, list and cancel orders. Handlers only parse the request,
//! call the module that does the work ([`crate::placement`], [`crate::read_model`], the
//! Order aggregate) and shape the answer, so the OpenAPI annotations sit beside the code they
//! describe.

use axum::extract::{Path, Query, State as AxumState};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use shop_contracts::api::{
    ErrorBody, OrderAccepted, OrderLineView, OrderPage, OrderStatus, OrderView, PAGE_LIMIT_DEFAULT,
    PAGE_LIMIT_MAX, PlaceOrder, TimelineEntry,
};
use trellis_eventstore::{Metadata, RepositoryError};
use trellis_service::{ApiError, ApiJson, Caller};
use utoipa::OpenApi;

use crate::aggregate::{OrderCommand, OrderError};
use crate::placement::{self, IDEMPOTENCY_KEY_MAX};
use crate::read_model::{self, ListFilter};
use crate::state::State;

/// The router.
pub(crate) fn router(state: State) -> Router {
    Router::new()
        .route("/api/orders", post(place_order).get(list_orders))
        .route("/api/orders/{id}", get(get_order))
        .route("/api/orders/{id}/cancel", post(cancel_order))
        .route("/openapi.json", get(|| async { Json(openapi()) }))
        .with_state(state)
}

/// The orders service's part of the public OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

#[derive(OpenApi)]
#[openapi(
    info(title = "trellis shop: orders", version = "1"),
    paths(place_order, get_order, list_orders, cancel_order),
    components(schemas(
        PlaceOrder,
        OrderAccepted,
        OrderView,
        OrderPage,
        OrderStatus,
        OrderLineView,
        TimelineEntry,
        ErrorBody
    ))
)]
struct ApiDoc;

fn order_id_of(raw: &str) -> Result<String, ApiError> {
    uuid::Uuid::parse_str(raw)
        .map(|u| u.hyphenated().to_string())
        .map_err(|_| ApiError::not_found("no such order"))
}

fn idempotency_key(headers: &HeaderMap) -> Result<String, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Err(ApiError::bad_request(
            "missing_idempotency_key",
            "POST /api/orders needs an Idempotency-Key header (any unique string, e.g. a UUID)",
        ));
    };
    let key = value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|k| !k.is_empty() && k.len() <= IDEMPOTENCY_KEY_MAX)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_idempotency_key",
                format!(
                    "Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} visible ASCII characters"
                ),
            )
        })?;
    Ok(key.to_owned())
}

fn accepted(id: &str) -> Response {
    (
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/api/orders/{id}"))],
        Json(OrderAccepted {
            id: id.to_owned(),
            status: OrderStatus::Pending,
        }),
    )
        .into_response()
}

/// Place an order.
#[utoipa::path(post, path = "/api/orders", tag = "orders", request_body = PlaceOrder,
    params(("Idempotency-Key" = String, Header, description = "Unique per order attempt")),
    responses(
        (status = 202, body = OrderAccepted, description = "Accepted; the saga decides it (or, for a repeated key, the order placed first)"),
        (status = 400, body = ErrorBody, description = "A missing or bad key (`missing_idempotency_key`, `invalid_idempotency_key`), bad lines (`empty_order`, `too_many_items`, `invalid_product_id`, `invalid_quantity`, `duplicate_product`) or a body that is not JSON of this shape (`invalid_json`)"),
        (status = 401, body = ErrorBody, description = "No verified caller (`unauthenticated`)"),
        (status = 403, body = ErrorBody, description = "The caller's account does not exist (`forbidden`)"),
        (status = 413, body = ErrorBody, description = "The body is larger than the service takes (`payload_too_large`)"),
        (status = 415, body = ErrorBody, description = "No `Content-Type: application/json` (`unsupported_media_type`)"),
        (status = 422, body = ErrorBody, description = "Unknown product (`unknown_product`), or the key reused with another body (`idempotency_key_reused`)"),
        (status = 500, body = ErrorBody, description = "Internal error (`internal`)"),
        (status = 503, body = ErrorBody, description = "The users or products service did not answer (`dependency_unavailable`); retry with the same key"),
    ))]
async fn place_order(
    AxumState(state): AxumState<State>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(body): ApiJson<PlaceOrder>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    body.validate()
        .map_err(|(code, message)| ApiError::bad_request(code, message))?;
    let order_id = placement::place(&state, &caller, &key, &body).await?;
    Ok(accepted(&order_id))
}

/// One order of the caller (any order for an admin).
#[utoipa::path(get, path = "/api/orders/{id}", tag = "orders",
    params(("id" = String, Path, description = "Order id")),
    responses(
        (status = 200, body = OrderView, description = "The order"),
        (status = 401, body = ErrorBody, description = "No verified caller (`unauthenticated`)"),
        (status = 404, body = ErrorBody, description = "No such order, or not the caller's (`not_found`)"),
        (status = 500, body = ErrorBody, description = "Internal error (`internal`)"),
    ))]
async fn get_order(
    AxumState(state): AxumState<State>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<OrderView>, ApiError> {
    let id = order_id_of(&id)?;
    let view = match read_model::find(state.db(), &id).await? {
        Some(row) => row.into_view().map_err(ApiError::internal)?,
        None => {
            // Not projected yet: read the stream.
            let order = state
                .orders()
                .load(&id)
                .await
                .map_err(ApiError::internal)?
                .state;
            if !order.exists {
                return Err(ApiError::not_found("no such order"));
            }
            read_model::view_of(&id, &order)
        }
    };
    if view.user_id != caller.user_id && !caller.is_admin() {
        return Err(ApiError::not_found("no such order"));
    }
    Ok(Json(view))
}

/// Query of `GET /api/orders`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    status: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

/// The caller's orders (all orders for an admin), newest first.
#[utoipa::path(get, path = "/api/orders", tag = "orders",
    params(
        ("status" = Option<String>, Query, description = "PENDING, CONFIRMED or CANCELLED"),
        ("limit" = Option<u32>, Query, description = "1 to 100, default 20"),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page"),
    ),
    responses(
        (status = 200, body = OrderPage, description = "A page of orders"),
        (status = 400, body = ErrorBody, description = "Bad `status` (`invalid_status`), `limit` (`invalid_limit`), `cursor` (`invalid_cursor`) or an unknown parameter (`invalid_query`)"),
        (status = 401, body = ErrorBody, description = "No verified caller (`unauthenticated`)"),
        (status = 500, body = ErrorBody, description = "Internal error (`internal`)"),
    ))]
async fn list_orders(
    AxumState(state): AxumState<State>,
    caller: Caller,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<OrderPage>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let status = match query.status.as_deref() {
        None => None,
        Some(s) => Some(OrderStatus::parse(s).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_status",
                "status must be PENDING, CONFIRMED or CANCELLED",
            )
        })?),
    };
    let limit = query.limit.unwrap_or(PAGE_LIMIT_DEFAULT);
    if !(1..=PAGE_LIMIT_MAX).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_limit",
            format!("limit must be between 1 and {PAGE_LIMIT_MAX}"),
        ));
    }
    let before = match &query.cursor {
        None => None,
        Some(cursor) => Some(
            URL_SAFE_NO_PAD
                .decode(cursor)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .filter(|s| uuid::Uuid::parse_str(s).is_ok())
                .ok_or_else(|| {
                    ApiError::bad_request("invalid_cursor", "cursor is not one this API gave")
                })?,
        ),
    };
    let filter = ListFilter {
        user_id: (!caller.is_admin()).then(|| caller.user_id.clone()),
        status,
        before,
        // One more than the page, to know whether another page follows.
        limit: limit + 1,
    };
    let rows = read_model::list(state.db(), filter).await?;
    let more = rows.len() > limit as usize;
    let items = rows
        .into_iter()
        .take(limit as usize)
        .map(read_model::ViewRow::into_view)
        .collect::<Result<Vec<_>, _>>()
        .map_err(ApiError::internal)?;
    let next_cursor = if more {
        items
            .last()
            .map(|o| URL_SAFE_NO_PAD.encode(o.id.as_bytes()))
    } else {
        None
    };
    Ok(Json(OrderPage { items, next_cursor }))
}

/// Cancel a pending order.
#[utoipa::path(post, path = "/api/orders/{id}/cancel", tag = "orders",
    params(("id" = String, Path, description = "Order id")),
    responses(
        (status = 202, body = OrderAccepted, description = "Cancellation under way"),
        (status = 401, body = ErrorBody, description = "No verified caller (`unauthenticated`)"),
        (status = 404, body = ErrorBody, description = "No such order, or not the caller's (`not_found`)"),
        (status = 409, body = ErrorBody, description = "Shipping began or the order ended (`not_cancellable`)"),
        (status = 500, body = ErrorBody, description = "Internal error (`internal`)"),
    ))]
async fn cancel_order(
    AxumState(state): AxumState<State>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = order_id_of(&id)?;
    let order = state
        .orders()
        .load(&id)
        .await
        .map_err(ApiError::internal)?
        .state;
    if !order.exists || (order.user_id != caller.user_id && !caller.is_admin()) {
        return Err(ApiError::not_found("no such order"));
    }
    let metadata = Metadata {
        correlation_id: uuid::Uuid::parse_str(&id).ok(),
        ..Metadata::default()
    };
    match state
        .orders()
        .execute(&id, OrderCommand::RequestCancel.at(state.now()), metadata)
        .await
    {
        Ok(_) => Ok(accepted(&id)),
        Err(RepositoryError::Domain(
            error @ (OrderError::NotCancellable(_) | OrderError::Ended(_)),
        )) => Err(ApiError::conflict("not_cancellable", error.to_string())),
        Err(error) => Err(ApiError::internal(error)),
    }
}
