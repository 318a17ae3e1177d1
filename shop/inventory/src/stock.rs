//! Stock and reservations: every rule of the service, on either database engine.
//!
//! Invariants kept by the database itself (CHECK constraints) and by the transactions here:
//! `0 <= reserved <= total` for every product, and an order's lines are held all together or
//! not at all. Concurrent callers are serialised by `BEGIN IMMEDIATE` on SQLite and by row
//! locks taken by guarded `UPDATE`s on PostgreSQL (`… WHERE total - reserved >= $q`, checked
//! by rows affected), so no read-then-write race can oversell.

use std::collections::{HashMap, HashSet};

use shop_contracts::api::{LINE_QUANTITY_MAX, ORDER_LINES_MAX, STOCK_MAX};
use sqlx::Row;
use trellis_service::choreography::{Tx, on_tx};
use trellis_service::{Db, on_db};

/// Tables of the inventory service (DDL both engines accept).
pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS stock (
    product_id TEXT PRIMARY KEY,
    total BIGINT NOT NULL,
    reserved BIGINT NOT NULL DEFAULT 0,
    CHECK (reserved >= 0),
    CHECK (reserved <= total)
);
CREATE TABLE IF NOT EXISTS reservations (
    order_id TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('reserved', 'released', 'committed', 'rejected')),
    created_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS reservation_lines (
    order_id TEXT NOT NULL REFERENCES reservations (order_id),
    product_id TEXT NOT NULL,
    quantity BIGINT NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (order_id, product_id)
);
";

/// Longest product or order id accepted, bytes.
pub const ID_BYTES_MAX: usize = 64;
/// Most products one `GetStock` call may ask about.
pub const GET_STOCK_IDS_MAX: usize = 1_000;

/// A reservation's state.
pub(crate) mod state {
    pub(crate) const RESERVED: &str = "reserved";
    pub(crate) const RELEASED: &str = "released";
    pub(crate) const COMMITTED: &str = "committed";
    pub(crate) const REJECTED: &str = "rejected";
    /// No reservation for the order.
    pub(crate) const NONE: &str = "none";
}

/// Why an operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StockError {
    /// Bad input; the code names it.
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
    /// The new total is below what is reserved.
    #[error("total {total} is below the {reserved} units reserved for {product_id}")]
    BelowReserved {
        product_id: String,
        total: i64,
        reserved: i64,
    },
    /// The order has no reservation.
    #[error("no reservation for order {0}")]
    UnknownOrder(String),
    /// The reservation is in a state the operation cannot leave.
    #[error("the reservation of order {order_id} is {state}")]
    WrongState { order_id: String, state: String },
    /// A reservation for the order exists with other lines: the order id is taken.
    #[error("order {order_id} already has a reservation with other lines")]
    Mismatch { order_id: String },
    /// The database failed.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// A product's stock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Level {
    pub(crate) total: i64,
    pub(crate) reserved: i64,
}

/// The answer to a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reserved {
    Yes,
    OutOfStock,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn invalid(code: &'static str, message: impl Into<String>) -> StockError {
    StockError::Invalid {
        code,
        message: message.into(),
    }
}

/// Checks an id; `what` names the field.
pub(crate) fn check_id(what: &'static str, id: &str) -> Result<(), StockError> {
    if id.trim().is_empty() || id.len() > ID_BYTES_MAX {
        let code = if what == "order_id" {
            "invalid_order_id"
        } else {
            "invalid_product_id"
        };
        return Err(invalid(
            code,
            format!("{what} must have 1 to {ID_BYTES_MAX} bytes"),
        ));
    }
    Ok(())
}

/// Checks a stock total.
pub(crate) fn check_total(total: i64) -> Result<(), StockError> {
    if !(0..=STOCK_MAX).contains(&total) {
        return Err(invalid(
            "invalid_total",
            format!("total must be between 0 and {STOCK_MAX}"),
        ));
    }
    Ok(())
}

