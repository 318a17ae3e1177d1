//! Parking and retry copies: a failed message of an ordered group waits in its subject's
//! lane; an unordered group's retry goes out as a copy. Both carry their history in headers.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use chrono::{DateTime, Utc};

use super::{NatsBus, ONLY_GROUP_HEADER, REQUEST_TIMEOUT, bounded, header, partition_of};
use crate::envelope::Envelope;
use crate::error::BusError;

/// The headers a parked message carries in its lane: its topic, the deliveries made before
/// it was parked, when its next delivery is due (Unix ms) and when it first failed (Unix ms).
pub(super) const PARKED_TOPIC_HEADER: &str = "Trellis-Topic";
const PARKED_ATTEMPTS_HEADER: &str = "Trellis-Attempts";
const PARKED_DUE_HEADER: &str = "Trellis-Due-Ms";
const FIRST_FAILURE_HEADER: &str = "Trellis-First-Failure-Ms";
/// Most remembered first-failure times of lane messages that carry none in their headers
/// (queued behind a parked message, then failing themselves); cleared when exceeded.
pub(super) const LANE_FIRST_FAILURES_MAX: usize = 100_000;

/// A failed message on its way to another try: a park lane's entry, or an unordered
/// group's retry copy.
#[derive(Debug, Clone, Copy)]
pub(super) struct RetryCopy<'a> {
    pub(super) topic: &'a str,
    pub(super) envelope: &'a Envelope,
    /// Deliveries made before this copy.
    pub(super) attempts: u32,
    /// When the copy may be handled.
    pub(super) due: DateTime<Utc>,
    pub(super) first_failure: Option<DateTime<Utc>>,
}

impl NatsBus {
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
    pub(super) async fn is_parked(&self, group: &str, subject: &str) -> Result<bool, BusError> {
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
    pub(super) async fn park(
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
    pub(super) async fn requeue(&self, group: &str, retry: &RetryCopy<'_>) -> Result<(), BusError> {
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
}

/// One process's view of an ordered group's park lanes, shared by its subscriptions.
#[derive(Debug, Default)]
pub(super) struct GroupView {
    /// Subjects parked by this process or seen parked. Entries may be stale (the lane
    /// drained meanwhile); every positive is checked on the server.
    pub(super) parked: Mutex<HashSet<String>>,
    /// The last consumer sequence this process received per partition consumer: a gap means
    /// another process took a delivery of the partition meanwhile, and may have parked a
    /// subject this view does not know about.
    pub(super) last_consumer_sequence: Mutex<HashMap<String, u64>>,
}

/// The attempt number and first failure of a retry copy (a lane message or an unordered
/// group's retry) from its headers: its attempts continue where the original's left off
/// (its first delivery only scheduled it, see `schedule_if_new`), and its first failure
/// survives restarts. `None` for a message that is not a retry copy.
pub(super) fn retry_copy_history(
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

/// The first delivery of a retry copy (a lane message, an unordered group's retry) only
/// schedules it: a NAK with the time left until
/// it is due (none for a message queued behind a parked one). Its lane consumer has one
/// message in flight, and a NAKed message stays in flight until redelivered, so nothing of
/// the group's lanes passes it; and the server keeps the schedule, so it holds across a
/// restart of the consumer. Returns whether the message was scheduled (not to be handled).
pub(super) async fn schedule_if_new(message: &jetstream::Message, group: &str) -> bool {
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
