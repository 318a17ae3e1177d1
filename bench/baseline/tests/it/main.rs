//! The baseline started in this process on port 0 with a fresh database, driven over HTTP
//! as `trellis load` drives it.

use std::time::Duration;

use serde_json::{Value, json};
use trellis_bench_baseline::{Baseline, Config, start};

const ADMIN_EMAIL: &str = "admin@baseline.test";
const ADMIN_PASSWORD: &str = "admin-password-1";
/// How long a test waits for an order to leave PENDING.
const SETTLE_MAX: Duration = Duration::from_secs(20);

struct Harness {
    baseline: Baseline,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let baseline = start(Config::new(dir.path(), ADMIN_EMAIL, ADMIN_PASSWORD))
            .await
            .expect("starts");
        Self {
            baseline,
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
            _dir: dir,
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.baseline.url()));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("answers");
        let status = response.status().as_u16();
        let bytes = response.bytes().await.expect("body");
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, body)
    }

    async fn login(&self, email: &str, password: &str) -> String {
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                "/api/auth/token",
                None,
                None,
                Some(json!({"email": email, "password": password})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["token_type"], "Bearer");
        body["access_token"].as_str().expect("a token").to_owned()
    }

    /// Registers and logs in a customer; answers the token.
    async fn customer(&self) -> String {
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                "/api/users",
                None,
                None,
                Some(json!({
                    "email": "ann@example.com",
                    "password": "ann-password-1",
                    "name": "Ann"
                })),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["role"], "customer");
        self.login("ann@example.com", "ann-password-1").await
    }

    async fn first_product(&self) -> String {
        let (status, page) = self
            .call(
                reqwest::Method::GET,
                "/api/products?limit=100",
                None,
                None,
                None,
            )
            .await;
        assert_eq!(status, 200, "{page}");
        let item = &page["items"][0];
        assert!(item["available"].as_i64().expect("available") > 0, "{page}");
        item["id"].as_str().expect("an id").to_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placed_order_is_confirmed_with_a_captured_payment_and_a_created_shipment() {
    // Register, log in, order one unit, poll the order as its owner until it leaves PENDING,
    // then read its payment, shipment and stock as the admin, as `trellis load` checks them.
    let shop = Harness::start().await;
    let token = shop.customer().await;
    let product = shop.first_product().await;
    let (status, accepted) = shop
        .call(
            reqwest::Method::POST,
            "/api/orders",
            Some(&token),
            Some("order-1"),
            Some(json!({"items": [{"product_id": product, "quantity": 1}]})),
        )
        .await;
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(accepted["status"], "PENDING");
    let id = accepted["id"].as_str().expect("an id").to_owned();

    let deadline = tokio::time::Instant::now() + SETTLE_MAX;
    let order = loop {
        let (status, order) = shop
            .call(
                reqwest::Method::GET,
                &format!("/api/orders/{id}"),
                Some(&token),
                None,
                None,
            )
            .await;
        assert_eq!(status, 200, "{order}");
        if order["status"] != "PENDING" {
            break order;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still PENDING: {order}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(order["status"], "CONFIRMED", "{order}");
    assert_eq!(order["items"][0]["quantity"], 1);
    assert!(order["total_cents"].as_i64().expect("a total") > 0);
    let steps: Vec<String> = order["timeline"]
        .as_array()
        .expect("a timeline")
        .iter()
        .map(|e| {
            format!(
                "{}/{}",
                e["step"].as_str().unwrap_or(""),
                e["outcome"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(
        steps,
        [
            "order/created",
            "inventory/reserved",
            "payment/captured",
            "shipping/created",
            "inventory/committed",
            "order/confirmed"
        ]
    );

    let admin = shop.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let (status, payment) = shop
        .call(
            reqwest::Method::GET,
            &format!("/api/payments/{id}"),
            Some(&admin),
            None,
            None,
        )
        .await;
    assert_eq!(
        (status, payment["status"].as_str()),
        (200, Some("captured")),
        "{payment}"
    );
    let (status, shipment) = shop
        .call(
            reqwest::Method::GET,
            &format!("/api/shipments/{id}"),
            Some(&admin),
            None,
            None,
        )
        .await;
    assert_eq!(
        (status, shipment["status"].as_str()),
        (200, Some("created")),
        "{shipment}"
    );
    let (status, stock) = shop
        .call(
            reqwest::Method::GET,
            &format!("/api/inventory/{product}"),
            Some(&admin),
            None,
            None,
        )
        .await;
    assert_eq!(status, 200, "{stock}");
    assert_eq!(stock["reserved"], 0, "{stock}");
    assert_eq!(
        stock["total"],
        trellis_bench_baseline::SEED_STOCK - 1,
        "{stock}"
    );

    // A customer is no admin, and someone else's order is not found.
    let (status, _) = shop
        .call(
            reqwest::Method::GET,
            &format!("/api/payments/{id}"),
            Some(&token),
            None,
            None,
        )
        .await;
    assert_eq!(status, 403);
    let (status, _) = shop
        .call(
            reqwest::Method::GET,
            &format!("/api/orders/{id}"),
            None,
            None,
            None,
        )
        .await;
    assert_eq!(status, 401);
    shop.baseline.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_idempotency_key_answers_the_first_order_and_another_body_is_refused() {
    // The same key and body twice: one order, the same 202 answer; the same key with another
    // body: 422; a new key: a new order.
    let shop = Harness::start().await;
    let token = shop.customer().await;
    let product = shop.first_product().await;
    let body = json!({"items": [{"product_id": product, "quantity": 1}]});
    let place = |key: &'static str, body: Value| {
        let shop = &shop;
        let token = token.clone();
        async move {
            shop.call(
                reqwest::Method::POST,
                "/api/orders",
                Some(&token),
                Some(key),
                Some(body),
            )
            .await
        }
    };
    let first = place("key-1", body.clone()).await;
    let again = place("key-1", body.clone()).await;
    assert_eq!(first.0, 202, "{}", first.1);
    assert_eq!(again, first);

    let other = json!({"items": [{"product_id": product, "quantity": 2}]});
    let (status, error) = place("key-1", other).await;
    assert_eq!(status, 422, "{error}");
    assert_eq!(error["error"]["code"], "idempotency_key_reused");

    let fresh = place("key-2", body).await;
    assert_eq!(fresh.0, 202);
    assert_ne!(fresh.1["id"], first.1["id"]);

    // Without a key, the shop's error.
    let (status, error) = shop
        .call(
            reqwest::Method::POST,
            "/api/orders",
            Some(&token),
            None,
            Some(json!({"items": [{"product_id": product, "quantity": 1}]})),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(error["error"]["code"], "missing_idempotency_key");
    shop.baseline.shutdown().await;
}
