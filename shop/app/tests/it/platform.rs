//! The shop as a whole: restart on the same data, the OpenAPI document, health.

use reqwest::Method;

use crate::harness::{Backend, TestShop};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_start_reuses_the_data() {
    let shop = TestShop::start(Backend::Sqlite, "restart")
        .await
        .expect("sqlite");
    let hana = shop.customer("hana").await;
    let product = shop.product("Kettle", 2_000, 3).await;
    let id = shop.order(&hana, &product, 1).await;
    assert_eq!(shop.settled(&hana, &id).await["status"], "CONFIRMED");
    let dir = shop.stop().await;

    let shop = TestShop::start_in(Backend::Sqlite, "restart", dir)
        .await
        .expect("sqlite");
    assert!(!shop.shop.admin().created, "the admin account is reused");
    // Tokens signed before the restart still verify (the signing key is kept).
    let (status, order) = shop
        .call(Method::GET, &format!("/api/orders/{id}"), Some(&hana), None)
        .await;
    assert_eq!(status, 200, "{order}");
    assert_eq!(order["status"], "CONFIRMED");
    let (_, stock) = shop
        .call(
            Method::GET,
            &format!("/api/inventory/{product}"),
            Some(shop.admin()),
            None,
        )
        .await;
    assert_eq!(stock["total"], 2);
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_gateway_serves_the_whole_openapi_document() {
    let shop = TestShop::start(Backend::Sqlite, "openapi")
        .await
        .expect("sqlite");
    let (status, doc) = shop.call(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(status, 200);
    for path in [
        "/api/users",
        "/api/auth/token",
        "/api/products",
        "/api/orders",
        "/api/orders/{id}",
    ] {
        assert!(
            doc["paths"].get(path).is_some(),
            "{path} missing from the document"
        );
    }
    let health = shop
        .http
        .get(format!("{}/healthz", shop.shop.operator_url()))
        .send()
        .await
        .expect("the operator listener answers");
    assert_eq!(health.status(), 200);
    shop.stop().await;
}

/// Every status a real client can meet, for each method of `path` in the served document.
fn statuses(doc: &serde_json::Value, method: &str, path: &str) -> Vec<String> {
    let operation = &doc["paths"][path][method];
    assert!(
        operation.is_object(),
        "{method} {path} missing from the document"
    );
    operation["responses"]
        .as_object()
        .map(|r| r.keys().cloned().collect())
        .unwrap_or_default()
}

#[test]
fn the_openapi_document_names_every_error_status() {
    // The gateway serves `shop_app::openapi()`; check it against what the extractor, the
    // identity check and the gateway answer (schemathesis's status_code_conformance found
    // 415 and 400 missing).
    let doc = serde_json::to_value(shop_app::openapi()).expect("the document serialises");
    for path in ["/api/users", "/api/auth/token", "/api/orders"] {
        let documented = statuses(&doc, "post", path);
        for status in ["400", "413", "415", "429", "500", "502", "503", "504"] {
            assert!(
                documented.iter().any(|s| s == status),
                "POST {path} does not document {status}: {documented:?}"
            );
        }
    }
    // Everything behind a bearer token: 401, and the security requirement schemathesis and
    // other clients read to send the token.
    let mut authenticated = 0;
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("a path item") {
            let Some(responses) = operation["responses"].as_object() else {
                continue;
            };
            for status in ["500", "502", "503", "504"] {
                assert!(
                    responses.contains_key(status),
                    "{method} {path} does not document {status}"
                );
            }
            for (status, response) in responses {
                if status.starts_with(['4', '5']) {
                    assert_eq!(
                        response["content"]["application/json"]["schema"]["$ref"],
                        "#/components/schemas/ErrorBody",
                        "{method} {path} {status} has no ErrorBody"
                    );
                }
            }
            if operation["security"].is_array() {
                authenticated += 1;
                assert!(
                    responses.contains_key("401"),
                    "{method} {path} needs a token but does not document 401"
                );
            }
        }
    }
    for (method, path) in [
        ("get", "/api/users/me"),
        ("post", "/api/orders"),
        ("get", "/api/orders/{id}"),
        ("post", "/api/products"),
        ("put", "/api/inventory/{product_id}"),
        ("get", "/api/payments/{order_id}"),
    ] {
        assert!(
            doc["paths"][path][method]["security"].is_array(),
            "{method} {path} does not declare the bearer token"
        );
        let documented = statuses(&doc, method, path);
        assert!(documented.iter().any(|s| s == "401"), "{method} {path}");
    }
    assert!(
        authenticated >= 10,
        "only {authenticated} operations need a token"
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer",
        "the bearer scheme is declared"
    );
    for (method, path) in [
        ("post", "/api/products"),
        ("get", "/api/shipments/{order_id}"),
    ] {
        assert!(
            statuses(&doc, method, path).iter().any(|s| s == "403"),
            "admin-only {method} {path} does not document 403"
        );
    }
    // Public reads need no token.
    assert!(doc["paths"]["/api/products"]["get"]["security"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_saga_cut_off_by_a_stop_is_finished_by_the_next_start() {
    let shop = TestShop::start(Backend::Sqlite, "crash")
        .await
        .expect("sqlite");
    let ivan = shop.customer("ivan").await;
    let product = shop.product("Clock", 4_000, 2).await;
    // The provider is slow: the saga sits in its payment step when the shop stops.
    let (status, _) = shop
        .call(
            Method::PUT,
            "/api/admin/provider",
            Some(shop.admin()),
            Some(serde_json::json!({"latency_ms": 3000})),
        )
        .await;
    assert_eq!(status, 200);
    let id = shop.order(&ivan, &product, 1).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let dir = shop.stop().await;

    // A fresh process: the provider is healthy again; recovery resumes the saga.
    let shop = TestShop::start_in(Backend::Sqlite, "crash", dir)
        .await
        .expect("sqlite");
    let order = shop.settled(&ivan, &id).await;
    assert_eq!(order["status"], "CONFIRMED", "{order}");
    assert_eq!(shop.payment(&id).await, "captured");
    assert_eq!(shop.shipment(&id).await, "created");
    crate::harness::stock_ok(&shop, &product).await;
    shop.stop().await;
}
