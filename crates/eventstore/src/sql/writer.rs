//! Group commit, written once for both engines: writer tasks turn concurrent appends into one
//! transaction each, and one algorithm decides every append of a batch.
//!
//! A durable commit costs an fsync (about 90 µs on our disks), so committing every append on
//! its own caps a store at a few thousand appends per second. A writer takes every append
//! waiting in its queue (up to a limit), checks and writes each in one transaction, commits
//! once, and only then answers each caller. Each append is still checked and answered on its
//! own: a version conflict in one does not affect the others in the batch.
//!
//! What differs per engine is behind [`Dialect`]: how a batch transaction starts, how it reads
//! the committed state, how it writes and numbers the rows, how many writers a store runs,
//! which errors mean "lost a race, decide again", how the head is read and what wakes a store
//! when another process appends. This side is plain generic code: each engine implements the
//! traits with its own concrete sqlx types, so no `sqlx::Database` bounds are needed.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Weak};

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use super::raise;
use crate::error::EventStoreError;
use crate::types::{AppendResult, ExpectedVersion, NewEvent, StreamId, validate_append};

/// The most appends waiting for the writers; callers wait for room beyond this.
pub(crate) const QUEUE_APPENDS_MAX: usize = 4_096;
/// The most events written in one transaction.
const BATCH_EVENTS_MAX: usize = 4_000;
/// The most appends written in one transaction.
const BATCH_APPENDS_MAX: usize = 512;
/// Attempts at a batch whose appends keep losing races (see [`Dialect::lost_race`]).
const RACE_ATTEMPTS: u32 = 5;

/// Seconds an append waited for its answer: queueing, its batch's transaction and the commit
/// (a histogram).
const APPEND_DURATION: &str = "trellis_eventstore_append_duration_seconds";
/// Appends written in one transaction (a histogram): how well group commit batches.
const APPEND_BATCH_SIZE: &str = "trellis_eventstore_append_batch_size";

/// One caller's append, waiting for a writer.
pub(crate) struct AppendRequest {
    pub(crate) stream: StreamId,
    pub(crate) expected: ExpectedVersion,
    pub(crate) events: Vec<NewEvent>,
    pub(crate) reply: oneshot::Sender<Result<AppendResult, EventStoreError>>,
}

/// An engine: the few statements and behaviours in which SQLite and PostgreSQL differ.
/// Implemented by each engine's pool type; everything else about a SQL store is shared.
pub(crate) trait Dialect: Clone + Send + Sync + 'static {
    /// A batch transaction, holding whatever the engine needs until it commits.
    type Batch: BatchTx;
    /// Writer tasks per store.
    const WRITERS: usize;
    /// The `FROM` clause of an event read, aliasing the events table `e`.
    const EVENTS_FROM: &'static str;
    /// The column holding an event's position in [`Self::EVENTS_FROM`].
    const POSITION: &'static str;
    /// Reads the newest position in the log.
    fn read_head(&self) -> impl Future<Output = Result<u64, sqlx::Error>> + Send;
    /// Starts whatever tells this store of appends made by other store instances (other
    /// processes) by raising `head`; it ends once `head` is dropped.
    fn spawn_waker(&self, head: Weak<watch::Sender<u64>>);
    /// Opens a batch transaction.
    fn begin(&self) -> impl Future<Output = Result<Self::Batch, sqlx::Error>> + Send;
    /// Whether a failed batch lost a race to another writer and should be decided again on
    /// fresh state.
    fn lost_race(error: &sqlx::Error) -> bool;
}

