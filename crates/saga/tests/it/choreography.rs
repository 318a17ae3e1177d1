//! Choreography helpers: handlers on the memory bus with a SQLite or PostgreSQL inbox and
//! outbox; a redelivered event has no second effect; the flow's progress rebuilt from its
//! events, and from the choreography log (Rust API and HTTP endpoint).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::time::Duration;

use http_body_util::BodyExt as _;
use sqlx::{Postgres, Sqlite};
use tower::ServiceExt as _;
use trellis_bus::inbox::{PgInbox, SqliteInbox};
use trellis_bus::outbox::{PgOutbox, SqliteOutbox};
use trellis_bus::{Bus, Envelope, HandlerError, InMemoryBus, Message, SubscribeOptions};
use trellis_saga::choreography::{Choreography, ChoreographyDb, ChoreographyLog, NextEvent};
use trellis_saga::on_tx;
use trellis_saga::{SagaError, SagaStatus, SagaTimeline, StepState};
use uuid::Uuid;

/// Reserve stock on `order.placed`, charge on `stock.reserved` (declined when the order's
/// `card` is "bad"), release the stock on `payment.failed`. Effects are rows in `effects`.
/// A macro, because each database's effects take its own connection type.
macro_rules! order_flow {
    ($db:ty) => {
        Choreography::<$db>::new("order-flow", "shop")
            .step("order.placed", "reserve-stock", |tx, event| {
                Box::pin(async move {
                    sqlx::query("INSERT INTO effects (kind, subject) VALUES ('reserve', $1)")
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
                    sqlx::query("INSERT INTO effects (kind, subject) VALUES ('release', $1)")
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
    };
}

/// A shop service's database: its inbox, outbox relay, effects and choreography log.
trait Shop {
    type Db: ChoreographyDb;
    fn flow(&self) -> Choreography<Self::Db>;
    fn inbox(&self) -> &<Self::Db as ChoreographyDb>::Inbox;
    fn pool(&self) -> sqlx::Pool<Self::Db>;
    async fn relay(&self, bus: &InMemoryBus) -> usize;
    async fn effects(&self) -> Vec<String>;
}

struct SqliteShop {
    _dir: tempfile::TempDir,
    pool: sqlx::SqlitePool,
    inbox: SqliteInbox,
    outbox: SqliteOutbox,
}

impl SqliteShop {
    async fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("shop.db").display());
        let pool = sqlx::SqlitePool::connect(&url).await.expect("pool");
        sqlx::raw_sql(
            "CREATE TABLE effects (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, \
             subject TEXT NOT NULL)",
        )
        .execute(&pool)
        .await
        .expect("schema");
        let inbox = SqliteInbox::new(pool.clone()).await.expect("inbox");
        let outbox = SqliteOutbox::new(pool.clone()).await.expect("outbox");
        Self {
            _dir: dir,
            pool,
            inbox,
            outbox,
        }
    }
}

impl Shop for SqliteShop {
    type Db = Sqlite;
    fn flow(&self) -> Choreography<Sqlite> {
        order_flow!(Sqlite)
    }
    fn inbox(&self) -> &SqliteInbox {
        &self.inbox
    }
    fn pool(&self) -> sqlx::SqlitePool {
        self.pool.clone()
    }
    async fn relay(&self, bus: &InMemoryBus) -> usize {
        self.outbox
            .relay_once(bus, 100)
            .await
            .expect("relay")
            .published
    }
    async fn effects(&self) -> Vec<String> {
        sqlx::query_scalar("SELECT kind FROM effects ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .expect("effects")
    }
}

struct PgShop {
    _db: trellis_testkit::TestPostgres,
    pool: sqlx::PgPool,
    inbox: PgInbox,
    outbox: PgOutbox,
}

impl PgShop {
    /// `None` (with the reason printed) when no PostgreSQL is reachable outside CI.
    async fn new(name: &str) -> Option<Self> {
        let db = trellis_testkit::postgres(name).await?;
        let pool = sqlx::PgPool::connect(&db.url).await.expect("pool");
        sqlx::raw_sql(
            "CREATE TABLE effects (id BIGSERIAL PRIMARY KEY, kind TEXT NOT NULL, \
             subject TEXT NOT NULL)",
        )
        .execute(&pool)
        .await
        .expect("schema");
        let inbox = PgInbox::new(pool.clone()).await.expect("inbox");
        let outbox = PgOutbox::new(pool.clone()).await.expect("outbox");
        Some(Self {
            _db: db,
            pool,
            inbox,
            outbox,
        })
    }
}

impl Shop for PgShop {
    type Db = Postgres;
    fn flow(&self) -> Choreography<Postgres> {
        order_flow!(Postgres)
    }
    fn inbox(&self) -> &PgInbox {
        &self.inbox
    }
    fn pool(&self) -> sqlx::PgPool {
        self.pool.clone()
    }
    async fn relay(&self, bus: &InMemoryBus) -> usize {
        self.outbox
            .relay_once(bus, 100)
            .await
            .expect("relay")
            .published
    }
    async fn effects(&self) -> Vec<String> {
        sqlx::query_scalar("SELECT kind FROM effects ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .expect("effects")
    }
}

/// Publishes `order.placed` for a new order with `card` and runs the flow until quiet;
/// returns the correlation id, every event seen, and the first delivered message.
async fn run_flow<S: Shop>(
    card: &str,
    shop: &S,
    flow: &Choreography<S::Db>,
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
        let relayed = shop.relay(bus).await;
        let deliveries = subscription
            .fetch(10, Duration::from_millis(50))
            .await
            .expect("fetch");
        if deliveries.is_empty() && relayed == 0 {
            break;
        }
        for delivery in deliveries {
            let message = delivery.message().as_ref().clone();
            flow.handle(shop.inbox(), &message).await.expect("handle");
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

fn assert_declined(timeline: &SagaTimeline) {
    assert_eq!(timeline.status, SagaStatus::Failed, "{timeline:#?}");
    assert_eq!(timeline.definition, "order-flow");
    assert_eq!(timeline.steps.len(), 2, "{timeline:#?}");
    assert_eq!(timeline.steps[0].step, "reserve-stock");
    assert_eq!(timeline.steps[0].state, StepState::Compensated);
    assert_eq!(timeline.steps[1].step, "charge");
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

fn assert_completed(timeline: &SagaTimeline) {
    assert_eq!(timeline.status, SagaStatus::Completed, "{timeline:#?}");
    assert_eq!(timeline.steps.len(), 2, "{timeline:#?}");
    assert!(
        timeline
            .steps
            .iter()
            .all(|step| step.state == StepState::Succeeded)
    );
}

async fn declined<S: Shop>(shop: S, group: &str) {
    let bus = InMemoryBus::new();
    let flow = shop.flow();
    let (correlation, events, first) = run_flow("bad", &shop, &flow, &bus, group).await;
    assert_eq!(shop.effects().await, ["reserve", "release"]);
    assert_eq!(
        flow.handle(shop.inbox(), &first).await.expect("redelivery"),
        0,
        "a redelivered event runs no handler"
    );
    assert_eq!(shop.effects().await, ["reserve", "release"]);

    assert_declined(&flow.timeline(correlation, &events));

    // The log recorded each handler run with the inbox entry (once, despite the redelivery)
    // and rebuilds the same story without the events or the choreography's code.
    let log = ChoreographyLog::new(shop.pool()).await.expect("log");
    let entries = log.entries(correlation).await.expect("entries");
    let runs: Vec<_> = entries
        .iter()
        .map(|entry| {
            (
                entry.event_type.as_str(),
                entry.step.as_str(),
                entry.compensating,
                entry.outcome.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        runs,
        [
            (
                "order.placed",
                "reserve-stock",
                false,
                Some("stock.reserved")
            ),
            ("stock.reserved", "charge", false, Some("payment.failed")),
            (
                "payment.failed",
                "reserve-stock",
                true,
                Some("stock.released")
            ),
        ]
    );
    assert_eq!(entries[1].error.as_deref(), Some("card declined"));
    let timeline = log.timeline(correlation).await.expect("timeline");
    assert_declined(&timeline);
    assert_eq!(timeline.id.to_string(), correlation.to_string());
}

async fn charged<S: Shop>(shop: S, group: &str) {
    let bus = InMemoryBus::new();
    let flow = shop.flow();
    let (correlation, events, _) = run_flow("good", &shop, &flow, &bus, group).await;
    assert_eq!(shop.effects().await, ["reserve"]);
    assert_completed(&flow.timeline(correlation, &events));
    // Events of other flows are ignored.
    let other = flow.timeline(Uuid::now_v7(), &events);
    assert_eq!(other.status, SagaStatus::Running);
    assert!(
        other
            .steps
            .iter()
            .all(|step| step.state == StepState::Pending)
    );

    let log = ChoreographyLog::new(shop.pool()).await.expect("log");
    assert_completed(&log.timeline(correlation).await.expect("timeline"));
    let unknown = Uuid::now_v7();
    assert!(matches!(
        log.timeline(unknown).await,
        Err(SagaError::NotFound(id)) if id.to_string() == unknown.to_string()
    ));

    // The inspector's HTTP endpoint serves the same timeline.
    let router = trellis_saga::http::choreography_router(log);
    let (status, body) = get(&router, &format!("/choreographies/{correlation}")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "completed", "{body}");
    assert_eq!(body["steps"][1]["step"], "charge", "{body}");
    let (status, body) = get(&router, &format!("/choreographies/{unknown}")).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "choreography_not_found", "{body}");
    let (status, body) = get(&router, "/choreographies/not-a-uuid").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "bad_request", "{body}");
}

async fn get(router: &axum::Router, path: &str) -> (u16, serde_json::Value) {
    let request = axum::http::Request::builder()
        .uri(path)
        .body(axum::body::Body::empty())
        .expect("request");
    let response = router.clone().oneshot(request).await.expect("infallible");
    let status = response.status().as_u16();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, serde_json::from_slice(&bytes).expect("JSON body"))
}

#[tokio::test]
async fn a_declined_payment_releases_the_stock_once_and_the_timeline_shows_it() {
    // Goal: the failure event triggers the compensating handler; a redelivered trigger runs
    // nothing; the timeline, rebuilt from the events and from the log, reads: reserve-stock
    // compensated, charge failed, Failed.
    declined(SqliteShop::new().await, "shop-declined").await;
}

#[tokio::test]
async fn a_declined_payment_releases_the_stock_once_on_postgres() {
    // Goal: the same, with the PostgreSQL inbox, outbox and log.
    let Some(shop) = PgShop::new("saga_choreography_declined").await else {
        return;
    };
    declined(shop, "shop-declined").await;
}

#[tokio::test]
async fn a_charged_order_completes_and_the_timeline_shows_every_step_succeeded() {
    // Goal: the happy path: each handler's event triggers the next; the timeline completes,
    // from the events, the log and the HTTP endpoint.
    charged(SqliteShop::new().await, "shop-charged").await;
}

#[tokio::test]
async fn a_charged_order_completes_on_postgres() {
    // Goal: the same, with the PostgreSQL inbox, outbox and log.
    let Some(shop) = PgShop::new("saga_choreography_charged").await else {
        return;
    };
    charged(shop, "shop-charged").await;
}

/// A step whose work ran before the transaction: its outcome reaches the effect, the event
/// goes out once however often the trigger is delivered, and the outcome header stays on the
/// trigger, never on the emitted event.
#[tokio::test]
async fn a_prepared_outcome_reaches_the_effect_and_its_event_goes_out_once() {
    use trellis_saga::choreography::{PREPARED_HEADER, prepared};
    let shop = SqliteShop::new().await;
    let flow = Choreography::<Sqlite>::new("prepared-flow", "shop").step(
        "order.placed",
        "charge",
        |_tx, event| {
            Box::pin(async move {
                let outcome = prepared(event).unwrap_or_default();
                let kind = if outcome["captured"] == true {
                    "payment.completed"
                } else {
                    "payment.failed"
                };
                Ok(Some(NextEvent::new("shop.events", kind, outcome)))
            })
        },
    );
    let bus = InMemoryBus::new();
    let mut subscription = bus
        .subscribe("shop.events", "observer", SubscribeOptions::default())
        .await
        .expect("subscribe");
    let placed = Envelope::new("order.placed", "orders", "o-1", serde_json::json!({}));
    let message = Message {
        topic: "shop.orders".to_owned(),
        group: "payments".to_owned(),
        envelope: placed,
    };
    let outcome = serde_json::json!({ "captured": true, "payment_id": "p-1" });
    assert_eq!(
        flow.handle_prepared(&shop.inbox, &message, &outcome)
            .await
            .expect("handle"),
        1
    );
    // Delivered again (the work before it answered the same): nothing more goes out.
    assert_eq!(
        flow.handle_prepared(&shop.inbox, &message, &outcome)
            .await
            .expect("handle"),
        0
    );
    assert_eq!(shop.relay(&bus).await, 1);
    let deliveries = subscription
        .fetch(10, Duration::from_millis(100))
        .await
        .expect("fetch");
    assert_eq!(deliveries.len(), 1);
    let event = deliveries[0].envelope();
    assert_eq!(event.kind, "payment.completed");
    assert_eq!(event.data, outcome);
    assert_eq!(event.causation_id, Some(message.envelope.id));
    assert!(!event.headers.contains_key(PREPARED_HEADER), "{event:?}");
    // Without a prepared outcome the effect sees none.
    assert_eq!(prepared(&message.envelope), None);
}

/// `stock.reserve`, written once for both databases: inserts a `reserve` effect row in the
/// inbox's transaction through [`ChoreographyDb::tx`], then fails (a transient error: the
/// process "crashing" before the inbox record commits) while `crash` is set, clearing it.
fn local_flow<D: ChoreographyDb>(crash: Arc<AtomicBool>) -> Choreography<D> {
    Choreography::<D>::new("local-flow", "shop").step(
        "order.placed",
        "reserve-stock",
        move |connection, event| {
            let tx = D::tx(connection);
            let crash = crash.clone();
            Box::pin(async move {
                on_tx!(tx, |connection| {
                    sqlx::query("INSERT INTO effects (kind, subject) VALUES ('reserve', $1)")
                        .bind(&event.subject)
                        .execute(&mut *connection)
                        .await?
                        .rows_affected()
                });
                if crash.swap(false, AtomicOrdering::SeqCst) {
                    return Err(HandlerError::transient("crash", "after the effect"));
                }
                Ok(Some(NextEvent::new(
                    "shop.events",
                    "stock.reserved",
                    serde_json::json!({}),
                )))
            })
        },
    )
}

/// A local effect crashes after its write and before the inbox record commits, then the
/// trigger is delivered twice more: the crashed run leaves no effect, no event and no log
/// entry; the next applies everything once; the last is a duplicate.
async fn local_effect_commits_with_its_inbox_record<S: Shop>(shop: S) {
    let crash = Arc::new(AtomicBool::new(true));
    let flow = local_flow::<S::Db>(crash.clone());
    let placed = Envelope::new("order.placed", "orders", "o-1", serde_json::json!({}));
    let message = Message {
        topic: "shop.orders".to_owned(),
        group: "inventory".to_owned(),
        envelope: placed.clone(),
    };
    let bus = InMemoryBus::new();
    let error = flow
        .handle(shop.inbox(), &message)
        .await
        .expect_err("the injected crash");
    assert!(error.is_retryable(), "{error}");
    assert!(!crash.load(AtomicOrdering::SeqCst), "the effect ran first");
    assert!(shop.effects().await.is_empty(), "the effect rolled back");
    assert_eq!(shop.relay(&bus).await, 0, "no event left the crashed run");
    let log = ChoreographyLog::<S::Db>::new(shop.pool())
        .await
        .expect("log");
    assert!(log.entries(placed.id).await.expect("entries").is_empty());

    assert_eq!(
        flow.handle(shop.inbox(), &message)
            .await
            .expect("redelivery"),
        1
    );
    assert_eq!(
        flow.handle(shop.inbox(), &message)
            .await
            .expect("duplicate"),
        0
    );
    assert_eq!(shop.effects().await, ["reserve"]);
    assert_eq!(shop.relay(&bus).await, 1);
    assert_eq!(log.entries(placed.id).await.expect("entries").len(), 1);
}

#[tokio::test]
async fn a_local_effect_and_its_inbox_record_commit_together() {
    // Goal: an effect on the service's own tables is exactly once by transaction; method: a
    // handler written once for both databases, crashing once after its write, on SQLite.
    local_effect_commits_with_its_inbox_record(SqliteShop::new().await).await;
}

#[tokio::test]
async fn a_local_effect_and_its_inbox_record_commit_together_on_postgres() {
    // Goal: the same handler code holds the same guarantee on PostgreSQL; method: as above,
    // on a fresh database from the testkit.
    let Some(shop) = PgShop::new("saga_choreography_local").await else {
        return;
    };
    local_effect_commits_with_its_inbox_record(shop).await;
}
