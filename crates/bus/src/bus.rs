//! The `Bus` trait, subscriptions, deliveries and the consumer loop shared by every backend.
//! (Over 600 lines: the contract, the consumer loop every backend runs and their tests read as
//! one.)

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::Instrument;
use trellis_telemetry::service::ServiceScopeExt as _;

use crate::dlq::{DeadLetterReason, Failure};
use crate::envelope::Envelope;
use crate::error::BusError;
use crate::policy::{RETRY_DELAY_MAX, RetryPolicy, SubscribeOptions};
use crate::topic;

/// Most messages one [`Subscription::fetch`] returns.
pub const FETCH_BATCH_MAX: usize = 1_024;
/// Longest wait one [`Subscription::fetch`] accepts.
pub const FETCH_WAIT_MAX: Duration = Duration::from_secs(60);

/// A durable publish/subscribe bus.
///
/// # Contract
/// - [`Bus::publish`] returns once the backend holds the message durably (committed to the
///   SQLite log, acknowledged by the JetStream stream); an error means it may or may not be
///   stored, so publishing again is safe only because consumers deduplicate on the envelope id.
/// - [`Bus::subscribe`] joins consumer group `group` on `pattern`. Every group sees every
///   matching message retained by the backend (including those published before the group's
///   first subscription); consumers of one group compete, and two messages with the same
///   `subject` are never in flight at once within a group, so they are handled in order.
/// - A delivery not settled within the ack wait is redelivered; after the policy's last
///   delivery the message moves to the dead-letter queue. Nothing is dropped silently.
pub trait Bus: Send + Sync {
    /// Publishes `envelope` on `topic` and waits until it is durable.
    ///
    /// When `traceparent` is empty, fills it with a PRODUCER span's (a child of the current
    /// span, see [`produce_span`]).
    ///
    /// # Errors
    /// Bad topic or envelope, [`BusError::MessageTooLarge`] over the configured limit, or a
    /// storage / network fault ([`BusError::is_retryable`]).
    fn publish(
        &self,
        topic: &str,
        envelope: Envelope,
    ) -> impl Future<Output = Result<(), BusError>> + Send;

    /// Joins consumer group `group` on the topics `pattern` matches: a pattern list
    /// ([`crate::topic`]: one pattern or several separated by `,`), per-subject order kept
    /// across all of them. The group keeps its list: joining with another one is a
    /// [`BusError::GroupConflict`] unless [`crate::SubscribeOptions::replacing_patterns`] says to
    /// replace it.
    ///
    /// # Errors
    /// Bad pattern or group, [`BusError::GroupConflict`] when the group exists with another
    /// pattern list, or a storage / network fault.
    fn subscribe(
        &self,
        pattern: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> impl Future<Output = Result<Subscription, BusError>> + Send;
}

/// A delivered message: where it came from and what it carries.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The topic it was published on.
    pub topic: String,
    /// The consumer group it is delivered to.
    pub group: String,
    /// The envelope.
    pub envelope: Envelope,
}

/// Backend-specific handle on one delivery, used to settle it.
#[derive(Debug, Clone, Default)]
pub(crate) struct DeliveryKey {
    /// The backend's sequence of the message (log row, stream sequence).
    pub(crate) sequence: u64,
    /// The lease this delivery holds (SQLite, memory).
    pub(crate) lease: u64,
    /// The JetStream reply subject.
    pub(crate) reply: Option<String>,
    /// NATS: the delivery comes from the group's park lane, not from a partition.
    pub(crate) parked: bool,
    /// NATS: when the message first failed, as its retry copy's headers carry it.
    pub(crate) first_failure: Option<DateTime<Utc>>,
}

/// What a consumer decided about a delivery.
#[derive(Debug, Clone)]
pub(crate) enum Settlement {
    Ack,
    Nack {
        delay: Duration,
        /// The handler failed (a retry), rather than asking for redelivery: a backend keeps
        /// the first such time for the message's dead letter.
        failed: bool,
    },
    DeadLetter(Failure),
}

/// What every backend (and the outbox) does to a message before it stores a publish: checks
/// the topic, fills in the trace context and serializes the envelope within `bytes_max`.
pub(crate) fn prepare_publish(
    topic: &str,
    envelope: &mut Envelope,
    bytes_max: usize,
) -> Result<Vec<u8>, BusError> {
    topic::validate_topic(topic)?;
    if envelope.traceparent.is_none() {
        // A message leaving this process for the first time: its PRODUCER span is the
        // consumers' parent. One that already carries a trace context (relayed from an outbox,
        // replayed from the dead letters) keeps it.
        let _producer = produce_span(topic, envelope);
    }
    envelope.to_bytes_limited(bytes_max)
}

