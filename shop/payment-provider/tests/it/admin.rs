//! Run-time settings through `/admin/config` and the OpenAPI document.

use axum::http::StatusCode;
use serde_json::json;
use shop_payment_provider::{CARD_LIMIT_CENTS_DEFAULT, ProviderConfig};

use crate::{call, call_as, charge, key, provider};

#[tokio::test]
async fn a_partial_update_changes_only_the_given_settings() {
    let (router, handle) = provider(ProviderConfig::default()).await;
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
    let (router, handle) = provider(ProviderConfig::default()).await;
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
    let (router, _) = provider(ProviderConfig::default()).await;
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
    let (_, handle) = provider(ProviderConfig {
        latency_ms: u64::MAX,
        decline_rate: f64::NAN,
        ..ProviderConfig::default()
    })
    .await;
    let config = handle.config();
    assert_eq!(config.latency_ms, shop_payment_provider::LATENCY_MS_MAX);
    assert_eq!(config.decline_rate, 0.0);
}

#[tokio::test]
async fn the_admin_routes_refuse_anyone_but_an_administrator() {
    // Goal: the simulator's fault switches cannot be flipped by whoever reaches its port.
    // Method: read and change /admin/config with no token, with forged identity headers, with
    // a customer's token and with a token signed by another key; none may pass.
    let (router, handle) = provider(ProviderConfig::default()).await;
    let outage = Some(serde_json::json!({"outage": true}));
    let (status, body) = call_as(&router, None, "PUT", "/admin/config", outage.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"]["code"], "unauthenticated");
    let forged = axum::http::Request::builder()
        .method("GET")
        .uri("/admin/config")
        .header("x-user-id", "someone")
        .header("x-user-role", "admin")
        .body(axum::body::Body::empty())
        .expect("request");
    let response = tower::ServiceExt::oneshot(router.clone(), forged)
        .await
        .expect("infallible");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let customer = key()
        .signer("gateway")
        .token("c1", trellis_service::ROLE_CUSTOMER)
        .expect("signs");
    let (status, _) = call_as(&router, Some(customer), "GET", "/admin/config", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let stranger = trellis_service::auth::ServiceKey::generate()
        .expect("randomness")
        .signer("gateway")
        .token("admin-1", trellis_service::ROLE_ADMIN)
        .expect("signs");
    let (status, _) = call_as(&router, Some(stranger), "PUT", "/admin/config", outage).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        !handle.config().outage,
        "no refused call changed the settings"
    );
}