/// Checks reservation lines and sorts them by product id (a fixed lock order, so concurrent
/// reservations on PostgreSQL cannot deadlock).
pub(crate) fn check_lines(order_id: &str, lines: &mut [(String, i64)]) -> Result<(), StockError> {
    check_id("order_id", order_id)?;
    if lines.is_empty() || lines.len() > ORDER_LINES_MAX {
        return Err(invalid(
            "invalid_lines",
            format!("a reservation has 1 to {ORDER_LINES_MAX} lines"),
        ));
    }
    let mut seen = HashSet::new();
    for (i, (product_id, quantity)) in lines.iter().enumerate() {
        check_id("product_id", product_id)?;
        if !(1..=LINE_QUANTITY_MAX).contains(quantity) {
            return Err(invalid(
                "invalid_quantity",
                format!("lines[{i}].quantity must be between 1 and {LINE_QUANTITY_MAX}"),
            ));
        }
        if !seen.insert(product_id.as_str()) {
            return Err(invalid(
                "duplicate_product",
                format!("lines[{i}].product_id repeats an earlier line"),
            ));
        }
    }
    lines.sort();
    Ok(())
}

/// The SQL of a reservation on `$connection` (a `&mut` SQLite or PostgreSQL connection inside
/// an open transaction), written once and compiled for each engine by [`on_db!`] and
/// [`on_tx!`]: an async block answering what the call found. `$lines` are checked and sorted.
macro_rules! reserve_on {
    ($connection:ident, $order_id:expr, $lines:expr) => {
        async {
            let order_id: &str = $order_id;
            let lines: &[(String, i64)] = $lines;
            // Claims the order id first: on PostgreSQL a concurrent repeat waits here for this
            // transaction, then finds the row.
            let claimed = sqlx::query(
                "INSERT INTO reservations (order_id, state, created_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (order_id) DO NOTHING",
            )
            .bind(order_id)
            .bind(state::RESERVED)
            .bind(now_ms())
            .execute(&mut *$connection)
            .await?
            .rows_affected();
            if claimed == 0 {
                let existing: String =
                    sqlx::query("SELECT state FROM reservations WHERE order_id = $1")
                        .bind(order_id)
                        .fetch_one(&mut *$connection)
                        .await?
                        .get("state");
                let mut recorded: Vec<(String, i64)> = sqlx::query(
                    "SELECT product_id, quantity FROM reservation_lines WHERE order_id = $1",
                )
                .bind(order_id)
                .fetch_all(&mut *$connection)
                .await?
                .iter()
                .map(|row| (row.get("product_id"), row.get("quantity")))
                .collect();
                // Sorted here, not by SQL: the database's collation may order ids differently.
                recorded.sort();
                // A release recorded before any reservation (no lines) refuses it.
                return Ok::<Repeat, sqlx::Error>(
                    if existing == state::RELEASED && recorded.is_empty() {
                        Repeat::Released
                    } else if recorded != lines {
                        Repeat::Mismatch
                    } else {
                        match existing.as_str() {
                            state::REJECTED => Repeat::Answer(Reserved::OutOfStock),
                            state::RELEASED => Repeat::Released,
                            _ => Repeat::Answer(Reserved::Yes),
                        }
                    },
                );
            }
            let mut held = 0;
            for (product_id, quantity) in lines {
                let rows = sqlx::query(
                    "UPDATE stock SET reserved = reserved + $2 \
                     WHERE product_id = $1 AND total - reserved >= $2",
                )
                .bind(product_id)
                .bind(quantity)
                .execute(&mut *$connection)
                .await?
                .rows_affected();
                if rows == 0 {
                    break;
                }
                held += 1;
            }
            let fits = held == lines.len();
            if !fits {
                // Gives back what this transaction held before the short line.
                for (product_id, quantity) in &lines[..held] {
                    sqlx::query("UPDATE stock SET reserved = reserved - $2 WHERE product_id = $1")
                        .bind(product_id)
                        .bind(quantity)
                        .execute(&mut *$connection)
                        .await?;
                }
                sqlx::query("UPDATE reservations SET state = $2 WHERE order_id = $1")
                    .bind(order_id)
                    .bind(state::REJECTED)
                    .execute(&mut *$connection)
                    .await?;
            }
            for (product_id, quantity) in lines {
                sqlx::query(
                    "INSERT INTO reservation_lines (order_id, product_id, quantity) \
                     VALUES ($1, $2, $3)",
                )
                .bind(order_id)
                .bind(product_id)
                .bind(quantity)
                .execute(&mut *$connection)
                .await?;
            }
            Ok(Repeat::Answer(if fits {
                Reserved::Yes
            } else {
                Reserved::OutOfStock
            }))
        }
    };
}