/// Starts the PRODUCER span of publishing `envelope` on `topic` and points the envelope's
/// `traceparent` at it, so the consumers' spans are its children.
///
/// The span is named `<topic> create` with OpenTelemetry's messaging attributes. Its parent is
/// the trace the envelope already carries, else the current span. Every publish through a
/// [`Bus`] calls this for an envelope without a `traceparent`; call it yourself where a message
/// is relayed later than it was made (an outbox reading an event store), with the envelope's
/// `traceparent` set to the context it was made in. Drop the span once the message is handed
/// over.
#[must_use]
pub fn produce_span(topic: &str, envelope: &mut Envelope) -> tracing::Span {
    let span = tracing::info_span!(
        "bus.publish",
        otel.name = %format_args!("{topic} create"),
        otel.kind = "producer",
        messaging.system = "trellis",
        messaging.operation.type = "create",
        messaging.destination.name = %topic,
        messaging.message.id = %envelope.id,
    );
    trellis_telemetry::propagation::set_parent_from_map(&span, &envelope.trace_map());
    if let Some(traceparent) = trellis_telemetry::propagation::traceparent_of(&span) {
        envelope.traceparent = Some(traceparent);
    }
    span
}

/// Counts a publish a backend stored (`trellis_bus_published_total`, by topic).
pub(crate) fn count_published(topic: &str) {
    metrics::counter!("trellis_bus_published_total", "topic" => topic.to_owned()).increment(1);
}

/// What every backend checks before it subscribes a group.
pub(crate) fn validate_subscription(pattern: &str, group: &str) -> Result<(), BusError> {
    topic::validate_pattern_list(pattern)?;
    topic::validate_group(group)
}

/// A fetch that waits: calls `attempt` until it leases deliveries or `wait` has passed.
///
/// `attempt` returns the deliveries it leased and, when none, the earliest time it might
/// find one (a retry delay ending, the next poll of a shared file; `None`: only when
/// `changed` fires). Between attempts the fetch sleeps until then or until `changed` fires,
/// never past the deadline. It registers for `changed` *before* each attempt, so a publish
/// or settlement that lands between an empty attempt and the sleep still wakes it.
pub(crate) async fn fetch_until<F, Fut>(
    changed: &Notify,
    wait: Duration,
    mut attempt: F,
) -> Result<Vec<RawDelivery>, BusError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(Vec<RawDelivery>, Option<Instant>), BusError>>,
{
    let deadline = Instant::now() + wait;
    loop {
        let notified = changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let (deliveries, next_wake) = attempt().await?;
        if !deliveries.is_empty() {
            return Ok(deliveries);
        }
        if Instant::now() >= deadline {
            return Ok(Vec::new());
        }
        let wake = next_wake.map_or(deadline, |at| at.min(deadline));
        tokio::select! {
            () = &mut notified => {}
            () = tokio::time::sleep_until(wake) => {}
        }
    }
}

/// A backend's way to settle deliveries.
pub(crate) trait Settle: Send + Sync + fmt::Debug {
    fn settle(
        &self,
        message: Arc<Message>,
        key: DeliveryKey,
        attempt: u32,
        settlement: Settlement,
    ) -> BoxFuture<'static, Result<(), BusError>>;
}

/// A message as a backend fetched it, before the shared policy sees it.
#[derive(Debug)]
pub(crate) struct RawDelivery {
    pub(crate) topic: String,
    /// The envelope, or the undecodable payload as text.
    pub(crate) envelope: Result<Envelope, String>,
    pub(crate) attempt: u32,
    pub(crate) key: DeliveryKey,
}

/// A backend's fetch side of a subscription.
pub(crate) trait Source: Send + fmt::Debug {
    fn fetch(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<RawDelivery>, BusError>>;
}

/// One consumer's subscription to a group: fetch deliveries, settle each one.
///
/// Dropping the subscription (or a delivery) without settling leaves the messages to be
/// redelivered after the ack wait, exactly as if the process had crashed.
#[derive(Debug)]
pub struct Subscription {
    pub(crate) group: String,
    pub(crate) source: Box<dyn Source>,
    pub(crate) settler: Arc<dyn Settle>,
    pub(crate) options: SubscribeOptions,
    pub(crate) permits: Arc<Semaphore>,
}

impl Subscription {
    pub(crate) fn new(
        group: &str,
        source: Box<dyn Source>,
        settler: Arc<dyn Settle>,
        options: SubscribeOptions,
    ) -> Self {
        let permits = Arc::new(Semaphore::new(options.in_flight_max));
        Self {
            group: group.to_owned(),
            source,
            settler,
            options,
            permits,
        }
    }

