//! The handlers: the part of the shop's public API `trellis load --mix order=1` calls, with
//! the shop's shapes, codes and limits.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use shop_contracts::api::{
    OrderAccepted, OrderLineView, OrderStatus, OrderView, PAGE_LIMIT_DEFAULT, PAGE_LIMIT_MAX,
    PlaceOrder, ProductPage, ProductView, RegisterUser, STOCK_MAX, SetStock, StockView,
    TokenRequest, TokenResponse, UserView,
};
use tokio::sync::mpsc;
use trellis_service::{ApiError, ApiJson, Caller};

use crate::auth::{self, Hasher, Sessions, TOKEN_LIFETIME};
use crate::flow::PlacedOrder;
use crate::store::{self, Db, PaymentView, ShipmentView, User};

/// Largest request body, in bytes (the users and products services' limit).
pub(crate) const BODY_BYTES_MAX: usize = 16 * 1024;
/// How long `POST /api/orders` waits for room in the order queue before it answers 503.
pub(crate) const QUEUE_WAIT_MAX: Duration = Duration::from_secs(5);
/// Longest `Idempotency-Key`, in bytes (the orders service's limit).
const IDEMPOTENCY_KEY_MAX: usize = 200;
/// Longest product id inventory takes, in bytes.
const PRODUCT_ID_BYTES_MAX: usize = 64;
/// Longest order id payments and shipping take, in bytes.
const ORDER_ID_BYTES_MAX: usize = 128;
/// Longest `q` of a product listing, in characters.
const QUERY_CHARS_MAX: usize = 200;
/// Shortest password accepted, in characters.
const PASSWORD_CHARS_MIN: usize = 8;
/// Longest password accepted, in characters.
const PASSWORD_CHARS_MAX: usize = 128;
/// Longest display name, in characters.
const NAME_CHARS_MAX: usize = 100;
/// Longest email address, in bytes.
const EMAIL_BYTES_MAX: usize = 254;

/// What the handlers share.
#[derive(Debug, Clone)]
pub(crate) struct AppState {
    pub(crate) db: Db,
    pub(crate) sessions: Arc<Sessions>,
    pub(crate) hasher: Arc<Hasher>,
    pub(crate) orders: mpsc::Sender<PlacedOrder>,
}

/// The API's router.
pub(crate) fn router(state: AppState) -> Router {
    let sessions = state.sessions.clone();
    Router::new()
        .route("/api/users", post(register))
        .route("/api/auth/token", post(token))
        .route("/api/products", get(list_products))
        .route("/api/inventory/{product_id}", get(get_stock).put(put_stock))
        .route("/api/orders", post(place_order))
        .route("/api/orders/{id}", get(get_order))
        .route("/api/payments/{order_id}", get(get_payment))
        .route("/api/shipments/{order_id}", get(get_shipment))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(|| async { ApiError::not_found("no such path") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this path does not take this method",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            sessions,
            auth::identify,
        ))
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(state)
}

/// A path segment, or 404 when it cannot be read.
fn segment(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(s)| s)
        .map_err(|_| ApiError::not_found("no such path"))
}

/// Checks a registration as shop/users does (without its common-password list):
/// `(email lowercased, name trimmed)`, or the code and message of the first problem.
fn validate_registration(
    email: &str,
    password: &str,
    name: &str,
) -> Result<(String, String), (&'static str, String)> {
    let email = email.trim().to_lowercase();
    let valid_email = email.len() <= EMAIL_BYTES_MAX
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && !domain.contains('@')
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
        });
    if !valid_email {
        return Err((
            "invalid_email",
            format!(
                "email must be an address like name@example.com, at most {EMAIL_BYTES_MAX} bytes"
            ),
        ));
    }
    let password_chars = password.chars().count();
    if password_chars < PASSWORD_CHARS_MIN {
        return Err((
            "password_too_short",
            format!("password must have at least {PASSWORD_CHARS_MIN} characters"),
        ));
    }
    if password_chars > PASSWORD_CHARS_MAX {
        return Err((
            "password_too_long",
            format!("password must have at most {PASSWORD_CHARS_MAX} characters"),
        ));
    }
    let name = name.trim();
    if name.is_empty() || name.chars().count() > NAME_CHARS_MAX {
        return Err((
            "invalid_name",
            format!("name must have 1 to {NAME_CHARS_MAX} characters"),
        ));
    }
    Ok((email, name.to_owned()))
}

fn user_view(user: &User) -> UserView {
    UserView {
        id: user.id.clone(),
        email: user.email.clone(),
        name: user.name.clone(),
        role: user.role.clone(),
    }
}

fn email_taken() -> ApiError {
    ApiError::conflict("email_taken", "an account with this email exists")
}

