//! Group commit: one writer task per store turns concurrent appends into one transaction.
//!
//! A durable commit costs an fsync (about 90 µs on our disks), so committing every append on
//! its own caps a store at a few thousand appends per second. The writer takes every append
//! waiting in its queue (up to a limit), checks and writes each in one transaction, commits
//! once, and only then answers each caller. Each append is still checked and answered on its
//! own: a version conflict in one does not affect the others in the batch.

use std::collections::HashMap;
use std::future::Future;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::error::EventStoreError;
use crate::types::{AppendResult, ExpectedVersion, NewEvent, StreamId};

/// The most appends waiting for the writer; callers wait for room beyond this.
pub(crate) const QUEUE_APPENDS_MAX: usize = 4_096;
/// The most events written in one transaction.
const BATCH_EVENTS_MAX: usize = 4_000;
/// The most appends written in one transaction.
const BATCH_APPENDS_MAX: usize = 512;

/// One caller's append, waiting for the writer.
pub(crate) struct AppendRequest {
    pub(crate) stream: StreamId,
    pub(crate) expected: ExpectedVersion,
    pub(crate) events: Vec<NewEvent>,
    pub(crate) reply: oneshot::Sender<Result<AppendResult, EventStoreError>>,
}

/// One row to insert.
pub(crate) struct Row {
    pub(crate) position: i64,
    pub(crate) stream: String,
    pub(crate) version: i64,
    pub(crate) event: NewEvent,
    pub(crate) recorded_at: DateTime<Utc>,
}

/// An event id already in the store.
pub(crate) struct StoredId {
    pub(crate) id: Uuid,
    pub(crate) stream: String,
    pub(crate) version: u64,
    pub(crate) position: u64,
}

/// What the batch algorithm needs to know before it decides.
pub(crate) struct BatchState {
    /// The newest position in the log.
    pub(crate) head: u64,
    /// Which of the batch's event ids are stored, with where.
    pub(crate) stored: Vec<StoredId>,
    /// The versions of the batch's streams (streams not listed are at version 0).
    pub(crate) versions: Vec<(String, u64)>,
}

