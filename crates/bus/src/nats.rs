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
//!   partition is in flight across all of the group's consumers.
//! - A failing message of an ordered group does not hold its partition through its retry
//!   delay (that blocked every subject hashed to the partition, a sixteenth of the traffic,
//!   for as long as the retries took). It is **parked**: copied with its attempt count, due
//!   time and first-failure time in headers to its subject's lane in stream `<PREFIX>_PARK`
//!   (`<prefix>.park.<group>.s<hex of subject>`, work-queue retention), then acked in the
//!   partition, which moves on. A later partition message whose subject has a non-empty lane
//!   is appended to the lane instead of being handled, so it stays behind its predecessor.
//!   Checking the lane costs a request, so a process asks only about subjects it parked (or
//!   saw parked) or after another process took a delivery of that partition (a gap in the
//!   consumer sequence its subscriptions saw): with one in flight per partition, every park
//!   happens while holding the partition, so without a gap this process saw them all.
//!   Competing consumers in several processes pay that request on each handoff. Lanes are consumed by
//!   one consumer per group (`<group>_parked`, one message in flight; a lane message's first
//!   delivery NAKs it with the time left until it is due, and a failed retry NAKs it with
//!   its backoff delay: a NAKed message stays in flight, so the lane keeps its order, and
//!   the server keeps the schedule across a restart). So a failing message blocks
//!   its own subject, and other parked subjects of its group while it waits for its delay,
//!   never the healthy subjects of its partition. The first-failure time travels in the
//!   lane message's headers, so a dead letter made after a restart keeps it.
//! - [`crate::SubscribeOptions::with_unordered`] uses one consumer per group over every
//!   partition (`<group>_all`, filter `<prefix>.bus.*.<pattern>`) with the in-flight limit as
//!   its ack window. A message's first failure republishes it to its partition as a retry
//!   copy for that group only (`Trellis-Only-Group`, with its attempt count, due time and
//!   first-failure time in headers; its first delivery only schedules it with a NAK delay)
//!   and acks the original; later failures NAK the copy with their delay. So the
//!   first-failure time survives a restart here too. A group is either ordered or unordered.
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

use std::collections::{HashMap, HashSet};
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
    ACTIONS_LIMIT_MAX, DeadLetter, DeadLetterFilter, DeadLetterPage, DeadLetterState, DeadLetters,
    DlqAction, DlqActionKind, cursor, log_action, not_found, page_of, redriven_envelope,
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
/// Most DLQ stream messages one list page reads; past it the page ends early, with a cursor
/// to continue (a lookup by id reads the whole stream, in batches).
pub const DLQ_SCAN_MAX: u64 = 100_000;
/// Default age limit of the bus stream: none ([`Duration::ZERO`]). The stream uses limits
/// retention, so an age limit drops a message after that age whether or not every group has
/// consumed it; see [`NatsBusConfig::with_max_age`].
pub const MAX_AGE_DEFAULT: Duration = Duration::ZERO;
/// The header marking a redriven message as meant for one group only.
pub const ONLY_GROUP_HEADER: &str = "Trellis-Only-Group";
/// The headers a parked message carries in its lane: its topic, the deliveries made before
/// it was parked, when its next delivery is due (Unix ms) and when it first failed (Unix ms).
const PARKED_TOPIC_HEADER: &str = "Trellis-Topic";
const PARKED_ATTEMPTS_HEADER: &str = "Trellis-Attempts";
const PARKED_DUE_HEADER: &str = "Trellis-Due-Ms";
const FIRST_FAILURE_HEADER: &str = "Trellis-First-Failure-Ms";
/// Most remembered first-failure times of lane messages that carry none in their headers
/// (queued behind a parked message, then failing themselves); cleared when exceeded.
const LANE_FIRST_FAILURES_MAX: usize = 100_000;

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
    park_stream: stream::Stream,
    partitions: u32,
    message_bytes_max: usize,
    /// Each ordered group's view of its park lanes, shared by the group's subscriptions.
    group_views: Mutex<HashMap<String, Arc<GroupView>>>,
    /// First failures of lane messages without one in their headers, by group and park
    /// stream sequence. A lane message cannot be rewritten without losing its place, so
    /// this one case stays in memory (after a restart the letter shows the last failure).
    lane_first_failures: Mutex<HashMap<(String, u64), DateTime<Utc>>>,
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