/// `POST /api/users`: 201 and the new customer.
async fn register(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<RegisterUser>,
) -> Result<(StatusCode, Json<UserView>), ApiError> {
    let (email, name) = validate_registration(&body.email, &body.password, &body.name)
        .map_err(|(code, message)| ApiError::bad_request(code, message))?;
    if store::find_user(&state.db, &email).await?.is_some() {
        return Err(email_taken());
    }
    let hash = state.hasher.hash(body.password).await?;
    match store::insert_customer(&state.db, email, name, hash).await? {
        Some(user) => Ok((StatusCode::CREATED, Json(user_view(&user)))),
        None => Err(email_taken()),
    }
}

fn invalid_credentials() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "invalid_credentials",
        "wrong email or password",
    )
}

/// `POST /api/auth/token`: a bearer token for an email and password.
async fn token(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<TokenRequest>,
) -> Result<Json<TokenResponse>, ApiError> {
    // Longer than any accepted password: refused without hashing an attacker-sized input.
    if body.password.chars().count() > PASSWORD_CHARS_MAX || body.email.len() > EMAIL_BYTES_MAX {
        return Err(invalid_credentials());
    }
    let email = body.email.trim().to_lowercase();
    let user = store::find_user(&state.db, &email).await?;
    let hash = user.as_ref().map(|u| u.password_hash.clone());
    let matches = state.hasher.verify(body.password, hash).await?;
    let Some(user) = user.filter(|_| matches) else {
        return Err(invalid_credentials());
    };
    let access_token = state.sessions.issue(&user.id, &user.role)?;
    Ok(Json(TokenResponse {
        access_token,
        token_type: "Bearer".to_owned(),
        expires_in: TOKEN_LIFETIME.as_secs(),
        refresh_token: String::new(),
        refresh_expires_in: 0,
    }))
}

/// Query of `GET /api/products`.
#[derive(Debug, Deserialize)]
struct ListParams {
    limit: Option<String>,
    cursor: Option<String>,
    q: Option<String>,
}

/// `GET /api/products`: a page of products in creation order, with what is available.
async fn list_products(
    State(state): State<AppState>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<ProductPage>, ApiError> {
    let Query(params) =
        params.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let limit = match params.limit.as_deref() {
        None => PAGE_LIMIT_DEFAULT,
        Some(text) => match text.parse::<u32>() {
            Ok(n) if (1..=PAGE_LIMIT_MAX).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_limit",
                    format!("limit must be a whole number from 1 to {PAGE_LIMIT_MAX}"),
                ));
            }
        },
    };
    // The cursor is the last product id of the previous page.
    let after = match params.cursor.as_deref() {
        None => None,
        Some(cursor) => Some(
            uuid::Uuid::parse_str(cursor)
                .map(|id| id.hyphenated().to_string())
                .map_err(|_| {
                    ApiError::bad_request(
                        "invalid_cursor",
                        "cursor must be the next_cursor of an earlier page",
                    )
                })?,
        ),
    };
    let needle = match params.q.as_deref().map(str::trim) {
        Some(q) if q.chars().count() > QUERY_CHARS_MAX => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("q must have at most {QUERY_CHARS_MAX} characters"),
            ));
        }
        Some("") | None => None,
        Some(q) => Some(q.to_lowercase()),
    };
    let mut products =
        store::list_products(&state.db, after.as_deref(), needle.as_deref(), limit + 1).await?;
    let more = products.len() > limit as usize;
    products.truncate(limit as usize);
    let next_cursor = if more {
        products.last().map(|p| p.id.clone())
    } else {
        None
    };
    let items = products
        .into_iter()
        .map(|p| ProductView {
            id: p.id,
            name: p.name,
            price_cents: p.price_cents,
            available: p.available,
        })
        .collect();
    Ok(Json(ProductPage { items, next_cursor }))
}

fn product_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let id = segment(path)?;
    if id.trim().is_empty() || id.len() > PRODUCT_ID_BYTES_MAX {
        return Err(ApiError::bad_request(
            "invalid_product_id",
            format!("product_id must have 1 to {PRODUCT_ID_BYTES_MAX} bytes"),
        ));
    }
    Ok(id)
}

/// `GET /api/inventory/{product_id}` (admin): the stock, zeros for a product never stocked.
async fn get_stock(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<StockView>, ApiError> {
    caller.require_admin()?;
    let id = product_id(path)?;
    Ok(Json(store::stock(&state.db, &id).await?))
}

/// `PUT /api/inventory/{product_id}` (admin): sets the total, not below what is reserved.
async fn put_stock(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    ApiJson(body): ApiJson<SetStock>,
) -> Result<Json<StockView>, ApiError> {
    caller.require_admin()?;
    let id = product_id(path)?;
    if !(0..=STOCK_MAX).contains(&body.total) {
        return Err(ApiError::bad_request(
            "invalid_total",
            format!("total must be between 0 and {STOCK_MAX}"),
        ));
    }
    match store::set_stock(&state.db, &id, body.total).await? {
        store::SetStock::Set(view) => Ok(Json(view)),
        store::SetStock::BelowReserved { reserved } => Err(ApiError::conflict(
            "below_reserved",
            format!(
                "total {} is below the {reserved} units reserved",
                body.total
            ),
        )),
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<String, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Err(ApiError::bad_request(
            "missing_idempotency_key",
            "POST /api/orders needs an Idempotency-Key header (any unique string, e.g. a UUID)",
        ));
    };
    value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|k| !k.is_empty() && k.len() <= IDEMPOTENCY_KEY_MAX)
        .map(str::to_owned)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_idempotency_key",
                format!(
                    "Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} visible ASCII characters"
                ),
            )
        })
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

