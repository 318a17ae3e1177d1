//! Starting a shop and talking to it like a client.

use std::time::Duration;

use serde_json::{Value, json};
use shop_app::{SagaStyle, Shop, ShopConfig};

/// Which backends a test shop uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    Sqlite,
    Postgres,
}

/// A shop started for one test, with what it needs kept alive.
pub(crate) struct TestShop {
    pub(crate) shop: Shop,
    pub(crate) http: reqwest::Client,
    pub(crate) base: String,
    pub(crate) dir: tempfile::TempDir,
    _databases: Vec<trellis_testkit::TestPostgres>,
    /// The NATS prefix of a PostgreSQL + NATS shop: its streams are deleted when it drops.
    _nats: Option<trellis_testkit::TestNats>,
    /// Held while a PostgreSQL-backed shop runs (dropped after the databases).
    _pg_turn: Option<tokio::sync::SemaphorePermit<'static>>,
    /// The bus URL and prefix the orders service relays to.
    pub(crate) bus: (String, String),
    admin_token: String,
}

static PG_SHOPS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

pub(crate) const ADMIN_EMAIL: &str = "admin@test.local";
pub(crate) const ADMIN_PASSWORD: &str = "admin-password-1";

impl TestShop {
    /// Starts a shop, or `None` when PostgreSQL is wanted and unreachable outside CI.
    pub(crate) async fn start(backend: Backend, test: &str) -> Option<Self> {
        Self::start_styled(backend, SagaStyle::Orchestrated, test).await
    }

    /// Starts a shop whose order saga runs in `style`.
    pub(crate) async fn start_styled(
        backend: Backend,
        style: SagaStyle,
        test: &str,
    ) -> Option<Self> {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::start_in_styled(backend, style, test, dir).await
    }

    pub(crate) async fn start_in(
        backend: Backend,
        test: &str,
        dir: tempfile::TempDir,
    ) -> Option<Self> {
        Self::start_in_styled(backend, SagaStyle::Orchestrated, test, dir).await
    }

