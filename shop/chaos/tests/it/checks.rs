//! The database checks against a real shop: they hold after clean orders, and they find what
//! is broken when a database is tampered with.

use std::time::Duration;

use serde_json::{Value, json};
use shop_chaos::checks::{ProviderStats, check};

struct Shop {
    shop: shop_app::Shop,
    http: reqwest::Client,
    base: String,
    dir: tempfile::TempDir,
    admin: String,
}

async fn start() -> Shop {
    let dir = tempfile::tempdir().unwrap();
    let mut config = shop_app::ShopConfig::ephemeral(dir.path());
    config.admin = Some(("admin@chaos.test".into(), "admin-password-1".into()));
    config.seed_catalog = false;
    let shop = shop_app::up(config).await.unwrap();
    let base = shop.gateway_url();
    let http = reqwest::Client::new();
    let admin = token(&http, &base, "admin@chaos.test", "admin-password-1").await;
    Shop {
        shop,
        http,
        base,
        dir,
        admin,
    }
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
    let shop = start().await;
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
        let r = check(shop.dir.path(), Some(stats)).await.unwrap();
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
    let report = check(shop.dir.path(), Some(doubled)).await.unwrap();
    assert_eq!(report.double_captures, 1);
    assert!(!report.hold());

    // Tamper with the databases the way a lost effect would leave them.
    let confirmed = ids[0].clone();
    let dir = shop.dir.path().to_owned();
    shop.shop.shutdown().await;
    let exec = |file: &str, sql: String| {
        let path = dir.join(file);
        async move {
            let options = sqlx::sqlite::SqliteConnectOptions::new().filename(path);
            let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
        }
    };
    exec(
        "payments.db",
        format!("UPDATE payments SET status = 'refunded' WHERE order_id = '{confirmed}'"),
    )
    .await;
    exec(
        "shipping.db",
        format!("DELETE FROM shipments WHERE order_id = '{confirmed}'"),
    )
    .await;
    exec(
        "inventory.db",
        format!(
            "UPDATE reservation_lines SET quantity = quantity + 1 WHERE order_id = '{confirmed}'"
        ),
    )
    .await;
    let report = check(&dir, Some(stats)).await.unwrap();
    assert_eq!(report.payment_mismatches, 1, "{report:?}");
    assert_eq!(report.shipment_mismatches, 1, "{report:?}");
    assert_eq!(report.stock_mismatches, 1, "{report:?}");
    assert!(
        report.violations.iter().any(|v| v.contains(&confirmed)),
        "{report:?}"
    );
}