/// A failed message on its way to another try: a park lane's entry, or an unordered
/// group's retry copy.
#[derive(Debug, Clone, Copy)]
struct RetryCopy<'a> {
    topic: &'a str,
    envelope: &'a Envelope,
    /// Deliveries made before this copy.
    attempts: u32,
    /// When the copy may be handled.
    due: DateTime<Utc>,
    first_failure: Option<DateTime<Utc>>,
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
        // Work-queue retention: a parked message is removed once its group acked it, so "the
        // lane has a message" means "the subject is parked".
        let park_stream = bounded(context.get_or_create_stream(stream::Config {
            name: format!("{upper}_PARK"),
            subjects: vec![format!("{}.park.>", config.prefix)],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            max_message_size: max_message_size.saturating_add(1024),
            discard: stream::DiscardPolicy::New,
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
                park_stream,
                partitions: config.partitions,
                message_bytes_max: config.message_bytes_max,
                group_views: Mutex::new(HashMap::new()),
                lane_first_failures: Mutex::new(HashMap::new()),
            }),
        })
    }

    fn bus_subject(&self, partition: u32, topic: &str) -> String {
        format!("{}.bus.p{partition}.{topic}", self.inner.prefix)
    }

    /// The park lane of `subject` in `group`: `<prefix>.park.<group>.s<hex of subject>`
    /// (hex keeps any subject a single NATS token).
    fn lane_subject(&self, group: &str, subject: &str) -> String {
        let mut lane = format!("{}.park.{group}.s", self.inner.prefix);
        for byte in subject.bytes() {
            lane.push_str(&format!("{byte:02x}"));
        }
        lane
    }

    /// Whether `subject` has a parked message in `group` (its lane is not empty).
    async fn is_parked(&self, group: &str, subject: &str) -> Result<bool, BusError> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        let lane = self.lane_subject(group, subject);
        match tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.inner
                .park_stream
                .get_last_raw_message_by_subject(&lane),
        )
        .await
        {
            Ok(Ok(_)) => Ok(true),
            Ok(Err(error)) if error.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(false),
            Ok(Err(error)) => Err(BusError::nats(error)),
            Err(_) => Err(BusError::Timeout(REQUEST_TIMEOUT)),
        }
    }

    /// Appends `envelope` to its subject's park lane in `group`; returns once the stream
    /// holds it.
    async fn park(
        &self,
        group: &str,
        topic: &str,
        envelope: &Envelope,
        attempts: u32,
        due: DateTime<Utc>,
        first_failure: Option<DateTime<Utc>>,
    ) -> Result<(), BusError> {
        let lane = self.lane_subject(group, &envelope.subject);
        let retry = RetryCopy {
            topic,
            envelope,
            attempts,
            due,
            first_failure,
        };
        self.publish_retry_copy(lane, &retry, None).await
    }

    /// Publishes the retry copy of a message that failed in an unordered group: to its
    /// partition again, for `group` only, due after its retry delay, its first failure in
    /// its headers (a restart does not lose it, as a NAK in place would).
    async fn requeue(&self, group: &str, retry: &RetryCopy<'_>) -> Result<(), BusError> {
        let partition = partition_of(&retry.envelope.subject, self.inner.partitions);
        let subject = self.bus_subject(partition, retry.topic);
        self.publish_retry_copy(subject, retry, Some(group)).await
    }

    async fn publish_retry_copy(
        &self,
        subject: String,
        retry: &RetryCopy<'_>,
        only_group: Option<&str>,
    ) -> Result<(), BusError> {
        let RetryCopy {
            topic,
            envelope,
            attempts,
            due,
            first_failure,
        } = *retry;
        let bytes = serde_json::to_vec(envelope).map_err(BusError::corrupt)?;
        let mut headers = HeaderMap::new();
        if let Some(group) = only_group {
            headers.insert(ONLY_GROUP_HEADER, group);
        }
        headers.insert(PARKED_TOPIC_HEADER, topic);
        headers.insert(PARKED_ATTEMPTS_HEADER, attempts.to_string().as_str());
        headers.insert(
            PARKED_DUE_HEADER,
            due.timestamp_millis().to_string().as_str(),
        );
        if let Some(at) = first_failure {
            headers.insert(
                FIRST_FAILURE_HEADER,
                at.timestamp_millis().to_string().as_str(),
            );
        }
        let ack = bounded(
            self.inner
                .context
                .publish_with_headers(subject, headers, bytes.into()),
        )
        .await?;
        bounded(std::future::IntoFuture::into_future(ack)).await?;
        Ok(())
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

    /// Opens a reader over the DLQ stream's messages matching `filter_subject`, from stream
    /// sequence `start` on: an ephemeral consumer without acks, read in batches of up to
    /// [`DLQ_BATCH_MAX`] messages per request (a page costs a few round trips, not one per
    /// letter).
    async fn dlq_reader(&self, filter_subject: String, start: u64) -> Result<DlqReader, BusError> {
        let deliver_policy = if start <= 1 {
            consumer::DeliverPolicy::All
        } else {
            consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            }
        };
        let consumer: consumer::PullConsumer = bounded(self.inner.dlq_stream.create_consumer(
            consumer::pull::Config {
                filter_subject,
                deliver_policy,
                ack_policy: consumer::AckPolicy::None,
                inactive_threshold: DLQ_READER_IDLE_MAX,
                memory_storage: true,
                ..Default::default()
            },
        ))
        .await?;
        Ok(DlqReader {
            stream: self.inner.dlq_stream.clone(),
            name: consumer.cached_info().name.clone(),
            consumer,
            done: false,
        })
    }

    async fn find_letter(&self, id: Uuid) -> Result<(u64, DeadLetter), BusError> {
        // `<prefix>.dlq.<letter|archived>.<group>`: every letter, not the action log.
        let mut reader = self
            .dlq_reader(format!("{}.dlq.*.*", self.inner.prefix), 1)
            .await?;
        let mut found = None;
        while found.is_none() && !reader.done {
            for (sequence, payload) in reader.next_batch(DLQ_BATCH_MAX).await? {
                let letter: DeadLetter =
                    serde_json::from_slice(&payload).map_err(BusError::corrupt)?;
                if letter.id == id {
                    found = Some((sequence, letter));
                    break;
                }
            }
        }
        reader.close().await;
        found.ok_or_else(|| not_found(id))
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
            return Err(not_found(id));
        }
        let entry = DlqAction::new(action, &letter, actor);
        let payload = serde_json::to_vec(&entry).map_err(BusError::corrupt)?;
        self.publish_dlq(format!("{}.dlq.action", self.inner.prefix), payload)
            .await?;
        log_action(action, &letter, actor);
        Ok(())
    }
}

