//! Create, cancel and read shipments.

use serde_json::{Value, json};

use crate::{Backend, on_both_backends, start};

on_both_backends!(
    creating_is_idempotent_by_order,
    cancelling_is_idempotent_and_a_cancelled_shipment_stays_cancelled,
    a_cancellation_before_the_shipment_prevents_it,
    bad_shipments_are_refused,
    the_admin_view_shows_a_shipment_to_administrators_only,
);

async fn creating_is_idempotent_by_order(backend: Backend) {
    // Repeats, even racing ones, answer the one shipment of the order.
    let Some(h) = start(backend, "create_idempotent").await else {
        return;
    };
    let first = h
        .create("order-1", &[("p1", 2), ("p2", 1)])
        .await
        .expect("create");
    assert_eq!(first.status, "created");
    assert_eq!(first.order_id, "order-1");
    assert!(!first.id.is_empty());
    let racing: Vec<_> = (0..8)
        .map(|_| {
            let client = h.client.clone();
            tokio::spawn(async move {
                let mut client = client;
                client
                    .create_shipment(shop_contracts::proto::CreateShipmentRequest {
                        order_id: "order-1".into(),
                        user_id: "user-1".into(),
                        lines: vec![shop_contracts::proto::Line {
                            product_id: "p1".into(),
                            quantity: 2,
                        }],
                    })
                    .await
                    .expect("create")
                    .into_inner()
            })
        })
        .collect();
    for call in racing {
        assert_eq!(call.await.expect("task"), first);
    }
    assert_eq!(h.get("order-1").await, first);
    let other = h.create("order-2", &[("p1", 1)]).await.expect("create");
    assert_ne!(other.id, first.id);
}

async fn cancelling_is_idempotent_and_a_cancelled_shipment_stays_cancelled(backend: Backend) {
    let Some(h) = start(backend, "cancel_idempotent").await else {
        return;
    };
    let created = h.create("order-1", &[("p1", 1)]).await.expect("create");
    let cancelled = h.cancel("order-1").await;
    assert_eq!(cancelled.status, "cancelled");
    assert_eq!(cancelled.id, created.id);
    assert_eq!(h.cancel("order-1").await, cancelled);
    // Creating again does not revive it, and the answer says so.
    let again = h.create("order-1", &[("p1", 1)]).await.expect("create");
    assert_eq!(again.status, "cancelled");
    assert_eq!(again.id, created.id);
    assert_eq!(h.get("order-1").await.status, "cancelled");
}

async fn a_cancellation_before_the_shipment_prevents_it(backend: Backend) {
    // A compensation can overtake a slow create: the order then never gets a shipment.
    let Some(h) = start(backend, "cancel_first").await else {
        return;
    };
    let none = h.cancel("order-9").await;
    assert_eq!((none.status.as_str(), none.id.as_str()), ("none", ""));
    assert_eq!(h.cancel("order-9").await, none);
    assert_eq!(h.get("order-9").await.status, "none");
    let late = h.create("order-9", &[("p1", 1)]).await.expect("create");
    assert_eq!(late.status, "cancelled");
    assert_eq!(h.get("order-9").await.status, "none");
    assert_eq!(h.get("never").await.status, "none");
}

async fn bad_shipments_are_refused(backend: Backend) {
    let Some(h) = start(backend, "bad_shipments").await else {
        return;
    };
    let long = "x".repeat(200);
    let too_many: Vec<(String, i64)> = (0..51).map(|i| (format!("p{i}"), 1)).collect();
    let too_many: Vec<(&str, i64)> = too_many.iter().map(|(p, q)| (p.as_str(), *q)).collect();
    let cases: [(&str, &[(&str, i64)]); 6] = [
        ("", &[("p1", 1)]),
        (&long, &[("p1", 1)]),
        ("o", &[]),
        ("o", &[("p1", 0)]),
        ("o", &[("", 1)]),
        ("o", &too_many),
    ];
    for (order, lines) in cases {
        let status = h.create(order, lines).await.expect_err("refused");
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{order:?} {lines:?}"
        );
    }
    assert_eq!(h.get("o").await.status, "none", "nothing was written");
    let status = h
        .client
        .clone()
        .cancel_shipment(shop_contracts::proto::OrderRef {
            order_id: String::new(),
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
}

async fn get_json(url: &str, role: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::new().get(url);
    if let Some(role) = role {
        let token = crate::key()
            .signer("gateway")
            .token("u1", role)
            .expect("signs");
        request = request.header(trellis_service::auth::IDENTITY_HEADER, token);
    }
    let response = request.send().await.expect("http");
    let status = response.status().as_u16();
    (status, response.json().await.expect("json"))
}

async fn the_admin_view_shows_a_shipment_to_administrators_only(backend: Backend) {
    let Some(h) = start(backend, "shipment_admin_view").await else {
        return;
    };
    let created = h.create("order-3", &[("p1", 3)]).await.expect("create");
    let url = format!("{}/api/shipments/order-3", h.http_base);
    let (status, body) = get_json(&url, Some("admin")).await;
    assert_eq!(status, 200);
    assert_eq!(body["id"], created.id.as_str());
    assert_eq!(body["order_id"], "order-3");
    assert_eq!(body["status"], "created");
    assert_eq!(body["lines"], json!([{"product_id": "p1", "quantity": 3}]));
    let (status, _) = get_json(&url, Some("customer")).await;
    assert_eq!(status, 403);
    let (status, _) = get_json(&url, None).await;
    assert_eq!(status, 401);
    h.cancel("order-3").await;
    let (_, body) = get_json(&url, Some("admin")).await;
    assert_eq!(body["status"], "cancelled");
    let (status, body) = get_json(
        &format!("{}/api/shipments/none", h.http_base),
        Some("admin"),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    // A recorded early cancellation is not a shipment.
    h.cancel("early").await;
    let (status, _) = get_json(
        &format!("{}/api/shipments/early", h.http_base),
        Some("admin"),
    )
    .await;
    assert_eq!(status, 404);
    let (status, doc) = get_json(&format!("{}/openapi.json", h.http_base), None).await;
    assert_eq!(status, 200);
    assert!(doc["paths"]["/api/shipments/{order_id}"].is_object());
}
