//! Refunds: once per charge, idempotent by key.

use axum::http::StatusCode;
use serde_json::json;
use shop_payment_provider::ProviderConfig;

use crate::{call, charge, provider};

async fn refund(
    router: &axum::Router,
    charge_id: &str,
    key: &str,
) -> (StatusCode, serde_json::Value) {
    call(
        router,
        "POST",
        "/v1/refunds",
        Some(json!({"charge_id": charge_id, "idempotency_key": key})),
    )
    .await
}

#[tokio::test]
async fn a_charge_is_refunded_at_most_once() {
    let (router, handle) = provider(ProviderConfig::default()).await;
    let (_, created) = charge(&router, "order-1", 900).await;
    let id = created["id"].as_str().expect("id");
    let (status, first) = refund(&router, id, "refund-order-1").await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(first["status"], "refunded");
    assert_eq!(first["charge_id"], id);
    let (status, again) = refund(&router, id, "refund-order-1").await;
    assert_eq!((status, again), (StatusCode::OK, first.clone()));
    let (status, other) = refund(&router, id, "another-key").await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(other["error"]["code"], "charge_already_refunded");
    assert_eq!(handle.stats().refunds, 1);
    // The charge shows the refund, and charging the key again neither captures nor un-refunds.
    let (status, replay) = charge(&router, "order-1", 900).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(replay["status"], "refunded");
    assert_eq!(replay["refund_id"], first["id"]);
    assert_eq!(handle.stats().captures, 1);
}

#[tokio::test]
async fn refunds_of_unknown_or_declined_charges_are_refused() {
    let (router, handle) = provider(ProviderConfig {
        card_limit_cents: 10,
        ..ProviderConfig::default()
    })
    .await;
    let (status, body) = refund(&router, "ch_missing", "r1").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "not_found");
    charge(&router, "too-much", 11).await;
    let (_, found) = call(&router, "GET", "/v1/charges?idempotency_key=too-much", None).await;
    let declined = found["items"][0]["id"].as_str().expect("id");
    let (status, body) = refund(&router, declined, "r2").await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error"]["code"], "charge_not_captured");
    assert_eq!(handle.stats().refunds, 0);
}

#[tokio::test]
async fn a_refund_key_cannot_be_reused_for_another_charge() {
    let (router, _) = provider(ProviderConfig::default()).await;
    let (_, a) = charge(&router, "a", 1).await;
    let (_, b) = charge(&router, "b", 1).await;
    refund(&router, a["id"].as_str().expect("id"), "same").await;
    let (status, body) = refund(&router, b["id"].as_str().expect("id"), "same").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["code"], "idempotency_key_reused");
}
