//! The REST API: place, read, list and cancel orders.
//!
//! # Placing an order twice
//! `POST /api/orders` records its `Idempotency-Key` with the order id it chose and the body
//! (`order_requests`, in the read-model database), then appends the order's `Created` event to
//! the event store. The two are different databases (SQLite files, or at least different
//! connections), so they cannot be one transaction; instead a retry completes what the first
//! attempt left. A retry whose key is recorded but whose order has no events (the first
//! attempt crashed, or is still between the two writes) prices the body again and creates the
//! order under the recorded id. Pricing again is right: the first attempt never answered, so
//! no price was promised. Creating an existing order is a no-op, so when the first attempt
//! was only slow, whichever append comes first decides the order and both answer its id.

use std::collections::HashMap;
use std::sync::Arc;

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
use shop_contracts::proto::products_client::ProductsClient;
use shop_contracts::proto::users_client::UsersClient;
use shop_contracts::proto::{GetUserRequest, PriceItemsRequest};
use sqlx::Row;
use tokio::sync::Semaphore;
use trellis_eventstore::{AnyStore, Metadata, Repository, RepositoryError};
use trellis_service::{ApiError, ApiJson, Caller, Db, GrpcChannel, on_db, status_to_api_error};
use utoipa::OpenApi;

use crate::aggregate::{Order, OrderCommand, OrderError};
use crate::engine::Engine;
use crate::saga::OrderSagaContext;

/// Tables of the orders service besides the read model.
pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS order_requests (
    user_id TEXT NOT NULL,
    idem_key TEXT NOT NULL,
    request TEXT NOT NULL,
    order_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (user_id, idem_key)
)";

/// Longest `Idempotency-Key`, in bytes.
pub const IDEMPOTENCY_KEY_MAX: usize = 200;
/// Orders the sweeper starts per pass.
const SWEEP_BATCH: i64 = 200;

/// Shared by the handlers.
#[derive(Clone)]
pub(crate) struct State {
    inner: Arc<Inner>,
}

struct Inner {
    orders: Arc<Repository<Order, AnyStore>>,
    db: Db,
    /// Orders waiting for a saga slot, in arrival order; `None` when the saga is
    /// choreographed (the participants react to `order.created`).
    queue: Option<tokio::sync::mpsc::Sender<OrderSagaContext>>,
    /// Orders queued or with a saga running in this process (the sweeper skips them).
    active: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    users: UsersClient<GrpcChannel>,
    /// Callers whose account the users service confirmed recently (accounts are never
    /// deleted; the gateway already verified the caller's token).
    known_users: std::sync::Mutex<HashMap<String, std::time::Instant>>,
    products: ProductsClient<GrpcChannel>,
}

/// How long a confirmed account is trusted without asking the users service again.
const KNOWN_USER_TTL: std::time::Duration = std::time::Duration::from_secs(60);
/// Most accounts remembered; the memory is cleared when it is full.
const KNOWN_USERS_MAX: usize = 100_000;

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State").finish_non_exhaustive()
    }
}

impl State {
    pub(crate) fn new(
        orders: Arc<Repository<Order, AnyStore>>,
        db: Db,
        orchestrator: Option<(Engine, usize)>,
        users: UsersClient<GrpcChannel>,
        products: ProductsClient<GrpcChannel>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        let active = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
        let queue = orchestrator.map(|(engine, saga_concurrency)| {
            let (queue, waiting) = tokio::sync::mpsc::channel(SAGA_QUEUE_MAX);
            tokio::spawn(dispatch(
                waiting,
                Arc::new(Semaphore::new(saga_concurrency.max(1))),
                engine,
                active.clone(),
                stop,
            ));
            queue
        });
        Self {
            inner: Arc::new(Inner {
                orders,
                db,
                queue,
                active: active.clone(),
                users,
                known_users: std::sync::Mutex::new(HashMap::new()),
                products,
            }),
        }
    }

    /// Whether the users service confirmed `user_id`'s account within [`KNOWN_USER_TTL`].
    fn known_user(&self, user_id: &str) -> bool {
        let known = self
            .inner
            .known_users
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        known
            .get(user_id)
            .is_some_and(|at| at.elapsed() < KNOWN_USER_TTL)
    }

    fn remember_user(&self, user_id: &str) {
        let mut known = self
            .inner
            .known_users
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if known.len() >= KNOWN_USERS_MAX {
            known.clear();
        }
        known.insert(user_id.to_owned(), std::time::Instant::now());
    }