    /// The group this subscription consumes for.
    #[must_use]
    pub fn group(&self) -> &str {
        &self.group
    }

    /// How many more deliveries this consumer may hold before fetch waits (backpressure).
    #[must_use]
    pub fn available_in_flight(&self) -> usize {
        self.permits.available_permits()
    }

    /// Waits up to `wait` for deliveries and returns at most `max` of them (empty on timeout).
    ///
    /// Never returns more than the in-flight limit allows: while the consumer holds
    /// `in_flight_max` unsettled deliveries, fetch waits for one to be settled or dropped.
    /// Messages past their last delivery (their consumer crashed or never settled) and
    /// payloads that are not envelopes are moved to the dead-letter queue here and not
    /// returned.
    ///
    /// # Errors
    /// [`BusError::InvalidConfig`] for `max == 0` or `max > FETCH_BATCH_MAX` or `wait` over
    /// [`FETCH_WAIT_MAX`]; storage / network faults.
    pub async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BusError> {
        if !(1..=FETCH_BATCH_MAX).contains(&max) || wait > FETCH_WAIT_MAX {
            return Err(BusError::InvalidConfig(format!(
                "fetch takes 1..={FETCH_BATCH_MAX} messages and waits at most {FETCH_WAIT_MAX:?}"
            )));
        }
        let deadline = tokio::time::Instant::now() + wait;
        let first = match tokio::time::timeout_at(
            deadline,
            Arc::clone(&self.permits).acquire_owned(),
        )
        .await
        {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) => return Err(BusError::Closed),
            Err(_) => return Ok(Vec::new()),
        };
        let extra = self.permits.available_permits().min(max - 1);
        let mut permits = vec![first];
        if extra > 0
            && let Ok(mut many) = Arc::clone(&self.permits).try_acquire_many_owned(extra as u32)
        {
            for _ in 0..extra {
                if let Some(one) = many.split(1) {
                    permits.push(one);
                }
            }
        }
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let raw = self.source.fetch(permits.len(), remaining).await?;
        let mut deliveries = Vec::with_capacity(raw.len());
        for raw in raw {
            let permit = permits
                .pop()
                .expect("the source returns at most as many messages as asked for");
            let policy = &self.options.retry;
            let (envelope, undecodable) = match raw.envelope {
                Ok(envelope) => (envelope, None),
                Err(text) => (undecodable_envelope(&text), Some(text)),
            };
            let delivery = Delivery {
                message: Arc::new(Message {
                    topic: raw.topic,
                    group: self.group.clone(),
                    envelope,
                }),
                attempt: raw.attempt,
                key: raw.key,
                policy: policy.clone(),
                settler: Arc::clone(&self.settler),
                _permit: permit,
            };
            if undecodable.is_some() {
                delivery
                    .poison("the payload is not a trellis envelope")
                    .await?;
            } else if raw.attempt > policy.max_deliveries() {
                let error = format!(
                    "delivery {} of {} was not settled within the ack wait",
                    raw.attempt - 1,
                    policy.max_deliveries()
                );
                let failure = Failure::new(DeadLetterReason::AckTimeout, "ack_timeout", &error);
                delivery.dead_letter(failure).await?;
            } else {
                deliveries.push(delivery);
            }
        }
        count_deliveries(&self.group, &deliveries);
        Ok(deliveries)
    }

