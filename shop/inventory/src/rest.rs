//! REST (admin): read and set a product's stock; `/openapi.json`.

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::routing::get;
use axum::{Json, Router};
use shop_contracts::api::{ErrorBody, SetStock, StockView};
use trellis_service::{ApiError, ApiJson, Caller, Db};
use utoipa::OpenApi;

use crate::BODY_BYTES_MAX;
use crate::stock::{self, Level, StockError};

#[derive(OpenApi)]
#[openapi(
    paths(get_stock, put_stock),
    components(schemas(SetStock, StockView, ErrorBody))
)]
struct ApiDoc;

pub(crate) fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

pub(crate) fn router(db: Db) -> Router {
    Router::new()
        .route("/api/inventory/{product_id}", get(get_stock).put(put_stock))
        .route("/openapi.json", get(|| async { Json(openapi()) }))
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(db)
}

impl From<StockError> for ApiError {
    fn from(e: StockError) -> Self {
        match e {
            StockError::Invalid { code, message } => ApiError::bad_request(code, message),
            e @ StockError::BelowReserved { .. } => {
                ApiError::conflict("below_reserved", e.to_string())
            }
            e @ StockError::UnknownOrder(_) => ApiError::not_found(e.to_string()),
            e @ StockError::WrongState { .. } => ApiError::conflict("wrong_state", e.to_string()),
            e @ StockError::Mismatch { .. } => {
                ApiError::conflict("reservation_mismatch", e.to_string())
            }
            StockError::Db(e) => ApiError::internal(e),
        }
    }
}

fn view(product_id: String, level: Level) -> StockView {
    StockView {
        product_id,
        total: level.total,
        reserved: level.reserved,
        available: level.total - level.reserved,
    }
}

/// A product's stock (zeros for a product never stocked).
#[utoipa::path(
    get, path = "/api/inventory/{product_id}", tag = "inventory",
    params(("product_id" = String, Path, description = "Product id")),
    responses(
        (status = 200, description = "The stock", body = StockView),
        (status = 400, description = "Bad product id (`invalid_product_id`)", body = ErrorBody),
        (status = 401, description = "No verified caller (`unauthenticated`)", body = ErrorBody),
        (status = 403, description = "Not an admin (`forbidden`)", body = ErrorBody),
        (status = 500, description = "Internal error (`internal`)", body = ErrorBody),
    )
)]
async fn get_stock(
    State(db): State<Db>,
    caller: Caller,
    Path(product_id): Path<String>,
) -> Result<Json<StockView>, ApiError> {
    caller.require_admin()?;
    let levels = stock::levels(&db, std::slice::from_ref(&product_id)).await?;
    let level = levels.first().copied().unwrap_or_default();
    Ok(Json(view(product_id, level)))
}

/// Sets a product's total stock.
#[utoipa::path(
    put, path = "/api/inventory/{product_id}", tag = "inventory",
    params(("product_id" = String, Path, description = "Product id")),
    request_body = SetStock,
    responses(
        (status = 200, description = "The new stock", body = StockView),
        (status = 400, description = "Bad total (`invalid_total`) or product id (`invalid_product_id`); a body that is not JSON of this shape (`invalid_json`)", body = ErrorBody),
        (status = 401, description = "No verified caller (`unauthenticated`)", body = ErrorBody),
        (status = 403, description = "Not an admin (`forbidden`)", body = ErrorBody),
        (status = 409, description = "Below what is reserved (`below_reserved`)", body = ErrorBody),
        (status = 413, description = "The body is larger than 4 KiB (`payload_too_large`)", body = ErrorBody),
        (status = 415, description = "No `Content-Type: application/json` (`unsupported_media_type`)", body = ErrorBody),
        (status = 500, description = "Internal error (`internal`)", body = ErrorBody),
    )
)]
async fn put_stock(
    State(db): State<Db>,
    caller: Caller,
    Path(product_id): Path<String>,
    ApiJson(body): ApiJson<SetStock>,
) -> Result<Json<StockView>, ApiError> {
    caller.require_admin()?;
    let level = stock::set_total(&db, &product_id, body.total).await?;
    tracing::info!(%product_id, total = level.total, "stock set");
    Ok(Json(view(product_id, level)))
}
