//! The `shipments` table: one row per order.

use sqlx::Row;
use trellis_service::choreography::{Tx, on_tx};
use trellis_service::{Db, on_db};

/// The schema (both engines). A row with an empty `id` records a cancellation that arrived
/// before any shipment.
pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS shipments (
    order_id TEXT PRIMARY KEY,
    id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    lines TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
";

/// `created`.
pub(crate) const CREATED: &str = "created";
/// `cancelled`.
pub(crate) const CANCELLED: &str = "cancelled";

/// One row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Shipment {
    pub(crate) order_id: String,
    /// Empty for a cancellation recorded before any shipment.
    pub(crate) id: String,
    pub(crate) user_id: String,
    pub(crate) lines: String,
    pub(crate) status: String,
    pub(crate) created_at: String,
    pub(crate) updated_at: String,
}

impl Shipment {
    /// Whether a shipment exists (not just a recorded early cancellation).
    pub(crate) fn exists(&self) -> bool {
        !self.id.is_empty()
    }
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The row of `$order_id` on `$executor` (a pool, or `&mut *connection` in a transaction).
macro_rules! get_on {
    ($executor:expr, $order_id:expr) => {
        sqlx::query(
            "SELECT order_id, id, user_id, lines, status, created_at, updated_at \
             FROM shipments WHERE order_id = $1",
        )
        .bind($order_id)
        .fetch_optional($executor)
        .await
        .map(|row| {
            row.map(|r| Shipment {
                order_id: r.get("order_id"),
                id: r.get("id"),
                user_id: r.get("user_id"),
                lines: r.get("lines"),
                status: r.get("status"),
                created_at: r.get("created_at"),
                updated_at: r.get("updated_at"),
            })
        })
    };
}

/// Inserts `$row` unless its order has one, on `$executor`; the rows inserted.
macro_rules! insert_on {
    ($executor:expr, $row:expr) => {{
        let row: &NewShipment<'_> = $row;
        sqlx::query(
            "INSERT INTO shipments (order_id, id, user_id, lines, status, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $6) ON CONFLICT (order_id) DO NOTHING",
        )
        .bind(row.order_id)
        .bind(row.id)
        .bind(row.user_id)
        .bind(row.lines)
        .bind(row.status)
        .bind(now())
        .execute($executor)
        .await
        .map(|r| r.rows_affected())
    }};
}

pub(crate) async fn get(db: &Db, order_id: &str) -> Result<Option<Shipment>, sqlx::Error> {
    on_db!(db, |pool| get_on!(pool, order_id))
}

/// [`get`] inside a transaction the caller owns.
pub(crate) async fn get_in(tx: Tx<'_>, order_id: &str) -> Result<Option<Shipment>, sqlx::Error> {
    on_tx!(tx, |connection| get_on!(&mut *connection, order_id))
}

/// A shipment to record.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NewShipment<'a> {
    pub(crate) order_id: &'a str,
    pub(crate) id: &'a str,
    pub(crate) user_id: &'a str,
    /// The lines as a JSON array.
    pub(crate) lines: &'a str,
    pub(crate) status: &'a str,
}

/// Inserts a row unless the order has one; `true` when inserted.
pub(crate) async fn insert_if_absent(db: &Db, row: &NewShipment<'_>) -> Result<bool, sqlx::Error> {
    let inserted = on_db!(db, |pool| insert_on!(pool, row))?;
    Ok(inserted == 1)
}

/// [`insert_if_absent`] inside a transaction the caller owns.
pub(crate) async fn insert_if_absent_in(
    tx: Tx<'_>,
    row: &NewShipment<'_>,
) -> Result<bool, sqlx::Error> {
    let inserted = on_tx!(tx, |connection| insert_on!(&mut *connection, row))?;
    Ok(inserted == 1)
}

/// Cancels a created shipment; `true` when it was created until now.
pub(crate) async fn cancel(db: &Db, order_id: &str) -> Result<bool, sqlx::Error> {
    let now = now();
    let changed = on_db!(db, |pool| {
        sqlx::query(
            "UPDATE shipments SET status = $1, updated_at = $2 WHERE order_id = $3 AND status = $4",
        )
        .bind(CANCELLED)
        .bind(&now)
        .bind(order_id)
        .bind(CREATED)
        .execute(pool)
        .await
        .map(|r| r.rows_affected())
    })?;
    Ok(changed == 1)
}
