//! The NATS JetStream backend.
//!
//! # Layout on the server
//!
//! - Stream `<PREFIX>_BUS` holds every topic under `<prefix>.bus.p<k>.<topic>`, where `k` is a
//!   stable hash (FNV-1a) of the envelope's subject modulo the partition count, so one subject
//!   always lands in one partition.
//! - Each consumer group has one durable pull consumer per partition (`<group>_p<k>`, explicit
//!   acks, `ack_wait` from the options, unlimited server-side deliveries: the client counts
//!   deliveries and dead-letters, so JetStream never drops a message silently). For per-subject
//!   order each partition consumer has `max_ack_pending = 1`: at most one message per
//!   partition is in flight across all of the group's consumers, and a retry keeps its place
//!   (the delay is held with `+WPI` progress acks, then `-NAK` redelivers it first).
//!   [`crate::SubscribeOptions::with_unordered`] uses one consumer per group over every
//!   partition (`<group>_all`, filter `<prefix>.bus.*.<pattern>`) with the in-flight limit as
//!   its ack window, and `-NAK {"delay"}` for retries. A group is either ordered or unordered.
//! - Stream `<PREFIX>_DLQ` is the dead-letter queue: records under `<prefix>.dlq.letter.<group>`,
//!   archived ones under `<prefix>.dlq.archived.<group>`, and the action log under
//!   `<prefix>.dlq.action`. A redrive republishes to the bus stream with a
//!   `Trellis-Only-Group` header; other groups ack such a message without handling it.
//!
//! # Retention: why limits, and why no age limit by default
//!
//! The bus stream uses limits retention with **no age limit** by default, discard policy
//! `new`, and an optional size bound ([`NatsBusConfig::with_max_bytes`]). Interest retention
//! (keep a message until every consumer has acked it) does not fit how groups are declared:
//! a group's durable consumers are created by its first `subscribe`, which happens when that
//! service starts, and the [`Bus`] contract promises a group every retained message,
//! including those published before it first subscribed. Under interest retention a message
//! published while no consumer's filter matches it is deleted at once, so the first messages
//! of a new deployment (the publisher started before the consumer) would vanish. A 7-day age
//! limit, the old default, had the same flaw later: a group that was down for a week lost
//! what it had not consumed, silently. Now a stream that fills up refuses publishes (counted
//! in `trellis_bus_publish_refused_total{reason="stream_full"}`) instead of dropping
//! anything; the price is that the stream grows until someone sets limits or purges it.
//! [`NatsBus::connect`] brings an existing stream (made by an older version) to the
//! configured limits.
//!
//! Each subscription keeps one pull stream open per partition (background tasks, aborted when
//! the subscription is dropped); messages it had buffered are redelivered after the ack wait.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use uuid::Uuid;

use crate::bus::{
    Bus, DeliveryKey, Message, RawDelivery, Settle, Settlement, Source, Subscription,
};
use crate::dlq::{
    ACTIONS_LIMIT_MAX, DeadLetter, DeadLetterFilter, DeadLetterState, DeadLetters, DlqAction,
    DlqActionKind, log_action, redriven_envelope, truncate,
};
use crate::envelope::{Envelope, MESSAGE_BYTES_MAX_DEFAULT};
use crate::error::BusError;
use crate::policy::SubscribeOptions;
use crate::topic;

/// Default number of partitions per topic (the most in-flight messages per ordered group).
pub const PARTITIONS_DEFAULT: u32 = 16;
/// Most partitions.
pub const PARTITIONS_MAX: u32 = 256;
/// Limit on every request to the server.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Most DLQ stream messages one list or lookup scans.
pub const DLQ_SCAN_MAX: u64 = 10_000;
/// Default age limit of the bus stream: none ([`Duration::ZERO`]). The stream uses limits
/// retention, so an age limit drops a message after that age whether or not every group has
/// consumed it; see [`NatsBusConfig::with_max_age`].
pub const MAX_AGE_DEFAULT: Duration = Duration::ZERO;
/// The header marking a redriven message as meant for one group only.
pub const ONLY_GROUP_HEADER: &str = "Trellis-Only-Group";
/// Most remembered first-failure times (for dead letters); cleared when exceeded.
const FIRST_FAILURES_MAX: usize = 100_000;

