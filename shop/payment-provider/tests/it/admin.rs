//! Run-time settings through `/admin/config` and the OpenAPI document.

use axum::http::StatusCode;
use serde_json::json;
use shop_payment_provider::{CARD_LIMIT_CENTS_DEFAULT, ProviderConfig, app};

use crate::{call, charge};

#[tokio::test]
async fn a_partial_update_changes_only_the_given_settings() {
    let (router, handle) = app(ProviderConfig::default());
    let (status, before) = call(&router, "GET", "/admin/config", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(before["card_limit_cents"], CARD_LIMIT_CENTS_DEFAULT);
    assert_eq!(before["outage"], false);
    let (status, after) = call(
        &router,
        "PUT",
        "/admin/config",
        Some(json!({"outage": true, "latency_ms": 5})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(after["outage"], true);
    assert_eq!(after["latency_ms"], 5);
    assert_eq!(after["card_limit_cents"], CARD_LIMIT_CENTS_DEFAULT);
    assert!(handle.config().outage);
    let (status, _) = charge(&router, "k", 1).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn out_of_range_settings_are_refused_naming_the_field() {
    let (router, handle) = app(ProviderConfig::default());
    let cases = [
        (json!({"failure_rate": 2.0}), "invalid_failure_rate"),
        (json!({"decline_rate": -0.1}), "invalid_decline_rate"),
        (
            json!({"fail_after_capture_rate": 1.01}),
            "invalid_fail_after_capture_rate",
        ),
        (json!({"latency_ms": 60_001}), "invalid_latency_ms"),
        (json!({"card_limit_cents": -1}), "invalid_card_limit_cents"),
        (json!({"outage": "yes"}), "invalid_json"),
        (json!({"outages": true}), "invalid_json"),
    ];
    for (body, code) in cases {
        let (status, answer) = call(&router, "PUT", "/admin/config", Some(body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(answer["error"]["code"], code, "{body}");
    }
    // A refused update changes nothing, not even its valid fields.
    let (status, _) = call(
        &router,
        "PUT",
        "/admin/config",
        Some(json!({"outage": true, "failure_rate": 7})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(handle.config(), ProviderConfig::default());
    assert_eq!(
        handle
            .set_config(ProviderConfig {
                failure_rate: f64::INFINITY,
                ..ProviderConfig::default()
            })
            .unwrap_err()
            .field,
        "failure_rate"
    );
}

#[tokio::test]
async fn the_openapi_document_lists_the_routes() {
    let (router, _) = app(ProviderConfig::default());
    let (status, doc) = call(&router, "GET", "/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    for path in [
        "/v1/charges",
        "/v1/charges/{id}",
        "/v1/refunds",
        "/v1/stats",
        "/admin/config",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} missing");
    }
    assert_eq!(
        doc,
        serde_json::to_value(shop_payment_provider::openapi()).expect("json")
    );
}

#[tokio::test]
async fn a_start_configuration_out_of_range_is_clamped_not_a_panic() {
    let (_, handle) = app(ProviderConfig {
        latency_ms: u64::MAX,
        decline_rate: f64::NAN,
        ..ProviderConfig::default()
    });
    let config = handle.config();
    assert_eq!(config.latency_ms, shop_payment_provider::LATENCY_MS_MAX);
    assert_eq!(config.decline_rate, 0.0);
}