/// The database side of one batch, inside one transaction. Two calls, so an engine can do
/// each in as few round trips as it is able to.
pub(crate) trait BatchTx: Send {
    /// Reads which of `ids` are stored and the versions of `streams`, on committed state.
    fn read_state(
        &mut self,
        ids: &[Uuid],
        streams: &[String],
    ) -> impl Future<Output = Result<BatchState, sqlx::Error>> + Send;
    /// Inserts the plan's rows, numbering them in order after the head, records each touched
    /// stream's new version (undeleting it), and commits. Returns the head before the rows.
    fn write(
        self,
        batch: &[AppendRequest],
        plan: &Plan,
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send;
}

/// Where an event id is: in the store, or in a row of this batch's plan.
#[derive(Clone, Copy)]
enum Place {
    Stored(u64),
    /// Row `k` of the plan, whose position is only known once the rows are numbered.
    Planned(usize),
}

/// An event id already in the store or in the plan.
struct StoredId {
    stream: String,
    version: u64,
    place: Place,
}

/// What the batch algorithm needs to know before it decides.
pub(crate) struct BatchState {
    /// Which of the batch's event ids are stored, with where.
    stored: HashMap<Uuid, StoredId>,
    /// The versions of the batch's streams (streams not listed are at version 0).
    versions: HashMap<String, u64>,
}

impl BatchState {
    /// Parses the two JSON arrays both engines' state queries build: `[[id, stream, version,
    /// position], …]` and `[[stream, version], …]`.
    pub(crate) fn from_json(stored: &str, versions: &str) -> Result<Self, sqlx::Error> {
        let decode = |e: serde_json::Error| sqlx::Error::Decode(Box::new(e));
        let stored: Vec<(Uuid, String, i64, i64)> = serde_json::from_str(stored).map_err(decode)?;
        let versions: Vec<(String, i64)> = serde_json::from_str(versions).map_err(decode)?;
        Ok(Self {
            stored: stored
                .into_iter()
                .map(|(id, stream, version, position)| {
                    let (version, position) = (to_u64(version), to_u64(position));
                    let place = Place::Stored(position);
                    (
                        id,
                        StoredId {
                            stream,
                            version,
                            place,
                        },
                    )
                })
                .collect(),
            versions: versions.into_iter().map(|(s, v)| (s, to_u64(v))).collect(),
        })
    }
}

/// One row the plan writes: event `event` of append `request` in the batch.
pub(crate) struct PlannedRow {
    pub(crate) request: usize,
    pub(crate) event: usize,
    /// The event's version in its stream.
    pub(crate) version: i64,
}

/// What one append of a batch turned into.
enum Decision {
    /// Refused without writing.
    Refused(EventStoreError),
    /// A replay of ids stored (or planned earlier in the batch), answered without writing.
    Replayed { next_version: u64, place: Place },
    /// Written as rows `[first, first + count)` of the plan, reaching `next_version`.
    Written {
        first: usize,
        count: usize,
        next_version: u64,
    },
}

/// The decided batch: the rows to write, in position order, and each append's answer.
pub(crate) struct Plan {
    /// Row `k` gets position `head + k + 1`.
    pub(crate) rows: Vec<PlannedRow>,
    /// Each touched stream's version after the batch, sorted by stream.
    pub(crate) versions: Vec<(String, i64)>,
    pub(crate) recorded_at: DateTime<Utc>,
    decisions: Vec<Decision>,
}

impl Plan {
    /// Decides every append of the batch on the state read before it, in batch order, so a
    /// later append sees the versions and ids an earlier one writes.
    fn decide(batch: &[AppendRequest], state: BatchState) -> Self {
        let BatchState {
            mut stored,
            mut versions,
        } = state;
        let mut rows = Vec::new();
        let mut touched = Vec::new();
        let mut decisions = Vec::with_capacity(batch.len());
        for (index, request) in batch.iter().enumerate() {
            let ids: Vec<Uuid> = request.events.iter().map(|e| e.id).collect();
            let known: Vec<(Uuid, String, u64, Place)> = ids
                .iter()
                .filter_map(|id| {
                    let s = stored.get(id)?;
                    Some((*id, s.stream.clone(), s.version, s.place))
                })
                .collect();
            if !known.is_empty() {
                decisions.push(match replayed(&request.stream, &ids, known) {
                    Ok((next_version, place)) => Decision::Replayed {
                        next_version,
                        place,
                    },
                    Err(error) => Decision::Refused(error),
                });
                continue;
            }
            let stream = request.stream.as_str();
            let version = versions.get(stream).copied().unwrap_or(0);
            if !request.expected.matches(version) {
                decisions.push(Decision::Refused(EventStoreError::WrongExpectedVersion {
                    stream: request.stream.clone(),
                    expected: request.expected,
                    actual: version,
                }));
                continue;
            }
            let first = rows.len();
            for (event_index, event) in request.events.iter().enumerate() {
                let event_version = version + event_index as u64 + 1;
                // A later append of the same ids in the batch is then a replay (or a
                // conflict), never a second write.
                let stored_id = StoredId {
                    stream: stream.to_owned(),
                    version: event_version,
                    place: Place::Planned(rows.len()),
                };
                stored.insert(event.id, stored_id);
                rows.push(PlannedRow {
                    request: index,
                    event: event_index,
                    version: to_i64(event_version),
                });
            }
            let next_version = version + request.events.len() as u64;
            versions.insert(stream.to_owned(), next_version);
            touched.push(stream);
            decisions.push(Decision::Written {
                first,
                count: request.events.len(),
                next_version,
            });
        }
        touched.sort_unstable();
        touched.dedup();
        let versions = touched
            .into_iter()
            .map(|s| (s.to_owned(), to_i64(versions.get(s).copied().unwrap_or(0))))
            .collect();
        Self {
            rows,
            versions,
            recorded_at: Utc::now(),
            decisions,
        }
    }

