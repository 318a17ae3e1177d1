//! The payment provider simulator, driven through its router.

mod admin;
mod charges;
mod faults;
mod refunds;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use shop_payment_provider::{CHARGES_KEPT_MAX, Ledger, ProviderConfig, ProviderHandle, app};
use tower::ServiceExt;
use trellis_service::auth::{IDENTITY_HEADER, ServiceKey};

/// The key the simulator under test trusts (one per test binary).
pub(crate) fn key() -> ServiceKey {
    static KEY: std::sync::OnceLock<ServiceKey> = std::sync::OnceLock::new();
    KEY.get_or_init(|| ServiceKey::generate().expect("OS randomness"))
        .clone()
}

/// A simulator with `config` over a fresh ledger in memory of the shop's capacity.
pub(crate) async fn provider(config: ProviderConfig) -> (Router, ProviderHandle) {
    provider_with_capacity(config, CHARGES_KEPT_MAX).await
}

/// A simulator with `config` over a fresh ledger in memory keeping at most `capacity` charges.
pub(crate) async fn provider_with_capacity(
    config: ProviderConfig,
    capacity: usize,
) -> (Router, ProviderHandle) {
    let ledger = Ledger::in_memory(capacity).await.expect("in-memory ledger");
    app(config, ledger, &key())
}

/// An identity token for an administrator, as the shop's gateway signs one.
pub(crate) fn admin_token() -> axum::http::HeaderValue {
    key()
        .signer("gateway")
        .token("admin-1", trellis_service::ROLE_ADMIN)
        .expect("signs")
}

/// Sends one request to the router as an administrator and answers the status and the JSON
/// body.
pub(crate) async fn call(
    router: &Router,
    method: &str,
    uri: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    call_as(router, Some(admin_token()), method, uri, body).await
}

/// Sends one request with `identity` (or none) and answers the status and the JSON body.
pub(crate) async fn call_as(
    router: &Router,
    identity: Option<axum::http::HeaderValue>,
    method: &str,
    uri: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(token) = identity {
        request = request.header(IDENTITY_HEADER, token);
    }
    let body = match body {
        Some(json) => {
            request = request.header("content-type", "application/json");
            Body::from(json.to_string())
        }
        None => Body::empty(),
    };
    let response = router
        .clone()
        .oneshot(request.body(body).expect("request"))
        .await
        .expect("infallible");
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let json = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("JSON body")
    };
    (status, json)
}

/// Charges `amount` under `key`.
pub(crate) async fn charge(router: &Router, key: &str, amount: i64) -> (StatusCode, Value) {
    call(
        router,
        "POST",
        "/v1/charges",
        Some(serde_json::json!({"idempotency_key": key, "amount_cents": amount})),
    )
    .await
}
