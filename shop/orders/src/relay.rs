//! Relays order lifecycle events from the event store's global log onto the bus:
//! `order.created`, `order.confirmed` and `order.cancelled` (and, for choreographed orders,
//! `order.shipping_started` and `order.failed`), each with the order id as
//! `subject` and `correlation_id`, and the event's own id as the envelope id, so a message
//! relayed twice (after a crash before the checkpoint was saved) is deduplicated by the
//! consumers' inbox. Publishing is never "write then publish": the event is durable first and
//! the relay follows the log at least once from a checkpoint in the read-model database.

use std::time::Duration;

use futures_util::StreamExt;
use shop_contracts::events::{self, OrderCreated, OrderEnded, ShippingStarted, StepFailed};
use trellis_bus::{AnyBus, Bus, Envelope};
use trellis_eventstore::{AnyStore, RecordedEvent, Repository, Upcasters, decode, subscribe_all};
use trellis_service::{Db, on_db};

use crate::aggregate::{Order, OrderEvent};

/// The relay's checkpoint name.
const RELAY_NAME: &str = "order-events-to-bus";
/// Events relayed between two checkpoint saves (a crash re-relays at most this many).
const CHECKPOINT_EVERY: u64 = 100;
/// Longest time between two checkpoint saves while events flow.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS bus_relay_checkpoints (
    name TEXT PRIMARY KEY,
    position BIGINT NOT NULL
)";

async fn load_checkpoint(db: &Db) -> Result<u64, sqlx::Error> {
    let position: Option<i64> = on_db!(db, |pool| {
        sqlx::query_scalar("SELECT position FROM bus_relay_checkpoints WHERE name = $1")
            .bind(RELAY_NAME)
            .fetch_optional(pool)
            .await
    })?;
    Ok(position.map_or(0, |p| u64::try_from(p).unwrap_or(0)))
}

async fn save_checkpoint(db: &Db, position: u64) -> Result<(), sqlx::Error> {
    let position = i64::try_from(position).unwrap_or(i64::MAX);
    on_db!(db, |pool| {
        sqlx::query(
            "INSERT INTO bus_relay_checkpoints (name, position) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET position = excluded.position",
        )
        .bind(RELAY_NAME)
        .bind(position)
        .execute(pool)
        .await
        .map(|r| r.rows_affected())
    })?;
    Ok(())
}

