//! Listing, search, one product, PriceItems.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use reqwest::StatusCode;
use shop_contracts::proto::PriceItemsRequest;
use tonic::Code;

use crate::helpers::{Service, sqlite_with};
use crate::on_both;

/// Pages follow creation order behind an opaque cursor, 20 by default; each item's
/// availability comes from one GetStock call per page.
async fn pages_follow_creation_order(service: Service) {
    let mut ids = Vec::new();
    for i in 0..25 {
        ids.push(service.product(&format!("Widget {i:02}"), 100 + i, i).await);
    }
    let calls = service.inventory.get_stock_calls.load(Ordering::SeqCst);
    let first = service.get("/api/products").await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    let items = first.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 20);
    assert_eq!(
        service.inventory.get_stock_calls.load(Ordering::SeqCst),
        calls + 1
    );
    for (i, item) in items.iter().enumerate() {
        assert_eq!(item["id"], ids[i].as_str());
        assert_eq!(item["name"], format!("Widget {i:02}"));
        assert_eq!(item["price_cents"], 100 + i as i64);
        assert_eq!(item["available"], i as i64);
    }
    let cursor = first.body["next_cursor"].as_str().unwrap();
    let second = service.get(&format!("/api/products?cursor={cursor}")).await;
    let items = second.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 5);
    assert_eq!(items[0]["id"], ids[20].as_str());
    assert!(second.body["next_cursor"].is_null());

    // Small pages visit every product once.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let path = match &cursor {
            Some(c) => format!("/api/products?limit=7&cursor={c}"),
            None => "/api/products?limit=7".to_owned(),
        };
        let page = service.get(&path).await.body;
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["id"].as_str().unwrap().to_owned()),
        );
        cursor = page["next_cursor"].as_str().map(str::to_owned);
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(seen, ids);
}
on_both!(pages_follow_creation_order);

/// `q` matches a case-insensitive substring of the name; LIKE wildcards match themselves.
async fn search_is_a_literal_case_insensitive_substring(service: Service) {
    for name in [
        "Blue Mug",
        "blue plate",
        "100% Cotton",
        "Under_score",
        "Red MUG",
        "Plain",
    ] {
        service.product(name, 500, 1).await;
    }
    let names = |body: &serde_json::Value| -> HashSet<String> {
        body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let set = |names: &[&str]| {
        names
            .iter()
            .map(|n| (*n).to_owned())
            .collect::<HashSet<_>>()
    };
    assert_eq!(
        names(&service.get("/api/products?q=mug").await.body),
        set(&["Blue Mug", "Red MUG"])
    );
    assert_eq!(
        names(&service.get("/api/products?q=BLUE").await.body),
        set(&["Blue Mug", "blue plate"])
    );
    assert_eq!(
        names(&service.get("/api/products?q=%25").await.body),
        set(&["100% Cotton"])
    );
    assert_eq!(
        names(&service.get("/api/products?q=_").await.body),
        set(&["Under_score"])
    );
    assert_eq!(
        names(&service.get("/api/products?q=zzz").await.body),
        set(&[])
    );
    assert_eq!(names(&service.get("/api/products?q=").await.body).len(), 6);
}
on_both!(search_is_a_literal_case_insensitive_substring);

/// Bad `limit`, `cursor` or `q` are 400s naming the parameter.
#[tokio::test]
async fn bad_list_parameters_name_the_problem() {
    let service = sqlite_with(None).await;
    for (query, code) in [
        ("limit=0", "invalid_limit"),
        ("limit=101", "invalid_limit"),
        ("limit=ten", "invalid_limit"),
        ("cursor=not-a-cursor!", "invalid_cursor"),
        ("cursor=Zm9v", "invalid_cursor"),
    ] {
        let answer = service.get(&format!("/api/products?{query}")).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{query}");
        assert_eq!(answer.code(), code, "{query}");
    }
    let long = "q".repeat(201);
    let answer = service.get(&format!("/api/products?q={long}")).await;
    assert_eq!(answer.code(), "invalid_query");
    assert_eq!(
        service.get("/api/products?limit=100").await.status,
        StatusCode::OK
    );
}

/// One product by id; 404 for an unknown or malformed id.
async fn one_product_by_id(service: Service) {
    let id = service.product("Lamp", 2500, 4).await;
    let answer = service.get(&format!("/api/products/{id}")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.body,
        serde_json::json!({"id": id, "name": "Lamp", "price_cents": 2500, "available": 4})
    );
    let unknown = service
        .get(&format!("/api/products/{}", uuid::Uuid::now_v7()))
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(
        service.get("/api/products/lamp").await.status,
        StatusCode::NOT_FOUND
    );
}
on_both!(one_product_by_id);

/// When inventory does not answer, listing is 503 `dependency_unavailable`.
#[tokio::test]
async fn listing_without_inventory_is_unavailable() {
    let service = sqlite_with(None).await;
    let id = service.product("Chair", 100, 1).await;
    service.inventory.down.store(true, Ordering::SeqCst);
    for path in ["/api/products".to_owned(), format!("/api/products/{id}")] {
        let answer = service.get(&path).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{path}");
        assert_eq!(answer.code(), "dependency_unavailable");
    }
    service.inventory.down.store(false, Ordering::SeqCst);
    assert_eq!(service.get("/api/products").await.status, StatusCode::OK);
}

/// PriceItems answers prices in the order asked; an unknown id is NOT_FOUND naming it.
async fn price_items(service: Service) {
    let a = service.product("A", 100, 0).await;
    let b = service.product("B", 250, 0).await;
    let mut grpc = service.grpc();
    let prices = grpc
        .price_items(PriceItemsRequest {
            product_ids: vec![b.clone(), a.clone()],
        })
        .await
        .unwrap()
        .into_inner()
        .products;
    let got: Vec<(String, String, i64)> = prices
        .into_iter()
        .map(|p| (p.id, p.name, p.price_cents))
        .collect();
    assert_eq!(
        got,
        vec![
            (b.clone(), "B".to_owned(), 250),
            (a.clone(), "A".to_owned(), 100)
        ]
    );
    let missing = "0190e0a0-0000-7000-8000-000000000000";
    let err = grpc
        .price_items(PriceItemsRequest {
            product_ids: vec![a, missing.to_owned(), "other-missing".to_owned()],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains(missing), "{}", err.message());
}
on_both!(price_items);
