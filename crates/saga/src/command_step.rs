//! Asynchronous steps over `trellis-bus`: a step publishes a command and waits for the reply
//! event correlated with it, under the step's timeout.
//!
//! - [`Replies`] subscribes once to the reply topics (`payments.events`, say) and hands each
//!   reply to the step waiting for it, matched by the reply's `correlation_id` (the saga id)
//!   and its [`STEP_HEADER`] (the step's name).
//! - [`command_step`] builds a [`Step`] whose `execute` registers a waiter, publishes the
//!   command (correlation id, step and idempotency-key headers set), waits for the reply and
//!   applies it to the context. A reply whose type ends in `.failed` fails the step
//!   permanently with the reply's `error` field; no reply within the step's timeout is a
//!   retryable failure, so the step's retry policy publishes the command again.
//! - A participant answers with [`reply_to`], which copies the correlation and the step
//!   header. It keys its effect by the [`IDEMPOTENCY_HEADER`] (the same for every attempt and
//!   every recovery of the step) and answers every command, duplicates included: a retried or
//!   recovered step publishes the command again and waits for an answer.
//!
//! Replies that arrive with no step waiting (late ones, or for another engine sharing the
//! reply group) are kept, at most [`UNCLAIMED_REPLIES_MAX`], so a step that registers after its
//! reply arrived still gets it. Every engine should listen with its own consumer group so each
//! sees every reply.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use tokio::sync::oneshot;
use trellis_bus::{Bus, BusError, Envelope, Message, SubscribeOptions};
use uuid::Uuid;

use crate::definition::{SagaContext, Step, StepContext, StepError};

/// The header naming the saga step a command (and its reply) belongs to.
pub const STEP_HEADER: &str = "trellis-saga-step";
/// The header carrying the step's idempotency key (`{saga_id}:{step}`).
pub const IDEMPOTENCY_HEADER: &str = "trellis-idempotency-key";
/// The most replies kept while no step waits for them; the oldest go first.
pub const UNCLAIMED_REPLIES_MAX: usize = 1_024;
/// The `source` of the commands saga steps publish.
pub const COMMAND_SOURCE: &str = "trellis-saga";

type Key = (Uuid, String);

#[derive(Debug, Default)]
struct Routing {
    waiters: HashMap<Key, oneshot::Sender<Envelope>>,
    unclaimed: HashMap<Key, Envelope>,
    arrival: VecDeque<Key>,
}

/// Aborts the reply listener when the last [`Replies`] handle is dropped.
#[derive(Debug)]
struct Listener(tokio::task::JoinHandle<()>);

impl Drop for Listener {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Routes reply events to the steps waiting for them. Cheap to clone; the listener task stops
/// when the last clone is dropped.
#[derive(Clone)]
pub struct Replies {
    routing: Arc<Mutex<Routing>>,
    _listener: Arc<Listener>,
}

impl fmt::Debug for Replies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let routing = self.lock();
        f.debug_struct("Replies")
            .field("waiting", &routing.waiters.len())
            .field("unclaimed", &routing.unclaimed.len())
            .finish()
    }
}