/// How to connect a [`NatsBus`].
#[derive(Debug, Clone)]
pub struct NatsBusConfig {
    url: String,
    prefix: String,
    partitions: u32,
    message_bytes_max: usize,
    max_age: Duration,
    max_bytes: Option<u64>,
}

impl NatsBusConfig {
    /// The server URL and a prefix (`[a-z0-9_]`, e.g. `shop`) naming this bus's streams and
    /// subjects.
    #[must_use]
    pub fn new(url: impl Into<String>, prefix: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: prefix.into(),
            partitions: PARTITIONS_DEFAULT,
            message_bytes_max: MESSAGE_BYTES_MAX_DEFAULT,
            max_age: MAX_AGE_DEFAULT,
            max_bytes: None,
        }
    }

    /// Sets the partition count (every process on this bus must use the same one).
    #[must_use]
    pub fn with_partitions(mut self, partitions: u32) -> Self {
        self.partitions = partitions;
        self
    }

    /// Refuses messages over `bytes` serialized bytes (default 1 MiB).
    #[must_use]
    pub fn with_message_bytes_max(mut self, bytes: usize) -> Self {
        self.message_bytes_max = bytes;
        self
    }

    /// Sets how long the bus stream keeps messages ([`Duration::ZERO`], the default: no age
    /// limit).
    ///
    /// The stream uses limits retention, so the server drops a message at this age **even if
    /// a group has not consumed it yet** (a group that was down, or declared later). Only set
    /// it when losing such messages is acceptable; connecting with an age limit logs a
    /// warning and sets the gauge `trellis_bus_stream_max_age_seconds`.
    #[must_use]
    pub fn with_max_age(mut self, max_age: Duration) -> Self {
        self.max_age = max_age;
        self
    }

    /// Bounds the bus stream at `bytes` (default: no bound of its own, only the server's
    /// JetStream storage limit). When the stream is full, publishes fail (discard policy
    /// `new`) rather than the server dropping the oldest messages; each refusal is counted
    /// in `trellis_bus_publish_refused_total{reason="stream_full"}` and logged.
    #[must_use]
    pub fn with_max_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = Some(bytes);
        self
    }
}

/// The NATS JetStream bus. Clones share one connection.
#[derive(Debug, Clone)]
pub struct NatsBus {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: async_nats::Client,
    context: jetstream::Context,
    prefix: String,
    bus_stream: stream::Stream,
    dlq_stream: stream::Stream,
    partitions: u32,
    message_bytes_max: usize,
    first_failures: Mutex<HashMap<(String, u64), DateTime<Utc>>>,
}

async fn bounded<T, E: std::fmt::Display>(
    future: impl Future<Output = Result<T, E>>,
) -> Result<T, BusError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(BusError::nats(error)),
        Err(_) => Err(BusError::Timeout(REQUEST_TIMEOUT)),
    }
}

/// Whether a publish error is JetStream refusing a message because the stream (discard
/// `new`) or the server's storage is at its limit.
fn is_stream_full(error: &str) -> bool {
    error.contains("maximum bytes exceeded")
        || error.contains("maximum messages exceeded")
        || error.contains("insufficient resources")
}

/// FNV-1a: stable across processes and versions, unlike `std`'s hasher.
fn partition_of(subject: &str, partitions: u32) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in subject.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % partitions
}

/// Creates the bus stream with `wanted`'s limits, or brings an existing one (made by an older
/// version or another configuration) to them: a stream left with an old age limit would keep
/// dropping unconsumed messages.
async fn ensure_limits(
    context: &jetstream::Context,
    wanted: stream::Config,
) -> Result<stream::Stream, BusError> {
    let mut stream = bounded(context.get_or_create_stream(wanted.clone())).await?;
    let existing = stream.cached_info().config.clone();
    let differs = existing.max_age != wanted.max_age
        || existing.max_bytes != wanted.max_bytes
        || existing.discard != wanted.discard
        || existing.max_message_size != wanted.max_message_size;
    if differs {
        tracing::warn!(
            stream = %wanted.name,
            old_max_age = ?existing.max_age,
            new_max_age = ?wanted.max_age,
            old_max_bytes = existing.max_bytes,
            new_max_bytes = wanted.max_bytes,
            "updating the bus stream's limits"
        );
        let updated = stream::Config {
            max_age: wanted.max_age,
            max_bytes: wanted.max_bytes,
            discard: wanted.discard,
            max_message_size: wanted.max_message_size,
            ..existing
        };
        bounded(context.update_stream(&updated))
            .await
            .map_err(|error| {
                BusError::InvalidConfig(format!(
                    "the stream {} exists with other limits and could not be updated \
                     (update or recreate it by hand): {error}",
                    wanted.name
                ))
            })?;
        bounded(stream.info()).await?;
    }
    Ok(stream)
}