    /// Queues the order's saga; it starts as soon as one of the `saga_concurrency` slots is
    /// free. When the queue is full the sweeper starts it later.
    fn spawn_saga(&self, order_id: &str, order: &Order) {
        let Some(queue) = &self.inner.queue else {
            return;
        };
        if order.choreographed {
            return;
        }
        {
            let mut active = self.inner.active.lock().unwrap_or_else(|p| p.into_inner());
            if !active.insert(order_id.to_owned()) {
                return; // already queued or running here
            }
        }
        let context = OrderSagaContext {
            order_id: order_id.to_owned(),
            user_id: order.user_id.clone(),
            lines: order.items.clone(),
            total_cents: order.total_cents,
            traceparent: trellis_telemetry::propagation::current_traceparent(),
        };
        if queue.try_send(context).is_err() {
            self.inner
                .active
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(order_id);
            tracing::warn!(order = %order_id, "saga queue full; the sweeper will start it");
        }
    }

    /// Starts sagas for orders accepted without one (a crash between the order's creation
    /// and its saga's start).
    pub(crate) async fn sweep(&self) {
        if self.inner.queue.is_none() {
            return;
        }
        let cutoff =
            chrono::Utc::now() - chrono::Duration::from_std(crate::SWEEP_AGE).unwrap_or_default();
        let cutoff = cutoff.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let ids: Result<Vec<String>, sqlx::Error> = on_db!(&self.inner.db, |pool| {
            sqlx::query_scalar(
                "SELECT id FROM order_view WHERE status = 'PENDING' AND saga_id IS NULL
                 AND created_at < $1 ORDER BY id LIMIT $2",
            )
            .bind(&cutoff)
            .bind(SWEEP_BATCH)
            .fetch_all(pool)
            .await
        });
        let ids = match ids {
            Ok(ids) => ids,
            Err(error) => {
                tracing::debug!(%error, "order sweep skipped");
                return;
            }
        };
        for id in ids {
            if self
                .inner
                .active
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&id)
            {
                continue;
            }
            match self.inner.orders.load(&id).await {
                Ok(loaded)
                    if loaded.state.saga_id.is_none()
                        && loaded.state.status() == OrderStatus::Pending =>
                {
                    tracing::info!(order = %id, "starting the saga of an order accepted without one");
                    self.spawn_saga(&id, &loaded.state);
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(order = %id, %error, "sweep could not load the order"),
            }
        }
    }
}

/// Orders that may wait for a saga slot before the queue refuses more (the sweeper then
/// starts them).
const SAGA_QUEUE_MAX: usize = 10_000;

