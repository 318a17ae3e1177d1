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

pub(crate) fn order_id_of(raw: &str) -> Result<String, ApiError> {
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
    user_id: Option<String>,
    placed_from: Option<String>,
    placed_to: Option<String>,
}

/// Which end of a placement-time range a query parameter gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RangeEnd {
    /// `placed_from`: orders placed at or after it (a date: from its first moment, UTC).
    From,
    /// `placed_to`: orders placed at or before it (a date: through its last moment, UTC).
    To,
}

/// Parses `placed_from` / `placed_to` (an RFC 3339 time or a `YYYY-MM-DD` date, UTC) into a
/// bound in the read model's `created_at` format (RFC 3339, UTC, milliseconds, `Z`), which
/// sorts as text in time order: an inclusive lower bound for [`RangeEnd::From`], an exclusive
/// upper bound for [`RangeEnd::To`]. Orders record their time to the millisecond, so "at or
/// before `t`" is "before `t` truncated to the millisecond, plus one millisecond".
fn placed_bound(name: &str, text: &str, end: RangeEnd) -> Result<String, ApiError> {
    use chrono::{DateTime, Datelike, Days, NaiveDate, SecondsFormat, TimeDelta, Timelike, Utc};

    let invalid = || {
        ApiError::bad_request(
            "invalid_date",
            format!(
                "{name} must be an RFC 3339 time (2026-01-31T09:30:00Z) or a date (2026-01-31) \
                 in the years 1 to 9999"
            ),
        )
    };
    let text = text.trim();
    let at: DateTime<Utc> = if let Ok(date) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        let day = match end {
            RangeEnd::From => Some(date),
            RangeEnd::To => date.checked_add_days(Days::new(1)),
        };
        day.and_then(|d| d.and_hms_opt(0, 0, 0))
            .ok_or_else(invalid)?
            .and_utc()
    } else {
        let time = DateTime::parse_from_rfc3339(text)
            .map_err(|_| invalid())?
            .with_timezone(&Utc);
        let millis = time
            .with_nanosecond(time.nanosecond() / 1_000_000 * 1_000_000)
            .ok_or_else(invalid)?;
        match end {
            RangeEnd::From => millis,
            RangeEnd::To => millis
                .checked_add_signed(TimeDelta::milliseconds(1))
                .ok_or_else(invalid)?,
        }
    };
    // Four-digit years only: the text comparison needs one width.
    if !(1..=9999).contains(&at.year()) {
        return Err(invalid());
    }
    Ok(at.to_rfc3339_opts(SecondsFormat::Millis, true))
}

/// Whose orders a listing shows: the caller's own, or for an admin everyone's or the one
/// customer `requested`. A customer naming another customer is refused rather than quietly
/// shown their own orders, so a client never mistakes one for the other.
fn owner_filter(caller: &Caller, requested: Option<&str>) -> Result<Option<String>, ApiError> {
    let requested = requested.map(str::trim).filter(|id| !id.is_empty());
    match requested {
        _ if caller.is_admin() => Ok(requested.map(str::to_owned)),
        Some(id) if id != caller.user_id => Err(ApiError::forbidden(
            "only an admin may list another customer's orders",
        )),
        _ => Ok(Some(caller.user_id.clone())),
    }
}

