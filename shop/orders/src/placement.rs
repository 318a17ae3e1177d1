//! Placing an order, at most once per `Idempotency-Key`.
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

use shop_contracts::api::{OrderLineView, OrderStatus, PlaceOrder};
use shop_contracts::proto::{GetUserRequest, PriceItemsRequest};
use sqlx::Row;
use trellis_eventstore::Metadata;
use trellis_service::{ApiError, Caller, Db, on_db, status_to_api_error};

use crate::aggregate::{Order, OrderCommand};
use crate::state::State;

/// The idempotency table (in the read-model database).
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

/// Places the order `body` (validated) for `caller` under `key`, or answers as the earlier
/// attempt with the same key did: the id of the accepted order, whose saga runs.
///
/// # Errors
/// The [`ApiError`] to answer: the key reused with another body (422), an account that does
/// not exist (403), an unknown product (422), a dependency that did not answer (503), or an
/// internal error.
pub(crate) async fn place(
    state: &State,
    caller: &Caller,
    key: &str,
    body: &PlaceOrder,
) -> Result<String, ApiError> {
    let request = serde_json::to_string(body).map_err(ApiError::internal)?;

    // Replays answer before any other work, unless the first attempt recorded its key and
    // stopped before creating the order (a crash between the two writes): then this attempt
    // completes it, under the order id the first one chose.
    let recorded = match find_request(state.db(), &caller.user_id, key).await? {
        Some(recorded) => match replay(state, &request, &recorded).await? {
            Replay::Answered(order_id) => return Ok(order_id),
            Replay::Incomplete => Some(recorded.order_id),
        },
        None => None,
    };

    check_account(state, caller).await?;
    let items = price(state, body).await?;

    if let Some(order_id) = recorded {
        return create_order(state, caller, &order_id, items).await;
    }
    let candidate = uuid::Uuid::now_v7().hyphenated().to_string();
    let inserted = on_db!(state.db(), |pool| {
        sqlx::query(
            "INSERT INTO order_requests (user_id, idem_key, request, order_id, created_at)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (user_id, idem_key) DO NOTHING",
        )
        .bind(&caller.user_id)
        .bind(key)
        .bind(&request)
        .bind(&candidate)
        .bind(state.now().to_rfc3339())
        .execute(pool)
        .await
        .map(|r| r.rows_affected())
    })?;
    if inserted == 0 {
        // A concurrent request with the same key won: answer as it does, or, if it has not
        // created its order (yet, or ever), create it: `Create` on an existing order is a
        // no-op, so whichever of the two appends first decides the order.
        let Some(recorded) = find_request(state.db(), &caller.user_id, key).await? else {
            return Err(ApiError::internal("idempotency row vanished"));
        };
        return match replay(state, &request, &recorded).await? {
            Replay::Answered(order_id) => Ok(order_id),
            Replay::Incomplete => create_order(state, caller, &recorded.order_id, items).await,
        };
    }
    create_order(state, caller, &candidate, items).await
}

/// Makes sure the caller's account exists (asking the users service unless it confirmed
/// the account recently).
async fn check_account(state: &State, caller: &Caller) -> Result<(), ApiError> {
    if state.known_user(&caller.user_id) {
        return Ok(());
    }
    if let Err(status) = state
        .users()
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
    Ok(())
}

/// The lines of `body` with their current prices.
async fn price(state: &State, body: &PlaceOrder) -> Result<Vec<OrderLineView>, ApiError> {
    let prices = state
        .products()
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
    Ok(items)
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
#[derive(Debug)]
enum Replay {
    /// Its order exists: the answer is its id again.
    Answered(String),
    /// Its key without its order: this attempt must create it.
    Incomplete,
}

/// Checks a recorded attempt against this one's body and answers as it did, when its order
/// exists (a 422 for another body).
async fn replay(state: &State, request: &str, recorded: &Recorded) -> Result<Replay, ApiError> {
    if recorded.request != request {
        return Err(ApiError::unprocessable(
            "idempotency_key_reused",
            "this Idempotency-Key was used with another body",
        ));
    }
    let order = state
        .orders()
        .load(&recorded.order_id)
        .await
        .map_err(ApiError::internal)?
        .state;
    if !order.exists {
        return Ok(Replay::Incomplete);
    }
    Ok(Replay::Answered(accept(state, &recorded.order_id, &order)))
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

/// Creates order `order_id` from `items` (a no-op when it exists), then accepts it as
/// [`accept`] does.
async fn create_order(
    state: &State,
    caller: &Caller,
    order_id: &str,
    items: Vec<OrderLineView>,
) -> Result<String, ApiError> {
    let metadata = Metadata {
        correlation_id: uuid::Uuid::parse_str(order_id).ok(),
        // The outbox puts it on the bus message, so consumers continue the trace.
        traceparent: trellis_telemetry::propagation::current_traceparent(),
        ..Metadata::default()
    };
    let command = OrderCommand::Create {
        user_id: caller.user_id.clone(),
        items,
        choreographed: state.sagas().is_none(),
    };
    // The id was made for this request (or by the attempt this one completes): nothing to
    // read before the append; if the stream exists after all, `Create` does nothing.
    let executed = state
        .orders()
        .execute_on_new(order_id, command.at(state.now()), metadata)
        .await
        .map_err(ApiError::internal)?;
    if !executed.events.is_empty() {
        metrics::counter!("shop_orders_placed_total").increment(1);
    }
    Ok(accept(state, order_id, &executed.state))
}

/// Makes sure the saga of `order` (which exists) runs, and answers its id.
fn accept(state: &State, order_id: &str, order: &Order) -> String {
    debug_assert!(order.exists, "only an existing order is accepted");
    if order.saga_id.is_none()
        && order.status() == OrderStatus::Pending
        && let Some(sagas) = state.sagas()
    {
        sagas.submit(order_id, order);
    }
    order_id.to_owned()
}
