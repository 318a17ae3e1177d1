//! A service's part in a choreographed saga: consume the bus, act, emit the next event.
//!
//! A [`Participant`] names its consumer group, declares its handlers as a
//! [`trellis_saga::choreography::Choreography`] on either engine (one generic method) and
//! does the work for each delivery in [`Participant::prepare`]: a call that is
//! idempotent by the order id and opens its own transactions (the service's existing rules),
//! or that leaves the process (a payment provider). [`start`] wires the rest on the service's
//! own [`Db`]:
//!
//! - one subscription to every topic (`>`) for the group, in per-subject order, so one
//!   order's events reach the service one at a time and in order;
//! - for each delivery: `prepare`, then [`Choreography::handle_prepared`], which commits the
//!   inbox record, the log entry and the next event (in the outbox) in one transaction;
//! - the outbox relay to the bus, and an hourly purge of inbox records older than
//!   [`INBOX_RETENTION`].
//!
//! Why the work runs before the transaction instead of inside it: the services' rules
//! (reservations, charges, shipments) already run in their own transactions and are
//! idempotent by order id, and a charge calls an external provider, which must not hold a
//! SQLite write lock. A redelivery repeats the call, which answers its first outcome, and the
//! inbox lets the event out once: effects and events stay exactly once.
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

pub use trellis_bus::{AnyBus, Envelope, HandlerError, Message};
pub use trellis_saga::choreography::{
    Choreography, ChoreographyDb, EffectFuture, NextEvent, Postgres, Sqlite, prepared,
};

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

    /// The handlers, on either engine (`Sqlite` or `Postgres`): one generic function whose
    /// effects do not touch the connection, as [`emit_prepared`] does.
    fn choreography<D: ChoreographyDb>(&self) -> Choreography<D>;

    /// The work for `message` before its inbox transaction, idempotent by the order id; its
    /// outcome reaches the handlers' effects through
    /// [`trellis_saga::choreography::prepared`]. `Ok(None)`: the message is not for this
    /// service (acknowledged, nothing recorded). A retryable error has the bus deliver it
    /// again with backoff, up to [`DELIVERIES_MAX`] times, then dead-letters it.
    fn prepare<'a>(&'a self, message: &'a Message) -> PrepareFuture<'a>;
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
    let options = SubscribeOptions::default().with_retry(RetryPolicy::new(DELIVERIES_MAX)?);
    let subscription = bus.subscribe(">", participant.group(), options).await?;
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
            tasks.push(tokio::spawn(async move {
                outbox.run(&bus, relay_stop).await;
            }));
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
    tokio::spawn(async move {
        let handler = move |message: Arc<Message>| {
            let flow = flow.clone();
            let inbox = inbox.clone();
            let participant = participant.clone();
            async move {
                match participant.prepare(&message).await? {
                    None => Ok(()),
                    Some(outcome) => flow
                        .handle_prepared(&inbox, &message, &outcome)
                        .await
                        .map(drop),
                }
            }
        };
        if let Err(error) = subscription.run(handler, shutdown).await {
            tracing::error!(%error, group, "choreography consumer stopped");
        }
    })
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
