//! The one database: its schema and every statement the API and the order steps run.
//!
//! Writes go through one connection ([`Db::write`], `BEGIN IMMEDIATE`): SQLite takes one
//! writer at a time anyway, and queueing writers in the pool (fair, asynchronous) is cheaper
//! than letting them spin in SQLite's busy handler. Reads use a pool of their own, which WAL
//! lets run beside the writer. Times are RFC 3339 UTC with milliseconds, taken by SQLite.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use shop_contracts::api::{
    OrderItem, OrderLineView, OrderStatus, OrderView, StockView, TimelineEntry,
};
use sqlx::sqlite::SqlitePool;
use sqlx::{Row, Sqlite, Transaction};
use trellis_service::{ROLE_ADMIN, ROLE_CUSTOMER};

use crate::flow::PlacedOrder;

/// Read connections.
const READERS_MAX: u32 = 4;
/// How long a statement waits for a connection before the call fails (503).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// The schema, created on a fresh file at every start.
const SCHEMA: &str = "
CREATE TABLE users (
    id TEXT PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    password_hash TEXT NOT NULL
);
CREATE TABLE products (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    price_cents INTEGER NOT NULL
);
CREATE TABLE stock (
    product_id TEXT PRIMARY KEY,
    total INTEGER NOT NULL,
    reserved INTEGER NOT NULL DEFAULT 0,
    CHECK (reserved >= 0 AND reserved <= total)
);
CREATE TABLE order_requests (
    user_id TEXT NOT NULL,
    idem_key TEXT NOT NULL,
    request TEXT NOT NULL,
    order_id TEXT NOT NULL,
    PRIMARY KEY (user_id, idem_key)
) WITHOUT ROWID;
CREATE TABLE orders (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    status TEXT NOT NULL,
    items TEXT NOT NULL,
    total_cents INTEGER NOT NULL,
    reason TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE order_timeline (
    seq INTEGER PRIMARY KEY,
    order_id TEXT NOT NULL,
    step TEXT NOT NULL,
    outcome TEXT NOT NULL,
    at TEXT NOT NULL
);
CREATE INDEX order_timeline_by_order ON order_timeline (order_id, seq);
CREATE TABLE payments (
    order_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    amount_cents INTEGER NOT NULL,
    provider_charge_id TEXT,
    updated_at TEXT NOT NULL
);
CREATE TABLE shipments (
    order_id TEXT PRIMARY KEY,
    id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    lines TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
";

/// Appends one timeline entry (`?1` order, `?2` step, `?3` outcome).
const TIMELINE_INSERT: &str = "INSERT INTO order_timeline (order_id, step, outcome, at)
     VALUES (?1, ?2, ?3, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))";

/// The database: one writer connection, a few readers.
#[derive(Debug, Clone)]
pub(crate) struct Db {
    writer: SqlitePool,
    reader: SqlitePool,
}

impl Db {
    /// Opens (creates) the file at `path` with trellis's SQLite settings and the schema.
    pub(crate) async fn open(path: &Path) -> anyhow::Result<Self> {
        let url = format!("sqlite://{}", path.display());
        let options = trellis_sqlite::connect_options(&url)?;
        let writer = trellis_sqlite::pool_options()
            .max_connections(1)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options.clone())
            .await
            .with_context(|| format!("opening {url}"))?;
        sqlx::raw_sql(SCHEMA)
            .execute(&writer)
            .await
            .context("creating the schema")?;
        let reader = trellis_sqlite::pool_options()
            .max_connections(READERS_MAX)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .with_context(|| format!("opening {url} for reading"))?;
        Ok(Self { writer, reader })
    }

    /// A write transaction; committed durably (`synchronous = FULL`) by `commit`.
    async fn write(&self) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
        self.writer.begin_with("BEGIN IMMEDIATE").await
    }

    /// Closes both pools.
    pub(crate) async fn close(&self) {
        self.reader.close().await;
        self.writer.close().await;
    }
}