impl NatsBus {
    /// Connects and creates (or reuses) the bus and DLQ streams.
    ///
    /// An existing bus stream whose age limit, size limit or discard policy differ from
    /// `config` is updated to them (logged as a warning); when the server refuses, this is
    /// [`BusError::InvalidConfig`] naming the stream.
    ///
    /// # Errors
    /// [`BusError::InvalidConfig`] for a bad prefix or partition count; the server is
    /// unreachable or refuses the streams.
    pub async fn connect(config: NatsBusConfig) -> Result<Self, BusError> {
        let prefix_ok = !config.prefix.is_empty()
            && config.prefix.len() <= 64
            && config
                .prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !prefix_ok {
            return Err(BusError::InvalidConfig(format!(
                "nats prefix must be 1 to 64 of [a-z0-9_], got {:?}",
                config.prefix
            )));
        }
        if !(1..=PARTITIONS_MAX).contains(&config.partitions) {
            return Err(BusError::InvalidConfig(format!(
                "partitions must be 1..={PARTITIONS_MAX}"
            )));
        }
        let client = bounded(
            async_nats::ConnectOptions::new()
                .connection_timeout(REQUEST_TIMEOUT)
                .connect(config.url.as_str()),
        )
        .await?;
        let context = jetstream::new(client.clone());
        let upper = config.prefix.to_ascii_uppercase();
        let max_message_size =
            i32::try_from(config.message_bytes_max.saturating_add(4096)).unwrap_or(i32::MAX);
        let bus_config = stream::Config {
            name: format!("{upper}_BUS"),
            subjects: vec![format!("{}.bus.>", config.prefix)],
            storage: stream::StorageType::File,
            max_message_size,
            max_age: config.max_age,
            max_bytes: config
                .max_bytes
                .map_or(-1, |bytes| i64::try_from(bytes).unwrap_or(i64::MAX)),
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        };
        let bus_stream = ensure_limits(&context, bus_config).await?;
        if config.max_age.is_zero() {
            tracing::debug!(stream = %format!("{upper}_BUS"), "bus stream without an age limit");
        } else {
            tracing::warn!(
                stream = %format!("{upper}_BUS"),
                max_age = ?config.max_age,
                "the bus stream drops messages at this age even if a group has not consumed them"
            );
        }
        metrics::gauge!("trellis_bus_stream_max_age_seconds").set(config.max_age.as_secs_f64());
        let dlq_stream = bounded(context.get_or_create_stream(stream::Config {
            name: format!("{upper}_DLQ"),
            subjects: vec![format!("{}.dlq.>", config.prefix)],
            storage: stream::StorageType::File,
            max_message_size: max_message_size.saturating_add(16 * 1024),
            ..Default::default()
        }))
        .await?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                context,
                prefix: config.prefix,
                bus_stream,
                dlq_stream,
                partitions: config.partitions,
                message_bytes_max: config.message_bytes_max,
                first_failures: Mutex::new(HashMap::new()),
            }),
        })
    }

    fn bus_subject(&self, partition: u32, topic: &str) -> String {
        format!("{}.bus.p{partition}.{topic}", self.inner.prefix)
    }

    async fn publish_raw(
        &self,
        topic: &str,
        envelope: &Envelope,
        only_group: Option<&str>,
    ) -> Result<(), BusError> {
        let bytes = envelope.to_bytes_limited(self.inner.message_bytes_max)?;
        let partition = partition_of(&envelope.subject, self.inner.partitions);
        let subject = self.bus_subject(partition, topic);
        let ack = match only_group {
            None => bounded(self.inner.context.publish(subject, bytes.into())).await?,
            Some(group) => {
                let mut headers = HeaderMap::new();
                headers.insert(ONLY_GROUP_HEADER, group);
                bounded(
                    self.inner
                        .context
                        .publish_with_headers(subject, headers, bytes.into()),
                )
                .await?
            }
        };
        match bounded(std::future::IntoFuture::into_future(ack)).await {
            Err(BusError::Nats(text)) if is_stream_full(&text) => {
                metrics::counter!("trellis_bus_publish_refused_total", "reason" => "stream_full")
                    .increment(1);
                tracing::warn!(error = %text, topic, "the bus stream is full; publish refused");
                Err(BusError::Nats(format!(
                    "the bus stream is full, nothing was dropped to make room (raise its limits or \
                     its consumers' pace): {text}"
                )))
            }
            other => other.map(drop),
        }
    }

    async fn publish_dlq(&self, subject: String, payload: Vec<u8>) -> Result<(), BusError> {
        let ack = bounded(self.inner.context.publish(subject, payload.into())).await?;
        bounded(std::future::IntoFuture::into_future(ack)).await?;
        Ok(())
    }

    /// Reads the DLQ stream: `(sequence, subject, payload)` of up to [`DLQ_SCAN_MAX`] messages,
    /// oldest first, whose subject starts with `subject_prefix`.
    async fn scan_dlq(
        &self,
        subject_prefix: &str,
        newest_first: bool,
        limit: usize,
    ) -> Result<Vec<(u64, String, Vec<u8>)>, BusError> {
        let mut stream = self.inner.dlq_stream.clone();
        let info = bounded(stream.info()).await?;
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        if info.state.messages == 0 || last < first {
            return Ok(Vec::new());
        }
        let mut found = Vec::new();
        let span = (last - first + 1).min(DLQ_SCAN_MAX);
        for step in 0..span {
            if found.len() >= limit {
                break;
            }
            let sequence = if newest_first {
                last - step
            } else {
                first + step
            };
            match tokio::time::timeout(REQUEST_TIMEOUT, stream.get_raw_message(sequence)).await {
                Ok(Ok(message)) => {
                    if message.subject.as_str().starts_with(subject_prefix) {
                        found.push((
                            sequence,
                            message.subject.to_string(),
                            message.payload.to_vec(),
                        ));
                    }
                }
                // Deleted sequences are gaps.
                Ok(Err(_)) => {}
                Err(_) => return Err(BusError::Timeout(REQUEST_TIMEOUT)),
            }
        }
        Ok(found)
    }

    async fn find_letter(&self, id: Uuid) -> Result<(u64, DeadLetter), BusError> {
        let prefix = format!("{}.dlq.", self.inner.prefix);
        for (sequence, subject, payload) in self.scan_dlq(&prefix, false, usize::MAX).await? {
            if subject.contains(".dlq.action") {
                continue;
            }
            let letter: DeadLetter = serde_json::from_slice(&payload).map_err(BusError::corrupt)?;
            if letter.id == id {
                return Ok((sequence, letter));
            }
        }
        Err(BusError::NotFound {
            what: "dead letter",
            id: id.to_string(),
        })
    }

    async fn act(&self, id: Uuid, actor: &str, action: DlqActionKind) -> Result<(), BusError> {
        let (sequence, mut letter) = self.find_letter(id).await?;
        match action {
            DlqActionKind::Redrive => {
                self.publish_raw(
                    &letter.topic,
                    &redriven_envelope(&letter),
                    Some(&letter.group),
                )
                .await?;
            }
            DlqActionKind::Discard => {}
            DlqActionKind::Archive => {
                letter.state = DeadLetterState::Archived;
                let payload = serde_json::to_vec(&letter).map_err(BusError::corrupt)?;
                let subject = format!("{}.dlq.archived.{}", self.inner.prefix, letter.group);
                self.publish_dlq(subject, payload).await?;
            }
        }
        let deleted = bounded(self.inner.dlq_stream.delete_message(sequence)).await?;
        if !deleted {
            return Err(BusError::NotFound {
                what: "dead letter",
                id: id.to_string(),
            });
        }
        let entry = DlqAction {
            at: Utc::now(),
            action,
            dead_letter_id: id,
            message_id: letter.envelope.id,
            actor: truncate(actor, crate::dlq::ACTION_TEXT_BYTES_MAX),
        };
        let payload = serde_json::to_vec(&entry).map_err(BusError::corrupt)?;
        self.publish_dlq(format!("{}.dlq.action", self.inner.prefix), payload)
            .await?;
        log_action(action, &letter, actor);
        Ok(())
    }
}