/// Holds every line for `order_id`, or none. A repeat with the same lines answers as the
/// first call did and holds nothing more: `Yes` while the stock is held or once it was sold
/// (`committed`), `OutOfStock` for a refusal (recorded as `rejected`, so more stock later does
/// not change the answer). A repeat after the reservation was released is
/// [`StockError::WrongState`]: its stock is no longer held, and a caller told "yes" would go on
/// as if it were. A repeat with other lines is [`StockError::Mismatch`].
pub(crate) async fn reserve(
    db: &Db,
    order_id: &str,
    mut lines: Vec<(String, i64)>,
) -> Result<Reserved, StockError> {
    check_lines(order_id, &mut lines)?;
    let found = on_db!(db, |pool, begin| {
        let mut tx = pool.begin_with(begin).await?;
        let connection = &mut *tx;
        let found = reserve_on!(connection, order_id, &lines).await?;
        tx.commit().await?;
        found
    });
    found.into_answer(order_id)
}

/// [`reserve`] inside a transaction the caller owns (the choreography's inbox transaction):
/// the reservation commits or rolls back with the caller's other writes.
pub(crate) async fn reserve_in(
    tx: Tx<'_>,
    order_id: &str,
    mut lines: Vec<(String, i64)>,
) -> Result<Reserved, StockError> {
    check_lines(order_id, &mut lines)?;
    let found = on_tx!(tx, |connection| reserve_on!(connection, order_id, &lines)
        .await?);
    found.into_answer(order_id)
}

/// What a reservation call found, before it becomes an answer or an error.
enum Repeat {
    Answer(Reserved),
    Released,
    Mismatch,
}

impl Repeat {
    fn into_answer(self, order_id: &str) -> Result<Reserved, StockError> {
        match self {
            Self::Answer(reserved) => Ok(reserved),
            Self::Released => Err(StockError::WrongState {
                order_id: order_id.to_owned(),
                state: state::RELEASED.to_owned(),
            }),
            Self::Mismatch => Err(StockError::Mismatch {
                order_id: order_id.to_owned(),
            }),
        }
    }
}

