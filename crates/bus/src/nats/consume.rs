//! Consuming: a group's durable consumers, the pull tasks and the source that turns
//! JetStream messages into deliveries.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use chrono::Utc;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;

use super::parking::{GroupView, PARKED_TOPIC_HEADER, retry_copy_history, schedule_if_new};
use super::settle::NatsSettler;
use super::{NatsBus, ONLY_GROUP_HEADER, bounded, header, lock};
use crate::bus::{DeliveryKey, RawDelivery, Source, Subscription, validate_subscription};
use crate::envelope::Envelope;
use crate::error::BusError;
use crate::policy::SubscribeOptions;

/// How long one pull request waits on the server; a stream that stopped receiving for any
/// reason re-pulls after this.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// The idle heartbeat asked of the server (below half of `PULL_EXPIRES`).
const PULL_HEARTBEAT: Duration = Duration::from_secs(2);
/// Messages one pull request asks for on an ordered partition.
const ORDERED_PULL_BATCH: usize = 8;
/// Most messages one pull request asks for (unordered subscriptions).
const PULL_BATCH_MAX: usize = 256;

impl NatsBus {
    /// Creates (or joins) the group's consumers and starts pulling; see the module docs of
    /// [`super`] for the layout.
    pub(super) async fn subscribe_group(
        &self,
        pattern: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, BusError> {
        validate_subscription(pattern, group)?;
        let pattern = crate::topic::canonical_pattern_list(pattern);
        // The server filters one pattern (nats-server 2.9 has no list of filter subjects): a
        // list's consumers take every topic under the list's common prefix, and `admit` acks
        // those the list does not match without handing them to the handler. The list itself
        // is kept in the consumers' descriptions, where a later subscription compares it.
        let server_pattern = server_pattern(&pattern);
        let server_pattern = server_pattern.as_str();
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
                        self.bus_subject(partition, server_pattern),
                    )
                })
                .collect()
        } else {
            vec![(
                format!("{group}_all"),
                format!("{}.bus.*.{server_pattern}", self.inner.prefix),
            )]
        };
        let mut consumers = Vec::new();
        for (durable, filter_subject) in lanes {
            let mut config = durable_config(
                &durable,
                filter_subject.clone(),
                options.ack_wait,
                max_ack_pending,
            );
            config.description = Some(format!("{PATTERNS_DESCRIPTION}{pattern}"));
            let mut consumer: consumer::PullConsumer = bounded(
                self.inner
                    .bus_stream
                    .get_or_create_consumer(&durable, config.clone()),
            )
            .await?;
            let existing = &consumer.cached_info().config;
            let existing_patterns = existing
                .description
                .as_deref()
                .and_then(|d| d.strip_prefix(PATTERNS_DESCRIPTION))
                .map_or_else(
                    || pattern_of_filter(&existing.filter_subject),
                    str::to_owned,
                );
            if existing_patterns != pattern || existing.filter_subject != filter_subject {
                if !options.replace_patterns {
                    return Err(BusError::GroupConflict {
                        group: group.to_owned(),
                        existing: existing_patterns,
                        requested: pattern,
                    });
                }
                // An update of the durable consumer (its position kept). The server refuses
                // what it cannot change in place (a filter subject, on nats-server 2.9).
                consumer = bounded(self.inner.bus_stream.create_consumer(config)).await?;
                tracing::info!(group, durable, from = %existing_patterns, to = %pattern, "bus group's pattern list replaced");
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
            let lanes_subject = format!("{}.park.{group}.>", self.inner.prefix);
            let config = durable_config(&durable, lanes_subject, options.ack_wait, 1);
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
            pattern,
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

/// A group's durable pull consumer: explicit acks, every message from the start, and no
/// server-side delivery limit (the client counts deliveries and dead-letters, so JetStream
/// never drops a message silently).
/// The one pattern the server filters a group's consumers on: the pattern itself, or for a
/// list, the literal tokens all of its patterns start with, then `>` (`>` alone when they
/// share none). Wider than the list; never narrower.
fn server_pattern(list: &str) -> String {
    let patterns: Vec<Vec<&str>> = list.split(',').map(|p| p.split('.').collect()).collect();
    if let [only] = patterns.as_slice() {
        return only.join(".");
    }
    // A shared token must leave each pattern at least one more, which `>` then matches.
    let shortest = patterns.iter().map(Vec::len).min().unwrap_or(0);
    let mut common = Vec::new();
    for index in 0..shortest.saturating_sub(1) {
        let token = patterns[0][index];
        if token == "*" || token == ">" || patterns.iter().any(|p| p[index] != token) {
            break;
        }
        common.push(token);
    }
    common.push(">");
    common.join(".")
}

/// What starts a consumer's description that holds its group's pattern list.
const PATTERNS_DESCRIPTION: &str = "trellis-bus patterns: ";

/// The pattern a consumer made before descriptions held the list filters on:
/// `<prefix>.bus.<lane>.<pattern>` → `<pattern>`.
fn pattern_of_filter(filter: &str) -> String {
    filter
        .split_once(".bus.")
        .and_then(|(_, rest)| rest.split_once('.'))
        .map_or(filter, |(_, pattern)| pattern)
        .to_owned()
}

fn durable_config(
    durable: &str,
    filter_subject: String,
    ack_wait: Duration,
    max_ack_pending: i64,
) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(durable.to_owned()),
        filter_subject,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait,
        max_deliver: -1,
        max_ack_pending,
        deliver_policy: consumer::DeliverPolicy::All,
        ..Default::default()
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

struct NatsSource {
    bus: NatsBus,
    group: String,
    /// The group's pattern list, canonical: what `admit` hands to the handler.
    pattern: String,
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
        if !crate::topic::matches(&self.pattern, &topic) {
            // A pattern list's consumer takes every topic (see `subscribe_group`): not one of
            // this group's, so settled here and never parked or handled.
            message.ack().await.map_err(BusError::nats)?;
            return Ok(None);
        }
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

#[cfg(test)]
mod tests {
    use super::{pattern_of_filter, server_pattern};
    use crate::topic::matches;

    #[test]
    fn the_server_filter_of_a_pattern_list_covers_every_pattern_in_it() {
        // Goal: the server never drops a topic the list matches, and filters on the list's
        // shared literal prefix where there is one.
        assert_eq!(server_pattern("order.*"), "order.*");
        assert_eq!(server_pattern("inventory.reserved,payment.completed"), ">");
        assert_eq!(server_pattern("t1.a.one,t1.c.*"), "t1.>");
        assert_eq!(server_pattern("t1,t1.a"), ">");
        assert_eq!(server_pattern("t1.*.x,t1.a.y"), "t1.>");
        for (list, topic) in [
            ("t1.a.one,t1.c.*", "t1.c.z"),
            ("t1,t1.a", "t1"),
            ("inventory.reserved,payment.completed", "payment.completed"),
        ] {
            assert!(matches(list, topic));
            assert!(matches(&server_pattern(list), topic), "{list} / {topic}");
        }
        assert_eq!(pattern_of_filter("PFX.bus.p3.order.*"), "order.*");
        assert_eq!(pattern_of_filter("PFX.bus.*.>"), ">");
    }
}