impl Bus for NatsBus {
    async fn publish(&self, topic: &str, mut envelope: Envelope) -> Result<(), BusError> {
        topic::validate_topic(topic)?;
        envelope.fill_trace_context();
        self.publish_raw(topic, &envelope, None).await?;
        metrics::counter!("trellis_bus_published_total").increment(1);
        Ok(())
    }

    async fn subscribe(
        &self,
        pattern: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, BusError> {
        topic::validate_pattern(pattern)?;
        topic::validate_group(group)?;
        let max_ack_pending = if options.per_subject_order {
            1
        } else {
            i64::try_from(options.in_flight_max).unwrap_or(i64::MAX)
        };
        // Ordered: one consumer per partition, one message in flight each. Unordered: one
        // consumer over every partition (`p*`), the in-flight limit as its ack window.
        let lanes: Vec<(String, String)> = if options.per_subject_order {
            (0..self.inner.partitions)
                .map(|partition| {
                    (
                        format!("{group}_p{partition}"),
                        self.bus_subject(partition, pattern),
                    )
                })
                .collect()
        } else {
            vec![(
                format!("{group}_all"),
                format!("{}.bus.*.{pattern}", self.inner.prefix),
            )]
        };
        let mut consumers = Vec::new();
        for (durable, filter_subject) in lanes {
            let config = consumer::pull::Config {
                durable_name: Some(durable.clone()),
                filter_subject: filter_subject.clone(),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: options.ack_wait,
                max_deliver: -1,
                max_ack_pending,
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            };
            let consumer: consumer::PullConsumer = bounded(
                self.inner
                    .bus_stream
                    .get_or_create_consumer(&durable, config),
            )
            .await?;
            let existing = &consumer.cached_info().config.filter_subject;
            if *existing != filter_subject {
                return Err(BusError::GroupConflict {
                    group: group.to_owned(),
                    existing: existing.clone(),
                    requested: filter_subject,
                });
            }
            consumers.push(consumer);
        }
        let (sender, receiver) =
            tokio::sync::mpsc::channel(options.in_flight_max.max(consumers.len()));
        let mut pullers = tokio::task::JoinSet::new();
        // Ordered partitions only ever have one message in flight; a batch above 1 keeps a
        // pull request waiting on the server (async-nats re-pulls at half the batch).
        let batch = if options.per_subject_order {
            ORDERED_PULL_BATCH
        } else {
            options.in_flight_max.min(PULL_BATCH_MAX)
        };
        for consumer in consumers {
            pullers.spawn(pull_forever(consumer, batch, sender.clone()));
        }
        let source = NatsSource {
            group: group.to_owned(),
            receiver,
            _pullers: pullers,
            strip: format!("{}.bus.p", self.inner.prefix),
        };
        let settler = NatsSettler {
            bus: self.clone(),
            ordered: options.per_subject_order,
            ack_wait: options.ack_wait,
        };
        Ok(Subscription::new(
            group,
            Box::new(source),
            Arc::new(settler),
            options,
        ))
    }
}

/// Keeps a pull stream open on one partition consumer and forwards its messages, until the
/// subscription (the receiver) is dropped. Messages buffered when it is dropped were never
/// acked, so the server redelivers them after the ack wait.
async fn pull_forever(
    consumer: consumer::PullConsumer,
    batch: usize,
    sender: tokio::sync::mpsc::Sender<jetstream::Message>,
) {
    const REOPEN_PAUSE: Duration = Duration::from_millis(200);
    loop {
        let stream = consumer
            .stream()
            .max_messages_per_batch(batch)
            .heartbeat(PULL_HEARTBEAT)
            .expires(PULL_EXPIRES)
            .messages()
            .await;
        let mut stream = match stream {
            Ok(stream) => stream,
            Err(error) => {
                tracing::warn!(%error, "opening a pull stream failed; retrying");
                tokio::time::sleep(REOPEN_PAUSE).await;
                continue;
            }
        };
        while let Some(next) = stream.next().await {
            match next {
                Ok(message) => {
                    if sender.send(message).await.is_err() {
                        return;
                    }
                }
                Err(error) => {
                    tracing::debug!(%error, "pull stream error");
                }
            }
        }
        if sender.is_closed() {
            return;
        }
        tokio::time::sleep(REOPEN_PAUSE).await;
    }
}

/// How long one pull request waits on the server; a stream that stopped receiving for any
/// reason re-pulls after this.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// The idle heartbeat asked of the server (below half of `PULL_EXPIRES`).
const PULL_HEARTBEAT: Duration = Duration::from_secs(2);
/// Messages one pull request asks for on an ordered partition.
const ORDERED_PULL_BATCH: usize = 8;
/// Most messages one pull request asks for (unordered subscriptions).
const PULL_BATCH_MAX: usize = 256;

struct NatsSource {
    group: String,
    receiver: tokio::sync::mpsc::Receiver<jetstream::Message>,
    _pullers: tokio::task::JoinSet<()>,
    strip: String,
}

impl std::fmt::Debug for NatsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSource")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl NatsSource {
    async fn to_raw(&self, message: jetstream::Message) -> Result<Option<RawDelivery>, BusError> {
        let info = message.info().map_err(BusError::nats)?;
        let (sequence, delivered) = (info.stream_sequence, info.delivered);
        let reply = message.reply.as_ref().map(ToString::to_string);
        let only_group = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(ONLY_GROUP_HEADER))
            .map(|value| value.as_str().to_owned());
        if only_group.is_some_and(|only| only != self.group) {
            // A redrive for another group: not ours to handle.
            message.ack().await.map_err(BusError::nats)?;
            return Ok(None);
        }
        // `<prefix>.bus.p<k>.<topic>` → `<topic>`
        let subject = message.subject.as_str();
        let topic = subject
            .strip_prefix(&self.strip)
            .and_then(|rest| rest.split_once('.'))
            .map_or(subject, |(_, topic)| topic)
            .to_owned();
        let envelope = serde_json::from_slice::<Envelope>(&message.payload)
            .map_err(|_| String::from_utf8_lossy(&message.payload).into_owned());
        Ok(Some(RawDelivery {
            topic,
            envelope,
            attempt: u32::try_from(delivered).unwrap_or(u32::MAX),
            key: DeliveryKey {
                sequence,
                lease: 0,
                reply,
            },
        }))
    }
}

