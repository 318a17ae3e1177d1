//! The dead-letter queue on a JetStream stream: letters, archived letters and the action
//! log, read in batches through ephemeral consumers.

use std::time::Duration;

use async_nats::jetstream::{consumer, stream};
use chrono::Utc;
use futures_util::StreamExt;
use uuid::Uuid;

use super::{NatsBus, REQUEST_TIMEOUT, bounded};
use crate::dlq::{
    ACTIONS_LIMIT_MAX, DeadLetter, DeadLetterFilter, DeadLetterPage, DeadLetterState, DeadLetters,
    DlqAction, DlqActionKind, cursor, log_action, not_found, page_of, redriven_envelope,
};
use crate::error::BusError;

/// Most DLQ stream messages one list page reads; past it the page ends early, with a cursor
/// to continue (a lookup by id reads the whole stream, in batches).
pub const DLQ_SCAN_MAX: u64 = 100_000;

impl NatsBus {
    pub(super) async fn publish_dlq(
        &self,
        subject: String,
        payload: Vec<u8>,
    ) -> Result<(), BusError> {
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
                let envelope = redriven_envelope(&letter);
                let bytes = envelope.to_bytes_limited(self.inner.message_bytes_max)?;
                self.publish_raw(&letter.topic, &envelope.subject, bytes, Some(&letter.group))
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
