//! Listing orders: whose orders a caller sees, and the placement-time filters.

use axum::http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::TestOrders;

/// Places one order for `user` and waits until the read model lists it; answers its id.
async fn placed(orders: &TestOrders, user: &str) -> String {
    let key = uuid::Uuid::now_v7().to_string();
    let (status, accepted) = orders
        .call(
            Method::POST,
            "/api/orders",
            user,
            &[("idempotency-key", &key)],
            Some(json!({"items": [{"product_id": "product-1", "quantity": 1}]})),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let id = accepted["id"].as_str().expect("id").to_owned();
    for _ in 0..1_500 {
        if ids(&list(orders, (user, "customer"), "").await.1).contains(&id) {
            return id;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("order {id} never reached the read model");
}

async fn list(orders: &TestOrders, caller: (&str, &str), query: &str) -> (StatusCode, Value) {
    orders
        .call_as(
            Method::GET,
            &format!("/api/orders?limit=100{query}"),
            caller,
            &[],
            None,
        )
        .await
}

fn ids(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|o| o["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_lists_their_own_orders_and_an_admin_any_one_customers() {
    // Two customers each place an order; each sees only theirs, naming the other is a 403,
    // and an admin naming one customer sees exactly that customer's orders.
    let orders = TestOrders::start().await;
    let order_a = placed(&orders, "user-a").await;
    let order_b = placed(&orders, "user-b").await;

    let (status, page) = list(&orders, ("user-a", "customer"), "").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(ids(&page), vec![order_a.clone()]);

    let (status, page) = list(&orders, ("user-b", "customer"), "&user_id=user-a").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{page}");
    assert_eq!(page["error"]["code"], "forbidden");

    let (status, page) = list(&orders, ("user-b", "customer"), "&user_id=user-b").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(ids(&page), vec![order_b.clone()]);

    let (status, page) = list(&orders, ("admin-1", "admin"), "&user_id=user-a").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(ids(&page), vec![order_a.clone()]);

    let (status, page) = list(&orders, ("admin-1", "admin"), "").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(
        ids(&page),
        vec![order_b, order_a],
        "everyone's, newest first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_time_filters_take_dates_and_times_and_refuse_anything_else() {
    // One order placed now: ranges around now include it, ranges before or after exclude
    // it, a date covers its whole day, and bad or inverted bounds answer 400.
    let orders = TestOrders::start().await;
    let user = ("user-c", "customer");
    let id = placed(&orders, user.0).await;
    let now = chrono::Utc::now();
    let hour = chrono::TimeDelta::hours(1);
    let time = |t: chrono::DateTime<chrono::Utc>| {
        t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            .replace('+', "%2B")
    };
    // The day the order was placed, as it recorded it (not the clock now: midnight may pass).
    let (_, order) = orders
        .call(Method::GET, &format!("/api/orders/{id}"), user.0, &[], None)
        .await;
    let today = order["timeline"][0]["at"].as_str().expect("placed at")[..10].to_owned();
    let cases = [
        (format!("&placed_from={}", time(now - hour)), true),
        (format!("&placed_to={}", time(now + hour)), true),
        (
            format!(
                "&placed_from={}&placed_to={}",
                time(now - hour),
                time(now + hour)
            ),
            true,
        ),
        (format!("&placed_from={today}&placed_to={today}"), true),
        (format!("&placed_from={}", time(now + hour)), false),
        (format!("&placed_to={}", time(now - hour)), false),
        ("&placed_to=2000-01-01".to_owned(), false),
        (format!("&status=CANCELLED&placed_from={today}"), false),
    ];
    for (query, found) in cases {
        let (status, page) = list(&orders, user, &query).await;
        assert_eq!(status, StatusCode::OK, "{query}: {page}");
        assert_eq!(ids(&page).contains(&id), found, "{query}: {page}");
    }

    for (query, code) in [
        ("&placed_from=yesterday", "invalid_date"),
        ("&placed_to=2026-02-30", "invalid_date"),
        (
            "&placed_from=2026-02-02&placed_to=2026-02-01",
            "invalid_date_range",
        ),
    ] {
        let (status, page) = list(&orders, user, query).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {page}");
        assert_eq!(page["error"]["code"], code, "{query}");
    }
}