async fn timeline(
    tx: &mut Transaction<'static, Sqlite>,
    order_id: &str,
    step: &str,
    outcome: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(TIMELINE_INSERT)
        .bind(order_id)
        .bind(step)
        .bind(outcome)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Creates the catalogue with `stock` units of each product.
pub(crate) async fn seed_catalogue(
    db: &Db,
    catalogue: &[(&str, i64)],
    stock: i64,
) -> Result<(), sqlx::Error> {
    let mut tx = db.write().await?;
    for (name, price_cents) in catalogue {
        let id = uuid::Uuid::now_v7().hyphenated().to_string();
        sqlx::query("INSERT INTO products (id, name, price_cents) VALUES (?1, ?2, ?3)")
            .bind(&id)
            .bind(name)
            .bind(price_cents)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO stock (product_id, total, reserved) VALUES (?1, ?2, 0)")
            .bind(&id)
            .bind(stock)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await
}

/// A stored account.
#[derive(Debug, Clone)]
pub(crate) struct User {
    pub(crate) id: String,
    pub(crate) email: String,
    pub(crate) name: String,
    pub(crate) role: String,
    pub(crate) password_hash: String,
}

/// Creates the administrator account.
pub(crate) async fn insert_admin(db: &Db, email: &str, hash: &str) -> Result<(), sqlx::Error> {
    let user = User {
        id: uuid::Uuid::now_v7().hyphenated().to_string(),
        email: email.trim().to_lowercase(),
        name: "Admin".to_owned(),
        role: ROLE_ADMIN.to_owned(),
        password_hash: hash.to_owned(),
    };
    insert_user(db, &user).await.map(drop)
}

/// Registers a customer; `None` when the email is taken.
pub(crate) async fn insert_customer(
    db: &Db,
    email: String,
    name: String,
    hash: String,
) -> Result<Option<User>, sqlx::Error> {
    let user = User {
        id: uuid::Uuid::now_v7().hyphenated().to_string(),
        email,
        name,
        role: ROLE_CUSTOMER.to_owned(),
        password_hash: hash,
    };
    let inserted = insert_user(db, &user).await?;
    Ok((inserted == 1).then_some(user))
}

async fn insert_user(db: &Db, user: &User) -> Result<u64, sqlx::Error> {
    let mut tx = db.write().await?;
    let inserted = sqlx::query(
        "INSERT INTO users (id, email, name, role, password_hash) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (email) DO NOTHING",
    )
    .bind(&user.id)
    .bind(&user.email)
    .bind(&user.name)
    .bind(&user.role)
    .bind(&user.password_hash)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(inserted)
}

/// The account with this (lowercased) email.
pub(crate) async fn find_user(db: &Db, email: &str) -> Result<Option<User>, sqlx::Error> {
    let row =
        sqlx::query("SELECT id, email, name, role, password_hash FROM users WHERE email = ?1")
            .bind(email)
            .fetch_optional(&db.reader)
            .await?;
    row.map(|r| {
        Ok(User {
            id: r.try_get("id")?,
            email: r.try_get("email")?,
            name: r.try_get("name")?,
            role: r.try_get("role")?,
            password_hash: r.try_get("password_hash")?,
        })
    })
    .transpose()
}

/// A product as listed.
#[derive(Debug, Clone)]
pub(crate) struct ListedProduct {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) price_cents: i64,
    pub(crate) available: i64,
}

/// Up to `limit` products after `after` (by id, which is creation order), whose lowercased
/// name contains `needle`.
pub(crate) async fn list_products(
    db: &Db,
    after: Option<&str>,
    needle: Option<&str>,
    limit: u32,
) -> Result<Vec<ListedProduct>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT p.id, p.name, p.price_cents, COALESCE(s.total - s.reserved, 0) AS available
         FROM products p LEFT JOIN stock s ON s.product_id = p.id
         WHERE (?1 IS NULL OR p.id > ?1) AND (?2 IS NULL OR instr(lower(p.name), ?2) > 0)
         ORDER BY p.id LIMIT ?3",
    )
    .bind(after)
    .bind(needle)
    .bind(i64::from(limit))
    .fetch_all(&db.reader)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(ListedProduct {
                id: r.try_get("id")?,
                name: r.try_get("name")?,
                price_cents: r.try_get("price_cents")?,
                available: r.try_get("available")?,
            })
        })
        .collect()
}

fn stock_view(product_id: &str, total: i64, reserved: i64) -> StockView {
    StockView {
        product_id: product_id.to_owned(),
        total,
        reserved,
        available: total - reserved,
    }
}

/// A product's stock (zeros for one never stocked, as inventory answers).
pub(crate) async fn stock(db: &Db, product_id: &str) -> Result<StockView, sqlx::Error> {
    let row = sqlx::query("SELECT total, reserved FROM stock WHERE product_id = ?1")
        .bind(product_id)
        .fetch_optional(&db.reader)
        .await?;
    let (total, reserved) = match row {
        Some(r) => (r.try_get("total")?, r.try_get("reserved")?),
        None => (0, 0),
    };
    Ok(stock_view(product_id, total, reserved))
}

