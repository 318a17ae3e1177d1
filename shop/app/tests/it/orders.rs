//! The order flow end to end: each outcome, its compensations, and the invariants.

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{TestShop, stock_ok};
use crate::{on_both_backends, on_every_style};

fn timeline_has(order: &Value, step: &str, outcome: &str) -> bool {
    order["timeline"].as_array().is_some_and(|t| {
        t.iter()
            .any(|e| e["step"] == step && e["outcome"] == outcome)
    })
}

async fn provider(shop: &TestShop, settings: Value) {
    let (status, body) = shop
        .call(
            Method::PUT,
            "/api/admin/provider",
            Some(shop.admin()),
            Some(settings),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

async fn happy_path(shop: &TestShop) {
    let alice = shop.customer("alice").await;
    let product = shop.product("Mug", 1_250, 5).await;
    let id = shop.order(&alice, &product, 2).await;
    let order = shop.settled(&alice, &id).await;
    assert_eq!(order["status"], "CONFIRMED", "{order}");
    assert_eq!(order["total_cents"], 2_500);
    assert_eq!(order["reason"], Value::Null);
    for (step, outcome) in [
        ("inventory", "reserved"),
        ("payment", "captured"),
        ("shipping", "created"),
        ("inventory", "committed"),
        ("order", "confirmed"),
    ] {
        assert!(
            timeline_has(&order, step, outcome),
            "{step} {outcome}: {order}"
        );
    }
    assert_eq!(shop.payment(&id).await, "captured");
    assert_eq!(shop.shipment(&id).await, "created");
    assert_eq!(stock_ok(shop, &product).await, (3, 0, 3));
    // The listing shows it, for its owner.
    let (status, page) = shop
        .call(
            Method::GET,
            "/api/orders?status=CONFIRMED",
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(status, 200, "{page}");
    let mut found = false;
    for _ in 0..100 {
        let (_, page) = shop
            .call(
                Method::GET,
                "/api/orders?status=CONFIRMED",
                Some(&alice),
                None,
            )
            .await;
        if page["items"]
            .as_array()
            .is_some_and(|i| i.iter().any(|o| o["id"] == id.as_str()))
        {
            found = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(found, "the read model never listed the order");
}
on_every_style!(an_order_is_confirmed_paid_and_shipped, happy_path);

async fn out_of_stock(shop: &TestShop) {
    let bob = shop.customer("bob").await;
    let product = shop.product("Rare", 900, 1).await;
    let id = shop.order(&bob, &product, 2).await;
    let order = shop.settled(&bob, &id).await;
    assert_eq!(order["status"], "CANCELLED", "{order}");
    assert_eq!(order["reason"], "out_of_stock");
    assert_eq!(shop.payment(&id).await, "none");
    assert_eq!(shop.shipment(&id).await, "none");
    assert_eq!(stock_ok(shop, &product).await, (1, 0, 1));
}
on_every_style!(
    an_order_beyond_the_stock_is_cancelled_out_of_stock,
    out_of_stock
);

async fn declined(shop: &TestShop) {
    let carol = shop.customer("carol").await;
    // Above the simulator's card limit: the provider declines.
    let product = shop.product("Yacht", 20_000_000, 3).await;
    let id = shop.order(&carol, &product, 1).await;
    let order = shop.settled(&carol, &id).await;
    assert_eq!(order["status"], "CANCELLED", "{order}");
    assert_eq!(order["reason"], "payment_declined");
    assert!(timeline_has(&order, "inventory", "released"), "{order}");
    assert_ne!(shop.payment(&id).await, "captured");
    assert_eq!(shop.shipment(&id).await, "none");
    assert_eq!(stock_ok(shop, &product).await, (3, 0, 3));
}
on_every_style!(a_declined_payment_releases_the_stock, declined);

async fn outage(shop: &TestShop) {
    let dave = shop.customer("dave").await;
    let product = shop.product("Lamp", 3_000, 4).await;
    provider(shop, json!({"outage": true})).await;
    let id = shop.order(&dave, &product, 1).await;
    let order = shop.settled(&dave, &id).await;
    assert_eq!(order["status"], "CANCELLED", "{order}");
    assert_eq!(order["reason"], "payment_unavailable");
    assert_ne!(shop.payment(&id).await, "captured");
    assert_eq!(stock_ok(shop, &product).await, (4, 0, 4));
    // The provider recovers: orders go through again.
    provider(shop, json!({"outage": false})).await;
    let mut confirmed = false;
    for _ in 0..20 {
        let id = shop.order(&dave, &product, 1).await;
        if shop.settled(&dave, &id).await["status"] == "CONFIRMED" {
            confirmed = true;
            break;
        }
        // The breaker may still be open: wait for its half-open trial.
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert!(confirmed, "no order confirmed after the provider recovered");
}
on_every_style!(a_provider_outage_cancels_and_recovery_confirms, outage);

async fn user_cancel(shop: &TestShop) {
    let erin = shop.customer("erin").await;
    let product = shop.product("Chair", 7_000, 2).await;
    // A slow provider keeps the saga in its payment step while the customer cancels.
    provider(shop, json!({"latency_ms": 1500})).await;
    let id = shop.order(&erin, &product, 1).await;
    let (status, body) = shop
        .call(
            Method::POST,
            &format!("/api/orders/{id}/cancel"),
            Some(&erin),
            None,
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let order = shop.settled(&erin, &id).await;
    provider(shop, json!({"latency_ms": 0})).await;
    assert_eq!(order["status"], "CANCELLED", "{order}");
    assert_eq!(order["reason"], "cancelled_by_user");
    let payment = shop.payment(&id).await;
    assert!(
        payment == "refunded" || payment == "none",
        "payment {payment}"
    );
    assert_eq!(shop.shipment(&id).await, "none");
    assert_eq!(stock_ok(shop, &product).await, (2, 0, 2));
    // An ended order cannot be cancelled.
    let (status, body) = shop
        .call(
            Method::POST,
            &format!("/api/orders/{id}/cancel"),
            Some(&erin),
            None,
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "not_cancellable");
}
on_every_style!(a_customer_cancel_refunds_and_releases, user_cancel);

async fn idempotency(shop: &TestShop) {
    let frank = shop.customer("frank").await;
    let product = shop.product("Pen", 150, 10).await;
    let other = shop.product("Ink", 300, 10).await;
    let items = json!([{"product_id": product, "quantity": 1}]);
    let (s1, first) = shop.place(&frank, "key-1", items.clone()).await;
    let (s2, again) = shop.place(&frank, "key-1", items).await;
    assert_eq!((s1, s2), (202, 202));
    assert_eq!(
        first, again,
        "the same key and body answer the first answer again"
    );
    let (status, body) = shop
        .place(
            &frank,
            "key-1",
            json!([{"product_id": other, "quantity": 1}]),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "idempotency_key_reused");
    let id = first["id"].as_str().expect("id");
    assert_eq!(shop.settled(&frank, id).await["status"], "CONFIRMED");
    // One order, one unit sold.
    assert_eq!(stock_ok(shop, &product).await, (9, 0, 9));
}
on_every_style!(a_repeated_post_with_one_key_places_one_order, idempotency);

async fn contention(shop: &TestShop) {
    let product = shop.product("Limited", 500, 10).await;
    let mut customers = Vec::new();
    for i in 0..5 {
        customers.push(shop.customer(&format!("c{i}")).await);
    }
    let mut placing = Vec::new();
    for i in 0..50 {
        let token = customers[i % customers.len()].clone();
        let product = product.clone();
        let http = shop.http.clone();
        let url = shop.url("/api/orders");
        placing.push(tokio::spawn(async move {
            let response = http
                .post(url)
                .bearer_auth(&token)
                .header("idempotency-key", uuid::Uuid::now_v7().to_string())
                .json(&json!({"items": [{"product_id": product, "quantity": 1}]}))
                .send()
                .await
                .expect("place");
            assert_eq!(response.status(), 202);
            let body: Value = response.json().await.expect("json");
            (token, body["id"].as_str().expect("id").to_owned())
        }));
    }
    let mut confirmed = 0;
    let mut cancelled = 0;
    for task in placing {
        let (token, id) = task.await.expect("task");
        let order = shop.settled(&token, &id).await;
        match order["status"].as_str() {
            Some("CONFIRMED") => confirmed += 1,
            Some("CANCELLED") => {
                assert_eq!(order["reason"], "out_of_stock", "{order}");
                cancelled += 1;
            }
            other => panic!("unexpected status {other:?}"),
        }
        let _ = stock_ok(shop, &product).await;
    }
    assert_eq!((confirmed, cancelled), (10, 40));
    assert_eq!(stock_ok(shop, &product).await, (0, 0, 0));
}
on_every_style!(fifty_orders_for_ten_units_confirm_exactly_ten, contention);

async fn ownership(shop: &TestShop) {
    let alice = shop.customer("alice").await;
    let mallory = shop.customer("mallory").await;
    let product = shop.product("Safe", 100, 5).await;
    let id = shop.order(&alice, &product, 1).await;
    let path = format!("/api/orders/{id}");
    let (status, body) = shop.call(Method::GET, &path, Some(&mallory), None).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "not_found");
    let (status, _) = shop
        .call(
            Method::POST,
            &format!("{path}/cancel"),
            Some(&mallory),
            None,
        )
        .await;
    assert_eq!(status, 404);
    let (_, page) = shop
        .call(Method::GET, "/api/orders", Some(&mallory), None)
        .await;
    assert_eq!(page["items"], json!([]));
    // The admin sees every order; the owner sees theirs.
    assert_eq!(
        shop.call(Method::GET, &path, Some(shop.admin()), None)
            .await
            .0,
        200
    );
    assert_eq!(shop.settled(&alice, &id).await["status"], "CONFIRMED");
    // Admin-only calls need the admin role.
    let (status, body) = shop
        .call(
            Method::GET,
            &format!("/api/inventory/{product}"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(status, 403, "{body}");
}
on_both_backends!(a_customer_sees_only_their_own_orders, ownership);

async fn bad_input(shop: &TestShop) {
    let gina = shop.customer("gina").await;
    let product = shop.product("Cup", 100, 5).await;
    // Bad JSON.
    let response = shop
        .http
        .post(shop.url("/api/orders"))
        .bearer_auth(&gina)
        .header("idempotency-key", "bad-json")
        .header("content-type", "application/json")
        .body("{\"items\": [")
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.expect("json error body");
    assert_eq!(body["error"]["code"], "invalid_json");
    // Unknown product.
    let (status, body) = shop
        .place(
            &gina,
            "unknown",
            json!([{"product_id": uuid::Uuid::now_v7().to_string(), "quantity": 1}]),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "unknown_product");
    // Zero quantity.
    let (status, body) = shop
        .place(
            &gina,
            "zero",
            json!([{"product_id": product, "quantity": 0}]),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_quantity");
    // No Idempotency-Key.
    let response = shop
        .http
        .post(shop.url("/api/orders"))
        .bearer_auth(&gina)
        .json(&json!({"items": [{"product_id": product, "quantity": 1}]}))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 400);
    // No token: the gateway answers 401 with a JSON body.
    let (status, body) = shop.call(Method::GET, "/api/orders", None, None).await;
    assert_eq!(status, 401, "{body}");
    assert!(body["error"]["code"].is_string(), "{body}");
    // Nothing was reserved by any of it.
    assert_eq!(stock_ok(shop, &product).await, (5, 0, 5));
}
on_both_backends!(bad_input_gets_a_4xx_json_error, bad_input);

async fn events_on_the_bus(shop: &TestShop) {
    let jo = shop.customer("jo").await;
    let product = shop.product("Bell", 800, 5).await;
    let id = shop.order(&jo, &product, 1).await;
    assert_eq!(shop.settled(&jo, &id).await["status"], "CONFIRMED");
    let has = |seen: &[trellis_bus::Envelope], kind: &str| seen.iter().any(|e| e.kind == kind);
    let messages = shop
        .bus_messages("order.*", "e2e_observer", &id, |seen| {
            has(seen, "order.created") && has(seen, "order.confirmed")
        })
        .await;
    for envelope in &messages {
        assert_eq!(
            envelope.correlation_id.map(|c| c.to_string()),
            Some(id.clone())
        );
    }
    let seen: Vec<String> = messages.iter().map(|e| e.kind.clone()).collect();
    assert!(seen.contains(&"order.created".to_owned()), "{seen:?}");
    assert!(seen.contains(&"order.confirmed".to_owned()), "{seen:?}");
}
on_both_backends!(order_events_are_relayed_to_the_bus, events_on_the_bus);

async fn trace_to_the_bus(shop: &TestShop) {
    crate::harness::telemetry();
    let kim = shop.customer("kim").await;
    let product = shop.product("Lens", 900, 5).await;
    // The client starts a trace; the gateway, the orders service and the bus message
    // continue it.
    let trace_id = format!(
        "{:032x}",
        u128::from(fastrand_u64()) << 64 | u128::from(fastrand_u64())
    );
    let traceparent = format!("00-{trace_id}-00f067aa0ba902b7-01");
    let response = shop
        .http
        .post(shop.url("/api/orders"))
        .bearer_auth(&kim)
        .header("idempotency-key", uuid::Uuid::now_v7().to_string())
        .header("traceparent", &traceparent)
        .json(&json!({"items": [{"product_id": product, "quantity": 1}]}))
        .send()
        .await
        .expect("place");
    assert_eq!(response.status(), 202);
    let id = response.json::<Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    assert_eq!(shop.settled(&kim, &id).await["status"], "CONFIRMED");
    let messages = shop
        .bus_messages("order.created", "e2e_trace", &id, |seen| !seen.is_empty())
        .await;
    let carried = messages.first().map(|e| e.traceparent.clone());
    let carried = carried
        .expect("order.created reached the bus")
        .expect("it has a traceparent");
    assert!(
        carried.contains(&trace_id),
        "the bus message continues the client's trace {trace_id}: {carried}"
    );
}
on_both_backends!(the_clients_trace_reaches_the_bus_message, trace_to_the_bus);

fn fastrand_u64() -> u64 {
    // A random-enough trace id from the clock and the process: unique per test run.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    (nanos as u64) ^ (u64::from(std::process::id()) << 32) | 1
}
