//! The simulator's ledger: charges and their refunds in a SQLite file, as a real provider keeps
//! its books on disk, bounded, oldest deleted first.
//!
//! Why a file and not a map: the shop charges once per order, so a ledger in memory grows with
//! every order for as long as the process runs (issue 19 measured 10-17 MB a minute at 300
//! orders/s), and a smaller in-memory bound would forget charges that a late compensation must
//! still refund. On disk the ledger costs a page cache of fixed size, keeps every charge up to
//! [`crate::CHARGES_KEPT_MAX`], and outlives a restart of the simulator.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use sqlx::sqlite::{SqliteConnection, SqliteRow, SqliteSynchronous};
use sqlx::{Connection, Row};
use tokio::sync::Mutex;
use utoipa::ToSchema;

/// What happened to a charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChargeStatus {
    /// The money was taken.
    Captured,
    /// The card was declined; nothing was taken. Repeating the idempotency key declines again.
    Declined,
    /// The money was taken and given back.
    Refunded,
}

impl ChargeStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Captured => "captured",
            Self::Declined => "declined",
            Self::Refunded => "refunded",
        }
    }

    fn parse(text: &str) -> Result<Self, LedgerError> {
        match text {
            "captured" => Ok(Self::Captured),
            "declined" => Ok(Self::Declined),
            "refunded" => Ok(Self::Refunded),
            other => Err(LedgerError::Corrupt(format!(
                "unknown charge status {other:?}"
            ))),
        }
    }
}

/// A charge as the provider shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Charge {
    /// Charge id (`ch_…`).
    pub id: String,
    /// `captured`, `declined` or `refunded`.
    pub status: ChargeStatus,
    /// Amount in cents.
    pub amount_cents: i64,
    /// ISO 4217 currency code.
    pub currency: String,
    /// The key the charge was created with.
    pub idempotency_key: String,
    /// The refund's id once refunded.
    pub refund_id: Option<String>,
}

/// A refund as the provider shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Refund {
    /// Refund id (`re_…`).
    pub id: String,
    /// The refunded charge.
    pub charge_id: String,
    /// Always `refunded`.
    pub status: String,
    /// The key the refund was created with.
    pub idempotency_key: String,
}

/// Why the ledger could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The URL is not a SQLite one, or its directory cannot be created.
    #[error("the payment provider's ledger: {0}")]
    Open(#[from] trellis_sqlite::OpenError),
    /// SQLite failed.
    #[error("the payment provider's ledger: {0}")]
    Sqlite(#[from] sqlx::Error),
    /// A row the simulator cannot have written.
    #[error("the payment provider's ledger is corrupt: {0}")]
    Corrupt(String),
}

/// Why a refund was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RefundRefusal {
    UnknownCharge,
    NotCaptured,
    AlreadyRefunded,
    KeyReused { charge_id: String },
}

/// The outcome of [`Ledger::insert`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Inserted {
    /// Stored now.
    New,
    /// The key was taken: the charge made with it earlier.
    Existing(Charge),
}

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS charges (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    idempotency_key TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    amount_cents INTEGER NOT NULL,
    currency TEXT NOT NULL,
    refund_id TEXT,
    refund_key TEXT UNIQUE
)";

/// Charges by id and by idempotency key in one SQLite database, at most `capacity` of them.
///
/// One connection, used by one call at a time: the simulator's decisions (is this key new? is
/// this charge refundable?) are read-then-write, and one writer makes them atomic without a
/// retry loop. Commits use `synchronous = NORMAL` in WAL mode: a charge survives the process
/// being killed (what `trellis chaos` does), and a power loss may forget the last ones. The
/// simulator stands in for another company's system, whose durability is not the shop's to
/// prove, and FULL would add an fsync per order to every shop benchmark.
#[derive(Debug)]
pub struct Ledger {
    conn: Mutex<SqliteConnection>,
    capacity: u64,
    kept: AtomicU64,
}

impl Ledger {
    /// Opens (creating when missing) the ledger at a `sqlite://PATH` URL, or a fresh one in
    /// memory for `sqlite::memory:`, keeping at most `capacity` charges (at least 1).
    ///
    /// # Errors
    /// [`LedgerError`] when the URL is not SQLite, the file cannot be opened or its schema
    /// cannot be made.
    pub async fn open(url: &str, capacity: usize) -> Result<Self, LedgerError> {
        let options = trellis_sqlite::connect_options(url)?.synchronous(SqliteSynchronous::Normal);
        let mut conn = SqliteConnection::connect_with(&options).await?;
        sqlx::query(SCHEMA).execute(&mut conn).await?;
        let kept: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM charges")
            .fetch_one(&mut conn)
            .await?;
        Ok(Self {
            conn: Mutex::new(conn),
            capacity: u64::try_from(capacity.max(1)).unwrap_or(u64::MAX),
            kept: AtomicU64::new(u64::try_from(kept).unwrap_or(0)),
        })
    }

