//! The invariants, checked directly in each service's database after a run (the `trellis
//! load` engine checks them through the API as well): every order terminal; a confirmed order
//! has a captured payment, a created shipment and committed stock; a cancelled one none of
//! these; stock balances (`reserved` equals what live reservations hold, nothing reserved once
//! every order is terminal, the stock committed per product equals what confirmed orders
//! bought); the provider captured exactly once per confirmed order; every event of the orders
//! log relayed to the bus and projected into the read model; no message left undelivered.
//!
//! Reads the embedded SQLite databases of a data directory (read-only), as `trellis up` and
//! `trellis up --processes` lay them out.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Serialize;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use sqlx::{Row, SqliteConnection};

/// The most violations a report lists (all are counted).
pub const LISTED_MAX: usize = 50;

/// What the databases hold after a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DbReport {
    /// Orders by status in the orders read model.
    pub orders: BTreeMap<String, u64>,
    /// Cancelled orders by reason.
    pub cancelled_by_reason: BTreeMap<String, u64>,
    /// Orders accepted but not terminal (PENDING after the settle wait).
    pub lost_orders: u64,
    /// Confirmed orders whose payment is not captured, or captured payments of orders that
    /// are not confirmed.
    pub payment_mismatches: u64,
    /// Provider captures beyond one per confirmed order (captures − refunds − confirmed).
    pub double_captures: i64,
    /// Shipments that disagree with their order (missing for a confirmed one, live for a
    /// cancelled one).
    pub shipment_mismatches: u64,
    /// Products whose stock does not balance.
    pub stock_mismatches: u64,
    /// Events of the orders log not relayed to the bus, plus relay dead letters.
    pub unrelayed_events: u64,
    /// Events of the orders log not in the read model.
    pub unprojected_events: u64,
    /// Bus messages neither acknowledged nor dead-lettered (choreography's groups).
    pub undelivered_messages: u64,
    /// Bus dead letters (reported; not a violation by themselves: an operator redrives them).
    pub dead_letters: u64,
    /// Violations found, counted.
    pub violation_count: u64,
    /// The first [`LISTED_MAX`] violations.
    pub violations: Vec<String>,
}

impl DbReport {
    fn violate(&mut self, message: String) {
        self.violation_count += 1;
        if self.violations.len() < LISTED_MAX {
            self.violations.push(message);
        }
    }

    /// No violation.
    pub fn hold(&self) -> bool {
        self.violation_count == 0
    }
}

/// Why the databases could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// A database is missing or unreadable.
    #[error("{path}: {source}")]
    Db {
        /// The file.
        path: PathBuf,
        /// The error.
        source: sqlx::Error,
    },
}

async fn open(dir: &Path, file: &str) -> Result<(SqlitePool, PathBuf), CheckError> {
    let path = dir.join(file);
    let options = SqliteConnectOptions::new().filename(&path).read_only(true);
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .map_err(|source| CheckError::Db {
            path: path.clone(),
            source,
        })?;
    Ok((pool, path))
}

async fn rows(
    pool: &SqlitePool,
    path: &Path,
    sql: &'static str,
) -> Result<Vec<sqlx::sqlite::SqliteRow>, CheckError> {
    let mut conn: sqlx::pool::PoolConnection<sqlx::Sqlite> =
        pool.acquire().await.map_err(|source| CheckError::Db {
            path: path.to_owned(),
            source,
        })?;
    let conn: &mut SqliteConnection = &mut conn;
    sqlx::query(sql)
        .fetch_all(conn)
        .await
        .map_err(|source| CheckError::Db {
            path: path.to_owned(),
            source,
        })
}

/// The provider's counters, from its `GET /v1/stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ProviderStats {
    /// Charges captured since the simulator started.
    pub captures: u64,
    /// Refunds.
    pub refunds: u64,
}