    /// Each append's answer, given the head before the plan's rows were numbered.
    fn results(self, before: u64) -> Vec<Result<AppendResult, EventStoreError>> {
        let position = |place| match place {
            Place::Stored(position) => position,
            Place::Planned(row) => before + row as u64 + 1,
        };
        let results = self.decisions.into_iter().map(|decision| match decision {
            Decision::Refused(error) => Err(error),
            Decision::Replayed {
                next_version,
                place,
            } => Ok(AppendResult {
                next_version,
                global_position: position(place),
            }),
            Decision::Written {
                first,
                count,
                next_version,
            } => Ok(AppendResult {
                next_version,
                global_position: before + (first + count) as u64,
            }),
        });
        results.collect()
    }
}

/// A store's writer tasks: the queue that feeds them and the head they raise.
#[derive(Debug, Clone)]
pub(crate) struct Writers {
    queue: mpsc::Sender<AppendRequest>,
    head: Arc<watch::Sender<u64>>,
}

impl Writers {
    /// Reads the head, then starts the engine's waker and its writer tasks; they end when the
    /// last clone of the returned value is dropped.
    pub(crate) async fn start<D: Dialect>(pool: &D) -> Result<Self, sqlx::Error> {
        crate::metric_help::describe();
        let head = Arc::new(watch::Sender::new(pool.read_head().await?));
        pool.spawn_waker(Arc::downgrade(&head));
        let queue = spawn_writers(pool, &head);
        Ok(Self { queue, head })
    }

    /// Hands an append to the writers and waits for its answer.
    pub(crate) async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, EventStoreError> {
        validate_append(&events)?;
        let started = std::time::Instant::now();
        let (reply, answer) = oneshot::channel();
        let request = AppendRequest {
            stream: stream.clone(),
            expected,
            events,
            reply,
        };
        (self.queue.send(request).await).map_err(|_| EventStoreError::Closed)?;
        let result = answer.await.map_err(|_| EventStoreError::Closed)?;
        // Queueing, the batch's transaction and its commit: what a caller waits for.
        metrics::histogram!(APPEND_DURATION).record(started.elapsed().as_secs_f64());
        result
    }