/// The SQL of [`settle`] on `$connection` inside an open transaction (see [`reserve_on`]):
/// moves a reservation from `reserved` to `$to`, applies `$stock_sql` (binding product id and
/// quantity) to each line, and answers the state after the call (`none` when unknown).
macro_rules! settle_on {
    ($connection:ident, $order_id:expr, $to:expr, $stock_sql:expr) => {
        async {
            let order_id: &str = $order_id;
            let to: &str = $to;
            // The guarded transition takes the row lock on PostgreSQL: a concurrent repeat
            // waits, then matches no row.
            let moved = sqlx::query(
                "UPDATE reservations SET state = $2 WHERE order_id = $1 AND state = $3",
            )
            .bind(order_id)
            .bind(to)
            .bind(state::RESERVED)
            .execute(&mut *$connection)
            .await?
            .rows_affected();
            if moved == 1 {
                let lines = sqlx::query(
                    "SELECT product_id, quantity FROM reservation_lines WHERE order_id = $1 \
                     ORDER BY product_id",
                )
                .bind(order_id)
                .fetch_all(&mut *$connection)
                .await?;
                for line in &lines {
                    let product_id: String = line.get("product_id");
                    let quantity: i64 = line.get("quantity");
                    sqlx::query($stock_sql)
                        .bind(product_id)
                        .bind(quantity)
                        .execute(&mut *$connection)
                        .await?;
                }
                Ok::<String, sqlx::Error>(to.to_owned())
            } else {
                let current: Option<String> =
                    sqlx::query("SELECT state FROM reservations WHERE order_id = $1")
                        .bind(order_id)
                        .fetch_optional(&mut *$connection)
                        .await?
                        .map(|r| r.get("state"));
                match current {
                    Some(current) => Ok(current),
                    // A release before any reservation (its Reserve still on the way, or
                    // never sent) is recorded, so a Reserve arriving later is refused
                    // instead of holding stock for an order that gave up.
                    None if to == state::RELEASED => {
                        sqlx::query(
                            "INSERT INTO reservations (order_id, state, created_at) \
                             VALUES ($1, $2, $3) ON CONFLICT (order_id) DO NOTHING",
                        )
                        .bind(order_id)
                        .bind(state::RELEASED)
                        .bind(now_ms())
                        .execute(&mut *$connection)
                        .await?;
                        Ok(state::RELEASED.to_owned())
                    }
                    None => Ok(state::NONE.to_owned()),
                }
            }
        }
    };
}

