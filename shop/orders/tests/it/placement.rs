//! Placing orders: an interrupted placement is completed by its retry.

use axum::http::{Method, StatusCode};
use serde_json::json;
use shop_contracts::api::{OrderItem, PlaceOrder};

use crate::helpers::{PRICE_CENTS, TestOrders};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_idempotency_row_and_the_order_completes_on_retry() {
    // Records the idempotency row as the handler does and stops there (the crash), then
    // repeats the request with the same key: it must create that order and run its saga.
    let orders = TestOrders::start().await;
    let user = "user-1";
    let key = "key-crashed-once";
    let body = PlaceOrder {
        items: vec![OrderItem {
            product_id: "product-1".to_owned(),
            quantity: 2,
        }],
    };
    let order_id = uuid::Uuid::now_v7().hyphenated().to_string();
    let pool = sqlx::SqlitePool::connect(&orders.read_db_url())
        .await
        .expect("read db");
    sqlx::query(
        "INSERT INTO order_requests (user_id, idem_key, request, order_id, created_at)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(user)
    .bind(key)
    .bind(serde_json::to_string(&body).expect("serializes"))
    .bind(&order_id)
    .bind(chrono::Utc::now().to_rfc3339())
    .execute(&pool)
    .await
    .expect("the first attempt's row");
    pool.close().await;

    let (status, accepted) = orders
        .call(
            Method::POST,
            "/api/orders",
            user,
            &[("idempotency-key", key)],
            Some(json!(body)),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    assert_eq!(
        accepted["id"],
        order_id.as_str(),
        "the first attempt's order id"
    );

    let order = orders.wait_for_status(user, &order_id, "CONFIRMED").await;
    assert_eq!(order["total_cents"], 2 * PRICE_CENTS);

    // A third attempt answers the same order and creates nothing new.
    let (status, again) = orders
        .call(
            Method::POST,
            "/api/orders",
            user,
            &[("idempotency-key", key)],
            Some(json!(body)),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{again}");
    assert_eq!(again["id"], order_id.as_str());
}
