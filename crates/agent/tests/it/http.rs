//! The operator's HTTP surface: list and show runs, approve, deny and cancel, with JSON errors.

use std::sync::Arc;

use axum::body::Body;
use http_body_util::BodyExt as _;
use serde_json::{Value, json};
use tower::ServiceExt as _;
use trellis_agent::RunOutcome;
use trellis_agent::testing::{Script, Turn, calls, text};

use crate::support::{FakeShop, agent, caller, client, memory, registry};

async fn call(app: &axum::Router, method: &str, uri: &str, body: Option<Value>) -> (u16, Value) {
    let request = axum::http::Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    (status, value)
}

#[tokio::test]
async fn an_operator_approves_over_http_and_the_run_goes_on() {
    let script = Script::start(vec![
        Turn::Answer(calls(&[(
            "c1",
            "place_order",
            r#"{"product":"p","quantity":1}"#,
        )])),
        Turn::Answer(text("placed")),
    ])
    .await;
    let shop = Arc::new(FakeShop::default());
    let store = memory();
    let agent = agent(
        store.clone(),
        Arc::new(client(&script)),
        registry(&shop, true),
    );
    let app = trellis_agent::http::router(store.clone());
    let (id, outcome) = agent.run(&caller(), "order").await.unwrap();
    assert!(matches!(outcome, RunOutcome::AwaitingApproval { .. }));

    let (status, body) = call(&app, "GET", "/runs?status=running", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["runs"][0]["id"], id.to_string());
    let (status, body) = call(&app, "GET", &format!("/runs/{id}"), None).await;
    assert_eq!(status, 200);
    assert_eq!(body["state"]["calls"][0]["tool"], "place_order");
    assert_eq!(body["steps"][0]["step"], "llm-1");

    let (status, body) = call(
        &app,
        "POST",
        &format!("/runs/{id}/approve"),
        Some(json!({"operator": "ops", "call": "1.1"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["decided"][0], "1.1:place_order");
    // Nothing waits any more: a second decision is a conflict.
    let (status, body) = call(
        &app,
        "POST",
        &format!("/runs/{id}/deny"),
        Some(json!({"operator": "ops", "reason": "late"})),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"], "conflict");

    let outcome = agent.drive(id, &caller()).await.unwrap();
    assert!(matches!(outcome, RunOutcome::Finished { .. }));
    assert_eq!(shop.live_orders(), 1);
    let (status, _) = call(
        &app,
        "POST",
        &format!("/runs/{id}/cancel"),
        Some(json!({"operator": "ops", "reason": "x"})),
    )
    .await;
    assert_eq!(status, 409, "an ended run cannot be cancelled");
}

#[tokio::test]
async fn bad_requests_get_a_clear_4xx() {
    let app = trellis_agent::http::router(memory());
    let (status, body) = call(&app, "GET", "/runs/not-a-uuid", None).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_id")));
    let missing = uuid::Uuid::now_v7();
    let (status, body) = call(&app, "GET", &format!("/runs/{missing}"), None).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
    let (status, body) = call(
        &app,
        "POST",
        &format!("/runs/{missing}/approve"),
        Some(json!({"operator": ""})),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_body"))
    );
    let (status, body) = call(
        &app,
        "POST",
        &format!("/runs/{missing}/approve"),
        Some(json!({"who": "x"})),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_body")),
        "{body}"
    );
    let (status, body) = call(
        &app,
        "POST",
        &format!("/runs/{missing}/approve"),
        Some(json!({"operator": "ops"})),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("not_found")),
        "{body}"
    );
    let (status, body) = call(&app, "GET", "/runs?status=sleeping", None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_status"))
    );
}