/// What setting a stock total did.
#[derive(Debug)]
pub(crate) enum SetStock {
    /// The new level.
    Set(StockView),
    /// `total` is below what is reserved; nothing changed.
    BelowReserved {
        /// Units held for orders in progress.
        reserved: i64,
    },
}

/// Sets a product's total stock, not below what is reserved.
pub(crate) async fn set_stock(
    db: &Db,
    product_id: &str,
    total: i64,
) -> Result<SetStock, sqlx::Error> {
    let mut tx = db.write().await?;
    let reserved: i64 = sqlx::query_scalar("SELECT reserved FROM stock WHERE product_id = ?1")
        .bind(product_id)
        .fetch_optional(&mut *tx)
        .await?
        .unwrap_or(0);
    if reserved > total {
        return Ok(SetStock::BelowReserved { reserved });
    }
    sqlx::query(
        "INSERT INTO stock (product_id, total, reserved) VALUES (?1, ?2, 0)
         ON CONFLICT (product_id) DO UPDATE SET total = excluded.total",
    )
    .bind(product_id)
    .bind(total)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(SetStock::Set(stock_view(product_id, total, reserved)))
}

/// Each product's current price, for the ids that exist.
pub(crate) async fn prices(
    tx: &mut Transaction<'static, Sqlite>,
    product_ids: &[&str],
) -> Result<Vec<(String, i64)>, sqlx::Error> {
    let mut found = Vec::with_capacity(product_ids.len());
    for id in product_ids {
        let price: Option<i64> =
            sqlx::query_scalar("SELECT price_cents FROM products WHERE id = ?1")
                .bind(id)
                .fetch_optional(&mut **tx)
                .await?;
        if let Some(price) = price {
            found.push(((*id).to_owned(), price));
        }
    }
    Ok(found)
}

/// An `Idempotency-Key` recorded by an earlier request.
#[derive(Debug)]
pub(crate) struct Recorded {
    /// The order it placed.
    pub(crate) order_id: String,
    /// Its body, as JSON.
    pub(crate) request: String,
}

/// The transaction that accepts an order (the first commit of five).
pub(crate) async fn begin_accept(db: &Db) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
    db.write().await
}

/// What `user_id` placed under `key` before, if anything.
pub(crate) async fn find_request(
    tx: &mut Transaction<'static, Sqlite>,
    user_id: &str,
    key: &str,
) -> Result<Option<Recorded>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT order_id, request FROM order_requests WHERE user_id = ?1 AND idem_key = ?2",
    )
    .bind(user_id)
    .bind(key)
    .fetch_optional(&mut **tx)
    .await?;
    row.map(|r| {
        Ok(Recorded {
            order_id: r.try_get("order_id")?,
            request: r.try_get("request")?,
        })
    })
    .transpose()
}

/// Records the key and the order `PENDING` with its first timeline entry (the caller
/// commits).
pub(crate) async fn insert_order(
    tx: &mut Transaction<'static, Sqlite>,
    key: &str,
    request: &str,
    order: &PlacedOrder,
) -> Result<(), sqlx::Error> {
    let items =
        serde_json::to_string(&order.lines).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    sqlx::query(
        "INSERT INTO order_requests (user_id, idem_key, request, order_id) VALUES (?1, ?2, ?3, ?4)",
    )
    .bind(&order.user_id)
    .bind(key)
    .bind(request)
    .bind(&order.id)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO orders (id, user_id, status, items, total_cents, reason, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, NULL, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'),
                 strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
    )
    .bind(&order.id)
    .bind(&order.user_id)
    .bind(OrderStatus::Pending.as_str())
    .bind(items)
    .bind(order.total_cents)
    .execute(&mut **tx)
    .await?;
    timeline(tx, &order.id, "order", "created").await
}