impl Source for NatsSource {
    fn fetch(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<RawDelivery>, BusError>> {
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                let first = match tokio::time::timeout_at(deadline, self.receiver.recv()).await {
                    Ok(Some(message)) => message,
                    Ok(None) => return Err(BusError::Closed),
                    Err(_) => return Ok(Vec::new()),
                };
                let mut messages = vec![first];
                while messages.len() < max {
                    match self.receiver.try_recv() {
                        Ok(message) => messages.push(message),
                        Err(_) => break,
                    }
                }
                let mut deliveries = Vec::with_capacity(messages.len());
                for message in messages {
                    if let Some(delivery) = self.to_raw(message).await? {
                        deliveries.push(delivery);
                    }
                }
                if !deliveries.is_empty() {
                    return Ok(deliveries);
                }
            }
        })
    }
}

#[derive(Debug)]
struct NatsSettler {
    bus: NatsBus,
    ordered: bool,
    ack_wait: Duration,
}

impl NatsSettler {
    fn remember_failure(&self, group: &str, sequence: u64) {
        let mut map = self
            .bus
            .inner
            .first_failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= FIRST_FAILURES_MAX {
            map.clear();
        }
        map.entry((group.to_owned(), sequence))
            .or_insert_with(Utc::now);
    }

    fn take_first_failure(&self, group: &str, sequence: u64) -> Option<DateTime<Utc>> {
        self.bus
            .inner
            .first_failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&(group.to_owned(), sequence))
    }
}