    pub(crate) async fn start_in_styled(
        backend: Backend,
        style: SagaStyle,
        test: &str,
        dir: tempfile::TempDir,
    ) -> Option<Self> {
        let mut config = ShopConfig::ephemeral(dir.path());
        config.saga = style;
        config.admin = Some((ADMIN_EMAIL.into(), ADMIN_PASSWORD.into()));
        config.seed_catalog = false;
        // The process-wide recorder (installed once, shared by every shop of this binary), so
        // the gateway's operator listener has metrics to serve.
        config.metrics = true;
        let mut databases = Vec::new();
        // One PostgreSQL-backed shop at a time: each opens pools to six databases, and two at
        // once can exhaust the server's default 100 connections.
        let pg_turn = if backend == Backend::Postgres {
            Some(
                PG_SHOPS
                    .acquire()
                    .await
                    .expect("the semaphore is never closed"),
            )
        } else {
            None
        };
        let mut nats = None;
        if backend == Backend::Postgres {
            let test_nats = trellis_testkit::nats(test).await?;
            config.bus_url = Some(test_nats.url.clone());
            config.bus_prefix = test_nats.prefix.clone();
            nats = Some(test_nats);
        }
        let bus = (config.bus_url(), config.bus_prefix.clone());
        if backend == Backend::Postgres {
            for service in [
                "users",
                "products",
                "inventory",
                "orders",
                "payments",
                "shipping",
            ] {
                let db = trellis_testkit::postgres(&format!("{test}_{service}")).await?;
                config
                    .database_urls
                    .insert(service.to_owned(), db.url.clone());
                databases.push(db);
            }
        }
        let shop = shop_app::up(config).await.expect("the shop starts");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .expect("client");
        let base = shop.gateway_url();
        let mut this = Self {
            shop,
            http,
            base,
            dir,
            _databases: databases,
            _nats: nats,
            _pg_turn: pg_turn,
            bus,
            admin_token: String::new(),
        };
        this.admin_token = this.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
        Some(this)
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub(crate) fn admin(&self) -> &str {
        &self.admin_token
    }

    pub(crate) async fn login(&self, email: &str, password: &str) -> String {
        let response = self
            .http
            .post(self.url("/api/auth/token"))
            .json(&json!({"email": email, "password": password}))
            .send()
            .await
            .expect("token call");
        assert_eq!(response.status(), 200, "login of {email}");
        let body: Value = response.json().await.expect("json");
        body["access_token"].as_str().expect("token").to_owned()
    }

    /// Registers a customer and returns a token for them.
    pub(crate) async fn customer(&self, name: &str) -> String {
        let email = format!("{name}-{}@test.local", uuid::Uuid::now_v7().simple());
        let response = self
            .http
            .post(self.url("/api/users"))
            .json(&json!({"email": email, "password": "password-123", "name": name}))
            .send()
            .await
            .expect("register");
        assert_eq!(
            response.status(),
            201,
            "{}",
            response.text().await.unwrap_or_default()
        );
        self.login(&email, "password-123").await
    }

    /// Creates a product as admin and returns its id.
    pub(crate) async fn product(&self, name: &str, price_cents: i64, stock: i64) -> String {
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                "/api/products",
                Some(self.admin()),
                Some(json!({"name": name, "price_cents": price_cents, "stock": stock})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["id"].as_str().expect("id").to_owned()
    }

    /// Any call; answers the status and the JSON body (Null when empty).
    pub(crate) async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self.http.request(method, self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("call");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, value)
    }

    /// Places an order; answers the status and body.
    pub(crate) async fn place(&self, token: &str, key: &str, items: Value) -> (u16, Value) {
        let response = self
            .http
            .post(self.url("/api/orders"))
            .bearer_auth(token)
            .header("idempotency-key", key)
            .json(&json!({ "items": items }))
            .send()
            .await
            .expect("place");
        let status = response.status().as_u16();
        (status, response.json().await.expect("json"))
    }

    /// Places one order of `quantity` × `product` and returns its id.
    pub(crate) async fn order(&self, token: &str, product: &str, quantity: i64) -> String {
        let (status, body) = self
            .place(
                token,
                &uuid::Uuid::now_v7().to_string(),
                json!([{"product_id": product, "quantity": quantity}]),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["status"], "PENDING");
        body["id"].as_str().expect("id").to_owned()
    }

    /// Polls the order until it is CONFIRMED or CANCELLED (at most 30 s).
    pub(crate) async fn settled(&self, token: &str, id: &str) -> Value {
        for _ in 0..600 {
            let (status, body) = self
                .call(
                    reqwest::Method::GET,
                    &format!("/api/orders/{id}"),
                    Some(token),
                    None,
                )
                .await;
            assert_eq!(status, 200, "{body}");
            if body["status"] != "PENDING" {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("order {id} still PENDING after 30 s");
    }

    /// The product's stock, as the admin API shows it.
    pub(crate) async fn stock(&self, product: &str) -> Value {
        let (status, body) = self
            .call(
                reqwest::Method::GET,
                &format!("/api/inventory/{product}"),
                Some(self.admin()),
                None,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// The order's payment status (`none` when there is no payment).
    pub(crate) async fn payment(&self, order: &str) -> String {
        let (status, body) = self
            .call(
                reqwest::Method::GET,
                &format!("/api/payments/{order}"),
                Some(self.admin()),
                None,
            )
            .await;
        match status {
            404 => "none".to_owned(),
            200 => body["status"].as_str().expect("status").to_owned(),
            other => panic!("payment lookup answered {other}: {body}"),
        }
    }

    /// The order's shipment status (`none` when there is none).
    pub(crate) async fn shipment(&self, order: &str) -> String {
        let (status, body) = self
            .call(
                reqwest::Method::GET,
                &format!("/api/shipments/{order}"),
                Some(self.admin()),
                None,
            )
            .await;
        match status {
            404 => "none".to_owned(),
            200 => body["status"].as_str().expect("status").to_owned(),
            other => panic!("shipment lookup answered {other}: {body}"),
        }
    }

    pub(crate) async fn stop(self) -> tempfile::TempDir {
        self.shop.shutdown().await;
        self.dir
    }
}

/// Asserts the stock invariants of one product and returns (total, reserved, available).
pub(crate) async fn stock_ok(shop: &TestShop, product: &str) -> (i64, i64, i64) {
    let stock = shop.stock(product).await;
    let total = stock["total"].as_i64().expect("total");
    let reserved = stock["reserved"].as_i64().expect("reserved");
    let available = stock["available"].as_i64().expect("available");
    assert!(total >= 0 && reserved >= 0 && available >= 0, "{stock}");
    assert_eq!(reserved + available, total, "{stock}");
    (total, reserved, available)
}

/// One end-to-end test: a shop on `$backend` with `$style` sagas, `$body(shop)`, a clean stop.
/// A PostgreSQL test returns early (skipped) when the server is unreachable outside CI.
#[macro_export]
macro_rules! shop_test {
    ($fn_name:ident, $backend:ident, $style:ident, $test:expr, $body:path) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $fn_name() {
            let Some(shop) = $crate::harness::TestShop::start_styled(
                $crate::harness::Backend::$backend,
                shop_app::SagaStyle::$style,
                $test,
            )
            .await
            else {
                assert!(
                    $crate::harness::Backend::$backend != $crate::harness::Backend::Sqlite,
                    "sqlite needs no server"
                );
                return;
            };
            $body(&shop).await;
            shop.stop().await;
        }
    };
}

/// Defines `$name` for SQLite and PostgreSQL, calling `$body(shop)`.
#[macro_export]
macro_rules! on_both_backends {
    ($name:ident, $body:path) => {
        mod $name {
            use super::*;

            $crate::shop_test!(sqlite, Sqlite, Orchestrated, stringify!($name), $body);
            $crate::shop_test!(postgres, Postgres, Orchestrated, stringify!($name), $body);
        }
    };
}

/// Defines `$name` for each saga style, on SQLite and on PostgreSQL, calling `$body(shop)`:
/// the same business outcome and invariants whichever style runs the order saga.
#[macro_export]
macro_rules! on_every_style {
    ($name:ident, $body:path) => {
        mod $name {
            use super::*;

            $crate::shop_test!(sqlite, Sqlite, Orchestrated, stringify!($name), $body);
            $crate::shop_test!(postgres, Postgres, Orchestrated, stringify!($name), $body);
            $crate::shop_test!(
                choreography_sqlite,
                Sqlite,
                Choreography,
                concat!(stringify!($name), "_ch"),
                $body
            );
            $crate::shop_test!(
                choreography_postgres,
                Postgres,
                Choreography,
                concat!(stringify!($name), "_ch"),
                $body
            );
        }
    };
}

/// Installs the process's tracing with OpenTelemetry once, so spans carry W3C trace ids.
pub(crate) fn telemetry() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let config = trellis_telemetry::TelemetryConfig::new("shop-e2e").with_filter("warn");
        if let Ok(guard) = trellis_telemetry::init(config) {
            // Kept for the whole test process: dropping it would shut the tracer down.
            std::mem::forget(guard);
        }
    });
}

impl TestShop {
    /// The bus messages about `subject` on topics matching `pattern`, read as consumer group
    /// `group`, until `enough` holds for them or 15 s pass.
    pub(crate) async fn bus_messages(
        &self,
        pattern: &str,
        group: &str,
        subject: &str,
        enough: impl Fn(&[trellis_bus::Envelope]) -> bool,
    ) -> Vec<trellis_bus::Envelope> {
        use trellis_bus::Bus as _;
        let (url, prefix) = &self.bus;
        let bus = trellis_bus::AnyBus::connect(url, prefix)
            .await
            .expect("bus");
        let mut subscription = bus
            .subscribe(pattern, group, trellis_bus::SubscribeOptions::default())
            .await
            .expect("subscribe");
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while tokio::time::Instant::now() < deadline && !enough(&seen) {
            for delivery in subscription
                .fetch(16, Duration::from_millis(500))
                .await
                .expect("fetch")
            {
                if delivery.envelope().subject == subject {
                    seen.push(delivery.envelope().clone());
                }
                delivery.ack().await.expect("ack");
            }
        }
        seen
    }
}
