//! The `payments` table: one row per order.

use sqlx::Row;
use trellis_service::{Db, on_db};

/// The schema (both engines).
pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS payments (
    order_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    amount_cents BIGINT NOT NULL,
    status TEXT NOT NULL,
    provider_charge_id TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS payment_calls (
    order_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    until_ms BIGINT NOT NULL
);
";

/// Recorded state of an order's payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    /// A charge was (or is being) sent; its outcome is not known yet.
    Pending,
    /// The provider captured it.
    Captured,
    /// The provider declined it; nothing was taken.
    Declined,
    /// The provider could not be reached after an attempt may have reached it; the outcome
    /// is unknown (settled by Refund).
    Unavailable,
    /// No attempt of any Charge so far reached the provider's processing (each was refused
    /// here, failed to connect, or was answered 503): nothing was captured. Refund settles it
    /// without asking the provider; a repeated Charge tries again.
    Failed,
    /// Cancelled: the capture was refunded, or nothing was ever captured (then
    /// `provider_charge_id` is empty). The order is never charged again.
    Refunded,
}

impl Status {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Captured => "captured",
            Self::Declined => "declined",
            Self::Unavailable => "unavailable",
            Self::Failed => "failed",
            Self::Refunded => "refunded",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "captured" => Self::Captured,
            "declined" => Self::Declined,
            "unavailable" => Self::Unavailable,
            "failed" => Self::Failed,
            "refunded" => Self::Refunded,
            _ => Self::Pending,
        }
    }
}

/// One row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Payment {
    pub(crate) order_id: String,
    pub(crate) user_id: String,
    pub(crate) amount_cents: i64,
    pub(crate) status: Status,
    pub(crate) provider_charge_id: Option<String>,
    pub(crate) updated_at: String,
}

/// Unix time in milliseconds.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

pub(crate) async fn get(db: &Db, order_id: &str) -> Result<Option<Payment>, sqlx::Error> {
    on_db!(db, |pool| {
        sqlx::query(
            "SELECT order_id, user_id, amount_cents, status, provider_charge_id, updated_at \
             FROM payments WHERE order_id = $1",
        )
        .bind(order_id)
        .fetch_optional(pool)
        .await
        .map(|row| {
            row.map(|r| Payment {
                order_id: r.get("order_id"),
                user_id: r.get("user_id"),
                amount_cents: r.get("amount_cents"),
                status: Status::parse(r.get::<&str, _>("status")),
                provider_charge_id: r.get("provider_charge_id"),
                updated_at: r.get("updated_at"),
            })
        })
    })
}

/// Inserts a row unless the order has one; `true` when inserted.
pub(crate) async fn insert_if_absent(
    db: &Db,
    order_id: &str,
    user_id: &str,
    amount_cents: i64,
    status: Status,
) -> Result<bool, sqlx::Error> {
    let now = now();
    let inserted = on_db!(db, |pool| {
        sqlx::query(
            "INSERT INTO payments (order_id, user_id, amount_cents, status, provider_charge_id, \
             created_at, updated_at) VALUES ($1, $2, $3, $4, NULL, $5, $5) \
             ON CONFLICT (order_id) DO NOTHING",
        )
        .bind(order_id)
        .bind(user_id)
        .bind(amount_cents)
        .bind(status.as_str())
        .bind(&now)
        .execute(pool)
        .await
        .map(|r| r.rows_affected())
    })?;
    Ok(inserted == 1)
}

/// Moves an order from one of `from` to `to` (recording the charge id when given); `false`
/// when its status was none of `from`.
pub(crate) async fn transition(
    db: &Db,
    order_id: &str,
    from: &[Status],
    to: Status,
    provider_charge_id: Option<&str>,
) -> Result<bool, sqlx::Error> {
    let now = now();
    // At most three statuses: bind them as $4..$6, padding with the first.
    let pick = |i: usize| from.get(i).or(from.first()).map_or("", |s| s.as_str());
    let changed = on_db!(db, |pool| {
        sqlx::query(
            "UPDATE payments SET status = $1, \
             provider_charge_id = COALESCE($2, provider_charge_id), updated_at = $3 \
             WHERE order_id = $7 AND status IN ($4, $5, $6)",
        )
        .bind(to.as_str())
        .bind(provider_charge_id)
        .bind(&now)
        .bind(pick(0))
        .bind(pick(1))
        .bind(pick(2))
        .bind(order_id)
        .execute(pool)
        .await
        .map(|r| r.rows_affected())
    })?;
    debug_assert!(
        from.len() <= 3,
        "transition takes at most three source statuses"
    );
    Ok(changed == 1)
}

/// Takes the order's call lease for `owner` until `until_ms` (Unix ms) unless another owner
/// holds an unexpired one; whether it was taken.
pub(crate) async fn take_call_lease(
    db: &Db,
    order_id: &str,
    owner: &str,
    now_ms: i64,
    until_ms: i64,
) -> Result<bool, sqlx::Error> {
    let taken = on_db!(db, |pool| sqlx::query(
        "INSERT INTO payment_calls (order_id, owner, until_ms) VALUES ($1, $2, $3) \
         ON CONFLICT (order_id) DO UPDATE SET owner = $2, until_ms = $3 \
         WHERE payment_calls.until_ms < $4"
    )
    .bind(order_id)
    .bind(owner)
    .bind(until_ms)
    .bind(now_ms)
    .execute(pool)
    .await
    .map(|r| r.rows_affected()))?;
    Ok(taken == 1)
}

/// Gives the order's call lease back, if `owner` still holds it.
pub(crate) async fn release_call_lease(
    db: &Db,
    order_id: &str,
    owner: &str,
) -> Result<(), sqlx::Error> {
    on_db!(db, |pool| sqlx::query(
        "DELETE FROM payment_calls WHERE order_id = $1 AND owner = $2"
    )
    .bind(order_id)
    .bind(owner)
    .execute(pool)
    .await
    .map(|r| r.rows_affected()))?;
    Ok(())
}