    /// Runs `handler` on every delivery until `shutdown` resolves, up to the in-flight limit
    /// concurrently (never two messages of one subject at once), then waits for the handlers
    /// in flight to finish.
    ///
    /// Each handler runs in a `bus.consume` span whose parent is the producer's span (from the
    /// envelope's `traceparent`). `Ok` acks; a retryable [`HandlerError`] follows the retry
    /// policy; a permanent one dead-letters the message as rejected; a decode error as poison.
    ///
    /// # Errors
    /// A fetch fault that is not retryable; retryable ones are logged and retried after a
    /// short pause.
    pub async fn run<F, Fut>(
        mut self,
        handler: F,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), BusError>
    where
        F: Fn(Arc<Message>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        const IDLE_WAIT: Duration = Duration::from_millis(500);
        const FAULT_PAUSE: Duration = Duration::from_millis(200);
        let handler = Arc::new(handler);
        let mut tasks = tokio::task::JoinSet::new();
        tokio::pin!(shutdown);
        let batch = self.options.in_flight_max.min(FETCH_BATCH_MAX);
        let outcome = loop {
            let fetched = tokio::select! {
                () = &mut shutdown => break Ok(()),
                fetched = self.fetch(batch, IDLE_WAIT) => fetched,
            };
            while tasks.try_join_next().is_some() {}
            match fetched {
                Ok(deliveries) => {
                    for delivery in deliveries {
                        let handler = Arc::clone(&handler);
                        // Each delivery keeps the consumer's service scope (trellis up hosts
                        // several services in one process; see trellis_telemetry::service).
                        tasks.spawn(
                            async move {
                                if let Err(error) = delivery.handle_with(&*handler).await {
                                    tracing::warn!(%error, "settling a delivery failed; it will be redelivered");
                                }
                            }
                            .in_current_service(),
                        );
                    }
                }
                Err(error) if error.is_retryable() => {
                    tracing::warn!(%error, "fetch failed; retrying");
                    tokio::time::sleep(FAULT_PAUSE).await;
                }
                Err(error) => break Err(error),
            }
        };
        while tasks.join_next().await.is_some() {}
        outcome
    }
}

/// Counts deliveries handed to a consumer (`trellis_bus_delivered_total`) and records how long
/// each first delivery came after its envelope's time (`trellis_bus_consumer_lag_seconds`):
/// how far behind the publishers the group is. Redeliveries are not lag (their delay is the
/// retry policy's), so only first deliveries are recorded.
fn count_deliveries(group: &str, deliveries: &[Delivery]) {
    if deliveries.is_empty() {
        return;
    }
    metrics::counter!("trellis_bus_delivered_total", "group" => group.to_owned())
        .increment(deliveries.len() as u64);
    let lag = metrics::histogram!("trellis_bus_consumer_lag_seconds", "group" => group.to_owned());
    let now = chrono::Utc::now();
    for delivery in deliveries.iter().filter(|d| d.attempt == 1) {
        let behind = (now - delivery.message.envelope.time)
            .to_std()
            .unwrap_or_default();
        lag.record(behind.as_secs_f64());
    }
}

fn undecodable_envelope(text: &str) -> Envelope {
    Envelope::new(
        "trellis.undecodable",
        "unknown",
        "unknown",
        serde_json::Value::String(crate::dlq::truncate(text, 64 * 1024)),
    )
}

/// Why a handler failed, and whether trying again may help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError {
    kind: String,
    message: String,
    disposition: Disposition,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disposition {
    Retry,
    Reject,
    Poison,
}

impl HandlerError {
    /// A transient failure: the retry policy decides when to try again.
    pub fn transient(kind: impl Into<String>, message: impl fmt::Display) -> Self {
        Self {
            kind: kind.into(),
            message: message.to_string(),
            disposition: Disposition::Retry,
        }
    }

    /// A permanent failure: the message goes to the dead-letter queue as rejected.
    pub fn permanent(kind: impl Into<String>, message: impl fmt::Display) -> Self {
        Self {
            kind: kind.into(),
            message: message.to_string(),
            disposition: Disposition::Reject,
        }
    }

    /// The error kind (the first part of the failure fingerprint).
    #[must_use]
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The error text.
    #[must_use]
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether the retry policy applies.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        self.disposition == Disposition::Retry
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for HandlerError {}

impl From<BusError> for HandlerError {
    /// A decode error is poison; a retryable bus error is transient; others are permanent.
    fn from(error: BusError) -> Self {
        let disposition = match &error {
            BusError::Decode { .. } => Disposition::Poison,
            other if other.is_retryable() => Disposition::Retry,
            _ => Disposition::Reject,
        };
        let kind = match &error {
            BusError::Decode { .. } => "decode",
            BusError::Database(_) => "database",
            BusError::Nats(_) => "nats",
            _ => "bus",
        };
        Self {
            kind: kind.to_owned(),
            message: error.to_string(),
            disposition,
        }
    }
}

/// One delivery of a message to this consumer. Settle it exactly once with
/// [`Delivery::ack`], [`Delivery::nack`], [`Delivery::fail`], [`Delivery::term`] or
/// [`Delivery::poison`]; dropping it unsettled means redelivery after the ack wait.
#[derive(Debug)]
pub struct Delivery {
    message: Arc<Message>,
    attempt: u32,
    key: DeliveryKey,
    policy: RetryPolicy,
    settler: Arc<dyn Settle>,
    _permit: OwnedSemaphorePermit,
}

impl Delivery {
    /// The message.
    #[must_use]
    pub fn message(&self) -> &Arc<Message> {
        &self.message
    }

