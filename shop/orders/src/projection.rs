//! The CQRS read model: one row per order in `order_view_g{generation}`, read through the
//! `order_view` view, fed from the event store's log by trellis-eventstore's
//! `ProjectionRunner` (checkpoint committed with the rows: exactly once).

use std::sync::Arc;

use shop_contracts::api::{OrderStatus, TimelineEntry};
use sqlx::{Postgres, Sqlite, Transaction};
use trellis_eventstore::{Aggregate, Projection, RecordedEvent, Upcasters, decode};

use crate::aggregate::{Order, OrderEvent};

/// The projection's checkpoint name.
pub const PROJECTION_NAME: &str = "order_view";

/// Keeps `order_view` equal to the replay of the order streams.
#[derive(Debug, Default)]
pub struct OrderView {
    upcasters: Arc<Upcasters>,
}

impl OrderView {
    /// A read model that decodes with `upcasters`: the order repository's, so an upcaster
    /// registered for the service reaches the read model too.
    pub fn with_upcasters(upcasters: Arc<Upcasters>) -> Self {
        Self { upcasters }
    }
}

fn order_id(event: &RecordedEvent) -> Option<&str> {
    event
        .stream
        .as_str()
        .strip_prefix(Order::TYPE)
        .and_then(|rest| rest.strip_prefix('-'))
}

fn timeline_push(timeline: &str, step: &str, outcome: &str, at: &str) -> Result<String, String> {
    let mut entries: Vec<TimelineEntry> =
        serde_json::from_str(timeline).map_err(|e| format!("bad timeline: {e}"))?;
    entries.push(TimelineEntry {
        step: step.to_owned(),
        outcome: outcome.to_owned(),
        at: at.to_owned(),
    });
    serde_json::to_string(&entries).map_err(|e| e.to_string())
}

