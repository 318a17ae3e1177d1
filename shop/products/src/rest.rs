//! REST handlers: listing, one product, admin creation; `/openapi.json`.

use std::collections::HashMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State as AxumState};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use shop_contracts::api::{
    CreateProduct, ErrorBody, PAGE_LIMIT_DEFAULT, PAGE_LIMIT_MAX, PRICE_CENTS_MAX,
    PRODUCT_NAME_MAX, ProductPage, ProductView, STOCK_MAX,
};
use shop_contracts::proto::{GetStockRequest, SetStockRequest};
use trellis_service::{ApiError, ApiJson, Caller, status_to_api_error};
use utoipa::{IntoParams, OpenApi};

use crate::catalogue::{self, Created, Product};
use crate::{BODY_BYTES_MAX, IDEMPOTENCY_KEY_BYTES_MAX, QUERY_CHARS_MAX, State};

/// The header that makes product creation safe to retry.
pub(crate) const IDEMPOTENCY_KEY: &str = "idempotency-key";

#[derive(OpenApi)]
#[openapi(
    paths(list_products, get_product, create_product),
    components(schemas(CreateProduct, ProductView, ProductPage, ErrorBody))
)]
struct ApiDoc;

pub(crate) fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

pub(crate) fn router(state: State) -> Router {
    Router::new()
        .route("/api/products", get(list_products).post(create_product))
        .route("/api/products/{id}", get(get_product))
        .route("/openapi.json", get(|| async { Json(openapi()) }))
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(state)
}

/// Query of `GET /api/products`.
#[derive(Debug, Deserialize, IntoParams)]
struct ListParams {
    /// Page size, 1 to 100 (default 20).
    limit: Option<String>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Case-insensitive substring of the name.
    q: Option<String>,
}

fn parse_limit(limit: Option<&str>) -> Result<u32, ApiError> {
    let Some(text) = limit else {
        return Ok(PAGE_LIMIT_DEFAULT);
    };
    match text.parse::<u32>() {
        Ok(n) if (1..=PAGE_LIMIT_MAX).contains(&n) => Ok(n),
        _ => Err(ApiError::bad_request(
            "invalid_limit",
            format!("limit must be a whole number from 1 to {PAGE_LIMIT_MAX}"),
        )),
    }
}

/// The cursor of a page ending at `id`.
fn encode_cursor(id: &str) -> String {
    URL_SAFE_NO_PAD.encode(id)
}

/// The product id a cursor names.
fn decode_cursor(cursor: &str) -> Result<String, ApiError> {
    URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .filter(|id| uuid::Uuid::parse_str(id).is_ok())
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_cursor",
                "cursor must be the next_cursor of an earlier page",
            )
        })
}

/// Units available now per product, from inventory's `GetStock` (one call).
async fn availability(state: &State, ids: Vec<String>) -> Result<HashMap<String, i64>, ApiError> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let mut client = state.inventory.clone();
    let answer = client
        .get_stock(GetStockRequest { product_ids: ids })
        .await
        .map_err(|status| status_to_api_error("inventory", &status))?;
    Ok(answer
        .into_inner()
        .stock
        .into_iter()
        .map(|s| (s.product_id, s.available))
        .collect())
}

fn view(product: Product, available: i64) -> ProductView {
    ProductView {
        id: product.id,
        name: product.name,
        price_cents: product.price_cents,
        available,
    }
}

/// Lists products in creation order.
#[utoipa::path(
    get, path = "/api/products", tag = "products",
    params(ListParams),
    responses(
        (status = 200, description = "A page of products", body = ProductPage),
        (status = 400, description = "Bad `limit` (`invalid_limit`), `cursor` (`invalid_cursor`) or `q` (`invalid_query`)", body = ErrorBody),
        (status = 500, description = "Internal error (`internal`)", body = ErrorBody),
        (status = 503, description = "Inventory did not answer (`dependency_unavailable`)", body = ErrorBody),
    )
)]
async fn list_products(
    AxumState(state): AxumState<State>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<ProductPage>, ApiError> {
    let Query(params) =
        params.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let limit = parse_limit(params.limit.as_deref())?;
    let after = params.cursor.as_deref().map(decode_cursor).transpose()?;
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
        catalogue::list(&state.db, after.as_deref(), needle.as_deref(), limit + 1).await?;
    let more = products.len() > limit as usize;
    products.truncate(limit as usize);
    let next_cursor = if more {
        products.last().map(|p| encode_cursor(&p.id))
    } else {
        None
    };
    let available = availability(&state, products.iter().map(|p| p.id.clone()).collect()).await?;
    let items = products
        .into_iter()
        .map(|p| {
            let units = available.get(&p.id).copied().unwrap_or(0);
            view(p, units)
        })
        .collect();
    Ok(Json(ProductPage { items, next_cursor }))
}

/// One product.
#[utoipa::path(
    get, path = "/api/products/{id}", tag = "products",
    params(("id" = String, Path, description = "Product id")),
    responses(
        (status = 200, description = "The product", body = ProductView),
        (status = 404, description = "No such product (`not_found`)", body = ErrorBody),
        (status = 500, description = "Internal error (`internal`)", body = ErrorBody),
        (status = 503, description = "Inventory did not answer (`dependency_unavailable`)", body = ErrorBody),
    )
)]
async fn get_product(
    AxumState(state): AxumState<State>,
    Path(id): Path<String>,
) -> Result<Json<ProductView>, ApiError> {
    let not_found = || ApiError::not_found(format!("no product {id}"));
    if uuid::Uuid::parse_str(&id).is_err() {
        return Err(not_found());
    }
    let product = catalogue::find(&state.db, &id)
        .await?
        .ok_or_else(not_found)?;
    let available = availability(&state, vec![product.id.clone()]).await?;
    let units = available.get(&product.id).copied().unwrap_or(0);
    Ok(Json(view(product, units)))
}