/// An order as its owner sees it.
pub(crate) async fn find_order(db: &Db, id: &str) -> Result<Option<OrderView>, sqlx::Error> {
    let Some(row) = sqlx::query(
        "SELECT id, user_id, status, items, total_cents, reason FROM orders WHERE id = ?1",
    )
    .bind(id)
    .fetch_optional(&db.reader)
    .await?
    else {
        return Ok(None);
    };
    let decode = |e: serde_json::Error| sqlx::Error::Decode(Box::new(e));
    let status: String = row.try_get("status")?;
    let status = OrderStatus::parse(&status)
        .ok_or_else(|| sqlx::Error::Decode(format!("order status {status:?}").into()))?;
    let items: String = row.try_get("items")?;
    let items: Vec<OrderLineView> = serde_json::from_str(&items).map_err(decode)?;
    let timeline = sqlx::query(
        "SELECT step, outcome, at FROM order_timeline WHERE order_id = ?1 ORDER BY seq",
    )
    .bind(id)
    .fetch_all(&db.reader)
    .await?
    .into_iter()
    .map(|r| {
        Ok(TimelineEntry {
            step: r.try_get("step")?,
            outcome: r.try_get("outcome")?,
            at: r.try_get("at")?,
        })
    })
    .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Some(OrderView {
        id: row.try_get("id")?,
        user_id: row.try_get("user_id")?,
        status,
        items,
        total_cents: row.try_get("total_cents")?,
        reason: row.try_get("reason")?,
        timeline,
    }))
}

/// Step 2: holds every line's units. `false` when a line is short: then nothing is held and
/// the order is `CANCELLED` (`out_of_stock`), in the same commit.
pub(crate) async fn reserve(db: &Db, order: &PlacedOrder) -> Result<bool, sqlx::Error> {
    let mut tx = db.write().await?;
    for (i, line) in order.lines.iter().enumerate() {
        let held = sqlx::query(
            "UPDATE stock SET reserved = reserved + ?2
             WHERE product_id = ?1 AND total - reserved >= ?2",
        )
        .bind(&line.product_id)
        .bind(line.quantity)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if held == 0 {
            release(&mut tx, &order.lines[..i]).await?;
            let outcome = format!("out of stock: {}", line.product_id);
            timeline(&mut tx, &order.id, "inventory", &outcome).await?;
            cancel_order(
                &mut tx,
                &order.id,
                shop_contracts::api::reason::OUT_OF_STOCK,
            )
            .await?;
            tx.commit().await?;
            return Ok(false);
        }
    }
    timeline(&mut tx, &order.id, "inventory", "reserved").await?;
    tx.commit().await?;
    Ok(true)
}

