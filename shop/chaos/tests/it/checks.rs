//! The database checks against a real shop: they hold after clean orders, and they find what
//! is broken when a database (or the bus) is tampered with; on the embedded backends and on
//! PostgreSQL + NATS.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt as _;
use serde_json::{Value, json};
use shop_chaos::checks::{BusStore, ProviderStats, Stores, check};

struct Shop {
    shop: shop_app::Shop,
    http: reqwest::Client,
    base: String,
    _dir: tempfile::TempDir,
    admin: String,
    stores: Stores,
    _databases: Vec<trellis_testkit::TestPostgres>,
    _nats: Option<trellis_testkit::TestNats>,
}

/// The embedded shop (`remote` false), or the choreographed shop on PostgreSQL + NATS (so the
/// bus has consumer groups to count); `None` when those servers are unreachable outside CI.
async fn start(remote: bool, test: &str) -> Option<Shop> {
    let dir = tempfile::tempdir().unwrap();
    let mut config = shop_app::ShopConfig::ephemeral(dir.path());
    config.admin = Some(("admin@chaos.test".into(), "admin-password-1".into()));
    config.seed_catalog = false;
    let mut stores = Stores::embedded(dir.path());
    let mut databases = Vec::new();
    let mut nats = None;
    if remote {
        let test_nats = trellis_testkit::nats(test).await?;
        config.bus_url = Some(test_nats.url.clone());
        config.bus_prefix = test_nats.prefix.clone();
        config.saga = shop_app::SagaStyle::Choreography;
        stores.bus = BusStore::Nats {
            url: test_nats.url.clone(),
            prefix: test_nats.prefix.clone(),
        };
        nats = Some(test_nats);
        let mut urls = BTreeMap::new();
        for service in [
            "users",
            "products",
            "inventory",
            "orders",
            "payments",
            "shipping",
        ] {
            let db = trellis_testkit::postgres(&format!("{test}_{service}")).await?;
            urls.insert(service.to_owned(), db.url.clone());
            databases.push(db);
        }
        config.database_urls = urls.clone();
        stores.databases = urls;
    }
    let shop = shop_app::up(config).await.unwrap();
    let base = shop.gateway_url();
    let http = reqwest::Client::new();
    let admin = token(&http, &base, "admin@chaos.test", "admin-password-1").await;
    Some(Shop {
        shop,
        http,
        base,
        _dir: dir,
        admin,
        stores,
        _databases: databases,
        _nats: nats,
    })
}

async fn token(http: &reqwest::Client, base: &str, email: &str, password: &str) -> String {
    let body: Value = http
        .post(format!("{base}/api/auth/token"))
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["access_token"].as_str().unwrap().to_owned()
}

