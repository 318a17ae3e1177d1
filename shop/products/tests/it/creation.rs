//! Admin product creation: validation, authorisation, idempotency keys, inventory failures.

use std::sync::atomic::Ordering;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{Service, sqlite_with};
use crate::on_both;

/// Creation answers 201 with the product and sets its stock through inventory.
async fn admins_create_products(service: Service) {
    let answer = service
        .create(
            json!({"name": "  Kettle ", "price_cents": 3999, "stock": 12}),
            None,
        )
        .await;
    assert_eq!(answer.status, StatusCode::CREATED, "{:?}", answer.body);
    assert_eq!(answer.body["name"], "Kettle");
    assert_eq!(answer.body["price_cents"], 3999);
    assert_eq!(answer.body["available"], 12);
    let id = answer.body["id"].as_str().unwrap();
    assert_eq!(service.inventory.totals.lock().unwrap().get(id), Some(&12));
}
on_both!(admins_create_products);

/// Bad fields are 400s with a code per field; non-admins are refused.
#[tokio::test]
async fn bad_products_and_callers_are_refused() {
    let service = sqlite_with(None).await;
    let max_price = shop_contracts::api::PRICE_CENTS_MAX;
    let max_stock = shop_contracts::api::STOCK_MAX;
    let cases = [
        (
            json!({"name": "", "price_cents": 1, "stock": 1}),
            "invalid_name",
        ),
        (
            json!({"name": "n".repeat(201), "price_cents": 1, "stock": 1}),
            "invalid_name",
        ),
        (
            json!({"name": "x", "price_cents": -1, "stock": 1}),
            "invalid_price",
        ),
        (
            json!({"name": "x", "price_cents": max_price + 1, "stock": 1}),
            "invalid_price",
        ),
        (
            json!({"name": "x", "price_cents": 1, "stock": -1}),
            "invalid_stock",
        ),
        (
            json!({"name": "x", "price_cents": 1, "stock": max_stock + 1}),
            "invalid_stock",
        ),
        (
            json!({"name": "x", "price_cents": 1, "stock": 1, "colour": "red"}),
            "invalid_json",
        ),
    ];
    for (body, code) in cases {
        let answer = service.create(body.clone(), None).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(answer.code(), code, "{body}");
    }
    let edge = service
        .create(
            json!({"name": "n".repeat(200), "price_cents": max_price, "stock": max_stock}),
            None,
        )
        .await;
    assert_eq!(edge.status, StatusCode::CREATED);

    let body = json!({"name": "x", "price_cents": 1, "stock": 1});
    let customer = service
        .send(
            service
                .http
                .post(service.endpoint("/api/products"))
                .header(
                    trellis_service::auth::IDENTITY_HEADER,
                    crate::helpers::identity("u1", "customer"),
                )
                .json(&body),
        )
        .await;
    assert_eq!(customer.status, StatusCode::FORBIDDEN);
    let anonymous = service
        .send(
            service
                .http
                .post(service.endpoint("/api/products"))
                .json(&body),
        )
        .await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    let bad_key = service.create(body, Some(&"k".repeat(129))).await;
    assert_eq!(bad_key.code(), "invalid_idempotency_key");
    let listed = service.get("/api/products").await.body;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
}

/// The same key and body answer the same product without creating or stocking another; the
/// same key with another body is 422.
async fn idempotency_keys_make_creation_safe_to_retry(service: Service) {
    let body = json!({"name": "Teapot", "price_cents": 2000, "stock": 3});
    let first = service.create(body.clone(), Some("key-1")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let second = service.create(body.clone(), Some("key-1")).await;
    assert_eq!(second.status, StatusCode::CREATED);
    assert_eq!(first.body, second.body);
    assert_eq!(service.inventory.set_stock_calls.load(Ordering::SeqCst), 1);

    let other = service
        .create(
            json!({"name": "Teapot", "price_cents": 2100, "stock": 3}),
            Some("key-1"),
        )
        .await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(other.code(), "idempotency_key_reused");

    // Concurrent retries of one key create one product.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let request = service
            .http
            .post(service.endpoint("/api/products"))
            .header(
                trellis_service::auth::IDENTITY_HEADER,
                crate::helpers::identity("admin-1", "admin"),
            )
            .header("idempotency-key", "key-2")
            .json(&json!({"name": "Cup", "price_cents": 300, "stock": 9}));
        tasks.push(tokio::spawn(async move {
            let response = request.send().await.unwrap();
            (response.status(), response.json::<Value>().await.unwrap())
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for task in tasks {
        let (status, body) = task.await.unwrap();
        assert_eq!(status, StatusCode::CREATED, "{body}");
        ids.insert(body["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 1);
    let listed = service.get("/api/products").await.body;
    assert_eq!(listed["items"].as_array().unwrap().len(), 2);
}
on_both!(idempotency_keys_make_creation_safe_to_retry);

/// When inventory is down creation is 503; a retry with the same key once it is back
/// finishes the job on the same product.
async fn a_retry_after_an_inventory_failure_completes_the_product(service: Service) {
    let body = json!({"name": "Vase", "price_cents": 1500, "stock": 6});
    service.inventory.down.store(true, Ordering::SeqCst);
    let failed = service.create(body.clone(), Some("key-v")).await;
    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(failed.code(), "dependency_unavailable");
    service.inventory.down.store(false, Ordering::SeqCst);
    let retried = service.create(body, Some("key-v")).await;
    assert_eq!(retried.status, StatusCode::CREATED);
    assert_eq!(retried.body["available"], 6);
    let listed = service.get("/api/products").await.body;
    let items = listed["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["id"], retried.body["id"]);
    assert_eq!(items[0]["available"], 6);
}
on_both!(a_retry_after_an_inventory_failure_completes_the_product);

/// An inventory address nobody listens on makes creation a 503, not a hang or a panic.
#[tokio::test]
async fn an_unreachable_inventory_is_unavailable() {
    let service = sqlite_with(Some("127.0.0.1:1")).await;
    let answer = service
        .create(json!({"name": "x", "price_cents": 1, "stock": 1}), None)
        .await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.code(), "dependency_unavailable");
}

/// The service serves its OpenAPI document; start-up errors name what failed.
#[tokio::test]
async fn openapi_and_start_up_errors() {
    let service = sqlite_with(None).await;
    let doc = service.get("/openapi.json").await.body;
    assert!(doc["paths"]["/api/products"]["post"].is_object(), "{doc}");
    assert_eq!(doc, serde_json::to_value(shop_products::openapi()).unwrap());

    let err = shop_products::app(shop_products::Config {
        database_url: "sqlite::memory:".into(),
        inventory_addr: "not a uri\n".into(),
        service_key: crate::helpers::key(),
    })
    .await
    .unwrap_err();
    assert!(err.to_string().starts_with("inventory_addr"), "{err}");
    let err = shop_products::app(shop_products::Config {
        database_url: "oracle://x".into(),
        inventory_addr: "127.0.0.1:8103".into(),
        service_key: crate::helpers::key(),
    })
    .await
    .unwrap_err();
    assert!(err.to_string().contains("cannot open oracle://x"), "{err}");
}