async fn release(
    tx: &mut Transaction<'static, Sqlite>,
    lines: &[OrderLineView],
) -> Result<(), sqlx::Error> {
    for line in lines {
        sqlx::query("UPDATE stock SET reserved = reserved - ?2 WHERE product_id = ?1")
            .bind(&line.product_id)
            .bind(line.quantity)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

async fn cancel_order(
    tx: &mut Transaction<'static, Sqlite>,
    order_id: &str,
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE orders SET status = ?2, reason = ?3,
                updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
         WHERE id = ?1",
    )
    .bind(order_id)
    .bind(OrderStatus::Cancelled.as_str())
    .bind(reason)
    .execute(&mut **tx)
    .await?;
    timeline(tx, order_id, "order", &format!("cancelled: {reason}")).await
}

async fn insert_payment(
    tx: &mut Transaction<'static, Sqlite>,
    order: &PlacedOrder,
    status: &str,
    charge_id: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO payments (order_id, status, amount_cents, provider_charge_id, updated_at)
         VALUES (?1, ?2, ?3, ?4, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
    )
    .bind(&order.id)
    .bind(status)
    .bind(order.total_cents)
    .bind(charge_id)
    .execute(&mut **tx)
    .await?;
    timeline(tx, &order.id, "payment", status).await
}

/// Step 3, after the provider captured: the payment `captured`.
pub(crate) async fn record_capture(
    db: &Db,
    order: &PlacedOrder,
    charge_id: &str,
) -> Result<(), sqlx::Error> {
    let mut tx = db.write().await?;
    insert_payment(&mut tx, order, "captured", Some(charge_id)).await?;
    tx.commit().await
}

/// The payment a charge that did not capture leaves.
#[derive(Debug, Clone)]
pub(crate) struct FailedPayment {
    /// The payment's status (`declined`, `refunded`, `unavailable`), or none when nothing
    /// reached the provider.
    pub(crate) status: Option<&'static str>,
    /// The provider's charge, when there is one.
    pub(crate) charge_id: Option<String>,
    /// Why the order is cancelled.
    pub(crate) reason: &'static str,
}

/// Step 3, when the charge did not capture: the stock released, the payment as it ended,
/// the order `CANCELLED`, in one commit.
pub(crate) async fn cancel_unpaid(
    db: &Db,
    order: &PlacedOrder,
    payment: &FailedPayment,
) -> Result<(), sqlx::Error> {
    let mut tx = db.write().await?;
    if let Some(status) = payment.status {
        insert_payment(&mut tx, order, status, payment.charge_id.as_deref()).await?;
    }
    release(&mut tx, &order.lines).await?;
    timeline(&mut tx, &order.id, "inventory", "released").await?;
    cancel_order(&mut tx, &order.id, payment.reason).await?;
    tx.commit().await
}

/// Step 4: the shipment `created`.
pub(crate) async fn create_shipment(
    db: &Db,
    order: &PlacedOrder,
    shipment_id: &str,
) -> Result<(), sqlx::Error> {
    let lines: Vec<OrderItem> = order
        .lines
        .iter()
        .map(|l| OrderItem {
            product_id: l.product_id.clone(),
            quantity: l.quantity,
        })
        .collect();
    let lines = serde_json::to_string(&lines).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    let mut tx = db.write().await?;
    sqlx::query(
        "INSERT INTO shipments (order_id, id, user_id, lines, status, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, 'created', strftime('%Y-%m-%dT%H:%M:%fZ', 'now'),
                 strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
    )
    .bind(&order.id)
    .bind(shipment_id)
    .bind(&order.user_id)
    .bind(lines)
    .execute(&mut *tx)
    .await?;
    timeline(&mut tx, &order.id, "shipping", "created").await?;
    tx.commit().await
}

/// Step 5: the reserved units taken out of stock (the shop's stock commit) and the order
/// `CONFIRMED`.
pub(crate) async fn confirm(db: &Db, order: &PlacedOrder) -> Result<(), sqlx::Error> {
    let mut tx = db.write().await?;
    for line in &order.lines {
        sqlx::query(
            "UPDATE stock SET total = total - ?2, reserved = reserved - ?2 WHERE product_id = ?1",
        )
        .bind(&line.product_id)
        .bind(line.quantity)
        .execute(&mut *tx)
        .await?;
    }
    timeline(&mut tx, &order.id, "inventory", "committed").await?;
    sqlx::query(
        "UPDATE orders SET status = ?2, updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
         WHERE id = ?1",
    )
    .bind(&order.id)
    .bind(OrderStatus::Confirmed.as_str())
    .execute(&mut *tx)
    .await?;
    timeline(&mut tx, &order.id, "order", "confirmed").await?;
    tx.commit().await
}

/// An order's payment as `GET /api/payments/{order_id}` shows it (shop/payments' shape).
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct PaymentView {
    order_id: String,
    status: String,
    amount_cents: i64,
    provider_charge_id: Option<String>,
    updated_at: String,
}

/// An order's payment.
pub(crate) async fn payment(db: &Db, order_id: &str) -> Result<Option<PaymentView>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT order_id, status, amount_cents, provider_charge_id, updated_at
         FROM payments WHERE order_id = ?1",
    )
    .bind(order_id)
    .fetch_optional(&db.reader)
    .await?;
    row.map(|r| {
        Ok(PaymentView {
            order_id: r.try_get("order_id")?,
            status: r.try_get("status")?,
            amount_cents: r.try_get("amount_cents")?,
            provider_charge_id: r.try_get("provider_charge_id")?,
            updated_at: r.try_get("updated_at")?,
        })
    })
    .transpose()
}

/// An order's shipment as `GET /api/shipments/{order_id}` shows it (shop/shipping's shape).
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct ShipmentView {
    id: String,
    order_id: String,
    status: String,
    user_id: String,
    lines: Vec<OrderItem>,
    created_at: String,
    updated_at: String,
}

/// An order's shipment.
pub(crate) async fn shipment(db: &Db, order_id: &str) -> Result<Option<ShipmentView>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT id, order_id, status, user_id, lines, created_at, updated_at
         FROM shipments WHERE order_id = ?1",
    )
    .bind(order_id)
    .fetch_optional(&db.reader)
    .await?;
    row.map(|r| {
        let lines: String = r.try_get("lines")?;
        Ok(ShipmentView {
            id: r.try_get("id")?,
            order_id: r.try_get("order_id")?,
            status: r.try_get("status")?,
            user_id: r.try_get("user_id")?,
            lines: serde_json::from_str(&lines).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
            created_at: r.try_get("created_at")?,
            updated_at: r.try_get("updated_at")?,
        })
    })
    .transpose()
}
