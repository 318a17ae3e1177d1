//! The audit log of the console's actions: who did what to which saga, dead letter or setting,
//! when, and how it ended.
//!
//! # Where it is kept, and why
//! In the console's own database (`sqlite://DATA_DIR/console.db` under `trellis up`, or any
//! URL trellis-service's [`Db`] opens, PostgreSQL included), not in a service's: the record
//! of operator actions must outlive and not depend on the services acted on (an action on the
//! orders service is audited while orders is down, and fails there), and no business service
//! should carry an operator's table. SQLite runs with WAL and `synchronous = FULL` (the kit's
//! defaults), so an entry that was answered is on disk.
//!
//! # No action without an entry
//! [`AuditLog::begin`] writes the entry, with the outcome `requested`, before the action is
//! sent; when that write fails the action is not attempted. [`AuditLog::finish`] then records
//! `ok` or `failed: …`. A crash between the two leaves `requested`: the log never claims an
//! action that it cannot vouch for, and never misses one that was attempted.

use chrono::{DateTime, Utc};
use sqlx::Row as _;
use trellis_service::{Db, OpenError, on_db};

/// The table.
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS console_audit (
    id TEXT PRIMARY KEY,
    at TEXT NOT NULL,
    actor_id TEXT NOT NULL,
    actor_email TEXT,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL,
    outcome TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS console_audit_at ON console_audit (at);";

/// The most entries one [`AuditLog::recent`] call returns.
pub const AUDIT_PAGE_MAX: i64 = 500;
/// The longest text kept in one field, in bytes.
const FIELD_BYTES_MAX: usize = 2_000;

/// Who acted: the verified caller's id, and their email when the users service told it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// The user id the gateway verified.
    pub id: String,
    /// Their email, for people reading the log.
    pub email: Option<String>,
}

/// One action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// A UUIDv7: entries sort by time.
    pub id: String,
    /// When it was asked for.
    pub at: DateTime<Utc>,
    /// Who.
    pub actor: Actor,
    /// What (`saga.retry`, `dead_letter.replay`, `dead_letter_group.discard`,
    /// `provider.update`, ...).
    pub action: String,
    /// On what (a saga id, a dead letter id, a group, `payment-provider`).
    pub target: String,
    /// The parameters (a reason, a step, the settings sent).
    pub detail: String,
    /// `requested`, `ok` or `failed: …`.
    pub outcome: String,
}

/// The audit log on a database.
#[derive(Debug, Clone)]
pub struct AuditLog {
    db: Db,
}

impl AuditLog {
    /// Opens the log at `url`, creating its table when missing.
    ///
    /// # Errors
    /// [`OpenError`] naming the database.
    pub async fn open(url: &str) -> Result<Self, OpenError> {
        Ok(Self {
            db: Db::open_with_schema(url, SCHEMA).await?,
        })
    }

    /// The database (for `/readyz`).
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Records that `actor` asks for `action` on `target`; returns the entry's id for
    /// [`finish`](Self::finish).
    ///
    /// # Errors
    /// The database's error: then the action must not be attempted.
    pub async fn begin(
        &self,
        actor: &Actor,
        action: &str,
        target: &str,
        detail: &str,
    ) -> Result<String, sqlx::Error> {
        let id = uuid::Uuid::now_v7().to_string();
        let at = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let email = actor.email.as_deref().map(cut);
        on_db!(&self.db, |pool| {
            sqlx::query(
            "INSERT INTO console_audit (id, at, actor_id, actor_email, action, target, detail, outcome) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'requested')"
        )
        .bind(&id)
        .bind(&at)
        .bind(cut(&actor.id))
        .bind(email)
        .bind(cut(action))
        .bind(cut(target))
        .bind(cut(detail))
        .execute(pool)
        .await
        .map(|_| ())
        })?;
        Ok(id)
    }

    /// Records how the action of entry `id` ended.
    ///
    /// # Errors
    /// The database's error (the entry then stays `requested`).
    pub async fn finish(&self, id: &str, outcome: &str) -> Result<(), sqlx::Error> {
        on_db!(&self.db, |pool| sqlx::query(
            "UPDATE console_audit SET outcome = $1 WHERE id = $2"
        )
        .bind(cut(outcome))
        .bind(id)
        .execute(pool)
        .await
        .map(|_| ()))
    }

    /// The newest `limit` entries (at most [`AUDIT_PAGE_MAX`]), newest first.
    ///
    /// # Errors
    /// The database's error.
    pub async fn recent(&self, limit: i64) -> Result<Vec<AuditEntry>, sqlx::Error> {
        let limit = limit.clamp(1, AUDIT_PAGE_MAX);
        let rows = on_db!(&self.db, |pool| sqlx::query(
            "SELECT id, at, actor_id, actor_email, action, target, detail, outcome \
             FROM console_audit ORDER BY id DESC LIMIT $1"
        )
        .bind(limit)
        .fetch_all(pool)
        .await
        .map(|rows| {
            rows.iter()
                .map(|row| {
                    (
                        row.get::<String, _>("id"),
                        row.get::<String, _>("at"),
                        row.get::<String, _>("actor_id"),
                        row.get::<Option<String>, _>("actor_email"),
                        row.get::<String, _>("action"),
                        row.get::<String, _>("target"),
                        row.get::<String, _>("detail"),
                        row.get::<String, _>("outcome"),
                    )
                })
                .collect::<Vec<_>>()
        }))?;
        Ok(rows
            .into_iter()
            .map(
                |(id, at, actor_id, actor_email, action, target, detail, outcome)| AuditEntry {
                    id,
                    at: DateTime::parse_from_rfc3339(&at)
                        .map(|at| at.with_timezone(&Utc))
                        .unwrap_or_default(),
                    actor: Actor {
                        id: actor_id,
                        email: actor_email,
                    },
                    action,
                    target,
                    detail,
                    outcome,
                },
            )
            .collect())
    }
}

fn cut(text: &str) -> String {
    crate::api::cut(text, FIELD_BYTES_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_entry_is_requested_then_finished_and_survives_a_reopen() {
        // Goal: the two-step write, newest-first reading, and durability across a reopen of
        // the same file.
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}/console.db", dir.path().display());
        let log = AuditLog::open(&url).await.expect("open");
        let actor = Actor {
            id: "u-1".to_owned(),
            email: Some("ada@example.com".to_owned()),
        };
        let first = log
            .begin(&actor, "saga.retry", "saga-1", "")
            .await
            .expect("begin");
        let second = log
            .begin(
                &actor,
                "provider.update",
                "payment-provider",
                "{\"outage\":true}",
            )
            .await
            .expect("begin");
        log.finish(&first, "ok").await.expect("finish");
        log.db().close().await;

        let log = AuditLog::open(&url).await.expect("reopen");
        let entries = log.recent(10).await.expect("recent");
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].id, second, "newest first");
        assert_eq!(entries[0].outcome, "requested");
        assert_eq!(entries[1].outcome, "ok");
        assert_eq!(entries[1].actor, actor);
        assert_eq!(entries[1].action, "saga.retry");
    }
}