/// Checks the databases under `dir`; `provider` is the simulator's counters (`None` when it
/// was restarted during the run, so its counts do not cover it).
///
/// # Errors
/// [`CheckError`] when a database cannot be read.
pub async fn check(dir: &Path, provider: Option<ProviderStats>) -> Result<DbReport, CheckError> {
    let mut report = DbReport::default();

    // Orders: status and items from the read model.
    let (read, read_path) = open(dir, "orders-read.db").await?;
    let mut orders: HashMap<String, (String, String)> = HashMap::new();
    let mut bought: HashMap<String, i64> = HashMap::new();
    for row in rows(
        &read,
        &read_path,
        "SELECT id, status, COALESCE(reason, ''), items FROM order_view",
    )
    .await?
    {
        let id: String = row.get(0);
        let status: String = row.get(1);
        let reason: String = row.get(2);
        let items: String = row.get(3);
        *report.orders.entry(status.clone()).or_default() += 1;
        match status.as_str() {
            "CONFIRMED" => {
                let lines: Vec<serde_json::Value> =
                    serde_json::from_str(&items).unwrap_or_default();
                for line in lines {
                    if let (Some(product), Some(quantity)) =
                        (line["product_id"].as_str(), line["quantity"].as_i64())
                    {
                        *bought.entry(product.to_owned()).or_default() += quantity;
                    }
                }
            }
            "CANCELLED" => {
                let reason = if reason.is_empty() {
                    "unknown".into()
                } else {
                    reason.clone()
                };
                *report.cancelled_by_reason.entry(reason).or_default() += 1;
            }
            _ => {
                report.lost_orders += 1;
                report.violate(format!("order {id}: still {status} after the run"));
            }
        }
        orders.insert(id, (status, reason));
    }

    // Payments.
    let (payments, payments_path) = open(dir, "payments.db").await?;
    let mut payment: HashMap<String, String> = HashMap::new();
    for row in rows(
        &payments,
        &payments_path,
        "SELECT order_id, status FROM payments",
    )
    .await?
    {
        payment.insert(row.get(0), row.get(1));
    }
    // Shipments.
    let (shipping, shipping_path) = open(dir, "shipping.db").await?;
    let mut shipment: HashMap<String, (String, String)> = HashMap::new();
    for row in rows(
        &shipping,
        &shipping_path,
        "SELECT order_id, id, status FROM shipments",
    )
    .await?
    {
        shipment.insert(row.get(0), (row.get(1), row.get(2)));
    }
    // Reservations.
    let (inventory, inventory_path) = open(dir, "inventory.db").await?;
    let mut reservation: HashMap<String, String> = HashMap::new();
    for row in rows(
        &inventory,
        &inventory_path,
        "SELECT order_id, state FROM reservations",
    )
    .await?
    {
        reservation.insert(row.get(0), row.get(1));
    }

    let mut confirmed = 0i64;
    for (id, (status, _)) in &orders {
        let paid = payment.get(id).map(String::as_str);
        let shipped = shipment.get(id);
        let held = reservation.get(id).map(String::as_str);
        match status.as_str() {
            "CONFIRMED" => {
                confirmed += 1;
                if paid != Some("captured") {
                    report.payment_mismatches += 1;
                    report.violate(format!("order {id}: CONFIRMED but payment {paid:?}"));
                }
                if !shipped.is_some_and(|(sid, s)| s == "created" && !sid.is_empty()) {
                    report.shipment_mismatches += 1;
                    report.violate(format!("order {id}: CONFIRMED but shipment {shipped:?}"));
                }
                if held != Some("committed") {
                    report.violate(format!("order {id}: CONFIRMED but stock {held:?}"));
                }
            }
            "CANCELLED" => {
                if matches!(paid, Some("captured" | "pending" | "unavailable")) {
                    report.payment_mismatches += 1;
                    report.violate(format!("order {id}: CANCELLED but payment {paid:?}"));
                }
                if shipped.is_some_and(|(_, s)| s == "created") {
                    report.shipment_mismatches += 1;
                    report.violate(format!("order {id}: CANCELLED but a live shipment"));
                }
                if matches!(held, Some("reserved" | "committed")) {
                    report.violate(format!("order {id}: CANCELLED but stock {held:?}"));
                }
            }
            _ => {}
        }
    }
    for (id, status) in &payment {
        if status == "captured" && orders.get(id).is_none_or(|(s, _)| s != "CONFIRMED") {
            report.payment_mismatches += 1;
            report.violate(format!(
                "payment of order {id} captured, order {:?}",
                orders.get(id).map(|o| &o.0)
            ));
        }
    }
    if let Some(stats) = provider {
        let kept = i64::try_from(stats.captures).unwrap_or(i64::MAX)
            - i64::try_from(stats.refunds).unwrap_or(i64::MAX);
        report.double_captures = kept - confirmed;
        if kept != confirmed {
            report.violate(format!(
                "provider: {} captures − {} refunds = {kept} kept, but {confirmed} orders confirmed",
                stats.captures, stats.refunds
            ));
        }
    }

    // Stock.
    let mut held_by_product: HashMap<String, i64> = HashMap::new();
    let mut committed_by_product: HashMap<String, i64> = HashMap::new();
    for row in rows(
        &inventory,
        &inventory_path,
        "SELECT r.state, l.product_id, l.quantity FROM reservation_lines l \
         JOIN reservations r ON r.order_id = l.order_id",
    )
    .await?
    {
        let state: String = row.get(0);
        let product: String = row.get(1);
        let quantity: i64 = row.get(2);
        match state.as_str() {
            "reserved" => *held_by_product.entry(product).or_default() += quantity,
            "committed" => *committed_by_product.entry(product).or_default() += quantity,
            _ => {}
        }
    }
    for row in rows(
        &inventory,
        &inventory_path,
        "SELECT product_id, total, reserved FROM stock",
    )
    .await?
    {
        let product: String = row.get(0);
        let total: i64 = row.get(1);
        let reserved: i64 = row.get(2);
        let held = held_by_product.get(&product).copied().unwrap_or(0);
        let mut wrong = Vec::new();
        if reserved != held {
            wrong.push(format!(
                "reserved {reserved} but live reservations hold {held}"
            ));
        }
        if reserved < 0 || total < reserved {
            wrong.push(format!("total {total}, reserved {reserved}"));
        }
        if reserved != 0 && report.lost_orders == 0 {
            wrong.push(format!(
                "{reserved} still reserved with every order terminal"
            ));
        }
        let committed = committed_by_product.get(&product).copied().unwrap_or(0);
        let sold = bought.get(&product).copied().unwrap_or(0);
        if committed != sold {
            wrong.push(format!(
                "{committed} committed but confirmed orders bought {sold}"
            ));
        }
        if !wrong.is_empty() {
            report.stock_mismatches += 1;
            report.violate(format!("product {product}: {}", wrong.join("; ")));
        }
    }

    // The orders log: relayed to the bus and projected.
    let (log, log_path) = open(dir, "orders.db").await?;
    let head: i64 = rows(
        &log,
        &log_path,
        "SELECT COALESCE(MAX(position), 0) FROM es_events",
    )
    .await?
    .first()
    .map_or(0, |r| r.get(0));
    let relayed: i64 = rows(
        &read,
        &read_path,
        "SELECT COALESCE(MAX(position), 0) FROM bus_relay_checkpoints",
    )
    .await?
    .first()
    .map_or(0, |r| r.get(0));
    let relay_dead: i64 = rows(&read, &read_path, "SELECT COUNT(*) FROM relay_dead_letters")
        .await?
        .first()
        .map_or(0, |r| r.get(0));
    let projected: i64 = rows(
        &read,
        &read_path,
        "SELECT COALESCE(MAX(c.position), 0) FROM projection_checkpoints c \
         JOIN projection_active a ON a.name = c.name AND a.generation = c.generation",
    )
    .await
    .or(Ok::<_, CheckError>(Vec::new()))?
    .first()
    .map_or(0, |r| r.get(0));
    report.unrelayed_events = u64::try_from((head - relayed).max(0) + relay_dead).unwrap_or(0);
    if report.unrelayed_events > 0 {
        report.violate(format!(
            "orders log: head {head}, relayed to {relayed}, {relay_dead} relay dead letters"
        ));
    }
    report.unprojected_events = u64::try_from((head - projected).max(0)).unwrap_or(0);
    if report.unprojected_events > 0 {
        report.violate(format!(
            "orders log: head {head}, read model at {projected}"
        ));
    }

    // The bus: every group's messages acknowledged or dead-lettered.
    let (bus, bus_path) = open(dir, "bus.db").await?;
    report.undelivered_messages = rows(&bus, &bus_path, "SELECT COUNT(*) FROM bus_pending")
        .await?
        .first()
        .map_or(0, |r| u64::try_from(r.get::<i64, _>(0)).unwrap_or(0));
    if report.undelivered_messages > 0 {
        report.violate(format!(
            "bus: {} messages neither acknowledged nor dead-lettered",
            report.undelivered_messages
        ));
    }
    report.dead_letters = rows(&bus, &bus_path, "SELECT COUNT(*) FROM bus_dead_letters")
        .await?
        .first()
        .map_or(0, |r| u64::try_from(r.get::<i64, _>(0)).unwrap_or(0));
    for pool in [read, payments, shipping, inventory, log, bus] {
        pool.close().await;
    }
    Ok(report)
}
