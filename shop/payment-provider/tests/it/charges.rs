//! Charges: idempotency, declines, validation, lookups, eviction.

use axum::http::StatusCode;
use serde_json::json;
use shop_payment_provider::ProviderConfig;

use crate::{call, charge, provider, provider_with_capacity};

#[tokio::test]
async fn the_same_key_answers_the_same_charge_and_captures_once() {
    // A repeat of a key must never capture again; it answers the first charge with 200.
    let (router, handle) = provider(ProviderConfig::default()).await;
    let (status, first) = charge(&router, "order-1", 2_500).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(first["status"], "captured");
    assert_eq!(first["amount_cents"], 2_500);
    assert_eq!(first["idempotency_key"], "order-1");
    for _ in 0..3 {
        let (status, again) = charge(&router, "order-1", 2_500).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(again, first);
    }
    assert_eq!(handle.stats().captures, 1);
}

#[tokio::test]
async fn concurrent_repeats_of_a_key_capture_once() {
    // Many callers racing with one key: exactly one capture, one charge id.
    let (router, handle) = provider(ProviderConfig::default()).await;
    let calls = (0..20).map(|_| {
        let router = router.clone();
        tokio::spawn(async move { charge(&router, "race", 100).await })
    });
    let mut ids = std::collections::HashSet::new();
    let mut created = 0;
    for call in calls {
        let (status, body) = call.await.expect("task");
        created += usize::from(status == StatusCode::CREATED);
        ids.insert(body["id"].as_str().expect("id").to_owned());
    }
    assert_eq!((created, ids.len()), (1, 1));
    assert_eq!(handle.stats().captures, 1);
}

#[tokio::test]
async fn a_key_reused_with_another_amount_is_refused() {
    let (router, handle) = provider(ProviderConfig::default()).await;
    charge(&router, "k", 100).await;
    let (status, body) = charge(&router, "k", 101).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["code"], "idempotency_key_reused");
    assert_eq!(handle.stats().captures, 1);
}

#[tokio::test]
async fn charges_above_the_card_limit_are_declined_and_stay_declined() {
    let (router, handle) = provider(ProviderConfig {
        card_limit_cents: 1_000,
        ..ProviderConfig::default()
    })
    .await;
    let (status, body) = charge(&router, "big", 1_001).await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(body["error"]["code"], "card_declined");
    // Raising the limit does not turn a declined key into a capture.
    handle
        .set_config(ProviderConfig::default())
        .expect("valid config");
    let (status, _) = charge(&router, "big", 1_001).await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
    let (status, _) = charge(&router, "exact", 1_000).await;
    assert_eq!(status, StatusCode::CREATED);
    let stats = handle.stats();
    assert_eq!((stats.captures, stats.declines), (1, 1));
    let (_, found) = call(&router, "GET", "/v1/charges?idempotency_key=big", None).await;
    assert_eq!(found["items"][0]["status"], "declined");
}

#[tokio::test]
async fn a_decline_rate_of_one_declines_every_new_charge() {
    let (router, handle) = provider(ProviderConfig {
        decline_rate: 1.0,
        ..ProviderConfig::default()
    })
    .await;
    for n in 0..5 {
        let (status, _) = charge(&router, &format!("k{n}"), 10).await;
        assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
    }
    assert_eq!(handle.stats().declines, 5);
    assert_eq!(handle.stats().captures, 0);
}

#[tokio::test]
async fn bad_charges_are_refused_with_the_problem_named() {
    let (router, _) = provider(ProviderConfig::default()).await;
    let cases = [
        (
            json!({"idempotency_key": "", "amount_cents": 1}),
            "invalid_idempotency_key",
        ),
        (
            json!({"idempotency_key": "x".repeat(256), "amount_cents": 1}),
            "invalid_idempotency_key",
        ),
        (
            json!({"idempotency_key": "k", "amount_cents": 0}),
            "invalid_amount_cents",
        ),
        (
            json!({"idempotency_key": "k", "amount_cents": -5}),
            "invalid_amount_cents",
        ),
        (
            json!({"idempotency_key": "k", "amount_cents": 1, "currency": "usd"}),
            "invalid_currency",
        ),
        (json!({"idempotency_key": "k"}), "invalid_json"),
        (
            json!({"idempotency_key": "k", "amount_cents": 1, "tip": 2}),
            "invalid_json",
        ),
    ];
    for (body, code) in cases {
        let (status, answer) = call(&router, "POST", "/v1/charges", Some(body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(answer["error"]["code"], code, "{body}");
    }
    let huge = json!({"idempotency_key": "k", "amount_cents": 1, "currency": "x".repeat(20_000)});
    let (status, answer) = call(&router, "POST", "/v1/charges", Some(huge)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(answer["error"]["code"], "payload_too_large");
}

#[tokio::test]
async fn charges_are_found_by_key_and_by_id() {
    let (router, _) = provider(ProviderConfig::default()).await;
    let (_, created) = charge(&router, "order-9", 700).await;
    let (status, list) = call(&router, "GET", "/v1/charges?idempotency_key=order-9", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["items"], json!([created.clone()]));
    let (_, empty) = call(&router, "GET", "/v1/charges?idempotency_key=other", None).await;
    assert_eq!(empty["items"], json!([]));
    let id = created["id"].as_str().expect("id");
    let (status, by_id) = call(&router, "GET", &format!("/v1/charges/{id}"), None).await;
    assert_eq!((status, by_id), (StatusCode::OK, created));
    let (status, missing) = call(&router, "GET", "/v1/charges/ch_nope", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(missing["error"]["code"], "not_found");
    let (status, body) = call(&router, "GET", "/v1/charges", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "missing_idempotency_key");
}

#[tokio::test]
async fn memory_is_bounded_and_the_oldest_charge_goes_first() {
    let (router, handle) = provider_with_capacity(ProviderConfig::default(), 3).await;
    for n in 0..5 {
        charge(&router, &format!("k{n}"), 10).await;
    }
    assert_eq!(handle.stats().charges_kept, 3);
    let (_, oldest) = call(&router, "GET", "/v1/charges?idempotency_key=k0", None).await;
    assert_eq!(oldest["items"], json!([]));
    let (_, newest) = call(&router, "GET", "/v1/charges?idempotency_key=k4", None).await;
    assert_eq!(newest["items"].as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn a_failing_ledger_answers_500_with_an_unknown_outcome() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/provider.db", dir.path().display());
    let ledger = shop_payment_provider::Ledger::open(&url, 10)
        .await
        .expect("open");
    let (router, _) = shop_payment_provider::app(ProviderConfig::default(), ledger, &crate::key());
    // Someone else breaks the file under the simulator.
    let mut other = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
        .await
        .expect("second connection");
    sqlx::query("DROP TABLE charges")
        .execute(&mut other)
        .await
        .expect("drop");
    let (status, body) = charge(&router, "k1", 10).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(body["error"]["code"], "ledger_failed");
    let (status, body) = call(&router, "GET", "/v1/charges?idempotency_key=k1", None).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(body["error"]["code"], "ledger_failed");
}
