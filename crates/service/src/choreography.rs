//! A service's part in a choreographed saga: consume the bus, act, emit the next event.
//!
//! A [`Participant`] names its consumer group, declares its handlers as a
//! [`trellis_saga::choreography::Choreography`] on either engine (one generic method), and
//! decides in [`Participant::prepare`] whether a delivery is for it, doing there any work
//! that cannot run in the database transaction. [`start`] wires the rest on the service's
//! own [`Db`]:
//!
//! - one subscription for the group to the topics its handlers act on
//!   ([`Participant::topics`], a bus pattern list), in per-subject order across all of them,
//!   so one order's events reach the service one at a time and in order, and the flow's
//!   other events do not reach it at all (a group of an older release, subscribed to every
//!   topic, `>`, has its list replaced);
//! - for each delivery: `prepare`, then [`Choreography::handle_prepared`], which runs the
//!   handlers' effects and commits their writes, the inbox record, the log entry and the next
//!   event (in the outbox) in one transaction;
//! - the outbox relay to the bus, and an hourly purge of inbox records older than
//!   [`INBOX_RETENTION`].
//!
//! # Local and remote effects: what holds where
//!
//! - **Local effect** (a write to the service's own database): exactly once by transaction.
//!   `prepare` only says the delivery is for the service ([`local`]); the handler's effect
//!   does the work on the connection it gets, inside the inbox's transaction, written once
//!   for both engines with [`ChoreographyDb::tx`] and [`on_tx!`](crate::choreography::on_tx). A failure
//!   or a crash before the commit rolls the work back with the inbox record, and the
//!   redelivery does it again from the state as it was; after the commit a redelivery is a
//!   duplicate and does nothing. The work needs no idempotency of its own.
//! - **Remote effect** (a call to another service or a provider, such as payments calling
//!   the payment provider, which must not hold a SQLite write lock): `prepare` makes the
//!   call, with the order id as the key the remote side deduplicates on, and returns its
//!   outcome; the effect reads it with [`prepared`] ([`emit_prepared`] emits what [`next`]
//!   built). The call is at least once: a process that stops between the call and the commit
//!   repeats it on redelivery, and only the remote side's deduplication keeps its effect to
//!   one. The outcome, the log entry and the next event are recorded exactly once.
//!
//! Work on the service's own tables that runs in `prepare` through code opening its own
//! transactions would be in the second case (at least once, kept to one only by its own
//! idempotency, not atomic with the inbox record): keep such work in the effects. The shop's
//! inventory and shipping participants do all their work there; payments calls the provider
//! in `prepare`.
//!
//! # Example
//! ```no_run
//! use std::sync::Arc;
//! use trellis_service::Db;
//! use trellis_service::choreography::{
//!     AnyBus, Choreography, ChoreographyDb, Message, NextEvent, Participant, PrepareFuture,
//!     prepared,
//! };
//!
//! struct Shipping;
//!
//! fn flow<D: ChoreographyDb>() -> Choreography<D> {
//!     Choreography::new("place-order", "shop.shipping").step(
//!         "order.shipping_started",
//!         "shipping",
//!         |_tx, trigger| {
//!             Box::pin(async move {
//!                 let state = prepared(trigger).unwrap_or_default();
//!                 Ok(Some(NextEvent::new("shipment.created", "shipment.created", state)))
//!             })
//!         },
//!     )
//! }
//!
//! impl Participant for Shipping {
//!     fn group(&self) -> &str {
//!         "shipping"
//!     }
//!     fn choreography<D: ChoreographyDb>(&self) -> Choreography<D> {
//!         flow()
//!     }
//!     fn prepare<'a>(&'a self, message: &'a Message) -> PrepareFuture<'a> {
//!         Box::pin(async move {
//!             if message.envelope.kind != "order.shipping_started" {
//!                 return Ok(None);
//!             }
//!             // ... create the shipment, idempotent by order id ...
//!             Ok(Some(serde_json::json!({ "state": "created" })))
//!         })
//!     }
//! }
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let db = Db::connect("sqlite://trellis-data/shipping.db").await?;
//! let bus = AnyBus::connect("sqlite://trellis-data/bus.db", "shop").await?;
//! let (stop, stopped) = tokio::sync::watch::channel(false);
//! let tasks = trellis_service::choreography::start(&db, bus, Arc::new(Shipping), stopped).await?;
//! // ... serve ...
//! let _ = stop.send(true);
//! for task in tasks {
//!     let _ = task.await;
//! }
//! # Ok(()) }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use trellis_bus::inbox::{PgInbox, SqliteInbox};
use trellis_bus::outbox::{PgOutbox, SqliteOutbox};
use trellis_bus::{Bus, BusError, RetryPolicy, SubscribeOptions};
use trellis_saga::SagaError;
use trellis_telemetry::service::ServiceScopeExt as _;

