//! The order outbox: order lifecycle events reach the bus from the event store's global log,
//! which serves as the outbox: `order.created`, `order.confirmed` and `order.cancelled` (and,
//! for choreographed orders, `order.shipping_started` and `order.failed`), each with the order
//! id as `subject` and `correlation_id`, and the event's own id as the envelope id, so a
//! message published twice (after a crash before the checkpoint was saved) is deduplicated by
//! the consumers' inbox. Publishing is never "write then publish": the event is durable first
//! and the outbox follows the log at least once from a checkpoint in the read-model database.
//!
//! # One publisher per service
//! On PostgreSQL (the engine replicas share) every replica of the orders service runs the
//! outbox, but only the one holding its lease
//! (`relay_leases`, renewed every [`LEASE_RENEW`], expiring after [`LEASE_TTL`]) publishes;
//! the others try to take it every [`LEASE_RETRY`]. Without it every replica would publish
//! every event (consumers' inboxes would drop the copies, but the stream would grow with the
//! replica count). A replica that lost its lease (paused past its expiry, cut off from the
//! database) stops at its next renewal, at most [`LEASE_RENEW`] later; what it published
//! meanwhile is a duplicate the inboxes drop, and its checkpoint never moves backwards.
//! After a crash of the holder, another replica takes over within [`LEASE_TTL`] plus
//! [`LEASE_RETRY`]; the holder itself, restarted under the same owner name (the saga owner,
//! `--saga-owner`, which `up --processes` keeps stable), takes it back at once. On SQLite a
//! service's database belongs to one process, and the outbox takes no lease.
//!
//! The tables and metrics keep the names they had when this module was called the relay
//! (`bus_relay_checkpoints`, `relay_dead_letters`, `trellis_orders_relay_dead_letters_total`),
//! so existing databases and dashboards keep working.
//!
//! # Decoding, and events that cannot be decoded
//! The outbox decodes with the order repository's upcasters (the same `Arc`), so an upcaster
//! registered for the service reaches the outbox too. An event it still cannot decode (or
//! turn into a message) can never be published, and retrying it from the checkpoint would
//! stop every order event behind it for good. Such an event goes to `relay_dead_letters`
//! (position, stream, event id and type, reason, time) in the read-model database, the counter
//! `trellis_orders_relay_dead_letters_total` is incremented, an error is logged, and the
//! outbox moves on. A table rather than the bus's dead-letter queue: that queue holds messages
//! a consumer failed to handle, and here there is no message to hold, only an event that
//! stays in the log; the table sits beside the outbox's checkpoint, and its primary key (the
//! position) keeps a second pass after a crash from recording an event twice. Failures that
//! may pass (reading an order, publishing, saving the checkpoint) still resume from the
//! checkpoint.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use shop_contracts::events::{self, OrderCreated, OrderEnded, ShippingStarted, StepFailed};
use trellis_bus::{AnyBus, Bus, Envelope};
use trellis_eventstore::{AnyStore, RecordedEvent, Repository, Upcasters, decode, subscribe_all};
use trellis_service::{Db, on_db};

use crate::aggregate::{Order, OrderEvent};