impl Settle for NatsSettler {
    fn settle(
        &self,
        message: Arc<Message>,
        key: DeliveryKey,
        attempt: u32,
        settlement: Settlement,
    ) -> BoxFuture<'static, Result<(), BusError>> {
        let bus = self.bus.clone();
        let Some(reply) = key.reply.clone() else {
            return Box::pin(async { Err(BusError::LeaseLost) });
        };
        let client = bus.inner.client.clone();
        match settlement {
            Settlement::Ack => {
                Box::pin(async move { bounded(client.publish(reply, "+ACK".into())).await })
            }
            Settlement::Nack { delay, error } => {
                if error.is_some() {
                    self.remember_failure(&message.group, key.sequence);
                }
                if !self.ordered {
                    let body = format!("-NAK {{\"delay\":{}}}", delay.as_nanos());
                    return Box::pin(
                        async move { bounded(client.publish(reply, body.into())).await },
                    );
                }
                // Hold the message (progress acks) for the delay, then NAK it so JetStream
                // redelivers it before anything later in its partition.
                let heartbeat = (self.ack_wait / 3).max(Duration::from_millis(5));
                tokio::spawn(async move {
                    let until = tokio::time::Instant::now() + delay;
                    loop {
                        let now = tokio::time::Instant::now();
                        if now >= until {
                            break;
                        }
                        tokio::time::sleep_until((now + heartbeat).min(until)).await;
                        if tokio::time::Instant::now() < until
                            && client.publish(reply.clone(), "+WPI".into()).await.is_err()
                        {
                            return;
                        }
                    }
                    // Failing here only means redelivery after the ack wait instead.
                    let _ = client.publish(reply, "-NAK".into()).await;
                });
                Box::pin(async { Ok(()) })
            }
            Settlement::DeadLetter(failure) => {
                let first = self
                    .take_first_failure(&message.group, key.sequence)
                    .unwrap_or(failure.at);
                Box::pin(async move {
                    let letter = DeadLetter {
                        id: Uuid::now_v7(),
                        group: message.group.clone(),
                        topic: message.topic.clone(),
                        envelope: message.envelope.clone(),
                        reason: failure.reason,
                        attempts: attempt,
                        first_failure_at: first,
                        last_failure_at: failure.at,
                        fingerprint: failure.fingerprint(),
                        error_kind: failure.error_kind,
                        error: failure.error,
                        state: DeadLetterState::Dead,
                        redrive_count: message.envelope.redrive_count(),
                    };
                    let payload = serde_json::to_vec(&letter).map_err(BusError::corrupt)?;
                    let subject = format!("{}.dlq.letter.{}", bus.inner.prefix, letter.group);
                    // Stored in the DLQ first; only then is the original terminated.
                    bus.publish_dlq(subject, payload).await?;
                    bounded(client.publish(reply, "+TERM".into())).await
                })
            }
        }
    }
}

