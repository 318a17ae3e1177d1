//! Catch-up subscriptions: replay history, then follow new events, without a gap or a
//! duplicate.
//!
//! A subscription is a loop over `read_all` (or `read_stream`) that remembers the next
//! position to read. It reads in batches until a read comes back empty, then waits for the
//! store's head to move (or a poll interval to pass) and reads again. Since it always asks for
//! "everything from the next position" and the store assigns positions in commit order, the
//! switch from history to live has no seam where an event could be skipped or seen twice.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::Stream;

use crate::error::EventStoreError;
use crate::store::EventStore;
use crate::types::{Direction, RecordedEvent, StreamId};

/// Events fetched per read while catching up.
pub const SUBSCRIPTION_BATCH: usize = 512;
/// The longest a caught-up subscription waits before reading again without a wake-up (covers
/// appends by other processes when the backend cannot notify).
pub const SUBSCRIPTION_POLL: Duration = Duration::from_millis(250);
/// How long a subscription that was woken lets more appends arrive before it reads, so one
/// read carries the events of many writers (fewer queries when appends are frequent).
pub const SUBSCRIPTION_LINGER: Duration = Duration::from_millis(2);

enum Source {
    All,
    Stream(StreamId),
}

struct State<S> {
    store: S,
    source: Source,
    next: u64,
    buffer: VecDeque<RecordedEvent>,
    head: tokio::sync::watch::Receiver<u64>,
    /// The last read returned less than a batch: nothing more until the head moves.
    caught_up: bool,
    failed: bool,
}

/// Every event of the global log from position `from` (inclusive, positions start at 1), then
/// every new one as it commits. The stream ends only after yielding an error.
pub fn subscribe_all<S: EventStore>(
    store: S,
    from: u64,
) -> impl Stream<Item = Result<RecordedEvent, EventStoreError>> + Send {
    subscribe(store, Source::All, from.max(1))
}

/// Every event of `stream` from version `from` (inclusive), then every new one.
pub fn subscribe_stream<S: EventStore>(
    store: S,
    stream: StreamId,
    from: u64,
) -> impl Stream<Item = Result<RecordedEvent, EventStoreError>> + Send {
    subscribe(store, Source::Stream(stream), from.max(1))
}

fn subscribe<S: EventStore>(
    store: S,
    source: Source,
    from: u64,
) -> impl Stream<Item = Result<RecordedEvent, EventStoreError>> + Send {
    let head = store.watch_head();
    let state = State {
        store,
        source,
        next: from,
        buffer: VecDeque::new(),
        head,
        caught_up: false,
        failed: false,
    };
    futures_util::stream::unfold(state, |mut state| async move {
        if state.failed {
            return None;
        }
        loop {
            if let Some(event) = state.buffer.pop_front() {
                state.next = match state.source {
                    Source::All => event.position + 1,
                    Source::Stream(_) => event.version + 1,
                };
                return Some((Ok(event), state));
            }
            if state.caught_up {
                // The last read reached the head as it was marked below: wait for it to move
                // (at once if it moved meanwhile) instead of reading an empty batch.
                state.caught_up = false;
                if tokio::time::timeout(SUBSCRIPTION_POLL, state.head.changed())
                    .await
                    .is_ok()
                {
                    tokio::time::sleep(SUBSCRIPTION_LINGER).await;
                }
            }
            // Mark what we have seen before reading, so a head change during the read wakes us.
            state.head.borrow_and_update();
            let read = match &state.source {
                Source::All => state.store.read_all(state.next, SUBSCRIPTION_BATCH).await,
                Source::Stream(stream) => {
                    state
                        .store
                        .read_stream(stream, state.next, Direction::Forwards, SUBSCRIPTION_BATCH)
                        .await
                }
            };
            match read {
                Ok(events) if events.is_empty() => {
                    // Caught up: wait for the head to move, or poll.
                    let _ = tokio::time::timeout(SUBSCRIPTION_POLL, state.head.changed()).await;
                }
                Ok(events) => {
                    state.caught_up = events.len() < SUBSCRIPTION_BATCH;
                    state.buffer.extend(events);
                }
                Err(error) => {
                    state.failed = true;
                    return Some((Err(error), state));
                }
            }
        }
    })
}
