//! The example service (`examples/hello_service.rs`) answers as its docs say, so the kit's
//! example stays a working one: its router is driven with `oneshot` requests.

// The example's `main` runs only as the example.
#[allow(dead_code)]
#[path = "../examples/hello_service.rs"]
mod hello_service;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use tower::ServiceExt;
use trellis_service::auth::{IDENTITY_HEADER, ServiceKey};
use trellis_service::{Db, ROLE_ADMIN, ROLE_CUSTOMER};

/// Longest body a test reads.
const BODY_BYTES_MAX: usize = 64 * 1024;

async fn app(key: &ServiceKey) -> Router {
    let db = Db::open_with_schema("sqlite::memory:", hello_service::SCHEMA)
        .await
        .expect("opens");
    hello_service::app(db, key)
}

async fn call(
    app: &Router,
    method: &str,
    path: &str,
    token: Option<&axum::http::HeaderValue>,
    body: Option<&str>,
) -> (StatusCode, serde_json::Value) {
    let mut request = Request::builder().method(method).uri(path);
    if let Some(token) = token {
        request = request.header(IDENTITY_HEADER, token);
    }
    let request = match body {
        Some(body) => request
            .header("content-type", "application/json")
            .body(Body::from(body.to_owned())),
        None => request.body(Body::empty()),
    }
    .expect("a valid request");
    let response = app.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), BODY_BYTES_MAX)
        .await
        .expect("body");
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, json)
}

#[tokio::test]
async fn a_caller_with_a_token_keeps_and_lists_its_own_notes() {
    // Goal: the protected endpoints work end to end on the database; method: two callers
    // add notes and each lists only theirs.
    let key = ServiceKey::generate().expect("key");
    let app = app(&key).await;
    let alice = key
        .signer("test")
        .token("alice", ROLE_CUSTOMER)
        .expect("signs");
    let bob = key
        .signer("test")
        .token("bob", ROLE_CUSTOMER)
        .expect("signs");
    let (status, _) = call(
        &app,
        "POST",
        "/notes",
        Some(&alice),
        Some(r#"{"body":"hi"}"#),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = call(&app, "POST", "/notes", Some(&bob), Some(r#"{"body":"yo"}"#)).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, notes) = call(&app, "GET", "/notes", Some(&alice), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(notes, serde_json::json!([{ "body": "hi" }]));
}

#[tokio::test]
async fn a_caller_without_a_valid_token_is_refused_with_a_json_401() {
    // Goal: identity is never taken on faith; method: no token, a forged token, and the
    // `x-user-id` header a caller might hope is believed.
    let key = ServiceKey::generate().expect("key");
    let app = app(&key).await;
    let (status, body) = call(&app, "GET", "/notes", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["code"], "unauthenticated");
    let forged = ServiceKey::generate()
        .expect("key")
        .signer("test")
        .token("alice", ROLE_ADMIN)
        .expect("signs");
    let (status, _) = call(&app, "GET", "/notes", Some(&forged), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let request = Request::get("/notes")
        .header("x-user-id", "alice")
        .body(Body::empty())
        .expect("request");
    let response = app.clone().oneshot(request).await.expect("infallible");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn bad_input_is_a_400_naming_the_problem() {
    // Goal: input errors are JSON the caller can act on; method: an empty note and a body
    // that is not JSON.
    let key = ServiceKey::generate().expect("key");
    let app = app(&key).await;
    let alice = key
        .signer("test")
        .token("alice", ROLE_CUSTOMER)
        .expect("signs");
    let (status, body) = call(
        &app,
        "POST",
        "/notes",
        Some(&alice),
        Some(r#"{"body":" "}"#),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "invalid_note");
    let (status, body) = call(&app, "POST", "/notes", Some(&alice), Some("{")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "invalid_json");
}

#[tokio::test]
async fn only_the_admin_role_reaches_the_operator_count() {
    // Goal: `admin_only` inside `protect` admits exactly the admin role; method: the count
    // asked by a customer and by an administrator.
    let key = ServiceKey::generate().expect("key");
    let app = app(&key).await;
    let alice = key
        .signer("test")
        .token("alice", ROLE_CUSTOMER)
        .expect("signs");
    let root = key.signer("test").token("root", ROLE_ADMIN).expect("signs");
    call(
        &app,
        "POST",
        "/notes",
        Some(&alice),
        Some(r#"{"body":"hi"}"#),
    )
    .await;
    let (status, body) = call(&app, "GET", "/admin/notes/count", Some(&alice), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["error"]["code"], "forbidden");
    let (status, body) = call(&app, "GET", "/admin/notes/count", Some(&root), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, serde_json::json!({ "count": 1 }));
}