impl DeadLetters for NatsBus {
    async fn list(&self, filter: &DeadLetterFilter) -> Result<Vec<DeadLetter>, BusError> {
        filter.validate()?;
        let state = match filter.state.unwrap_or_default() {
            DeadLetterState::Dead => "letter",
            DeadLetterState::Archived => "archived",
        };
        let prefix = match &filter.group {
            Some(group) => format!("{}.dlq.{state}.{group}", self.inner.prefix),
            None => format!("{}.dlq.{state}.", self.inner.prefix),
        };
        let now = Utc::now();
        let mut letters = Vec::new();
        for (_, subject, payload) in self.scan_dlq(&prefix, false, usize::MAX).await? {
            if filter.group.is_some() && subject != prefix {
                continue;
            }
            let letter: DeadLetter = serde_json::from_slice(&payload).map_err(BusError::corrupt)?;
            if filter.accepts(&letter, now) {
                letters.push(letter);
                if letters.len() >= filter.limit() {
                    break;
                }
            }
        }
        Ok(letters)
    }

    async fn get(&self, id: Uuid) -> Result<DeadLetter, BusError> {
        Ok(self.find_letter(id).await?.1)
    }

    async fn redrive(&self, id: Uuid, actor: &str) -> Result<(), BusError> {
        self.act(id, actor, DlqActionKind::Redrive).await
    }

    async fn discard(&self, id: Uuid, actor: &str) -> Result<(), BusError> {
        self.act(id, actor, DlqActionKind::Discard).await
    }

    async fn archive(&self, id: Uuid, actor: &str) -> Result<(), BusError> {
        self.act(id, actor, DlqActionKind::Archive).await
    }

    async fn actions(&self, limit: usize) -> Result<Vec<DlqAction>, BusError> {
        let subject = format!("{}.dlq.action", self.inner.prefix);
        let found = self
            .scan_dlq(&subject, true, limit.min(ACTIONS_LIMIT_MAX))
            .await?;
        found
            .into_iter()
            .map(|(_, _, payload)| serde_json::from_slice(&payload).map_err(BusError::corrupt))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stable_and_spread() {
        assert_eq!(partition_of("order-1", 16), partition_of("order-1", 16));
        let used: std::collections::HashSet<u32> = (0..200)
            .map(|n| partition_of(&format!("order-{n}"), 16))
            .collect();
        assert_eq!(used.len(), 16);
    }
}