/// Most DLQ messages one read request returns.
pub const DLQ_BATCH_MAX: usize = 1_000;
/// Most bytes one DLQ read request returns.
const DLQ_BATCH_BYTES_MAX: usize = 16 * 1024 * 1024;
/// How long the server keeps an abandoned DLQ reader (a listing that failed midway).
const DLQ_READER_IDLE_MAX: Duration = Duration::from_secs(30);

/// Batched reads of the DLQ stream through an ephemeral consumer.
struct DlqReader {
    stream: stream::Stream,
    consumer: consumer::PullConsumer,
    name: String,
    /// No message is left after the last one read.
    done: bool,
}

impl DlqReader {
    /// Up to `max` more messages as `(sequence, payload)`, oldest first; sets `done` at the
    /// end of the stream.
    async fn next_batch(&mut self, max: usize) -> Result<Vec<(u64, Vec<u8>)>, BusError> {
        if self.done {
            return Ok(Vec::new());
        }
        let mut batch = bounded(
            self.consumer
                .fetch()
                .max_messages(max.clamp(1, DLQ_BATCH_MAX))
                .max_bytes(DLQ_BATCH_BYTES_MAX)
                .messages(),
        )
        .await?;
        let mut read = Vec::new();
        let mut pending = 0;
        loop {
            let next = tokio::time::timeout(REQUEST_TIMEOUT, batch.next())
                .await
                .map_err(|_| BusError::Timeout(REQUEST_TIMEOUT))?;
            let Some(message) = next else { break };
            let message = message.map_err(BusError::nats)?;
            let info = message.info().map_err(BusError::nats)?;
            pending = info.pending;
            read.push((info.stream_sequence, message.payload.to_vec()));
        }
        if read.is_empty() || pending == 0 {
            self.done = true;
        }
        Ok(read)
    }