pub use trellis_bus::{AnyBus, Envelope, HandlerError, Message};
pub use trellis_saga::choreography::{
    Choreography, ChoreographyDb, EffectFuture, NextEvent, Postgres, Sqlite, Tx, prepared,
};
/// Writes a local effect's SQL once for both engines (re-exported from trellis-saga).
pub use trellis_saga::on_tx;

/// What [`Participant::prepare`] returns for a delivery whose work is all local: nothing to
/// do before the transaction (the outcome is `null`); the handlers' effects do the work in
/// the inbox's transaction.
pub fn local() -> serde_json::Value {
    serde_json::Value::Null
}

/// The effect most participants need: emit the event [`Participant::prepare`] decided,
/// given to it as [`next`] built (`{"kind", "data"}`, published on the topic named like the
/// kind); a `null` outcome emits nothing.
pub fn emit_prepared<'t, C>(_tx: &'t mut C, trigger: &'t Envelope) -> EffectFuture<'t> {
    let next = prepared(trigger).and_then(|outcome| {
        let kind = outcome.get("kind")?.as_str()?.to_owned();
        let data = outcome.get("data").cloned().unwrap_or_default();
        Some(NextEvent::new(kind.clone(), kind, data))
    });
    Box::pin(async move { Ok(next) })
}

/// The outcome telling [`emit_prepared`] to emit event `kind` with `data`.
///
/// # Errors
/// `data` does not serialize (a permanent handler error).
pub fn next(kind: &str, data: impl serde::Serialize) -> Result<serde_json::Value, HandlerError> {
    let data = serde_json::to_value(data)
        .map_err(|e| HandlerError::permanent("serialize", format!("{kind}: {e}")))?;
    Ok(serde_json::json!({ "kind": kind, "data": data }))
}

use crate::Db;

/// How long inbox records are kept: a redelivery older than this is not recognised, so it is
/// above the bus's default retention (7 days).
pub const INBOX_RETENTION: Duration = Duration::from_secs(8 * 24 * 3600);
/// Time between two inbox purges.
pub const PURGE_INTERVAL: Duration = Duration::from_secs(3600);
/// Deliveries of one message before it goes to the dead-letter queue (backoff from 200 ms
/// doubling to 30 s between them: about four minutes in all).
pub const DELIVERIES_MAX: u32 = 12;

/// What [`Participant::prepare`] returns.
pub type PrepareFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Option<serde_json::Value>, HandlerError>> + Send + 'a>>;

/// A service taking part in a choreographed saga.
pub trait Participant: Send + Sync + 'static {
    /// The consumer group: the service's name.
    fn group(&self) -> &str;

    /// The handlers, on either engine (`Sqlite` or `Postgres`): one generic function. An
    /// effect either does local work on the connection it gets, in the inbox's transaction
    /// (take it as a [`Tx`] with [`ChoreographyDb::tx`] and write the SQL with
    /// [`on_tx!`](crate::choreography::on_tx)), or only turns `prepare`'s outcome into the next event, as
    /// [`emit_prepared`] does. An effect's error rolls back its writes with the inbox record.
    fn choreography<D: ChoreographyDb>(&self) -> Choreography<D>;

    /// Decides whether `message` is for this service, and does the work that cannot run in
    /// the transaction: a remote call, idempotent by the order id at the remote side. Its
    /// outcome reaches the handlers' effects through [`prepared`]; return [`local`] when the
    /// effects do all the work. `Ok(None)`: the message is not for this service
    /// (acknowledged, nothing recorded). A retryable error has the bus deliver it again with
    /// backoff, up to [`DELIVERIES_MAX`] times, then dead-letters it.
    fn prepare<'a>(&'a self, message: &'a Message) -> PrepareFuture<'a>;

    /// The topics the group subscribes to (a bus pattern list): by default those named like
    /// the event types the handlers run on ([`Choreography::events`]), as the shop publishes
    /// each event on the topic named like its type. Override it when events travel on other
    /// topics. An empty list subscribes to nothing useful: return at least one topic.
    fn topics(&self) -> Vec<String> {
        self.choreography::<Sqlite>()
            .events()
            .into_iter()
            .map(str::to_owned)
            .collect()
    }
}

/// Why a participant could not start.
#[derive(Debug, thiserror::Error)]
pub enum ChoreographyError {
    /// The inbox, outbox or subscription could not be set up.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The choreography log's tables could not be created.
    #[error(transparent)]
    Saga(#[from] SagaError),
}

impl ChoreographyError {
    /// Whether starting again may work: the bus's or the saga log's own judgement of its
    /// fault (a broker or database that did not answer, not a bad configuration).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Bus(e) => e.is_retryable(),
            Self::Saga(e) => e.is_retryable(),
        }
    }
}