    /// The envelope.
    #[must_use]
    pub fn envelope(&self) -> &Envelope {
        &self.message.envelope
    }

    /// Which delivery of this message this is, from 1.
    #[must_use]
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Decodes the data; on error, pass the error to [`Delivery::poison`].
    ///
    /// # Errors
    /// [`BusError::Decode`] when the data does not fit `T`.
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, BusError> {
        self.message.envelope.decode()
    }

    /// Confirms the message was handled; it will not be delivered to this group again.
    ///
    /// # Errors
    /// [`BusError::LeaseLost`] when the ack wait had passed and the message went to another
    /// consumer; storage / network faults.
    pub async fn ack(self) -> Result<(), BusError> {
        // The handler is done; the backend does not know yet (dropping `self` here leaves
        // the message to be redelivered after the ack wait, as a crash would).
        failpoint!(crate::failpoints::DELIVERY_BEFORE_ACK, &self.message.group);
        metrics::counter!("trellis_bus_acked_total", "group" => self.message.group.clone())
            .increment(1);
        self.settle(Settlement::Ack).await
    }

    /// Asks for redelivery after `delay` (capped at 24 h); counts as a failed delivery, so the
    /// last allowed delivery goes to the dead-letter queue instead.
    ///
    /// # Errors
    /// As [`Delivery::ack`].
    pub async fn nack(self, delay: Duration) -> Result<(), BusError> {
        if self.attempt >= self.policy.max_deliveries() {
            let failure = Failure::new(
                DeadLetterReason::MaxDeliveries,
                "nack",
                "the consumer asked for redelivery on the last allowed delivery",
            );
            return self.dead_letter(failure).await;
        }
        self.settle(Settlement::Nack {
            delay: delay.min(RETRY_DELAY_MAX),
            failed: false,
        })
        .await
    }

    /// Records a handler failure and applies the retry policy: redelivery after the backoff
    /// delay, or the dead-letter queue after the last delivery.
    ///
    /// # Errors
    /// As [`Delivery::ack`].
    pub async fn fail(self, error: &HandlerError) -> Result<(), BusError> {
        match error.disposition {
            Disposition::Poison => return self.poison(&error.message).await,
            Disposition::Reject => {
                let failure = Failure::new(DeadLetterReason::Rejected, &error.kind, &error.message);
                return self.dead_letter(failure).await;
            }
            Disposition::Retry => {}
        }
        if self.attempt >= self.policy.max_deliveries() {
            let failure =
                Failure::new(DeadLetterReason::MaxDeliveries, &error.kind, &error.message);
            return self.dead_letter(failure).await;
        }
        let delay = self.policy.delay(self.attempt);
        metrics::counter!("trellis_bus_retried_total", "group" => self.message.group.clone())
            .increment(1);
        self.settle(Settlement::Nack {
            delay,
            failed: true,
        })
        .await
    }

    /// Terminates the message: it goes to the dead-letter queue as rejected, with `reason`.
    ///
    /// # Errors
    /// As [`Delivery::ack`].
    pub async fn term(self, reason: &str) -> Result<(), BusError> {
        let failure = Failure::new(DeadLetterReason::Rejected, "terminated", reason);
        self.dead_letter(failure).await
    }

    /// Moves a message whose data does not decode to the dead-letter queue at once.
    ///
    /// # Errors
    /// As [`Delivery::ack`].
    pub async fn poison(self, error: &str) -> Result<(), BusError> {
        let failure = Failure::new(DeadLetterReason::Poison, "decode", error);
        self.dead_letter(failure).await
    }

