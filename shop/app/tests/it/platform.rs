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