/// The caller's orders (all orders, or one customer's, for an admin), newest first.
#[utoipa::path(get, path = "/api/orders", tag = "orders",
    params(
        ("status" = Option<String>, Query, description = "PENDING, CONFIRMED or CANCELLED"),
        ("limit" = Option<u32>, Query, description = "1 to 100, default 20"),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page"),
        ("user_id" = Option<String>, Query, description = "Only this customer's orders: any customer for an admin, only the caller's own id for a customer"),
        ("placed_from" = Option<String>, Query, description = "Only orders placed at or after this RFC 3339 time, or from the start of this date (YYYY-MM-DD, UTC)"),
        ("placed_to" = Option<String>, Query, description = "Only orders placed at or before this RFC 3339 time, or through the end of this date (YYYY-MM-DD, UTC)"),
    ),
    responses(
        (status = 200, body = OrderPage, description = "A page of orders"),
        (status = 400, body = ErrorBody, description = "Bad `status` (`invalid_status`), `limit` (`invalid_limit`), `cursor` (`invalid_cursor`), `placed_from` or `placed_to` (`invalid_date`), `placed_from` after `placed_to` (`invalid_date_range`) or an unknown parameter (`invalid_query`)"),
        (status = 401, body = ErrorBody, description = "No verified caller (`unauthenticated`)"),
        (status = 403, body = ErrorBody, description = "A customer asked for another customer's orders (`forbidden`)"),
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
    let user_id = owner_filter(&caller, query.user_id.as_deref())?;
    let placed_from = query
        .placed_from
        .as_deref()
        .map(|t| placed_bound("placed_from", t, RangeEnd::From))
        .transpose()?;
    let placed_before = query
        .placed_to
        .as_deref()
        .map(|t| placed_bound("placed_to", t, RangeEnd::To))
        .transpose()?;
    if let (Some(from), Some(before)) = (&placed_from, &placed_before)
        && from >= before
    {
        return Err(ApiError::bad_request(
            "invalid_date_range",
            "placed_from must be before placed_to",
        ));
    }
    let filter = ListFilter {
        user_id,
        status,
        placed_from,
        placed_before,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(user_id: &str, role: &str) -> Caller {
        Caller {
            user_id: user_id.to_owned(),
            role: role.to_owned(),
        }
    }

    #[test]
    fn a_date_bounds_its_whole_day_in_utc() {
        // From a date: its first moment; to a date: up to (not including) the next day.
        let from = placed_bound("placed_from", "2026-01-31", RangeEnd::From).expect("a date");
        let to = placed_bound("placed_to", "2026-01-31", RangeEnd::To).expect("a date");
        assert_eq!(from, "2026-01-31T00:00:00.000Z");
        assert_eq!(to, "2026-02-01T00:00:00.000Z");
    }

    #[test]
    fn a_time_is_taken_to_the_millisecond_in_utc_and_an_upper_one_is_inclusive() {
        // The read model records milliseconds in UTC: "at or before t" becomes "before t+1ms".
        let from = placed_bound(
            "placed_from",
            "2026-01-31T10:00:00.1239+02:00",
            RangeEnd::From,
        )
        .expect("a time");
        let to = placed_bound("placed_to", "2026-01-31T10:00:00Z", RangeEnd::To).expect("a time");
        assert_eq!(from, "2026-01-31T08:00:00.123Z");
        assert_eq!(to, "2026-01-31T10:00:00.001Z");
    }

    #[test]
    fn text_that_is_neither_a_time_nor_a_date_is_refused_naming_the_parameter() {
        // Each bad form answers 400 invalid_date with the parameter's name.
        for text in [
            "",
            "yesterday",
            "2026-13-01",
            "2026-01-31T25:00:00Z",
            "0000-01-01",
            "9999-12-31",
        ] {
            let end = if text.starts_with("9999") {
                RangeEnd::To
            } else {
                RangeEnd::From
            };
            let error = placed_bound("placed_to", text, end).expect_err(text);
            assert_eq!(error.code, "invalid_date", "{text}");
            assert!(error.message.contains("placed_to"), "{}", error.message);
        }
    }

    #[test]
    fn a_customer_lists_only_their_own_orders_and_may_not_name_another() {
        // Without user_id or with their own: their orders; with another's: 403.
        let customer = caller("user-a", "customer");
        assert_eq!(
            owner_filter(&customer, None).expect("own"),
            Some("user-a".to_owned())
        );
        assert_eq!(
            owner_filter(&customer, Some("user-a")).expect("own"),
            Some("user-a".to_owned())
        );
        let error = owner_filter(&customer, Some("user-b")).expect_err("another's");
        assert_eq!(error.status, StatusCode::FORBIDDEN);
    }

    #[test]
    fn an_admin_lists_everyone_or_the_customer_named() {
        // No user_id: every order; a user_id: that customer's.
        let admin = caller("admin-1", "admin");
        assert_eq!(owner_filter(&admin, None).expect("all"), None);
        assert_eq!(owner_filter(&admin, Some(" ")).expect("all"), None);
        assert_eq!(
            owner_filter(&admin, Some("user-b")).expect("one"),
            Some("user-b".to_owned())
        );
    }
}
