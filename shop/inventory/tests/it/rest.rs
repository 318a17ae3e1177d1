//! The admin REST routes.

use reqwest::StatusCode;
use serde_json::{Value, json};

use trellis_service::auth::IDENTITY_HEADER;

use crate::helpers::{Service, identity, reserve_request, set_stock};
use crate::on_both;

fn admin(request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    request.header(IDENTITY_HEADER, identity("admin-1", "admin"))
}

/// PUT sets the total and answers the stock; below what is reserved is 409; bad totals 400;
/// GET answers the stock (zeros for a product never stocked).
async fn admins_read_and_set_stock(service: Service) {
    let put = |product: &str, body: Value| {
        admin(
            service
                .http
                .put(service.url(&format!("/api/inventory/{product}"))),
        )
        .json(&body)
    };
    let answer = put("p1", json!({"total": 7})).send().await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(
        body,
        json!({"product_id": "p1", "total": 7, "reserved": 0, "available": 7})
    );

    let mut client = service.grpc();
    assert!(
        client
            .reserve(reserve_request("o", &[("p1", 4)]))
            .await
            .unwrap()
            .into_inner()
            .reserved
    );
    let answer = put("p1", json!({"total": 3})).send().await.unwrap();
    assert_eq!(answer.status(), StatusCode::CONFLICT);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["error"]["code"], "below_reserved");

    for bad in [json!({"total": -1}), json!({"total": 2_000_000_000_i64})] {
        let answer = put("p1", bad).send().await.unwrap();
        assert_eq!(answer.status(), StatusCode::BAD_REQUEST);
        let body: Value = answer.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_total");
    }
    let answer = put("p1", json!({"total": "many"})).send().await.unwrap();
    assert_eq!(answer.status(), StatusCode::BAD_REQUEST);

    let get = |product: &str| {
        admin(
            service
                .http
                .get(service.url(&format!("/api/inventory/{product}"))),
        )
    };
    let body: Value = get("p1").send().await.unwrap().json().await.unwrap();
    assert_eq!(
        body,
        json!({"product_id": "p1", "total": 7, "reserved": 4, "available": 3})
    );
    let body: Value = get("never").send().await.unwrap().json().await.unwrap();
    assert_eq!(
        body,
        json!({"product_id": "never", "total": 0, "reserved": 0, "available": 0})
    );
}
on_both!(admins_read_and_set_stock);

/// Customers get 403, anonymous callers 401, and the stock is unchanged.
async fn only_admins_touch_stock(service: Service) {
    let mut client = service.grpc();
    set_stock(&mut client, "p", 5).await;
    let customer = service
        .http
        .put(service.url("/api/inventory/p"))
        .header(IDENTITY_HEADER, identity("u1", "customer"))
        .json(&json!({"total": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(customer.status(), StatusCode::FORBIDDEN);
    let anonymous = service
        .http
        .get(service.url("/api/inventory/p"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(crate::helpers::level(&mut client, "p").await, (5, 0, 5));
}
on_both!(only_admins_touch_stock);

/// The service serves its OpenAPI document, naming its routes.
#[tokio::test]
async fn openapi_is_served() {
    let service = crate::helpers::sqlite().await.unwrap();
    let doc: Value = service
        .http
        .get(service.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        doc["paths"]["/api/inventory/{product_id}"]["put"].is_object(),
        "{doc}"
    );
    assert_eq!(
        doc,
        serde_json::to_value(shop_inventory::openapi()).unwrap()
    );
}

/// A database that cannot be opened is an error naming the URL.
#[tokio::test]
async fn a_bad_database_url_names_itself() {
    let err = shop_inventory::app(shop_inventory::Config {
        database_url: "mysql://nowhere/db".into(),
        service_key: crate::helpers::key(),
    })
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("cannot open mysql://nowhere/db"),
        "{err}"
    );
}