/// The database side of a batch, inside one open transaction that holds the store's write
/// lock (SQLite: `BEGIN IMMEDIATE`; PostgreSQL: an advisory lock). Two calls, so a backend
/// can do each in as few round trips as it is able to.
pub(crate) trait BatchTx: Send {
    /// Reads the head, which of `ids` are stored, and the versions of `streams`.
    fn read_state(
        &mut self,
        ids: &[Uuid],
        streams: &[String],
    ) -> impl Future<Output = Result<BatchState, sqlx::Error>> + Send;
    /// Inserts the rows, records each stream's new version (undeleting it), and commits;
    /// `head` is the new head position.
    fn write(
        self,
        rows: &[Row],
        versions: &[(String, i64)],
        head: u64,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;
}

/// Starts a writer task fed by the returned sender. `begin` opens a transaction holding the
/// write lock; `on_commit` is told the new head after each successful commit.
pub(crate) fn spawn_writer<T, B, BFut, C>(mut begin: B, on_commit: C) -> mpsc::Sender<AppendRequest>
where
    T: BatchTx + 'static,
    B: FnMut() -> BFut + Send + 'static,
    BFut: Future<Output = Result<T, sqlx::Error>> + Send,
    C: Fn(u64) + Send + 'static,
{
    let (sender, mut receiver) = mpsc::channel::<AppendRequest>(QUEUE_APPENDS_MAX);
    tokio::spawn(async move {
        while let Some(first) = receiver.recv().await {
            let mut batch = fill_batch(first, &mut receiver);
            let outcomes = match begin().await {
                Ok(tx) => write_batch(tx, &mut batch).await,
                Err(error) => Err(error),
            };
            match outcomes {
                Ok((results, head)) => {
                    if let Some(head) = head {
                        on_commit(head);
                    }
                    for (request, result) in batch.into_iter().zip(results) {
                        let _ = request.reply.send(result);
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, appends = batch.len(), "event store append transaction failed");
                    let message = error.to_string();
                    for request in batch {
                        let _ = request
                            .reply
                            .send(Err(EventStoreError::Unavailable(message.clone())));
                    }
                }
            }
        }
    });
    sender
}

/// The appends waiting in the queue after `first`, up to the batch limits.
pub(crate) fn fill_batch(
    first: AppendRequest,
    receiver: &mut mpsc::Receiver<AppendRequest>,
) -> Vec<AppendRequest> {
    let mut events = first.events.len();
    let mut batch = vec![first];
    while batch.len() < BATCH_APPENDS_MAX && events < BATCH_EVENTS_MAX {
        match receiver.try_recv() {
            Ok(request) => {
                events += request.events.len();
                batch.push(request);
            }
            Err(_) => break,
        }
    }
    batch
}

/// Checks and writes every append of the batch in one transaction: one query finds which of
/// the batch's event ids are stored, one reads the versions of its streams, one inserts every
/// row. Returns each append's result and the new head (None when nothing was written).
async fn write_batch<T: BatchTx>(
    mut tx: T,
    batch: &mut [AppendRequest],
) -> Result<(Vec<Result<AppendResult, EventStoreError>>, Option<u64>), sqlx::Error> {
    let all_ids: Vec<Uuid> = batch
        .iter()
        .flat_map(|r| r.events.iter().map(|e| e.id))
        .collect();
    let mut streams: Vec<String> = batch.iter().map(|r| r.stream.as_str().to_owned()).collect();
    streams.sort_unstable();
    streams.dedup();
    let state = tx.read_state(&all_ids, &streams).await?;
    let mut head = state.head;
    // Where each already-stored id is: (stream, version, position). Ids written earlier in
    // this batch are added as they are assigned.
    let mut stored: HashMap<Uuid, (String, u64, u64)> = state
        .stored
        .into_iter()
        .map(|s| (s.id, (s.stream, s.version, s.position)))
        .collect();
    let mut versions: HashMap<String, u64> = state.versions.into_iter().collect();
    let mut touched: HashMap<String, u64> = HashMap::new();
    let mut rows = Vec::new();
    let mut results = Vec::with_capacity(batch.len());
    let recorded_at = Utc::now();
    for request in batch.iter_mut() {
        let ids: Vec<Uuid> = request.events.iter().map(|e| e.id).collect();
        let known: Vec<(Uuid, String, u64, u64)> = ids
            .iter()
            .filter_map(|id| stored.get(id).map(|(s, v, p)| (*id, s.clone(), *v, *p)))
            .collect();
        if !known.is_empty() {
            results.push(replayed(&request.stream, &ids, known));
            continue;
        }
        let version = versions.get(request.stream.as_str()).copied().unwrap_or(0);
        if !request.expected.matches(version) {
            results.push(Err(EventStoreError::WrongExpectedVersion {
                stream: request.stream.clone(),
                expected: request.expected,
                actual: version,
            }));
            continue;
        }
        let mut next = version;
        for event in std::mem::take(&mut request.events) {
            head += 1;
            next += 1;
            stored.insert(event.id, (request.stream.as_str().to_owned(), next, head));
            rows.push(Row {
                position: to_i64(head),
                stream: request.stream.as_str().to_owned(),
                version: to_i64(next),
                event,
                recorded_at,
            });
        }
        versions.insert(request.stream.as_str().to_owned(), next);
        touched.insert(request.stream.as_str().to_owned(), next);
        results.push(Ok(AppendResult {
            next_version: next,
            global_position: head,
        }));
    }
    if rows.is_empty() {
        // Nothing to write: the transaction is dropped, which rolls it back.
        return Ok((results, None));
    }
    let touched: Vec<(String, i64)> = touched.into_iter().map(|(s, v)| (s, to_i64(v))).collect();
    tx.write(&rows, &touched, head).await?;
    Ok((results, Some(head)))
}

/// The answer to an append whose ids (some or all) are already stored.
pub(crate) fn replayed(
    stream: &StreamId,
    ids: &[Uuid],
    mut stored: Vec<(Uuid, String, u64, u64)>,
) -> Result<AppendResult, EventStoreError> {
    let order: HashMap<Uuid, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    stored.sort_by_key(|(id, ..)| order.get(id).copied().unwrap_or(usize::MAX));
    let complete = stored.len() == ids.len()
        && stored
            .iter()
            .zip(ids)
            .all(|((stored_id, ..), id)| stored_id == id)
        && stored.iter().all(|(_, s, ..)| s == stream.as_str())
        && stored.windows(2).all(|w| w[1].2 == w[0].2 + 1);
    if !complete {
        return Err(EventStoreError::IdempotencyConflict {
            stream: stream.clone(),
            event_id: stored[0].0,
        });
    }
    let (_, _, version, position) = stored[stored.len() - 1];
    Ok(AppendResult {
        next_version: version,
        global_position: position,
    })
}

pub(crate) fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub(crate) fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}