/// Starts `participant` on its own database `db` and `bus`: the consumer, the outbox relay
/// and the inbox purge, until `stop` turns `true`. Await the returned tasks after that to
/// let the deliveries in flight finish.
///
/// # Errors
/// [`ChoreographyError`] when the tables or the subscription cannot be set up.
pub async fn start<P: Participant>(
    db: &Db,
    bus: AnyBus,
    participant: Arc<P>,
    stop: watch::Receiver<bool>,
) -> Result<Vec<JoinHandle<()>>, ChoreographyError> {
    let options = SubscribeOptions::default()
        .with_retry(RetryPolicy::new(DELIVERIES_MAX)?)
        .replacing_patterns();
    let topics = participant.topics().join(",");
    let subscription = bus.subscribe(&topics, participant.group(), options).await?;
    let mut tasks = Vec::new();
    // The same wiring on each engine, with its own inbox, outbox and log types.
    macro_rules! wire {
        ($engine:ty, $pool:expr, $inbox:ty, $outbox:ty) => {{
            trellis_saga::choreography::ChoreographyLog::<$engine>::new($pool.clone()).await?;
            let inbox = Arc::new(<$inbox>::new($pool.clone()).await?);
            let outbox = <$outbox>::new($pool.clone()).await?;
            let flow = Arc::new(participant.choreography::<$engine>());
            tasks.push(consume(
                subscription,
                flow,
                inbox.clone(),
                participant,
                &stop,
            ));
            let relay_stop = stopped(&stop);
            tasks.push(tokio::spawn(
                async move {
                    outbox.run(&bus, relay_stop).await;
                }
                .in_current_service(),
            ));
            tasks.push(purge(
                move || {
                    let inbox = inbox.clone();
                    async move { inbox.purge_older_than(INBOX_RETENTION).await }
                },
                &stop,
            ));
        }};
    }
    match db {
        Db::Sqlite(pool) => wire!(Sqlite, pool, SqliteInbox, SqliteOutbox),
        Db::Postgres(pool) => wire!(Postgres, pool, PgInbox, PgOutbox),
    }
    Ok(tasks)
}

/// Resolves when `stop` turns `true` (or its sender is gone).
fn stopped(stop: &watch::Receiver<bool>) -> impl Future<Output = ()> + Send + 'static {
    let mut stop = stop.clone();
    async move {
        let _ = stop.wait_for(|s| *s).await;
    }
}

fn consume<D, P>(
    subscription: trellis_bus::Subscription,
    flow: Arc<Choreography<D>>,
    inbox: Arc<D::Inbox>,
    participant: Arc<P>,
    stop: &watch::Receiver<bool>,
) -> JoinHandle<()>
where
    D: ChoreographyDb,
    P: Participant,
{
    let shutdown = stopped(stop);
    let group = participant.group().to_owned();
    // The consumer's spans are this service's (in `trellis up` every service shares the
    // process): the task keeps the scope of whoever started the participant.
    tokio::spawn(
        async move {
            let handler = move |message: Arc<Message>| {
                let flow = flow.clone();
                let inbox = inbox.clone();
                let participant = participant.clone();
                async move { deliver(&flow, &inbox, &*participant, &message).await }
            };
            if let Err(error) = subscription.run(handler, shutdown).await {
                tracing::error!(%error, group, "choreography consumer stopped");
            }
        }
        .in_current_service(),
    )
}

/// One delivery: `prepare`, then the handlers in the inbox's transaction with its outcome.
async fn deliver<D, P>(
    flow: &Choreography<D>,
    inbox: &D::Inbox,
    participant: &P,
    message: &Message,
) -> Result<(), HandlerError>
where
    D: ChoreographyDb,
    P: Participant,
{
    match participant.prepare(message).await? {
        None => Ok(()),
        Some(outcome) => flow
            .handle_prepared(inbox, message, &outcome)
            .await
            .map(drop),
    }
}