/// `POST /api/orders`: the order priced and recorded `PENDING` in one commit, answered 202,
/// its steps queued. The same key and body answer the first order again; the same key with
/// another body is a 422.
async fn place_order(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(body): ApiJson<PlaceOrder>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    body.validate()
        .map_err(|(code, message)| ApiError::bad_request(code, message))?;
    let request = serde_json::to_string(&body).map_err(ApiError::internal)?;
    // Room in the queue first, so an order once committed always has its task.
    let room = match tokio::time::timeout(QUEUE_WAIT_MAX, state.orders.reserve()).await {
        Ok(Ok(room)) => room,
        _ => {
            return Err(ApiError::unavailable(
                "busy",
                "too many orders in progress; retry with the same key",
            ));
        }
    };
    let mut tx = store::begin_accept(&state.db).await?;
    if let Some(recorded) = store::find_request(&mut tx, &caller.user_id, &key).await? {
        if recorded.request != request {
            return Err(ApiError::unprocessable(
                "idempotency_key_reused",
                "this Idempotency-Key was used with another body",
            ));
        }
        return Ok(accepted(&recorded.order_id));
    }
    let ids: Vec<&str> = body.items.iter().map(|i| i.product_id.as_str()).collect();
    let prices = store::prices(&mut tx, &ids).await?;
    let mut lines = Vec::with_capacity(body.items.len());
    let mut total_cents: i64 = 0;
    for item in &body.items {
        let Some((_, price_cents)) = prices.iter().find(|(id, _)| *id == item.product_id) else {
            return Err(ApiError::unprocessable(
                "unknown_product",
                format!("no product {}", item.product_id),
            ));
        };
        total_cents = price_cents
            .checked_mul(item.quantity)
            .and_then(|line| total_cents.checked_add(line))
            .ok_or_else(|| ApiError::unprocessable("total_too_large", "the total overflows"))?;
        lines.push(OrderLineView {
            product_id: item.product_id.clone(),
            quantity: item.quantity,
            price_cents: *price_cents,
        });
    }
    let order = PlacedOrder {
        id: uuid::Uuid::now_v7().hyphenated().to_string(),
        user_id: caller.user_id,
        lines,
        total_cents,
    };
    store::insert_order(&mut tx, &key, &request, &order).await?;
    tx.commit().await?;
    let response = accepted(&order.id);
    room.send(order);
    Ok(response)
}

/// `GET /api/orders/{id}`: one order of the caller (any order for an admin); 404 for
/// anyone else's.
async fn get_order(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<OrderView>, ApiError> {
    let not_found = || ApiError::not_found("no such order");
    let id = uuid::Uuid::parse_str(&segment(path)?)
        .map(|u| u.hyphenated().to_string())
        .map_err(|_| not_found())?;
    let view = store::find_order(&state.db, &id)
        .await?
        .ok_or_else(not_found)?;
    if view.user_id != caller.user_id && !caller.is_admin() {
        return Err(not_found());
    }
    Ok(Json(view))
}

fn order_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let id = segment(path)?;
    if id.len() > ORDER_ID_BYTES_MAX {
        return Err(ApiError::bad_request(
            "invalid_order_id",
            format!("an order id has at most {ORDER_ID_BYTES_MAX} bytes"),
        ));
    }
    Ok(id)
}

/// `GET /api/payments/{order_id}` (admin).
async fn get_payment(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<PaymentView>, ApiError> {
    caller.require_admin()?;
    let id = order_id(path)?;
    store::payment(&state.db, &id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no payment for order {id}")))
}

/// `GET /api/shipments/{order_id}` (admin).
async fn get_shipment(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<ShipmentView>, ApiError> {
    caller.require_admin()?;
    let id = order_id(path)?;
    store::shipment(&state.db, &id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no shipment for order {id}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registration_is_checked_as_the_users_service_checks_it() {
        assert_eq!(
            validate_registration(" A@Example.com ", "long enough", " Ann "),
            Ok(("a@example.com".to_owned(), "Ann".to_owned()))
        );
        let code = |e: &str, p: &str, n: &str| validate_registration(e, p, n).unwrap_err().0;
        assert_eq!(code("no-at-sign", "long enough", "A"), "invalid_email");
        assert_eq!(code("a@b.c", "short", "A"), "password_too_short");
        assert_eq!(code("a@b.c", &"x".repeat(129), "A"), "password_too_long");
        assert_eq!(code("a@b.c", "long enough", "  "), "invalid_name");
    }
}
