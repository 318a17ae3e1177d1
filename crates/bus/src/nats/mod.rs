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

// Connecting and stream limits (setup.rs); consumers, pull tasks and the source
// (consume.rs); settling (settle.rs); park lanes and retry copies (parking.rs); the
// dead-letter queue (dlq.rs). This file: configuration, publishing and shared helpers.
mod consume;
mod dlq;
mod parking;
mod settle;
mod setup;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use chrono::{DateTime, Utc};

use crate::bus::{Bus, Subscription, count_published, prepare_publish};
use crate::envelope::{Envelope, MESSAGE_BYTES_MAX_DEFAULT};
use crate::error::BusError;
use crate::policy::SubscribeOptions;

pub use dlq::{DLQ_BATCH_MAX, DLQ_SCAN_MAX};

use parking::GroupView;

/// Default number of partitions per topic (the most in-flight messages per ordered group).
pub const PARTITIONS_DEFAULT: u32 = 16;
/// Most partitions.
pub const PARTITIONS_MAX: u32 = 256;
/// Limit on every request to the server.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Most DLQ stream messages one list page reads; past it the page ends early, with a cursor
/// to continue (a lookup by id reads the whole stream, in batches).
/// Default age limit of the bus stream: none ([`Duration::ZERO`]). The stream uses limits
/// retention, so an age limit drops a message after that age whether or not every group has
/// consumed it; see [`NatsBusConfig::with_max_age`].
pub const MAX_AGE_DEFAULT: Duration = Duration::ZERO;
/// The header marking a redriven message as meant for one group only.
pub const ONLY_GROUP_HEADER: &str = "Trellis-Only-Group";

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

impl NatsBus {
    fn bus_subject(&self, partition: u32, topic: &str) -> String {
        format!("{}.bus.p{partition}.{topic}", self.inner.prefix)
    }

    /// Publishes a serialized envelope (already checked against the size limit) to the
    /// partition of its subject, for one group only with `only_group` (a redrive). A full
    /// stream's refusal is counted and says that nothing was dropped.
    async fn publish_raw(
        &self,
        topic: &str,
        envelope_subject: &str,
        bytes: Vec<u8>,
        only_group: Option<&str>,
    ) -> Result<(), BusError> {
        let partition = partition_of(envelope_subject, self.inner.partitions);
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
}

impl Bus for NatsBus {
    async fn publish(&self, topic: &str, mut envelope: Envelope) -> Result<(), BusError> {
        let bytes = prepare_publish(topic, &mut envelope, self.inner.message_bytes_max)?;
        self.publish_raw(topic, &envelope.subject, bytes, None)
            .await?;
        count_published(topic);
        failpoint!(crate::failpoints::PUBLISH_AFTER_COMMIT, topic);
        Ok(())
    }

    async fn subscribe(
        &self,
        pattern: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, BusError> {
        self.subscribe_group(pattern, group, options).await
    }
}

fn header<'a>(message: &'a jetstream::Message, name: &str) -> Option<&'a str> {
    message
        .headers
        .as_ref()
        .and_then(|headers| headers.get(name))
        .map(async_nats::HeaderValue::as_str)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
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