    /// Deletes the consumer (the server would after [`DLQ_READER_IDLE_MAX`] anyway).
    async fn close(self) {
        let _ =
            tokio::time::timeout(REQUEST_TIMEOUT, self.stream.delete_consumer(&self.name)).await;
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
            // Unordered groups retry through copies whose first delivery schedules them.
            let schedule_for = (!options.per_subject_order).then(|| group.to_owned());
            pullers.spawn(pull_forever(consumer, batch, schedule_for, sender.clone()));
        }
        if options.per_subject_order {
            // The park lanes: one consumer over all of the group's lanes, one message in
            // flight, so a lane's messages are handled in order across competing consumers.
            let durable = format!("{group}_parked");
            let config = consumer::pull::Config {
                durable_name: Some(durable.clone()),
                filter_subject: format!("{}.park.{group}.>", self.inner.prefix),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: options.ack_wait,
                max_deliver: -1,
                max_ack_pending: 1,
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            };
            let lanes: consumer::PullConsumer = bounded(
                self.inner
                    .park_stream
                    .get_or_create_consumer(&durable, config),
            )
            .await?;
            pullers.spawn(pull_forever(
                lanes,
                ORDERED_PULL_BATCH,
                Some(group.to_owned()),
                sender.clone(),
            ));
        }
        let view = Arc::clone(
            lock(&self.inner.group_views)
                .entry(group.to_owned())
                .or_default(),
        );
        let source = NatsSource {
            bus: self.clone(),
            group: group.to_owned(),
            receiver,
            _pullers: pullers,
            strip: format!("{}.bus.p", self.inner.prefix),
            lanes: format!("{}.park.", self.inner.prefix),
            ordered: options.per_subject_order,
            view: Arc::clone(&view),
        };
        let settler = NatsSettler {
            bus: self.clone(),
            ordered: options.per_subject_order,
            view,
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
///
/// With `schedule_for` (a group name: the park lanes' consumer, an unordered consumer), the
/// first delivery of a retry copy meant for that group only schedules it
/// ([`schedule_if_new`]).
async fn pull_forever(
    consumer: consumer::PullConsumer,
    batch: usize,
    schedule_for: Option<String>,
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
                    if let Some(group) = &schedule_for
                        && schedule_if_new(&message, group).await
                    {
                        continue;
                    }
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

/// The first delivery of a retry copy (a lane message, an unordered group's retry) only
/// schedules it: a NAK with the time left until
/// it is due (none for a message queued behind a parked one). Its lane consumer has one
/// message in flight, and a NAKed message stays in flight until redelivered, so nothing of
/// the group's lanes passes it; and the server keeps the schedule, so it holds across a
/// restart of the consumer. Returns whether the message was scheduled (not to be handled).
async fn schedule_if_new(message: &jetstream::Message, group: &str) -> bool {
    // Most messages are not retry copies: look at the headers before parsing the reply.
    let Some(due_ms) =
        header(message, PARKED_DUE_HEADER).and_then(|value| value.parse::<i64>().ok())
    else {
        return false;
    };
    let ours = header(message, ONLY_GROUP_HEADER).is_none_or(|only| only == group);
    let first = message.info().is_ok_and(|info| info.delivered == 1);
    if !first || !ours {
        return false;
    }
    let left_ms = due_ms.saturating_sub(Utc::now().timestamp_millis()).max(0);
    let delay = (left_ms > 0).then(|| Duration::from_millis(left_ms.unsigned_abs()));
    // If the NAK is lost, the message comes back after the ack wait instead.
    let _ = message.ack_with(jetstream::AckKind::Nak(delay)).await;
    true
}

fn header<'a>(message: &'a jetstream::Message, name: &str) -> Option<&'a str> {
    message
        .headers
        .as_ref()
        .and_then(|headers| headers.get(name))
        .map(async_nats::HeaderValue::as_str)
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
    bus: NatsBus,
    group: String,
    receiver: tokio::sync::mpsc::Receiver<jetstream::Message>,
    _pullers: tokio::task::JoinSet<()>,
    /// `<prefix>.bus.p`, cut from a partition message's subject to get its topic.
    strip: String,
    /// `<prefix>.park.`, the start of a park lane message's subject.
    lanes: String,
    ordered: bool,
    /// What this process knows of the group's parked subjects (shared with the settler and
    /// with the group's other subscriptions in this process).
    view: Arc<GroupView>,
}

/// One process's view of an ordered group's park lanes, shared by its subscriptions.
#[derive(Debug, Default)]
struct GroupView {
    /// Subjects parked by this process or seen parked. Entries may be stale (the lane
    /// drained meanwhile); every positive is checked on the server.
    parked: Mutex<HashSet<String>>,
    /// The last consumer sequence this process received per partition consumer: a gap means
    /// another process took a delivery of the partition meanwhile, and may have parked a
    /// subject this view does not know about.
    last_consumer_sequence: Mutex<HashMap<String, u64>>,
}

impl std::fmt::Debug for NatsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSource")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl NatsSource {
    async fn admit(
        &mut self,
        message: jetstream::Message,
    ) -> Result<Option<RawDelivery>, BusError> {
        if message.subject.as_str().starts_with(&self.lanes) {
            return self.lane_to_raw(message);
        }
        let info = message.info().map_err(BusError::nats)?;
        let (sequence, delivered) = (info.stream_sequence, info.delivered);
        let handoff = self.ordered && {
            let previous = lock(&self.view.last_consumer_sequence)
                .insert(info.consumer.to_owned(), info.consumer_sequence);
            previous.is_none_or(|last| last.saturating_add(1) != info.consumer_sequence)
        };
        let reply = message.reply.as_ref().map(ToString::to_string);
        if header(&message, ONLY_GROUP_HEADER).is_some_and(|only| only != self.group) {
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
        if self.ordered
            && let Ok(envelope) = &envelope
            && self.waits_behind_parked(&envelope.subject, handoff).await?
        {
            // Its subject has a parked message: it queues behind it, in the lane.
            let attempts = u32::try_from(delivered.saturating_sub(1)).unwrap_or(u32::MAX);
            self.bus
                .park(&self.group, &topic, envelope, attempts, Utc::now(), None)
                .await?;
            message.ack().await.map_err(BusError::nats)?;
            return Ok(None);
        }
        let (attempt, first_failure) = retry_copy_history(&message, delivered);
        Ok(Some(RawDelivery {
            topic,
            envelope,
            attempt,
            key: DeliveryKey {
                sequence,
                lease: 0,
                reply,
                parked: false,
                first_failure,
            },
        }))
    }

    /// Whether a partition message of `subject` must queue behind a parked one. Asks the
    /// server only when this process parked (or saw parked) the subject, or when another
    /// process took a delivery of the partition since this process's last (`handoff`):
    /// otherwise every park of the partition went through this process's view.
    async fn waits_behind_parked(&self, subject: &str, handoff: bool) -> Result<bool, BusError> {
        let known = lock(&self.view.parked).contains(subject);
        if !known && !handoff {
            return Ok(false);
        }
        let parked = self.bus.is_parked(&self.group, subject).await?;
        let mut view = lock(&self.view.parked);
        if parked {
            view.insert(subject.to_owned());
        } else {
            view.remove(subject);
        }
        Ok(parked)
    }

    /// A message from the group's park lanes: its attempts continue where the partition's
    /// left off, and its first failure comes from its headers (it survives restarts).
    fn lane_to_raw(&self, message: jetstream::Message) -> Result<Option<RawDelivery>, BusError> {
        let info = message.info().map_err(BusError::nats)?;
        let (sequence, delivered) = (info.stream_sequence, info.delivered);
        let (attempt, first_failure) = retry_copy_history(&message, delivered);
        let topic = header(&message, PARKED_TOPIC_HEADER)
            .unwrap_or_default()
            .to_owned();
        let envelope = serde_json::from_slice::<Envelope>(&message.payload)
            .map_err(|_| String::from_utf8_lossy(&message.payload).into_owned());
        Ok(Some(RawDelivery {
            topic,
            envelope,
            attempt,
            key: DeliveryKey {
                sequence,
                lease: 0,
                reply: message.reply.as_ref().map(ToString::to_string),
                parked: true,
                first_failure,
            },
        }))
    }
}

/// The attempt number and first failure of a retry copy (a lane message or an unordered
/// group's retry) from its headers: its attempts continue where the original's left off
/// (its first delivery only scheduled it, see `schedule_if_new`), and its first failure
/// survives restarts. `None` for a message that is not a retry copy.
fn retry_copy_history(
    message: &jetstream::Message,
    delivered: i64,
) -> (u32, Option<DateTime<Utc>>) {
    let delivered = u32::try_from(delivered).unwrap_or(u32::MAX);
    let Some(before) = header(message, PARKED_ATTEMPTS_HEADER).and_then(|v| v.parse::<u32>().ok())
    else {
        return (delivered, None);
    };
    let first_failure = header(message, FIRST_FAILURE_HEADER)
        .and_then(|value| value.parse::<i64>().ok())
        .and_then(DateTime::from_timestamp_millis);
    (
        before.saturating_add(delivered.saturating_sub(1)),
        first_failure,
    )
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
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
                    if let Some(delivery) = self.admit(message).await? {
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
    /// The process's view of the group's parked subjects (shared with the sources).
    view: Arc<GroupView>,
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
            Settlement::Nack { delay, error } if self.ordered && !key.parked => {
                // Park the subject: the message moves to its lane (due after the delay) and
                // the partition moves on; later messages of the subject follow it there.
                let view = Arc::clone(&self.view);
                Box::pin(async move {
                    let now = Utc::now();
                    let due = now + chrono::Duration::from_std(delay).unwrap_or_default();
                    let first_failure = error.is_some().then_some(now);
                    bus.park(
                        &message.group,
                        &message.topic,
                        &message.envelope,
                        attempt,
                        due,
                        first_failure,
                    )
                    .await?;
                    lock(&view.parked).insert(message.envelope.subject.clone());
                    bounded(client.publish(reply, "+ACK".into())).await
                })
            }
            Settlement::Nack {
                delay,
                error: Some(_),
            } if !key.parked && key.first_failure.is_none() => {
                // An unordered group's first failure: the retry goes out as a copy carrying
                // the failure's time, and the original is acked.
                Box::pin(async move {
                    let now = Utc::now();
                    let retry = RetryCopy {
                        topic: &message.topic,
                        envelope: &message.envelope,
                        attempts: attempt,
                        due: now + chrono::Duration::from_std(delay).unwrap_or_default(),
                        first_failure: Some(now),
                    };
                    bus.requeue(&message.group, &retry).await?;
                    bounded(client.publish(reply, "+ACK".into())).await
                })
            }
            Settlement::Nack { delay, error } => {
                if key.parked && key.first_failure.is_none() && error.is_some() {
                    let mut first = lock(&bus.inner.lane_first_failures);
                    if first.len() >= LANE_FIRST_FAILURES_MAX {
                        first.clear();
                    }
                    first
                        .entry((message.group.clone(), key.sequence))
                        .or_insert_with(Utc::now);
                }
                // A retry copy (or a plain nack) is retried in place. A lane has one message
                // in flight, and a NAKed message stays in flight until its redelivery: the
                // delay keeps the lane's order.
                let body = format!("-NAK {{\"delay\":{}}}", delay.as_nanos());
                Box::pin(async move { bounded(client.publish(reply, body.into())).await })
            }
            Settlement::DeadLetter(failure) => {
                let remembered = key
                    .parked
                    .then(|| {
                        lock(&bus.inner.lane_first_failures)
                            .remove(&(message.group.clone(), key.sequence))
                    })
                    .flatten();
                let first = key.first_failure.or(remembered);
                Box::pin(async move {
                    let letter = DeadLetter::from_failure(&message, attempt, &failure, first);
                    let payload = serde_json::to_vec(&letter).map_err(BusError::corrupt)?;
                    let subject = format!("{}.dlq.letter.{}", bus.inner.prefix, letter.group);
                    // Stored in the DLQ first; only then is the original terminated (a lane
                    // message is acked: that removes it from the work queue and frees the
                    // lane for the subject's next message).
                    bus.publish_dlq(subject, payload).await?;
                    let verdict = if key.parked { "+ACK" } else { "+TERM" };
                    bounded(client.publish(reply, verdict.into())).await
                })
            }
        }
    }
}