/// The envelope for one event, or `None` for events the bus does not carry.
async fn envelope_for(
    event: &RecordedEvent,
    orders: &Repository<Order, AnyStore>,
    upcasters: &Upcasters,
) -> Result<Option<Envelope>, String> {
    let Some(order_id) = event
        .stream
        .as_str()
        .strip_prefix("order-")
        .map(str::to_owned)
    else {
        return Ok(None);
    };
    let decoded: OrderEvent = decode(event, upcasters).map_err(|e| e.to_string())?;
    let (kind, data) = match decoded {
        OrderEvent::Created {
            user_id,
            items,
            total_cents,
            choreographed,
            ..
        } => (
            events::ORDER_CREATED,
            serde_json::to_value(OrderCreated {
                order_id: order_id.clone(),
                user_id,
                items: items
                    .into_iter()
                    .map(|l| shop_contracts::api::OrderItem {
                        product_id: l.product_id,
                        quantity: l.quantity,
                    })
                    .collect(),
                total_cents,
                choreographed,
            }),
        ),
        // The choreographed flow's own events: only its orders have participants waiting.
        OrderEvent::ShippingStarted | OrderEvent::Failed { .. } => {
            let order = orders
                .load_cached(&order_id)
                .await
                .map_err(|e| e.to_string())?
                .state;
            if !order.choreographed {
                return Ok(None);
            }
            match decoded {
                OrderEvent::Failed { reason } => (
                    events::ORDER_FAILED,
                    serde_json::to_value(StepFailed {
                        order_id: order_id.clone(),
                        error: format!("the order failed before shipping: {reason}"),
                        reason,
                    }),
                ),
                _ => (
                    events::ORDER_SHIPPING_STARTED,
                    serde_json::to_value(ShippingStarted {
                        order_id: order_id.clone(),
                        user_id: order.user_id,
                        items: order
                            .items
                            .into_iter()
                            .map(|l| shop_contracts::api::OrderItem {
                                product_id: l.product_id,
                                quantity: l.quantity,
                            })
                            .collect(),
                    }),
                ),
            }
        }
        OrderEvent::Confirmed { .. } | OrderEvent::Cancelled { .. } => {
            // The owner never changes: the cached order is enough.
            let user_id = orders
                .load_cached(&order_id)
                .await
                .map_err(|e| e.to_string())?
                .state
                .user_id;
            let (kind, status, reason) = match decoded {
                OrderEvent::Cancelled { reason, .. } => {
                    (events::ORDER_CANCELLED, "CANCELLED", Some(reason))
                }
                _ => (events::ORDER_CONFIRMED, "CONFIRMED", None),
            };
            (
                kind,
                serde_json::to_value(OrderEnded {
                    order_id: order_id.clone(),
                    user_id,
                    status: status.to_owned(),
                    reason,
                }),
            )
        }
        _ => return Ok(None),
    };
    let data = data.map_err(|e| e.to_string())?;
    let mut envelope =
        Envelope::new(kind, "shop.orders", order_id.clone(), data).with_sequence(event.version);
    envelope.id = event.id;
    if let Ok(id) = uuid::Uuid::parse_str(&order_id) {
        envelope = envelope.with_correlation_id(id);
    }
    // For a choreographed order: the participant's event that led to this one.
    envelope.causation_id = event.metadata.causation_id;
    if let Some(traceparent) = &event.metadata.traceparent {
        envelope = envelope.with_traceparent(traceparent.clone());
    }
    Ok(Some(envelope))
}

/// Follows the log and publishes until the task is dropped. Failures are retried after a
/// pause, from the last saved checkpoint.
pub(crate) async fn run(
    store: AnyStore,
    orders: std::sync::Arc<Repository<Order, AnyStore>>,
    db: Db,
    bus: AnyBus,
) {
    let upcasters = Upcasters::default();
    loop {
        let from = match load_checkpoint(&db).await {
            Ok(position) => position + 1,
            Err(error) => {
                tracing::warn!(%error, "bus relay cannot read its checkpoint; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut log = Box::pin(subscribe_all(store.clone(), from));
        let mut unsaved = 0_u64;
        let mut last = from.saturating_sub(1);
        let mut saved_at = tokio::time::Instant::now();
        let failure = loop {
            let next = tokio::time::timeout(CHECKPOINT_INTERVAL, log.next()).await;
            match next {
                Err(_) => {}
                Ok(None) => break "the log subscription ended".to_owned(),
                Ok(Some(Err(error))) => break error.to_string(),
                Ok(Some(Ok(event))) => {
                    match envelope_for(&event, &orders, &upcasters).await {
                        Ok(Some(envelope)) => {
                            if let Err(error) =
                                bus.publish(envelope.kind.clone().as_str(), envelope).await
                            {
                                break error.to_string();
                            }
                            metrics::counter!("shop_orders_events_relayed_total").increment(1);
                        }
                        Ok(None) => {}
                        Err(error) => break error,
                    }
                    last = event.position;
                    unsaved += 1;
                }
            }
            if unsaved > 0
                && (unsaved >= CHECKPOINT_EVERY || saved_at.elapsed() >= CHECKPOINT_INTERVAL)
            {
                if let Err(error) = save_checkpoint(&db, last).await {
                    break error.to_string();
                }
                unsaved = 0;
                saved_at = tokio::time::Instant::now();
            }
        };
        tracing::warn!(error = %failure, "bus relay stopped; resuming from its checkpoint in 1 s");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