    /// A fresh ledger in memory (tests, examples): gone when dropped.
    ///
    /// # Errors
    /// [`LedgerError::Sqlite`] if SQLite cannot open an in-memory database.
    pub async fn in_memory(capacity: usize) -> Result<Self, LedgerError> {
        Self::open("sqlite::memory:", capacity).await
    }

    /// Charges kept now.
    pub(crate) fn len(&self) -> u64 {
        self.kept.load(Ordering::Relaxed)
    }

    pub(crate) async fn by_key(&self, key: &str) -> Result<Option<Charge>, LedgerError> {
        let mut conn = self.conn.lock().await;
        fetch_one_charge(&mut conn, By::Key, key).await
    }

    pub(crate) async fn by_id(&self, id: &str) -> Result<Option<Charge>, LedgerError> {
        let mut conn = self.conn.lock().await;
        fetch_one_charge(&mut conn, By::Id, id).await
    }

    /// Stores a new charge unless its key is taken, then deletes the oldest charges past the
    /// capacity.
    pub(crate) async fn insert(&self, charge: &Charge) -> Result<Inserted, LedgerError> {
        let mut conn = self.conn.lock().await;
        let seq: Option<i64> = sqlx::query_scalar(
            "INSERT INTO charges (id, idempotency_key, status, amount_cents, currency) \
             VALUES (?, ?, ?, ?, ?) ON CONFLICT (idempotency_key) DO NOTHING RETURNING seq",
        )
        .bind(&charge.id)
        .bind(&charge.idempotency_key)
        .bind(charge.status.as_str())
        .bind(charge.amount_cents)
        .bind(&charge.currency)
        .fetch_optional(&mut *conn)
        .await?;
        let Some(seq) = seq else {
            let existing = fetch_one_charge(&mut conn, By::Key, &charge.idempotency_key)
                .await?
                .ok_or_else(|| {
                    LedgerError::Corrupt("a taken idempotency key has no charge".into())
                })?;
            return Ok(Inserted::Existing(existing));
        };
        let mut kept = self.kept.fetch_add(1, Ordering::Relaxed) + 1;
        if kept > self.capacity {
            // seq only grows (the newest row is never deleted), so the oldest are the lowest.
            let oldest_kept = seq - i64::try_from(self.capacity).unwrap_or(i64::MAX) + 1;
            let deleted = sqlx::query("DELETE FROM charges WHERE seq < ?")
                .bind(oldest_kept)
                .execute(&mut *conn)
                .await?
                .rows_affected();
            kept = self.kept.fetch_sub(deleted, Ordering::Relaxed) - deleted;
        }
        debug_assert!(kept <= self.capacity);
        Ok(Inserted::New)
    }

    /// Refunds a charge once: `Ok((refund, true))` when refunded now, `Ok((refund, false))`
    /// when `key` already refunded this charge.
    pub(crate) async fn refund(
        &self,
        charge_id: &str,
        key: &str,
        new_refund_id: impl FnOnce() -> String,
    ) -> Result<Result<(Refund, bool), RefundRefusal>, LedgerError> {
        let mut conn = self.conn.lock().await;
        let refunded: Option<String> =
            sqlx::query_scalar("SELECT id FROM charges WHERE refund_key = ?")
                .bind(key)
                .fetch_optional(&mut *conn)
                .await?;
        if let Some(other) = &refunded
            && other != charge_id
        {
            return Ok(Err(RefundRefusal::KeyReused {
                charge_id: other.clone(),
            }));
        }
        let Some(charge) = fetch_one_charge(&mut conn, By::Id, charge_id).await? else {
            return Ok(Err(RefundRefusal::UnknownCharge));
        };
        let refund = |id: String| Refund {
            id,
            charge_id: charge.id.clone(),
            status: "refunded".into(),
            idempotency_key: key.to_owned(),
        };
        match (charge.status, &charge.refund_id) {
            (ChargeStatus::Declined, _) => Ok(Err(RefundRefusal::NotCaptured)),
            // The key is this charge's refund key (checked above), so this is a repeat.
            (ChargeStatus::Refunded, Some(id)) if refunded.is_some() => {
                Ok(Ok((refund(id.clone()), false)))
            }
            (ChargeStatus::Refunded, _) => Ok(Err(RefundRefusal::AlreadyRefunded)),
            (ChargeStatus::Captured, _) => {
                let id = new_refund_id();
                sqlx::query(
                    "UPDATE charges SET status = 'refunded', refund_id = ?, refund_key = ? \
                     WHERE id = ?",
                )
                .bind(&id)
                .bind(key)
                .bind(charge_id)
                .execute(&mut *conn)
                .await?;
                Ok(Ok((refund(id), true)))
            }
        }
    }
}