/// Starts queued sagas as slots free up, until the service stops.
async fn dispatch(
    mut waiting: tokio::sync::mpsc::Receiver<OrderSagaContext>,
    slots: Arc<Semaphore>,
    engine: Engine,
    active: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let context = tokio::select! {
            next = waiting.recv() => match next {
                Some(context) => context,
                None => return,
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        let engine = engine.clone();
        let active = active.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            // On shutdown the saga stops where it is, as in a crash: its log has every
            // transition, and the next start's recovery finishes it.
            // The saga continues the trace of the request that placed the order; its gRPC
            // calls carry it to the participants.
            let span = tracing::info_span!("order.saga", order = %context.order_id);
            if let Some(traceparent) = &context.traceparent {
                let carrier = std::collections::HashMap::from([(
                    trellis_telemetry::propagation::TRACEPARENT.to_owned(),
                    traceparent.clone(),
                )]);
                trellis_telemetry::propagation::set_parent_from_map(&span, &carrier);
            }
            tokio::select! {
                result = tracing::Instrument::instrument(engine.run(&context), span) => {
                    if let Err(error) = result {
                        tracing::warn!(order = %context.order_id, %error, "order saga did not finish; recovery will");
                    }
                }
                _ = stop.wait_for(|s| *s) => {}
            }
            active
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&context.order_id);
        });
    }
}

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
    let request = serde_json::to_string(&body).map_err(ApiError::internal)?;

    // Replays answer before any other work, unless the first attempt recorded its key and
    // stopped before creating the order (a crash between the two writes): then this attempt
    // completes it, under the order id the first one chose.
    let recorded = match find_request(&state.inner.db, &caller.user_id, &key).await? {
        Some(recorded) => match replay(&state, &request, &recorded).await? {
            Replay::Answered(response) => return Ok(response),
            Replay::Incomplete => Some(recorded.order_id),
        },
        None => None,
    };

    if !state.known_user(&caller.user_id) {
        let mut users = state.inner.users.clone();
        if let Err(status) = users
            .get_user(GetUserRequest {
                id: caller.user_id.clone(),
            })
            .await
        {
            return Err(match status.code() {
                tonic::Code::NotFound => ApiError::forbidden("the caller's account does not exist"),
                _ => status_to_api_error("users", &status),
            });
        }
        state.remember_user(&caller.user_id);
    }
    let mut products = state.inner.products.clone();
    let prices = products
        .price_items(PriceItemsRequest {
            product_ids: body.items.iter().map(|i| i.product_id.clone()).collect(),
        })
        .await
        .map_err(|status| match status.code() {
            tonic::Code::NotFound => ApiError::unprocessable("unknown_product", status.message()),
            _ => status_to_api_error("products", &status),
        })?
        .into_inner();
    let price_of: HashMap<&str, i64> = prices
        .products
        .iter()
        .map(|p| (p.id.as_str(), p.price_cents))
        .collect();
    let mut items = Vec::with_capacity(body.items.len());
    for item in &body.items {
        let Some(price) = price_of.get(item.product_id.as_str()) else {
            return Err(ApiError::unprocessable(
                "unknown_product",
                format!("no product {}", item.product_id),
            ));
        };
        items.push(OrderLineView {
            product_id: item.product_id.clone(),
            quantity: item.quantity,
            price_cents: *price,
        });
    }

    if let Some(order_id) = recorded {
        return create_order(&state, &caller, &order_id, items).await;
    }
    let candidate = uuid::Uuid::now_v7().hyphenated().to_string();
    let inserted = on_db!(&state.inner.db, |pool| {
        sqlx::query(
            "INSERT INTO order_requests (user_id, idem_key, request, order_id, created_at)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (user_id, idem_key) DO NOTHING",
        )
        .bind(&caller.user_id)
        .bind(&key)
        .bind(&request)
        .bind(&candidate)
        .bind(chrono::Utc::now().to_rfc3339())
        .execute(pool)
        .await
        .map(|r| r.rows_affected())
    })?;
    if inserted == 0 {
        // A concurrent request with the same key won: answer as it does, or, if it has not
        // created its order (yet, or ever), create it: `Create` on an existing order is a
        // no-op, so whichever of the two appends first decides the order.
        let Some(recorded) = find_request(&state.inner.db, &caller.user_id, &key).await? else {
            return Err(ApiError::internal("idempotency row vanished"));
        };
        return match replay(&state, &request, &recorded).await? {
            Replay::Answered(response) => Ok(response),
            Replay::Incomplete => create_order(&state, &caller, &recorded.order_id, items).await,
        };
    }
    create_order(&state, &caller, &candidate, items).await
}

/// An `Idempotency-Key` recorded by an earlier attempt.
#[derive(Debug)]
struct Recorded {
    /// The order id that attempt chose.
    order_id: String,
    /// Its body, as JSON.
    request: String,
}

/// What an earlier attempt with the same key left.
enum Replay {
    /// Its answer, given again (or the 422 for another body).
    Answered(Response),
    /// Its key without its order: this attempt must create it.
    Incomplete,
}

/// Checks a recorded attempt against this one's body and answers as it did, when its order
/// exists.
async fn replay(state: &State, request: &str, recorded: &Recorded) -> Result<Replay, ApiError> {
    if recorded.request != request {
        return Err(ApiError::unprocessable(
            "idempotency_key_reused",
            "this Idempotency-Key was used with another body",
        ));
    }
    let order = state
        .inner
        .orders
        .load(&recorded.order_id)
        .await
        .map_err(ApiError::internal)?
        .state;
    if !order.exists {
        return Ok(Replay::Incomplete);
    }
    Ok(Replay::Answered(accept_placement(
        state,
        &recorded.order_id,
        &order,
    )))
}

async fn find_request(db: &Db, user_id: &str, key: &str) -> Result<Option<Recorded>, ApiError> {
    let row: Option<Recorded> = on_db!(db, |pool| {
        sqlx::query(
            "SELECT order_id, request FROM order_requests WHERE user_id = $1 AND idem_key = $2",
        )
        .bind(user_id)
        .bind(key)
        .fetch_optional(pool)
        .await
        .map(|row| {
            row.map(|r| Recorded {
                order_id: r.get("order_id"),
                request: r.get("request"),
            })
        })
    })?;
    Ok(row)
}

/// Creates order `order_id` from `items` (a no-op when it exists), then answers as
/// [`accept_placement`] does.
async fn create_order(
    state: &State,
    caller: &Caller,
    order_id: &str,
    items: Vec<OrderLineView>,
) -> Result<Response, ApiError> {
    let metadata = Metadata {
        correlation_id: uuid::Uuid::parse_str(order_id).ok(),
        // The relay puts it on the bus message, so consumers continue the trace.
        traceparent: trellis_telemetry::propagation::current_traceparent(),
        ..Metadata::default()
    };
    let command = OrderCommand::Create {
        user_id: caller.user_id.clone(),
        items,
        choreographed: state.inner.queue.is_none(),
    };
    // The id was made for this request (or by the attempt this one completes): nothing to
    // read before the append; if the stream exists after all, `Create` does nothing.
    let executed = state
        .inner
        .orders
        .execute_on_new(order_id, command, metadata)
        .await
        .map_err(ApiError::internal)?;
    if !executed.events.is_empty() {
        metrics::counter!("shop_orders_placed_total").increment(1);
    }
    Ok(accept_placement(state, order_id, &executed.state))
}