impl Replies {
    /// Subscribes consumer group `group` to the reply topics `pattern` matches and starts
    /// routing replies (on the current tokio runtime).
    ///
    /// # Errors
    /// The bus's subscribe errors.
    pub async fn listen<B: Bus>(bus: &B, pattern: &str, group: &str) -> Result<Self, BusError> {
        let subscription = bus
            .subscribe(pattern, group, SubscribeOptions::default().with_unordered())
            .await?;
        let routing = Arc::new(Mutex::new(Routing::default()));
        let routed = routing.clone();
        let group = group.to_owned();
        let listener = tokio::spawn(async move {
            let handler = move |message: Arc<Message>| {
                let routed = routed.clone();
                async move {
                    route(&routed, &message.envelope);
                    Ok(())
                }
            };
            if let Err(error) = subscription.run(handler, std::future::pending()).await {
                tracing::error!(%error, %group, "saga reply listener stopped");
            }
        });
        Ok(Self {
            routing,
            _listener: Arc::new(Listener(listener)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Routing> {
        lock(&self.routing)
    }

    /// Registers interest in the reply to `(saga, step)`; the returned future resolves with it.
    /// Register before publishing the command, so a fast reply is not missed.
    pub fn wait(&self, saga: Uuid, step: &str) -> Reply {
        let key = (saga, step.to_owned());
        let (sender, receiver) = oneshot::channel();
        let mut routing = self.lock();
        if let Some(envelope) = routing.unclaimed.remove(&key) {
            routing.arrival.retain(|waiting| *waiting != key);
            let _ = sender.send(envelope);
        } else {
            routing.waiters.insert(key.clone(), sender);
        }
        Reply {
            receiver,
            key,
            routing: self.routing.clone(),
        }
    }
}

fn lock(routing: &Mutex<Routing>) -> MutexGuard<'_, Routing> {
    // Every change under the lock is a single insert or removal: a panic cannot leave it torn.
    routing
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn route(routing: &Mutex<Routing>, envelope: &Envelope) {
    let (Some(saga), Some(step)) = (envelope.correlation_id, envelope.headers.get(STEP_HEADER))
    else {
        tracing::debug!(id = %envelope.id, kind = %envelope.kind, "not a saga reply; ignored");
        return;
    };
    let key = (saga, step.clone());
    let mut routing = lock(routing);
    if let Some(waiter) = routing.waiters.remove(&key)
        && waiter.send(envelope.clone()).is_ok()
    {
        return;
    }
    if routing
        .unclaimed
        .insert(key.clone(), envelope.clone())
        .is_none()
    {
        routing.arrival.push_back(key);
    }
    while routing.arrival.len() > UNCLAIMED_REPLIES_MAX {
        if let Some(oldest) = routing.arrival.pop_front() {
            routing.unclaimed.remove(&oldest);
        }
    }
}

/// The reply a step waits for; dropping it (the step timed out) withdraws the interest.
#[derive(Debug)]
pub struct Reply {
    receiver: oneshot::Receiver<Envelope>,
    key: Key,
    routing: Arc<Mutex<Routing>>,
}

impl Future for Reply {
    type Output = Result<Envelope, StepError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.receiver).poll(cx).map(|received| {
            received.map_err(|_| StepError::retryable("the saga reply listener stopped"))
        })
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        // Closed, this waiter's sender reports so; a newer waiter for the same step does not.
        self.receiver.close();
        let mut routing = lock(&self.routing);
        if routing
            .waiters
            .get(&self.key)
            .is_some_and(oneshot::Sender::is_closed)
        {
            routing.waiters.remove(&self.key);
        }
    }
}

/// A reply to `command`: same subject and correlation, caused by it, carrying its step header.
pub fn reply_to(
    command: &Envelope,
    kind: impl Into<String>,
    source: impl Into<String>,
    data: serde_json::Value,
) -> Envelope {
    let mut reply = Envelope::new(kind, source, command.subject.clone(), data);
    reply.correlation_id = command.correlation_id;
    reply.causation_id = Some(command.id);
    if let Some(step) = command.headers.get(STEP_HEADER) {
        reply.headers.insert(STEP_HEADER.to_owned(), step.clone());
    }
    reply
}

/// A step that publishes a command on `topic` and waits for its reply.
///
/// `command` builds the command's type and data from the context; `on_reply` applies a
/// successful reply to the context (its error fails the step). Set the wait with
/// [`Step::timeout`] and the republishing with [`Step::retry`]; add an undo with
/// [`Step::compensate`] (for example another `publish` and wait).
pub fn command_step<C, B, F, R>(
    name: impl Into<String>,
    bus: Arc<B>,
    replies: Replies,
    topic: impl Into<String>,
    command: F,
    on_reply: R,
) -> Step<C>
where
    C: SagaContext,
    B: Bus + 'static,
    F: Fn(&C, &StepContext) -> (String, serde_json::Value) + Send + Sync + 'static,
    R: Fn(&mut C, &Envelope) -> Result<(), StepError> + Send + Sync + 'static,
{
    let topic: Arc<str> = topic.into().into();
    let on_reply = Arc::new(on_reply);
    Step::new(name, move |context: &mut C, step: StepContext| {
        let (kind, data) = command(context, &step);
        let (bus, replies, topic, on_reply) = (
            bus.clone(),
            replies.clone(),
            topic.clone(),
            on_reply.clone(),
        );
        Box::pin(async move {
            let saga = step.saga_id().as_uuid();
            let reply = replies.wait(saga, step.step());
            let mut envelope = Envelope::new(kind, COMMAND_SOURCE, saga.to_string(), data);
            envelope.correlation_id = Some(saga);
            envelope
                .headers
                .insert(STEP_HEADER.to_owned(), step.step().to_owned());
            envelope
                .headers
                .insert(IDEMPOTENCY_HEADER.to_owned(), step.idempotency_key());
            bus.publish(&topic, envelope).await.map_err(|error| {
                let message = format!("publishing the command failed: {error}");
                if error.is_retryable() {
                    StepError::retryable(message)
                } else {
                    StepError::permanent(message)
                }
            })?;
            let reply = reply.await?;
            if reply.kind.ends_with(".failed") {
                let reason = reply.data["error"]
                    .as_str()
                    .map_or_else(|| reply.kind.clone(), str::to_owned);
                return Err(StepError::permanent(reason));
            }
            on_reply(context, &reply)
        })
    })
}
