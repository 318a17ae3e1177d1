//! Reading orders for the API: rows of the read model ([`crate::projection`] writes them)
//! and, for an order the projection has not reached yet, the order's own stream.
//!
//! The row is a struct with named fields rather than a tuple because its columns are mostly
//! strings: a tuple would let `status` and `items` swap without the compiler noticing.

use shop_contracts::api::{OrderStatus, OrderView};
use sqlx::Row;
use trellis_service::{Db, on_db};

use crate::aggregate::Order;

/// The columns of `order_view` a [`ViewRow`] is read from.
const VIEW_COLUMNS: &str = "id, user_id, status, items, total_cents, reason, timeline";

/// One row of the read model's `order_view`, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ViewRow {
    /// The order id.
    pub(crate) id: String,
    /// Its owner.
    pub(crate) user_id: String,
    /// `PENDING`, `CONFIRMED` or `CANCELLED`.
    pub(crate) status: String,
    /// The priced lines, as JSON.
    pub(crate) items: String,
    /// The total, cents.
    pub(crate) total_cents: i64,
    /// Why it was cancelled.
    pub(crate) reason: Option<String>,
    /// What happened, as JSON.
    pub(crate) timeline: String,
}

/// A read-model row that does not decode (a bug, or a database edited by hand).
#[derive(Debug, thiserror::Error)]
#[error("order {id} in the read model: {problem}")]
pub(crate) struct CorruptRow {
    id: String,
    problem: String,
}

impl ViewRow {
    fn from_row<R: Row>(row: &R) -> Self
    where
        for<'a> &'a str: sqlx::ColumnIndex<R>,
        String: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
        i64: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
        Option<String>: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    {
        Self {
            id: row.get("id"),
            user_id: row.get("user_id"),
            status: row.get("status"),
            items: row.get("items"),
            total_cents: row.get("total_cents"),
            reason: row.get("reason"),
            timeline: row.get("timeline"),
        }
    }

    /// The order as the API shows it.
    ///
    /// # Errors
    /// [`CorruptRow`] when the status or the JSON columns do not decode.
    pub(crate) fn into_view(self) -> Result<OrderView, CorruptRow> {
        let corrupt = |problem: String| CorruptRow {
            id: self.id.clone(),
            problem,
        };
        let status = OrderStatus::parse(&self.status)
            .ok_or_else(|| corrupt(format!("bad status {:?}", self.status)))?;
        let items =
            serde_json::from_str(&self.items).map_err(|e| corrupt(format!("items: {e}")))?;
        let timeline =
            serde_json::from_str(&self.timeline).map_err(|e| corrupt(format!("timeline: {e}")))?;
        Ok(OrderView {
            id: self.id,
            user_id: self.user_id,
            status,
            items,
            total_cents: self.total_cents,
            reason: self.reason,
            timeline,
        })
    }
}

/// Which orders [`list`] returns, newest first.
#[derive(Debug, Clone, Default)]
pub(crate) struct ListFilter {
    /// Only this owner's orders (`None`: everyone's, for an administrator).
    pub(crate) user_id: Option<String>,
    /// Only orders in this status.
    pub(crate) status: Option<OrderStatus>,
    /// Only orders placed at or after this time (`created_at` format: RFC 3339, UTC,
    /// milliseconds, `Z`, which sorts as text in time order).
    pub(crate) placed_from: Option<String>,
    /// Only orders placed before this time (same format).
    pub(crate) placed_before: Option<String>,
    /// Only orders with an id below this one (the previous page's last).
    pub(crate) before: Option<String>,
    /// Most rows returned.
    pub(crate) limit: u32,
}

/// The read model's row of order `id`, if the projection has reached it.
///
/// # Errors
/// Database errors.
pub(crate) async fn find(db: &Db, id: &str) -> Result<Option<ViewRow>, sqlx::Error> {
    let sql = format!("SELECT {VIEW_COLUMNS} FROM order_view WHERE id = $1");
    on_db!(db, |pool| {
        sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
            .bind(id)
            .fetch_optional(pool)
            .await
            .map(|row| row.as_ref().map(ViewRow::from_row))
    })
}

/// The rows `filter` selects, newest (highest id) first.
///
/// # Errors
/// Database errors.
pub(crate) async fn list(db: &Db, filter: ListFilter) -> Result<Vec<ViewRow>, sqlx::Error> {
    let mut sql = format!("SELECT {VIEW_COLUMNS} FROM order_view WHERE 1 = 1");
    let mut binds: Vec<String> = Vec::new();
    if let Some(user_id) = filter.user_id {
        binds.push(user_id);
        sql.push_str(&format!(" AND user_id = ${}", binds.len()));
    }
    if let Some(status) = filter.status {
        binds.push(status.as_str().to_owned());
        sql.push_str(&format!(" AND status = ${}", binds.len()));
    }
    if let Some(from) = filter.placed_from {
        binds.push(from);
        sql.push_str(&format!(" AND created_at >= ${}", binds.len()));
    }
    if let Some(placed_before) = filter.placed_before {
        binds.push(placed_before);
        sql.push_str(&format!(" AND created_at < ${}", binds.len()));
    }
    if let Some(before) = filter.before {
        binds.push(before);
        sql.push_str(&format!(" AND id < ${}", binds.len()));
    }
    sql.push_str(&format!(" ORDER BY id DESC LIMIT {}", filter.limit));
    on_db!(db, |pool| {
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql.clone()));
        for bind in &binds {
            query = query.bind(bind);
        }
        query
            .fetch_all(pool)
            .await
            .map(|rows| rows.iter().map(ViewRow::from_row).collect())
    })
}

/// Order `id` as the API shows it, from its state (an order the projection has not reached).
pub(crate) fn view_of(id: &str, order: &Order) -> OrderView {
    OrderView {
        id: id.to_owned(),
        user_id: order.user_id.clone(),
        status: order.status(),
        items: order.items.clone(),
        total_cents: order.total_cents,
        reason: if order.status() == OrderStatus::Cancelled {
            order.reason.clone()
        } else {
            None
        },
        timeline: order.timeline.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> ViewRow {
        ViewRow {
            id: "0190a000-0000-7000-8000-000000000001".to_owned(),
            user_id: "user-1".to_owned(),
            status: "CANCELLED".to_owned(),
            items: "[]".to_owned(),
            total_cents: 1200,
            reason: Some("payment_declined".to_owned()),
            timeline: "[]".to_owned(),
        }
    }

    #[test]
    fn a_row_becomes_the_view_the_api_shows() {
        // Each named column lands in its own field of the view.
        let view = row().into_view().expect("a good row");
        assert_eq!(view.status, OrderStatus::Cancelled);
        assert_eq!(view.user_id, "user-1");
        assert_eq!(view.total_cents, 1200);
        assert_eq!(view.reason.as_deref(), Some("payment_declined"));
    }

    #[test]
    fn a_row_with_an_unknown_status_is_reported_as_corrupt_naming_the_order() {
        // A status the API does not know is a bug, reported with the order id.
        let error = ViewRow {
            status: "LOST".to_owned(),
            ..row()
        }
        .into_view()
        .expect_err("an unknown status");
        assert!(error.to_string().contains(&row().id), "{error}");
    }
}