/// Makes sure the saga of `order` (which exists) runs, and answers 202.
fn accept_placement(state: &State, order_id: &str, order: &Order) -> Response {
    debug_assert!(order.exists, "only an existing order is accepted");
    if order.saga_id.is_none() && order.status() == OrderStatus::Pending {
        state.spawn_saga(order_id, order);
    }
    accepted(order_id)
}

fn view_of(id: &str, order: &Order) -> OrderView {
    OrderView {
        id: id.to_owned(),
        user_id: order.user_id.clone(),
        status: order.status(),
        items: order.items.clone(),
        total_cents: order.total_cents,
        reason: if order.status() == OrderStatus::Cancelled {
            order.reason.clone()
        } else {
            None
        },
        timeline: order.timeline.clone(),
    }
}

fn row_view(
    row: &(String, String, String, String, i64, Option<String>, String),
) -> Result<OrderView, ApiError> {
    let (id, user_id, status, items, total_cents, reason, timeline) = row;
    Ok(OrderView {
        id: id.clone(),
        user_id: user_id.clone(),
        status: OrderStatus::parse(status)
            .ok_or_else(|| ApiError::internal("bad status in read model"))?,
        items: serde_json::from_str(items).map_err(ApiError::internal)?,
        total_cents: *total_cents,
        reason: reason.clone(),
        timeline: serde_json::from_str(timeline).map_err(ApiError::internal)?,
    })
}

type ViewRow = (String, String, String, String, i64, Option<String>, String);

fn to_view_row<R: Row>(row: &R) -> ViewRow
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    String: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<String>: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    (
        row.get("id"),
        row.get("user_id"),
        row.get("status"),
        row.get("items"),
        row.get("total_cents"),
        row.get("reason"),
        row.get("timeline"),
    )
}

const VIEW_COLUMNS: &str = "id, user_id, status, items, total_cents, reason, timeline";

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
    let sql = format!("SELECT {VIEW_COLUMNS} FROM order_view WHERE id = $1");
    let row: Option<ViewRow> = on_db!(&state.inner.db, |pool| {
        sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
            .bind(&id)
            .fetch_optional(pool)
            .await
            .map(|row| row.as_ref().map(to_view_row))
    })?;
    let view = match row {
        Some(row) => row_view(&row)?,
        None => {
            // Not projected yet: read the stream.
            let order = state
                .inner
                .orders
                .load(&id)
                .await
                .map_err(ApiError::internal)?
                .state;
            if !order.exists {
                return Err(ApiError::not_found("no such order"));
            }
            view_of(&id, &order)
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
    let mut sql = format!("SELECT {VIEW_COLUMNS} FROM order_view WHERE 1 = 1");
    let mut binds: Vec<String> = Vec::new();
    if !caller.is_admin() {
        binds.push(caller.user_id.clone());
        sql.push_str(&format!(" AND user_id = ${}", binds.len()));
    }
    if let Some(status) = status {
        binds.push(status.as_str().to_owned());
        sql.push_str(&format!(" AND status = ${}", binds.len()));
    }
    if let Some(before) = before {
        binds.push(before);
        sql.push_str(&format!(" AND id < ${}", binds.len()));
    }
    sql.push_str(&format!(" ORDER BY id DESC LIMIT {}", limit + 1));
    let rows: Vec<ViewRow> = on_db!(&state.inner.db, |pool| {
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.clone()));
        for b in &binds {
            q = q.bind(b);
        }
        q.fetch_all(pool)
            .await
            .map(|rows| rows.iter().map(to_view_row).collect())
    })?;
    let more = rows.len() > limit as usize;
    let items = rows
        .iter()
        .take(limit as usize)
        .map(row_view)
        .collect::<Result<Vec<_>, _>>()?;
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
        .inner
        .orders
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
        .inner
        .orders
        .execute(&id, OrderCommand::RequestCancel, metadata)
        .await
    {
        Ok(_) => Ok(accepted(&id)),
        Err(RepositoryError::Domain(
            error @ (OrderError::NotCancellable(_) | OrderError::Ended(_)),
        )) => Err(ApiError::conflict("not_cancellable", error.to_string())),
        Err(error) => Err(ApiError::internal(error)),
    }
}