/// Where [`settle`] runs: its own transaction, or one the caller owns.
enum On<'a, 't> {
    Db(&'a Db),
    Tx(Tx<'t>),
}

/// Moves a reservation from `reserved` to `to` and applies `stock_sql` (binding product id
/// and quantity) to each line; answers the state after the call (`none` when unknown).
async fn settle(
    on: On<'_, '_>,
    order_id: &str,
    to: &str,
    stock_sql: &'static str,
) -> Result<String, StockError> {
    check_id("order_id", order_id)?;
    let state = match on {
        On::Db(db) => on_db!(db, |pool, begin| {
            let mut tx = pool.begin_with(begin).await?;
            let connection = &mut *tx;
            let state = settle_on!(connection, order_id, to, stock_sql).await?;
            tx.commit().await?;
            state
        }),
        On::Tx(tx) => on_tx!(tx, |connection| settle_on!(
            connection, order_id, to, stock_sql
        )
        .await?),
    };
    Ok(state)
}

const RELEASE_SQL: &str = "UPDATE stock SET reserved = reserved - $2 WHERE product_id = $1";
const COMMIT_SQL: &str =
    "UPDATE stock SET total = total - $2, reserved = reserved - $2 WHERE product_id = $1";

/// Returns an order's held stock. Idempotent: a released, committed or rejected order is
/// left as it is and its state answered; an unknown order is recorded as released (answered
/// `released`), so a Reserve that arrives after its Release is refused.
pub(crate) async fn release(db: &Db, order_id: &str) -> Result<String, StockError> {
    settle(On::Db(db), order_id, state::RELEASED, RELEASE_SQL).await
}

/// [`release`] inside a transaction the caller owns.
pub(crate) async fn release_in(tx: Tx<'_>, order_id: &str) -> Result<String, StockError> {
    settle(On::Tx(tx), order_id, state::RELEASED, RELEASE_SQL).await
}

/// Turns an order's held stock into a sale: total and reserved both drop. Idempotent on a
/// committed order; an unknown order is [`StockError::UnknownOrder`], a released or rejected
/// one [`StockError::WrongState`].
pub(crate) async fn commit(db: &Db, order_id: &str) -> Result<String, StockError> {
    committed(
        settle(On::Db(db), order_id, state::COMMITTED, COMMIT_SQL).await?,
        order_id,
    )
}

/// [`commit`] inside a transaction the caller owns.
pub(crate) async fn commit_in(tx: Tx<'_>, order_id: &str) -> Result<String, StockError> {
    committed(
        settle(On::Tx(tx), order_id, state::COMMITTED, COMMIT_SQL).await?,
        order_id,
    )
}

fn committed(state: String, order_id: &str) -> Result<String, StockError> {
    match state.as_str() {
        state::COMMITTED => Ok(state),
        state::NONE => Err(StockError::UnknownOrder(order_id.to_owned())),
        _ => Err(StockError::WrongState {
            order_id: order_id.to_owned(),
            state,
        }),
    }
}

/// Sets a product's total; refused below what is reserved.
pub(crate) async fn set_total(db: &Db, product_id: &str, total: i64) -> Result<Level, StockError> {
    check_id("product_id", product_id)?;
    check_total(total)?;
    let (rows, level) = on_db!(db, |pool, begin| {
        let mut tx = pool.begin_with(begin).await?;
        let rows = sqlx::query(
            "INSERT INTO stock (product_id, total, reserved) VALUES ($1, $2, 0) \
             ON CONFLICT (product_id) DO UPDATE SET total = excluded.total \
             WHERE stock.reserved <= excluded.total",
        )
        .bind(product_id)
        .bind(total)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let row = sqlx::query("SELECT total, reserved FROM stock WHERE product_id = $1")
            .bind(product_id)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        (
            rows,
            Level {
                total: row.get("total"),
                reserved: row.get("reserved"),
            },
        )
    });
    if rows == 0 {
        return Err(StockError::BelowReserved {
            product_id: product_id.to_owned(),
            total,
            reserved: level.reserved,
        });
    }
    Ok(level)
}

/// Stock of each product, in the order asked; unknown products have zero stock.
pub(crate) async fn levels(db: &Db, product_ids: &[String]) -> Result<Vec<Level>, StockError> {
    if product_ids.len() > GET_STOCK_IDS_MAX {
        return Err(invalid(
            "too_many_ids",
            format!("at most {GET_STOCK_IDS_MAX} products per call"),
        ));
    }
    for id in product_ids {
        check_id("product_id", id)?;
    }
    if product_ids.is_empty() {
        return Ok(Vec::new());
    }
    let placeholders: Vec<String> = (1..=product_ids.len()).map(|i| format!("${i}")).collect();
    let sql = format!(
        "SELECT product_id, total, reserved FROM stock WHERE product_id IN ({})",
        placeholders.join(", ")
    );
    let found: HashMap<String, Level> = on_db!(db, |pool| {
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()));
        for id in product_ids {
            query = query.bind(id);
        }
        query.fetch_all(pool).await.map(|rows| {
            rows.iter()
                .map(|r| {
                    (
                        r.get::<String, _>("product_id"),
                        Level {
                            total: r.get("total"),
                            reserved: r.get("reserved"),
                        },
                    )
                })
                .collect()
        })
    })?;
    Ok(product_ids
        .iter()
        .map(|id| found.get(id).copied().unwrap_or_default())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_checked_and_sorted() {
        let mut lines = vec![("b".to_owned(), 1), ("a".to_owned(), 2)];
        check_lines("o1", &mut lines).unwrap();
        assert_eq!(lines[0].0, "a");
        let mut dup = vec![("a".to_owned(), 1), ("a".to_owned(), 2)];
        assert!(matches!(
            check_lines("o1", &mut dup),
            Err(StockError::Invalid {
                code: "duplicate_product",
                ..
            })
        ));
        let mut zero = vec![("a".to_owned(), 0)];
        assert!(matches!(
            check_lines("o1", &mut zero),
            Err(StockError::Invalid {
                code: "invalid_quantity",
                ..
            })
        ));
        assert!(matches!(
            check_lines("", &mut [("a".to_owned(), 1)]),
            Err(StockError::Invalid {
                code: "invalid_order_id",
                ..
            })
        ));
    }
}