/// The outbox's checkpoint name (and the `relay` column of its dead letters).
const OUTBOX_NAME: &str = "order-events-to-bus";
/// Events published between two checkpoint saves (a crash publishes at most this many again).
const CHECKPOINT_EVERY: u64 = 100;
/// Longest time between two checkpoint saves while events flow.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
/// How long the outbox's lease lasts unless renewed.
pub(crate) const LEASE_TTL: Duration = Duration::from_secs(15);
/// How often the holder renews its lease.
pub(crate) const LEASE_RENEW: Duration = Duration::from_secs(3);
/// How often a replica without the lease tries to take it.
pub(crate) const LEASE_RETRY: Duration = Duration::from_secs(2);

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS bus_relay_checkpoints (
    name TEXT PRIMARY KEY,
    position BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS relay_leases (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    until_ms BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS relay_dead_letters (
    position BIGINT PRIMARY KEY,
    relay TEXT NOT NULL,
    stream TEXT NOT NULL,
    event_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    reason TEXT NOT NULL,
    at TEXT NOT NULL
)";

/// Why one event was not published.
#[derive(Debug)]
enum OutboxError {
    /// The event can never become a message (its data does not decode, even upcast): it is
    /// dead-lettered and the outbox moves on.
    Undecodable(String),
    /// Something that may pass (reading the order): the outbox resumes from its checkpoint.
    Transient(String),
}

/// Records `event` as one the outbox skipped, with why.
async fn dead_letter(db: &Db, event: &RecordedEvent, reason: &str) -> Result<(), sqlx::Error> {
    let position = i64::try_from(event.position).unwrap_or(i64::MAX);
    let at = chrono::Utc::now().to_rfc3339();
    on_db!(db, |pool| {
        sqlx::query(
            "INSERT INTO relay_dead_letters
             (position, relay, stream, event_id, event_type, reason, at)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (position) DO NOTHING",
        )
        .bind(position)
        .bind(OUTBOX_NAME)
        .bind(event.stream.as_str())
        .bind(event.id.to_string())
        .bind(&event.event_type)
        .bind(reason)
        .bind(&at)
        .execute(pool)
        .await
        .map(|r| r.rows_affected())
    })?;
    Ok(())
}

async fn load_checkpoint(db: &Db) -> Result<u64, sqlx::Error> {
    let position: Option<i64> = on_db!(db, |pool| {
        sqlx::query_scalar("SELECT position FROM bus_relay_checkpoints WHERE name = $1")
            .bind(OUTBOX_NAME)
            .fetch_optional(pool)
            .await
    })?;
    Ok(position.map_or(0, |p| u64::try_from(p).unwrap_or(0)))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Takes or renews the outbox's lease for `owner`; whether `owner` holds it now.
async fn hold_lease(db: &Db, owner: &str) -> Result<bool, sqlx::Error> {
    let now = now_ms();
    let until = now.saturating_add(i64::try_from(LEASE_TTL.as_millis()).unwrap_or(i64::MAX));
    let held = on_db!(db, |pool| {
        sqlx::query(
            "INSERT INTO relay_leases (name, owner, until_ms) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE SET owner = $2, until_ms = $3
             WHERE relay_leases.owner = $2 OR relay_leases.until_ms < $4",
        )
        .bind(OUTBOX_NAME)
        .bind(owner)
        .bind(until)
        .bind(now)
        .execute(pool)
        .await
        .map(|r| r.rows_affected())
    })?;
    Ok(held == 1)
}

/// Saves the checkpoint, never moving it backwards (a replica that lost the lease may save
/// an older position than the holder's).
async fn save_checkpoint(db: &Db, position: u64) -> Result<(), sqlx::Error> {
    let position = i64::try_from(position).unwrap_or(i64::MAX);
    on_db!(db, |pool| {
        sqlx::query(
            "INSERT INTO bus_relay_checkpoints (name, position) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET position = excluded.position
             WHERE bus_relay_checkpoints.position < excluded.position",
        )
        .bind(OUTBOX_NAME)
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
) -> Result<Option<Envelope>, OutboxError> {
    let Some(order_id) = event
        .stream
        .as_str()
        .strip_prefix("order-")
        .map(str::to_owned)
    else {
        return Ok(None);
    };
    let decoded: OrderEvent =
        decode(event, upcasters).map_err(|e| OutboxError::Undecodable(e.to_string()))?;
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
                .map_err(|e| OutboxError::Transient(e.to_string()))?
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
                .map_err(|e| OutboxError::Transient(e.to_string()))?
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
    let data = data.map_err(|e| OutboxError::Undecodable(format!("no message data: {e}")))?;
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

/// Follows the log and publishes while this replica holds the outbox's lease, until the task
/// is dropped, decoding with `orders`' upcasters. Failures are retried after a pause, from the
/// last saved checkpoint; an event that cannot be decoded is dead-lettered and skipped.
pub(crate) async fn run(
    store: AnyStore,
    orders: Arc<Repository<Order, AnyStore>>,
    db: Db,
    bus: AnyBus,
    owner: Option<String>,
) {
    let upcasters = orders.upcasters();
    let leased = db.is_postgres();
    let owner = owner.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    loop {
        let held = if leased {
            hold_lease(&db, &owner).await
        } else {
            Ok(true)
        };
        match held {
            Ok(true) => {}
            Ok(false) => {
                tokio::time::sleep(LEASE_RETRY).await;
                continue;
            }
            Err(error) => {
                tracing::warn!(%error, "order outbox cannot take its lease; retrying");
                tokio::time::sleep(LEASE_RETRY).await;
                continue;
            }
        }
        if leased {
            tracing::info!(%owner, "order outbox publishing (lease taken)");
        }
        let mut renewed_at = tokio::time::Instant::now();
        let from = match load_checkpoint(&db).await {
            Ok(position) => position + 1,
            Err(error) => {
                tracing::warn!(%error, "order outbox cannot read its checkpoint; retrying");
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
                        Ok(Some(mut envelope)) => {
                            // The publish's PRODUCER span continues the request that made the
                            // event (its traceparent, from the event's metadata).
                            let topic = envelope.kind.clone();
                            let producer = trellis_bus::produce_span(&topic, &mut envelope);
                            if let Err(error) = tracing::Instrument::instrument(
                                bus.publish(topic.as_str(), envelope),
                                producer,
                            )
                            .await
                            {
                                break error.to_string();
                            }
                            metrics::counter!("shop_orders_events_relayed_total").increment(1);
                        }
                        Ok(None) => {}
                        Err(OutboxError::Undecodable(reason)) => {
                            if let Err(error) = dead_letter(&db, &event, &reason).await {
                                break error.to_string();
                            }
                            metrics::counter!("trellis_orders_relay_dead_letters_total")
                                .increment(1);
                            tracing::error!(
                                position = event.position,
                                stream = %event.stream.as_str(),
                                event_type = %event.event_type,
                                %reason,
                                "order outbox cannot decode an order event; dead-lettered it (relay_dead_letters) and moved on"
                            );
                        }
                        Err(OutboxError::Transient(error)) => break error,
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
            if leased && renewed_at.elapsed() >= LEASE_RENEW {
                match hold_lease(&db, &owner).await {
                    Ok(true) => renewed_at = tokio::time::Instant::now(),
                    Ok(false) => break "another replica took the lease".to_owned(),
                    Err(error) => break format!("cannot renew the lease: {error}"),
                }
            }
        };
        if unsaved > 0 {
            // What was published stays published: saved so the next holder need not repeat it.
            let _ = save_checkpoint(&db, last).await;
        }
        tracing::warn!(error = %failure, "order outbox stopped; resuming from its checkpoint in 1 s");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use serde_json::json;
    use shop_contracts::api::OrderLineView;
    use trellis_bus::{AnyBus, Bus as _, SubscribeOptions};
    use trellis_eventstore::{AnyStore, EventStore as _, ExpectedVersion, Metadata, NewEvent};
    use trellis_eventstore::{Repository, StreamId, Upcasters};
    use trellis_service::Db;

    use crate::aggregate::{Order, OrderCommand};

    /// Fetches from the bus until an `order.created` for `order_id` arrives; `None` if none
    /// came within `FETCHES_MAX` fetches of 200 ms.
    async fn created(
        subscription: &mut trellis_bus::Subscription,
        order_id: &str,
    ) -> Option<trellis_bus::Envelope> {
        const FETCHES_MAX: usize = 75;
        for _ in 0..FETCHES_MAX {
            for delivery in subscription
                .fetch(16, Duration::from_millis(200))
                .await
                .expect("fetch")
            {
                let envelope = delivery.envelope().clone();
                delivery.ack().await.expect("ack");
                if envelope.kind == "order.created" && envelope.subject == order_id {
                    return Some(envelope);
                }
            }
        }
        None
    }

    struct Fixture {
        store: AnyStore,
        orders: Arc<Repository<Order, AnyStore>>,
        db: Db,
        bus: AnyBus,
        _dir: tempdir::Dir,
        _postgres: Option<trellis_testkit::TestPostgres>,
    }

    mod tempdir {
        /// A directory removed when dropped.
        pub(super) struct Dir(pub(super) std::path::PathBuf);
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    async fn fixture() -> Fixture {
        fixture_on(None).await
    }

    /// The fixture with its read-model database on `postgres` instead of SQLite.
    async fn fixture_on(postgres: Option<trellis_testkit::TestPostgres>) -> Fixture {
        let dir = std::env::temp_dir().join(format!("orders-outbox-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let store = AnyStore::open("memory:").await.expect("memory store");
        let orders = Arc::new(Repository::<Order, AnyStore>::new(store.clone()));
        let url = postgres.as_ref().map_or_else(
            || format!("sqlite://{}", dir.join("read.db").display()),
            |pg| pg.url.clone(),
        );
        let db = Db::connect(&url).await.expect("read db");
        db.run_schema(super::SCHEMA).await.expect("outbox schema");
        let bus = AnyBus::connect("memory://", "shop").await.expect("bus");
        Fixture {
            store,
            orders,
            db,
            bus,
            _dir: tempdir::Dir(dir),
            _postgres: postgres,
        }
    }

    /// The fixed time the test orders are placed at.
    fn placed_at() -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::parse_from_rfc3339("2026-01-02T12:00:00Z")
            .expect("a valid time")
            .with_timezone(&chrono::Utc)
    }

    async fn place(orders: &Repository<Order, AnyStore>) -> String {
        let order_id = uuid::Uuid::now_v7().hyphenated().to_string();
        let command = OrderCommand::Create {
            user_id: "user-1".to_owned(),
            items: vec![OrderLineView {
                product_id: "product-1".to_owned(),
                quantity: 1,
                price_cents: 100,
            }],
            choreographed: false,
        };
        orders
            .execute_on_new(&order_id, command.at(placed_at()), Metadata::default())
            .await
            .expect("created");
        order_id
    }

    #[tokio::test]
    async fn an_undecodable_event_is_dead_lettered_and_the_outbox_moves_on() {
        // An order stream holds a `Created` whose data no upcaster can read, then a good
        // order follows: the good one must reach the bus and the bad one the dead letters.
        let f = fixture().await;
        let mut subscription = f
            .bus
            .subscribe("order.*", "observer", SubscribeOptions::default())
            .await
            .expect("subscribe");
        let broken = StreamId::new(format!("order-{}", uuid::Uuid::now_v7())).expect("valid");
        f.store
            .append(
                &broken,
                ExpectedVersion::NoStream,
                vec![NewEvent::new("Created", json!({ "user": 7 }))],
            )
            .await
            .expect("append");
        let good = place(&f.orders).await;

        let outbox = tokio::spawn(super::run(
            f.store.clone(),
            f.orders.clone(),
            f.db.clone(),
            f.bus.clone(),
            None,
        ));
        let envelope = created(&mut subscription, &good).await;
        outbox.abort();
        assert!(
            envelope.is_some(),
            "the event after the undecodable one is published"
        );

        let dead: Vec<(i64, String, String, String)> = trellis_service::on_db!(&f.db, |pool| {
            sqlx::query_as(
                "SELECT position, stream, event_type, reason FROM relay_dead_letters ORDER BY position",
            )
            .fetch_all(pool)
            .await
        })
        .expect("dead letters");
        assert_eq!(dead.len(), 1, "{dead:?}");
        let (position, stream, event_type, reason) = &dead[0];
        assert_eq!(
            (*position, stream.as_str(), event_type.as_str()),
            (1, broken.as_str(), "Created")
        );
        assert!(
            reason.contains("user_id"),
            "the reason names the problem: {reason}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_replicas_publish_each_event_once() {
        // Goal: replicas of the orders service do not each publish every order event; the one
        // holding the outbox's lease does. Method: two outboxes on one log, one read-model
        // database (PostgreSQL, where replicas share it) and one bus; every `order.created`
        // of 20 orders is counted by envelope id.
        let Some(postgres) = trellis_testkit::postgres("orders_outbox_replicas").await else {
            return;
        };
        let f = fixture_on(Some(postgres)).await;
        let mut subscription = f
            .bus
            .subscribe("order.*", "observer", SubscribeOptions::default())
            .await
            .expect("subscribe");
        let mut placed = std::collections::HashSet::new();
        for _ in 0..20 {
            placed.insert(place(&f.orders).await);
        }
        let replicas: Vec<_> = (0..2)
            .map(|_| {
                tokio::spawn(super::run(
                    f.store.clone(),
                    f.orders.clone(),
                    f.db.clone(),
                    f.bus.clone(),
                    None,
                ))
            })
            .collect();
        let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        // Until every order arrived, then one more second for copies a second publisher sends.
        let mut quiet_until = None;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while quiet_until.is_none_or(|until| tokio::time::Instant::now() < until) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "orders missing: {seen:?}"
            );
            for delivery in subscription
                .fetch(64, Duration::from_millis(100))
                .await
                .expect("fetch")
            {
                let envelope = delivery.envelope().clone();
                delivery.ack().await.expect("ack");
                if envelope.kind == "order.created" && placed.contains(&envelope.subject) {
                    *seen.entry(envelope.id.to_string()).or_default() += 1;
                }
            }
            if quiet_until.is_none() && seen.len() == placed.len() {
                quiet_until = Some(tokio::time::Instant::now() + Duration::from_secs(1));
            }
        }
        for replica in replicas {
            replica.abort();
        }
        let copies: Vec<_> = seen.values().filter(|&&n| n > 1).collect();
        assert!(
            copies.is_empty(),
            "events published more than once: {seen:?}"
        );
    }

    #[tokio::test]
    async fn the_outbox_decodes_with_the_services_upcasters() {
        // An order's `Created` in an older shape (`total` for `total_cents`, schema v0, built
        // in memory: today's Order events are all v1 and the store accepts no older version)
        // is published through the upcasters the outbox is given, and is undecodable without.
        let f = fixture().await;
        let order_id = place(&f.orders).await;
        let mut old = f.store.read_all(1, 1).await.expect("read").remove(0);
        let data = old.data.as_object_mut().expect("an object");
        let total = data.remove("total_cents").expect("total_cents");
        data.insert("total".to_owned(), total);
        old.schema_version = 0;
        let upcasters = Upcasters::new().register("Created", 0, |mut data| {
            let data_map = data.as_object_mut().ok_or("not an object")?;
            let total = data_map.remove("total").ok_or("no total")?;
            data_map.insert("total_cents".to_owned(), total);
            Ok(data)
        });

        let envelope = super::envelope_for(&old, &f.orders, &upcasters)
            .await
            .expect("decodes")
            .expect("published");
        assert_eq!(envelope.kind, "order.created");
        assert_eq!(envelope.subject, order_id);
        assert_eq!(envelope.data["total_cents"], 100);
        assert!(matches!(
            super::envelope_for(&old, &f.orders, &Upcasters::default()).await,
            Err(super::OutboxError::Undecodable(_))
        ));
    }
}