/// Which unique column a lookup goes by.
#[derive(Debug, Clone, Copy)]
enum By {
    Id,
    Key,
}

/// The one charge whose id or idempotency key is `value`.
async fn fetch_one_charge(
    conn: &mut SqliteConnection,
    by: By,
    value: &str,
) -> Result<Option<Charge>, LedgerError> {
    let sql = match by {
        By::Id => {
            "SELECT id, status, amount_cents, currency, idempotency_key, refund_id \
             FROM charges WHERE id = ?"
        }
        By::Key => {
            "SELECT id, status, amount_cents, currency, idempotency_key, refund_id \
             FROM charges WHERE idempotency_key = ?"
        }
    };
    let row = sqlx::query(sql).bind(value).fetch_optional(conn).await?;
    row.map(|row| charge_from(&row)).transpose()
}

fn charge_from(row: &SqliteRow) -> Result<Charge, LedgerError> {
    Ok(Charge {
        id: row.try_get("id")?,
        status: ChargeStatus::parse(row.try_get("status")?)?,
        amount_cents: row.try_get("amount_cents")?,
        currency: row.try_get("currency")?,
        idempotency_key: row.try_get("idempotency_key")?,
        refund_id: row.try_get("refund_id")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge(n: u32) -> Charge {
        Charge {
            id: format!("ch_{n}"),
            status: ChargeStatus::Captured,
            amount_cents: 100,
            currency: "USD".into(),
            idempotency_key: format!("k{n}"),
            refund_id: None,
        }
    }

    #[tokio::test]
    async fn the_oldest_charges_are_deleted_with_their_keys() {
        let ledger = Ledger::in_memory(2).await.expect("open");
        for n in 0..3 {
            assert_eq!(
                ledger.insert(&charge(n)).await.expect("insert"),
                Inserted::New
            );
        }
        assert_eq!(ledger.len(), 2);
        assert!(ledger.by_key("k0").await.expect("read").is_none());
        assert!(ledger.by_id("ch_0").await.expect("read").is_none());
        let newest = ledger.by_key("k2").await.expect("read");
        assert_eq!(newest.map(|c| c.id), Some("ch_2".to_owned()));
    }

    #[tokio::test]
    async fn a_taken_key_answers_the_first_charge() {
        let ledger = Ledger::in_memory(10).await.expect("open");
        ledger.insert(&charge(1)).await.expect("insert");
        let mut again = charge(1);
        again.id = "ch_other".into();
        assert_eq!(
            ledger.insert(&again).await.expect("insert"),
            Inserted::Existing(charge(1))
        );
        assert_eq!(ledger.len(), 1);
    }

    #[tokio::test]
    async fn a_charge_is_refunded_once() {
        let ledger = Ledger::in_memory(10).await.expect("open");
        ledger.insert(&charge(1)).await.expect("insert");
        let refund = |charge: &'static str, key: &'static str, id: &'static str| {
            let ledger = &ledger;
            async move {
                ledger
                    .refund(charge, key, || id.to_owned())
                    .await
                    .expect("ledger")
            }
        };
        let (first, new) = refund("ch_1", "r1", "re_1").await.expect("refund");
        assert!(new);
        let (again, new) = refund("ch_1", "r1", "re_2").await.expect("replay");
        assert!(!new);
        assert_eq!(first, again);
        assert_eq!(
            refund("ch_1", "r2", "re_3").await,
            Err(RefundRefusal::AlreadyRefunded)
        );
        assert_eq!(
            refund("ch_9", "r9", "re_4").await,
            Err(RefundRefusal::UnknownCharge)
        );
        ledger.insert(&charge(2)).await.expect("insert");
        assert_eq!(
            refund("ch_2", "r1", "re_5").await,
            Err(RefundRefusal::KeyReused {
                charge_id: "ch_1".into()
            })
        );
    }

    #[tokio::test]
    async fn the_ledger_outlives_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/provider.db", dir.path().display());
        let ledger = Ledger::open(&url, 10).await.expect("open");
        ledger.insert(&charge(1)).await.expect("insert");
        ledger
            .refund("ch_1", "r1", || "re_1".into())
            .await
            .expect("ledger")
            .expect("refund");
        drop(ledger);
        let reopened = Ledger::open(&url, 10).await.expect("reopen");
        assert_eq!(reopened.len(), 1);
        let kept = reopened.by_key("k1").await.expect("read").expect("kept");
        assert_eq!(kept.status, ChargeStatus::Refunded);
        assert_eq!(kept.refund_id.as_deref(), Some("re_1"));
    }
}