    /// The head as this store knows it: raised by its own commits and by the waker.
    pub(crate) fn watch_head(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }
}

type BatchOutcome = (Vec<Result<AppendResult, EventStoreError>>, Option<u64>);

/// Starts the engine's writer tasks, fed by the returned sender; they take turns at the queue
/// and end when every sender is gone. Each successful commit raises `head`.
fn spawn_writers<D: Dialect>(
    pool: &D,
    head: &Arc<watch::Sender<u64>>,
) -> mpsc::Sender<AppendRequest> {
    let (sender, receiver) = mpsc::channel::<AppendRequest>(QUEUE_APPENDS_MAX);
    let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
    for _ in 0..D::WRITERS {
        let (pool, receiver, head) = (pool.clone(), receiver.clone(), Arc::downgrade(head));
        tokio::spawn(async move {
            loop {
                let batch = {
                    let mut receiver = receiver.lock().await;
                    let Some(first) = receiver.recv().await else {
                        return;
                    };
                    fill_batch(first, &mut receiver)
                };
                metrics::histogram!(APPEND_BATCH_SIZE).record(batch.len() as f64);
                match write_with_retries(&pool, &batch).await {
                    Ok((results, last)) => {
                        if let (Some(last), Some(head)) = (last, head.upgrade()) {
                            raise(&head, last);
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
    }
    sender
}

/// The appends waiting in the queue after `first`, up to the batch limits.
fn fill_batch(
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

/// Writes a batch, deciding again on fresh state when it lost a race to another writer.
async fn write_with_retries<D: Dialect>(
    pool: &D,
    batch: &[AppendRequest],
) -> Result<BatchOutcome, sqlx::Error> {
    let mut attempt = 1;
    loop {
        match write_batch(pool, batch).await {
            Err(error) if D::lost_race(&error) && attempt < RACE_ATTEMPTS => {
                tracing::debug!(%error, attempt, "append batch lost a race; deciding again");
                attempt += 1;
            }
            outcome => return outcome,
        }
    }
}

/// Checks and writes every append of the batch in one transaction: one read of the stored
/// ids and stream versions, then one write. Returns each append's result and the new head
/// (None when nothing was written).
async fn write_batch<D: Dialect>(
    pool: &D,
    batch: &[AppendRequest],
) -> Result<BatchOutcome, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let ids: Vec<Uuid> = batch
        .iter()
        .flat_map(|r| r.events.iter().map(|e| e.id))
        .collect();
    let mut streams: Vec<String> = batch.iter().map(|r| r.stream.as_str().to_owned()).collect();
    streams.sort_unstable();
    streams.dedup();
    let plan = Plan::decide(batch, tx.read_state(&ids, &streams).await?);
    if plan.rows.is_empty() {
        // Nothing to write: the transaction is dropped, which rolls it back.
        return Ok((plan.results(0), None));
    }
    let written = plan.rows.len() as u64;
    let before = tx.write(batch, &plan).await?;
    Ok((plan.results(before), Some(before + written)))
}

/// The answer to an append whose ids (some or all) are already stored: the stream version
/// and place of its last event when it is a complete replay.
fn replayed(
    stream: &StreamId,
    ids: &[Uuid],
    mut stored: Vec<(Uuid, String, u64, Place)>,
) -> Result<(u64, Place), EventStoreError> {
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
    let (_, _, version, place) = stored[stored.len() - 1];
    Ok((version, place))
}

pub(crate) fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub(crate) fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(stream: &str, expected: ExpectedVersion, ids: &[Uuid]) -> AppendRequest {
        let events = ids
            .iter()
            .map(|id| NewEvent::new("Tested", serde_json::json!({})).with_id(*id))
            .collect();
        AppendRequest {
            stream: StreamId::new(stream).expect("valid stream id"),
            expected,
            events,
            reply: oneshot::channel().0,
        }
    }

    fn empty_state() -> BatchState {
        BatchState::from_json("[]", "[]").expect("valid state")
    }

    #[test]
    fn appends_in_one_batch_are_numbered_in_batch_order_after_the_head() {
        // Two streams, three events: positions follow the head in batch order.
        let batch = [
            request("a", ExpectedVersion::Any, &[Uuid::now_v7(), Uuid::now_v7()]),
            request("b", ExpectedVersion::Any, &[Uuid::now_v7()]),
        ];
        let plan = Plan::decide(&batch, empty_state());
        assert_eq!(plan.rows.len(), 3);
        assert_eq!(plan.versions, [("a".to_owned(), 2), ("b".to_owned(), 1)]);
        let results = plan.results(10);
        let positions: Vec<u64> = results
            .iter()
            .map(|r| r.as_ref().expect("written").global_position)
            .collect();
        assert_eq!(positions, [12, 13]);
    }

    #[test]
    fn a_retry_in_the_same_batch_is_answered_with_the_first_appends_result() {
        // The same ids twice in one batch: written once, and the second append gets the
        // first one's version and position, not a position of zero.
        let ids = [Uuid::now_v7(), Uuid::now_v7()];
        let batch = [
            request("a", ExpectedVersion::Any, &ids),
            request("a", ExpectedVersion::Any, &ids),
        ];
        let plan = Plan::decide(&batch, empty_state());
        assert_eq!(plan.rows.len(), 2);
        let results = plan.results(5);
        let first = results[0].as_ref().expect("written");
        let second = results[1].as_ref().expect("replayed");
        assert_eq!((first.next_version, first.global_position), (2, 7));
        assert_eq!((second.next_version, second.global_position), (2, 7));
    }

    #[test]
    fn a_later_append_in_the_batch_sees_the_version_an_earlier_one_wrote() {
        // Expecting version 0 after an earlier append in the batch took the stream to 1.
        let batch = [
            request("a", ExpectedVersion::Exact(0), &[Uuid::now_v7()]),
            request("a", ExpectedVersion::Exact(0), &[Uuid::now_v7()]),
        ];
        let results = Plan::decide(&batch, empty_state()).results(0);
        assert!(results[0].is_ok());
        assert!(matches!(
            results[1],
            Err(EventStoreError::WrongExpectedVersion { actual: 1, .. })
        ));
    }
}
