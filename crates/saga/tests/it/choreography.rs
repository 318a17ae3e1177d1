//! Choreography helpers: handlers on the memory bus with a SQLite inbox and outbox; a
//! redelivered event has no second effect; the flow's progress rebuilt from its events.

use std::time::Duration;

use trellis_bus::inbox::SqliteInbox;
use trellis_bus::outbox::SqliteOutbox;
use trellis_bus::{Bus, Envelope, InMemoryBus, Message, SubscribeOptions};
use trellis_saga::choreography::{Choreography, NextEvent};
use trellis_saga::{SagaStatus, StepState};
use uuid::Uuid;

/// Reserve stock on `order.placed`, charge on `stock.reserved` (declined when the order's
/// `card` is "bad"), release the stock on `payment.failed`. Effects are rows in `effects`.
fn order_flow() -> Choreography {
    Choreography::new("order-flow", "shop")
        .step("order.placed", "reserve-stock", |tx, event| {
            Box::pin(async move {
                sqlx::query("INSERT INTO effects (kind, subject) VALUES ('reserve', ?)")
                    .bind(&event.subject)
                    .execute(&mut *tx)
                    .await?;
                Ok(Some(NextEvent::new(
                    "shop.events",
                    "stock.reserved",
                    event.data.clone(),
                )))
            })
        })
        .step("stock.reserved", "charge", |_tx, event| {
            Box::pin(async move {
                let next = if event.data["card"] == "bad" {
                    NextEvent::new(
                        "shop.events",
                        "payment.failed",
                        serde_json::json!({ "error": "card declined" }),
                    )
                } else {
                    NextEvent::new("shop.events", "payment.charged", serde_json::json!({}))
                };
                Ok(Some(next))
            })
        })
        .compensation("payment.failed", "reserve-stock", |tx, event| {
            Box::pin(async move {
                sqlx::query("INSERT INTO effects (kind, subject) VALUES ('release', ?)")
                    .bind(&event.subject)
                    .execute(&mut *tx)
                    .await?;
                Ok(Some(NextEvent::new(
                    "shop.events",
                    "stock.released",
                    serde_json::json!({}),
                )))
            })
        })
}

/// Publishes `order.placed` for a new order with `card` and runs the flow until quiet;
/// returns the correlation id, every event seen, and the first delivered message.
async fn run_flow(
    card: &str,
    flow: &Choreography,
    inbox: &SqliteInbox,
    outbox: &SqliteOutbox,
    bus: &InMemoryBus,
    group: &str,
) -> (Uuid, Vec<Envelope>, Message) {
    let mut subscription = bus
        .subscribe("shop.*", group, SubscribeOptions::default())
        .await
        .expect("subscribe");
    let correlation = Uuid::now_v7();
    let mut placed = Envelope::new(
        "order.placed",
        "orders",
        correlation.to_string(),
        serde_json::json!({ "card": card }),
    );
    placed.correlation_id = Some(correlation);
    bus.publish("shop.orders", placed).await.expect("publish");
    let (mut events, mut first) = (Vec::new(), None);
    for _ in 0..50 {
        let relayed = outbox.relay_once(bus, 100).await.expect("relay");
        let deliveries = subscription
            .fetch(10, Duration::from_millis(50))
            .await
            .expect("fetch");
        if deliveries.is_empty() && relayed.published == 0 {
            break;
        }
        for delivery in deliveries {
            let message = delivery.message().as_ref().clone();
            flow.handle(inbox, &message).await.expect("handle");
            events.push(message.envelope.clone());
            first.get_or_insert(message);
            delivery.ack().await.expect("ack");
        }
    }
    (
        correlation,
        events,
        first.expect("at least the first event"),
    )
}

async fn setup() -> (
    tempfile::TempDir,
    sqlx::SqlitePool,
    SqliteInbox,
    SqliteOutbox,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("shop.db").display());
    let pool = sqlx::SqlitePool::connect(&url).await.expect("pool");
    sqlx::raw_sql("CREATE TABLE effects (kind TEXT NOT NULL, subject TEXT NOT NULL)")
        .execute(&pool)
        .await
        .expect("schema");
    let inbox = SqliteInbox::new(pool.clone()).await.expect("inbox");
    let outbox = SqliteOutbox::new(pool.clone()).await.expect("outbox");
    (dir, pool, inbox, outbox)
}

async fn effects(pool: &sqlx::SqlitePool) -> Vec<String> {
    sqlx::query_scalar("SELECT kind FROM effects ORDER BY rowid")
        .fetch_all(pool)
        .await
        .expect("effects")
}

#[tokio::test]
async fn a_declined_payment_releases_the_stock_once_and_the_timeline_shows_it() {
    // Goal: the failure event triggers the compensating handler; a redelivered trigger runs
    // nothing; the rebuilt timeline reads: reserve-stock compensated, charge failed, Failed.
    let (_dir, pool, inbox, outbox) = setup().await;
    let bus = InMemoryBus::new();
    let flow = order_flow();
    let (correlation, events, first) =
        run_flow("bad", &flow, &inbox, &outbox, &bus, "shop-declined").await;
    assert_eq!(effects(&pool).await, ["reserve", "release"]);
    assert_eq!(
        flow.handle(&inbox, &first).await.expect("redelivery"),
        0,
        "a redelivered event runs no handler"
    );
    assert_eq!(effects(&pool).await, ["reserve", "release"]);

    let timeline = flow.timeline(correlation, &events);
    assert_eq!(timeline.status, SagaStatus::Failed, "{timeline:#?}");
    assert_eq!(timeline.definition, "order-flow");
    assert_eq!(timeline.steps[0].step, "reserve-stock");
    assert_eq!(timeline.steps[0].state, StepState::Compensated);
    assert_eq!(timeline.steps[1].state, StepState::Failed);
    assert_eq!(
        timeline.steps[1].attempts[0].error.as_deref(),
        Some("card declined")
    );
    assert_eq!(
        timeline.outcome.as_deref(),
        Some("failed at charge: card declined")
    );
}

#[tokio::test]
async fn a_charged_order_completes_and_the_timeline_shows_every_step_succeeded() {
    // Goal: the happy path: each handler's event triggers the next; the timeline completes.
    let (_dir, pool, inbox, outbox) = setup().await;
    let bus = InMemoryBus::new();
    let flow = order_flow();
    let (correlation, events, _) =
        run_flow("good", &flow, &inbox, &outbox, &bus, "shop-charged").await;
    assert_eq!(effects(&pool).await, ["reserve"]);
    let timeline = flow.timeline(correlation, &events);
    assert_eq!(timeline.status, SagaStatus::Completed, "{timeline:#?}");
    assert!(
        timeline
            .steps
            .iter()
            .all(|step| step.state == StepState::Succeeded)
    );
    // Events of other flows are ignored.
    let other = flow.timeline(Uuid::now_v7(), &events);
    assert_eq!(other.status, SagaStatus::Running);
    assert!(
        other
            .steps
            .iter()
            .all(|step| step.state == StepState::Pending)
    );
}