    pub(crate) async fn dead_letter(self, failure: Failure) -> Result<(), BusError> {
        tracing::warn!(
            message_id = %self.message.envelope.id,
            topic = %self.message.topic,
            group = %self.message.group,
            reason = failure.reason.as_str(),
            attempts = self.attempt,
            error = %failure.error,
            "message dead-lettered"
        );
        metrics::counter!(
            "trellis_bus_dead_lettered_total",
            "group" => self.message.group.clone(), "reason" => failure.reason.as_str()
        )
        .increment(1);
        self.settle(Settlement::DeadLetter(failure)).await
    }

    async fn settle(self, settlement: Settlement) -> Result<(), BusError> {
        let Self {
            message,
            attempt,
            key,
            settler,
            _permit,
            ..
        } = self;
        settler.settle(message, key, attempt, settlement).await
    }

    /// Runs `handler` in a span continuing the producer's trace and settles by its outcome.
    async fn handle_with<F, Fut>(self, handler: &F) -> Result<(), BusError>
    where
        F: Fn(Arc<Message>) -> Fut,
        Fut: Future<Output = Result<(), HandlerError>>,
    {
        let span = consume_span(&self.message, self.attempt);
        let outcome = handler(Arc::clone(&self.message))
            .instrument(span.clone())
            .await;
        async move {
            match outcome {
                Ok(()) => self.ack().await,
                Err(error) => self.fail(&error).await,
            }
        }
        .instrument(span)
        .await
    }
}

/// A `bus.consume` span whose OpenTelemetry parent is the producer's span: kind CONSUMER,
/// named `<topic> process` with OpenTelemetry's messaging attributes, as the messaging
/// conventions describe the processing of one message.
#[must_use]
pub fn consume_span(message: &Message, attempt: u32) -> tracing::Span {
    let span = tracing::info_span!(
        parent: None,
        "bus.consume",
        otel.name = %format_args!("{} process", message.topic),
        otel.kind = "consumer",
        messaging.system = "trellis",
        messaging.operation.type = "process",
        messaging.destination.name = %message.topic,
        messaging.consumer.group.name = %message.group,
        messaging.message.id = %message.envelope.id,
        topic = %message.topic,
        group = %message.group,
        message_id = %message.envelope.id,
        message_type = %message.envelope.kind,
        subject = %message.envelope.subject,
        attempt,
    );
    trellis_telemetry::propagation::set_parent_from_map(&span, &message.envelope.trace_map());
    span
}

/// Milliseconds since the Unix epoch of `time`, for storage.
pub(crate) fn millis(time: DateTime<Utc>) -> i64 {
    time.timestamp_millis()
}

/// `duration` in whole milliseconds, for storage (saturating at `i64::MAX`).
pub(crate) fn duration_millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// The time `millis` milliseconds after the Unix epoch.
pub(crate) fn from_millis(millis: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(millis).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn one_delivery() -> Vec<RawDelivery> {
        vec![RawDelivery {
            topic: "t".to_owned(),
            envelope: Err("x".to_owned()),
            attempt: 1,
            key: DeliveryKey::default(),
        }]
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_fetch_polls_at_the_backends_pace_and_gives_up_at_its_deadline() {
        // An empty backend that asks to be polled every 10 ms, under a 35 ms wait.
        let changed = Notify::new();
        let attempts = AtomicU32::new(0);
        let started = Instant::now();
        let fetched = fetch_until(&changed, Duration::from_millis(35), || {
            attempts.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Ok((
                Vec::new(),
                Some(Instant::now() + Duration::from_millis(10)),
            )))
        })
        .await
        .expect("the attempts do not fail");
        assert!(fetched.is_empty());
        assert_eq!(started.elapsed(), Duration::from_millis(35));
        assert_eq!(
            attempts.load(Ordering::SeqCst),
            5,
            "at 0, 10, 20, 30 and 35 ms"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_fetch_wakes_when_the_backend_changes() {
        // The backend has nothing and no wake time; a change after 5 ms brings a delivery.
        let changed = Arc::new(Notify::new());
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (notifier, flag) = (Arc::clone(&changed), Arc::clone(&ready));
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            flag.store(true, Ordering::SeqCst);
            notifier.notify_waiters();
        });
        let started = Instant::now();
        let fetched = fetch_until(&changed, Duration::from_secs(60), || {
            let found = if ready.load(Ordering::SeqCst) {
                one_delivery()
            } else {
                Vec::new()
            };
            std::future::ready(Ok((found, None)))
        })
        .await
        .expect("the attempts do not fail");
        assert_eq!(fetched.len(), 1);
        assert_eq!(started.elapsed(), Duration::from_millis(5));
    }
}