/// Checks a new product; answers it with the name trimmed.
fn validate(body: &CreateProduct) -> Result<CreateProduct, ApiError> {
    let name = body.name.trim();
    if name.is_empty() || name.chars().count() > PRODUCT_NAME_MAX {
        return Err(ApiError::bad_request(
            "invalid_name",
            format!("name must have 1 to {PRODUCT_NAME_MAX} characters"),
        ));
    }
    if !(0..=PRICE_CENTS_MAX).contains(&body.price_cents) {
        return Err(ApiError::bad_request(
            "invalid_price",
            format!("price_cents must be between 0 and {PRICE_CENTS_MAX}"),
        ));
    }
    if !(0..=STOCK_MAX).contains(&body.stock) {
        return Err(ApiError::bad_request(
            "invalid_stock",
            format!("stock must be between 0 and {STOCK_MAX}"),
        ));
    }
    Ok(CreateProduct {
        name: name.to_owned(),
        price_cents: body.price_cents,
        stock: body.stock,
    })
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(key) if !key.is_empty() && key.len() <= IDEMPOTENCY_KEY_BYTES_MAX => {
            Ok(Some(key.to_owned()))
        }
        _ => Err(ApiError::bad_request(
            "invalid_idempotency_key",
            format!(
                "Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_BYTES_MAX} visible ASCII characters"
            ),
        )),
    }
}

/// Creates a product and sets its stock (admin).
#[utoipa::path(
    post, path = "/api/products", tag = "products",
    request_body = CreateProduct,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes the call safe to retry: the same key and body answer the same product")),
    responses(
        (status = 201, description = "Created (or, for a repeated key, the product created first)", body = ProductView),
        (status = 400, description = "Bad name (`invalid_name`), price (`invalid_price`), stock (`invalid_stock`) or key (`invalid_idempotency_key`); a body that is not JSON of this shape (`invalid_json`)", body = ErrorBody),
        (status = 401, description = "No verified caller (`unauthenticated`)", body = ErrorBody),
        (status = 403, description = "Not an admin (`forbidden`)", body = ErrorBody),
        (status = 413, description = "The body is larger than 16 KiB (`payload_too_large`)", body = ErrorBody),
        (status = 415, description = "No `Content-Type: application/json` (`unsupported_media_type`)", body = ErrorBody),
        (status = 422, description = "The key was used with another body (`idempotency_key_reused`)", body = ErrorBody),
        (status = 500, description = "Internal error (`internal`)", body = ErrorBody),
        (status = 503, description = "Inventory did not answer (`dependency_unavailable`); retry with the same key", body = ErrorBody),
    )
)]
async fn create_product(
    AxumState(state): AxumState<State>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CreateProduct>,
) -> Result<(StatusCode, Json<ProductView>), ApiError> {
    caller.require_admin()?;
    let body = validate(&body)?;
    let key = idempotency_key(&headers)?;
    let request = serde_json::to_string(&body).map_err(ApiError::internal)?;
    // A known key answers before anything is written.
    let created = match key.as_deref() {
        Some(k) => match catalogue::key_record(&state.db, k).await? {
            Some(record) => Created::Existing(record),
            None => {
                catalogue::create(&state.db, &body.name, body.price_cents, Some((k, &request)))
                    .await?
            }
        },
        None => catalogue::create(&state.db, &body.name, body.price_cents, None).await?,
    };
    let product = match created {
        Created::New(product) => product,
        Created::Existing(record) => {
            if record.request != request {
                return Err(ApiError::unprocessable(
                    "idempotency_key_reused",
                    "this Idempotency-Key was used with a different body",
                ));
            }
            if record.stock_set {
                // Replays the first answer.
                return Ok((StatusCode::CREATED, Json(view(record.product, body.stock))));
            }
            record.product
        }
    };
    let mut client = state.inventory.clone();
    let stock = client
        .set_stock(SetStockRequest {
            product_id: product.id.clone(),
            total: body.stock,
        })
        .await
        .map_err(|status| {
            tracing::warn!(product_id = %product.id, error = %status, "setting the initial stock failed");
            status_to_api_error("inventory", &status)
        })?
        .into_inner();
    if let Some(k) = key.as_deref() {
        catalogue::mark_stock_set(&state.db, k).await?;
    }
    tracing::info!(product_id = %product.id, "product created");
    metrics::counter!("shop_products_created_total").increment(1);
    Ok((StatusCode::CREATED, Json(view(product, stock.available))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let id = uuid::Uuid::now_v7().to_string();
        assert_eq!(decode_cursor(&encode_cursor(&id)).unwrap(), id);
        assert_eq!(decode_cursor("!!").unwrap_err().code, "invalid_cursor");
        assert_eq!(
            decode_cursor(&encode_cursor("x")).unwrap_err().code,
            "invalid_cursor"
        );
    }

    #[test]
    fn limits_outside_one_to_a_hundred_are_refused() {
        assert_eq!(parse_limit(None).unwrap(), PAGE_LIMIT_DEFAULT);
        assert_eq!(parse_limit(Some("100")).unwrap(), 100);
        for bad in ["0", "101", "-1", "x"] {
            assert_eq!(parse_limit(Some(bad)).unwrap_err().code, "invalid_limit");
        }
    }
}