fn purge<F, Fut>(run: F, stop: &watch::Receiver<bool>) -> JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = Result<u64, BusError>> + Send,
{
    let shutdown = stopped(stop);
    tokio::spawn(async move {
        tokio::pin!(shutdown);
        let mut ticks = tokio::time::interval(PURGE_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                _ = ticks.tick() => {
                    if let Err(error) = run().await {
                        tracing::warn!(%error, "inbox purge failed; next try in an hour");
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_bus_that_did_not_answer_is_retryable_and_a_bad_configuration_is_not() {
        use super::ChoreographyError;
        let down = ChoreographyError::Bus(trellis_bus::BusError::Unavailable("down".to_owned()));
        let wrong = ChoreographyError::Bus(trellis_bus::BusError::InvalidConfig("bad".to_owned()));
        assert!(down.is_retryable());
        assert!(!wrong.is_retryable());
    }
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use trellis_bus::InMemoryBus;
    use trellis_bus::inbox::SqliteInbox;
    use trellis_bus::outbox::SqliteOutbox;
    use trellis_saga::choreography::ChoreographyLog;

    use super::{
        Choreography, ChoreographyDb, Envelope, HandlerError, Message, NextEvent, Participant,
        PrepareFuture, Sqlite, deliver, local, on_tx,
    };
    use crate::Db;

    /// Holds stock for `order.created` by adding a row to its own `holds` table (not
    /// idempotent by itself: a second run adds a second row), in the inbox's transaction;
    /// while `crash` is set the effect fails once after its write.
    struct Holds {
        crash: Arc<AtomicBool>,
    }

    impl Participant for Holds {
        fn group(&self) -> &str {
            "inventory"
        }

        fn choreography<D: ChoreographyDb>(&self) -> Choreography<D> {
            let crash = self.crash.clone();
            Choreography::new("place-order", "shop.inventory").step(
                "order.created",
                "inventory",
                move |connection, trigger| {
                    let tx = D::tx(connection);
                    let crash = crash.clone();
                    Box::pin(async move {
                        on_tx!(tx, |connection| {
                            sqlx::query("INSERT INTO holds (order_id) VALUES ($1)")
                                .bind(&trigger.subject)
                                .execute(&mut *connection)
                                .await?
                                .rows_affected()
                        });
                        if crash.swap(false, Ordering::SeqCst) {
                            return Err(HandlerError::transient("crash", "after the effect"));
                        }
                        Ok(Some(NextEvent::new(
                            "inventory.reserved",
                            "inventory.reserved",
                            serde_json::json!({}),
                        )))
                    })
                },
            )
        }

        fn prepare<'a>(&'a self, message: &'a Message) -> PrepareFuture<'a> {
            Box::pin(async move {
                if message.envelope.kind == "order.created" {
                    Ok(Some(local()))
                } else {
                    Ok(None)
                }
            })
        }
    }

    #[tokio::test]
    async fn a_participants_local_effect_commits_with_its_inbox_record() {
        // Goal: a participant's effect on its own tables is exactly once by transaction;
        // method: the runner's per-delivery path on a SQLite `Db`, the effect failing once
        // after its write, then the trigger delivered twice more.
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::connect(&format!("sqlite://{}/inventory.db", dir.path().display()))
            .await
            .expect("db");
        db.run_schema("CREATE TABLE holds (order_id TEXT NOT NULL)")
            .await
            .expect("schema");
        let Db::Sqlite(pool) = &db else {
            unreachable!("a sqlite:// URL opens SQLite")
        };
        ChoreographyLog::<Sqlite>::new(pool.clone())
            .await
            .expect("log");
        let inbox = SqliteInbox::new(pool.clone()).await.expect("inbox");
        let outbox = SqliteOutbox::new(pool.clone()).await.expect("outbox");
        let crash = Arc::new(AtomicBool::new(true));
        let participant = Holds {
            crash: crash.clone(),
        };
        let flow = participant.choreography::<Sqlite>();
        let message = |kind: &str| Message {
            topic: "orders".to_owned(),
            group: "inventory".to_owned(),
            envelope: Envelope::new(kind, "orders", "o-1", serde_json::json!({})),
        };
        let holds = || async {
            sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM holds")
                .fetch_one(pool)
                .await
                .expect("count")
        };
        let bus = InMemoryBus::new();
        let relayed = || async { outbox.relay_once(&bus, 100).await.expect("relay").published };

        let created = message("order.created");
        let error = deliver(&flow, &inbox, &participant, &created)
            .await
            .expect_err("the injected crash");
        assert!(error.is_retryable(), "{error}");
        assert!(
            !crash.load(Ordering::SeqCst),
            "the effect ran before the crash"
        );
        assert_eq!(
            holds().await,
            0,
            "the effect rolled back with the inbox record"
        );
        assert_eq!(relayed().await, 0);

        deliver(&flow, &inbox, &participant, &created)
            .await
            .expect("redelivery");
        deliver(&flow, &inbox, &participant, &created)
            .await
            .expect("duplicate");
        assert_eq!(holds().await, 1, "applied exactly once");
        assert_eq!(relayed().await, 1);

        // A message the participant does not take part in records nothing.
        deliver(&flow, &inbox, &participant, &message("order.cancelled"))
            .await
            .expect("ignored");
        assert_eq!(holds().await, 1);
    }
}