impl DeadLetters for NatsBus {
    async fn list_page(&self, filter: &DeadLetterFilter) -> Result<DeadLetterPage, BusError> {
        filter.validate()?;
        // The cursor is the stream sequence the next page starts at.
        let start = cursor::<u64>(filter)?.unwrap_or(1);
        let state = match filter.state.unwrap_or_default() {
            DeadLetterState::Dead => "letter",
            DeadLetterState::Archived => "archived",
        };
        let subject = match &filter.group {
            Some(group) => format!("{}.dlq.{state}.{group}", self.inner.prefix),
            None => format!("{}.dlq.{state}.*", self.inner.prefix),
        };
        let mut reader = self.dlq_reader(subject, start).await?;
        let now = Utc::now();
        let limit = filter.limit();
        let mut found = Vec::new();
        let mut scanned = 0_u64;
        let mut resume = None;
        while found.len() <= limit && !reader.done {
            if scanned >= DLQ_SCAN_MAX {
                resume = Some((start + scanned).to_string());
                break;
            }
            for (sequence, payload) in reader.next_batch(limit + 1 - found.len()).await? {
                scanned = sequence + 1 - start;
                let letter: DeadLetter =
                    serde_json::from_slice(&payload).map_err(BusError::corrupt)?;
                if filter.accepts(&letter, now) {
                    found.push((letter, (sequence + 1).to_string()));
                }
            }
        }
        reader.close().await;
        Ok(page_of(found, limit, resume))
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
        let limit = limit.min(ACTIONS_LIMIT_MAX);
        let mut reader = self
            .dlq_reader(format!("{}.dlq.action", self.inner.prefix), 1)
            .await?;
        let mut newest = std::collections::VecDeque::with_capacity(limit + 1);
        while !reader.done {
            for (_, payload) in reader.next_batch(DLQ_BATCH_MAX).await? {
                newest.push_back(payload);
                if newest.len() > limit {
                    newest.pop_front();
                }
            }
        }
        reader.close().await;
        newest
            .into_iter()
            .rev()
            .map(|payload| serde_json::from_slice(&payload).map_err(BusError::corrupt))
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
