//! Settling a delivery: ack, park, retry copy, NAK in place, or the DLQ.

use std::sync::Arc;

use chrono::Utc;
use futures_util::future::BoxFuture;

use super::parking::{GroupView, LANE_FIRST_FAILURES_MAX, RetryCopy};
use super::{NatsBus, bounded, lock};
use crate::bus::{DeliveryKey, Message, Settle, Settlement};
use crate::dlq::DeadLetter;
use crate::error::BusError;

#[derive(Debug)]
pub(super) struct NatsSettler {
    pub(super) bus: NatsBus,
    pub(super) ordered: bool,
    /// The process's view of the group's parked subjects (shared with the sources).
    pub(super) view: Arc<GroupView>,
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
            Settlement::Nack { delay, failed } if self.ordered && !key.parked => {
                // Park the subject: the message moves to its lane (due after the delay) and
                // the partition moves on; later messages of the subject follow it there.
                let view = Arc::clone(&self.view);
                Box::pin(async move {
                    let now = Utc::now();
                    let due = now + chrono::Duration::from_std(delay).unwrap_or_default();
                    let first_failure = failed.then_some(now);
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
                failed: true,
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
            Settlement::Nack { delay, failed } => {
                if key.parked && key.first_failure.is_none() && failed {
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