macro_rules! order_view_projection {
    ($db:ty, $append:expr) => {
        impl Projection<$db> for OrderView {
            fn name(&self) -> &str {
                PROJECTION_NAME
            }

            async fn setup(
                &self,
                tx: &mut Transaction<'static, $db>,
                generation: u32,
            ) -> Result<(), sqlx::Error> {
                let table = format!(
                    "CREATE TABLE IF NOT EXISTS order_view_g{generation} (
                        id TEXT PRIMARY KEY, user_id TEXT NOT NULL, status TEXT NOT NULL,
                        items TEXT NOT NULL, total_cents BIGINT NOT NULL, reason TEXT,
                        timeline TEXT NOT NULL, saga_id TEXT, created_at TEXT NOT NULL,
                        updated_at TEXT NOT NULL)"
                );
                sqlx::query(sqlx::AssertSqlSafe(table)).execute(&mut **tx).await?;
                let index = format!(
                    "CREATE INDEX IF NOT EXISTS order_view_g{generation}_user
                     ON order_view_g{generation} (user_id, id)"
                );
                sqlx::query(sqlx::AssertSqlSafe(index)).execute(&mut **tx).await?;
                let index = format!(
                    "CREATE INDEX IF NOT EXISTS order_view_g{generation}_status
                     ON order_view_g{generation} (status, id)"
                );
                sqlx::query(sqlx::AssertSqlSafe(index)).execute(&mut **tx).await?;
                Ok(())
            }

            async fn apply(
                &self,
                tx: &mut Transaction<'static, $db>,
                generation: u32,
                event: &RecordedEvent,
            ) -> Result<(), String> {
                let Some(id) = order_id(event) else {
                    return Ok(());
                };
                let decoded: OrderEvent =
                    decode(event, &self.upcasters).map_err(|e| e.to_string())?;
                let at = event.recorded_at.to_rfc3339();
                let err = |e: sqlx::Error| e.to_string();
                if let OrderEvent::Created {
                    user_id,
                    items,
                    total_cents,
                    at: created_at,
                    ..
                } = &decoded
                {
                    let timeline = timeline_push("[]", "order", "created", created_at)?;
                    let sql = format!(
                        "INSERT INTO order_view_g{generation}
                         (id, user_id, status, items, total_cents, reason, timeline, saga_id, created_at, updated_at)
                         VALUES ($1, $2, $3, $4, $5, NULL, $6, NULL, $7, $7)
                         ON CONFLICT (id) DO NOTHING"
                    );
                    sqlx::query(sqlx::AssertSqlSafe(sql))
                        .bind(id)
                        .bind(user_id)
                        .bind(OrderStatus::Pending.as_str())
                        .bind(serde_json::to_string(items).map_err(|e| e.to_string())?)
                        .bind(total_cents)
                        .bind(timeline)
                        .bind(created_at)
                        .execute(&mut **tx)
                        .await
                        .map_err(err)?;
                    return Ok(());
                }
                // Timeline entries are appended in SQL: no read of the row per event.
                let append = $append;
                let entry = |step: &str, outcome: &str, when: &str| {
                    serde_json::to_string(&TimelineEntry {
                        step: step.to_owned(),
                        outcome: outcome.to_owned(),
                        at: when.to_owned(),
                    })
                    .map_err(|e| e.to_string())
                };
                let (sql, binds): (String, Vec<String>) = match &decoded {
                    OrderEvent::Created { .. }
                    | OrderEvent::FailureNoted { .. }
                    | OrderEvent::ShippingStarted
                    | OrderEvent::Failed { .. } => {
                        return Ok(());
                    }
                    OrderEvent::SagaAttached { saga_id } => (
                        format!("UPDATE order_view_g{generation} SET saga_id = $2, updated_at = $3 WHERE id = $1"),
                        vec![saga_id.clone(), at],
                    ),
                    OrderEvent::Progress { step, outcome, at: when } => (
                        format!("UPDATE order_view_g{generation} SET timeline = {}, updated_at = $3 WHERE id = $1", append(2)),
                        vec![entry(step, outcome, when)?, at],
                    ),
                    OrderEvent::CancelRequested { at: when } => (
                        format!("UPDATE order_view_g{generation} SET timeline = {}, updated_at = $3 WHERE id = $1", append(2)),
                        vec![entry("order", "cancel_requested", when)?, at],
                    ),
                    OrderEvent::Confirmed { at: when } => (
                        format!("UPDATE order_view_g{generation} SET status = $2, timeline = {}, updated_at = $4 WHERE id = $1", append(3)),
                        vec![
                            OrderStatus::Confirmed.as_str().to_owned(),
                            entry("order", "confirmed", when)?,
                            at,
                        ],
                    ),
                    OrderEvent::Cancelled { reason, at: when } => (
                        format!("UPDATE order_view_g{generation} SET status = $2, timeline = {}, updated_at = $4, reason = $5 WHERE id = $1", append(3)),
                        vec![
                            OrderStatus::Cancelled.as_str().to_owned(),
                            entry("order", &format!("cancelled: {reason}"), when)?,
                            at,
                            reason.clone(),
                        ],
                    ),
                };
                let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id);
                for value in binds {
                    query = query.bind(value);
                }
                let changed = query.execute(&mut **tx).await.map_err(err)?.rows_affected();
                if changed == 0 {
                    return Err(format!("order {id}: {} before Created", event.event_type));
                }
                Ok(())
            }

            async fn activate(
                &self,
                tx: &mut Transaction<'static, $db>,
                generation: u32,
            ) -> Result<(), sqlx::Error> {
                sqlx::query("DROP VIEW IF EXISTS order_view").execute(&mut **tx).await?;
                let sql = format!("CREATE VIEW order_view AS SELECT * FROM order_view_g{generation}");
                sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut **tx).await?;
                Ok(())
            }

            async fn teardown(
                &self,
                tx: &mut Transaction<'static, $db>,
                generation: u32,
            ) -> Result<(), sqlx::Error> {
                let sql = format!("DROP TABLE IF EXISTS order_view_g{generation}");
                sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut **tx).await?;
                Ok(())
            }
        }
    };
}

// The SQL that appends the JSON entry bound as parameter `n` to the row's timeline array.
order_view_projection!(Sqlite, |n: usize| format!(
    "json_insert(timeline, '$[#]', json(${n}))"
));
order_view_projection!(Postgres, |n: usize| format!(
    "(timeline::jsonb || jsonb_build_array(${n}::jsonb))::text"
));