async fn settle(shop: &Shop, token: &str, id: &str) -> String {
    for _ in 0..400 {
        let body: Value = shop
            .http
            .get(format!("{}/api/orders/{id}", shop.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if body["status"] != "PENDING" {
            return body["status"].as_str().unwrap().to_owned();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("order {id} never settled");
}

async fn provider_stats(shop: &Shop) -> ProviderStats {
    let url = shop
        .shop
        .addrs()
        .iter()
        .find(|(name, _)| **name == "payment-provider")
        .map(|(_, addr)| format!("http://{addr}/v1/stats"))
        .unwrap();
    shop.http
        .get(url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_orders_pass_and_tampering_is_found() {
    clean_orders_pass_and_tampering_is_found_on(false, "checks_sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_orders_pass_and_tampering_is_found_on_postgres_and_nats() {
    clean_orders_pass_and_tampering_is_found_on(true, "checks_pg").await;
}

async fn clean_orders_pass_and_tampering_is_found_on(remote: bool, test: &str) {
    let Some(shop) = start(remote, test).await else {
        return;
    };
    let product: Value = shop
        .http
        .post(format!("{}/api/products", shop.base))
        .bearer_auth(&shop.admin)
        .json(&json!({"name": "Mug", "price_cents": 900, "stock": 3}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let product = product["id"].as_str().unwrap().to_owned();
    shop.http
        .post(format!("{}/api/users", shop.base))
        .json(&json!({"email": "c@chaos.test", "password": "password-123", "name": "C"}))
        .send()
        .await
        .unwrap();
    let customer = token(&shop.http, &shop.base, "c@chaos.test", "password-123").await;
    let mut ids = Vec::new();
    // Four orders of one unit for three in stock: three confirmed, one cancelled.
    for i in 0..4 {
        let body: Value = shop
            .http
            .post(format!("{}/api/orders", shop.base))
            .bearer_auth(&customer)
            .header("idempotency-key", format!("chaos-check-{i}"))
            .json(&json!({"items": [{"product_id": product, "quantity": 1}]}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    let mut statuses = Vec::new();
    for id in &ids {
        statuses.push(settle(&shop, &customer, id).await);
    }
    assert_eq!(
        statuses.iter().filter(|s| *s == "CONFIRMED").count(),
        3,
        "{statuses:?}"
    );
    let stats = provider_stats(&shop).await;
    // The relay and the projection catch up within moments.
    let mut report = None;
    for _ in 0..100 {
        let r = check(&shop.stores, Some(stats)).await.unwrap();
        if r.hold() {
            report = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = report.unwrap_or_else(|| panic!("clean run flagged"));
    assert_eq!(report.orders.get("CONFIRMED"), Some(&3));
    assert_eq!(report.cancelled_by_reason.get("out_of_stock"), Some(&1));
    assert_eq!(report.double_captures, 0);

    // A provider that captured once more than the shop confirmed is a double capture.
    let doubled = ProviderStats {
        captures: stats.captures + 1,
        ..stats
    };
    let report = check(&shop.stores, Some(doubled)).await.unwrap();
    assert_eq!(report.double_captures, 1);
    assert!(!report.hold());

    // Tamper with the databases the way a lost effect would leave them.
    let confirmed = statuses
        .iter()
        .position(|s| s == "CONFIRMED")
        .map(|i| ids[i].clone())
        .unwrap();
    let stores = shop.stores.clone();
    shop.shop.shutdown().await;
    let exec = |service: &str, sql: String| {
        let url = stores.databases[service].clone();
        async move {
            let db = trellis_service::Db::connect(&url).await.unwrap();
            trellis_service::on_db!(&db, |pool| sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(pool)
                .await
                .map(|r| r.rows_affected()))
            .unwrap();
            db.close().await;
        }
    };
    exec(
        "payments",
        format!("UPDATE payments SET status = 'refunded' WHERE order_id = '{confirmed}'"),
    )
    .await;
    exec(
        "shipping",
        format!("DELETE FROM shipments WHERE order_id = '{confirmed}'"),
    )
    .await;
    exec(
        "inventory",
        format!(
            "UPDATE reservation_lines SET quantity = quantity + 1 WHERE order_id = '{confirmed}'"
        ),
    )
    .await;
    let report = check(&stores, Some(stats)).await.unwrap();
    assert_eq!(report.payment_mismatches, 1, "{report:?}");
    assert_eq!(report.shipment_mismatches, 1, "{report:?}");
    assert_eq!(report.stock_mismatches, 1, "{report:?}");
    assert!(
        report.violations.iter().any(|v| v.contains(&confirmed)),
        "{report:?}"
    );
    if let BusStore::Nats { url, prefix } = &stores.bus {
        // A message a group has not taken is undelivered: publish one where a consumer of
        // the bus stream listens while nothing runs to take it.
        assert_eq!(report.undelivered_messages, 0, "{report:?}");
        let client = async_nats::connect(url.as_str()).await.unwrap();
        let context = async_nats::jetstream::new(client);
        let stream = context
            .get_stream(format!("{}_BUS", prefix.to_uppercase()))
            .await
            .unwrap();
        let consumers: Vec<_> = stream
            .consumers()
            .map(|c| c.unwrap())
            .collect::<Vec<_>>()
            .await;
        let filters = |c: &async_nats::jetstream::consumer::Info| {
            let mut all = c.config.filter_subjects.clone();
            all.push(c.config.filter_subject.clone());
            all
        };
        let filter = consumers
            .iter()
            .flat_map(filters)
            .find(|f| !f.is_empty())
            .expect("the choreographed shop's groups consume the bus stream");
        // Every group whose consumer's filter matches the subject has the message to take
        // (a group on a list of topics filters on a wider subject and acknowledges what is
        // not on its list only while it runs).
        let subject = filter.replace(['>', '*'], "tampered");
        let takers = consumers
            .iter()
            .filter(|c| {
                filters(c)
                    .iter()
                    .any(|f| !f.is_empty() && trellis_bus::topic::matches(f, &subject))
            })
            .count() as u64;
        context
            .publish(subject, "{}".into())
            .await
            .unwrap()
            .await
            .unwrap();
        let report = check(&stores, Some(stats)).await.unwrap();
        assert_eq!(report.undelivered_messages, takers, "{report:?}");
        assert!(takers >= 1);
    }
}
