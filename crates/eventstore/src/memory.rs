//! The in-memory backend: for tests and examples. Nothing survives the process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::Utc;
use tokio::sync::watch;
use uuid::Uuid;

use crate::error::EventStoreError;
use crate::store::EventStore;
use crate::types::{
    AppendResult, Direction, ExpectedVersion, NewEvent, RecordedEvent, Snapshot, StreamId,
    StreamInfo, StreamMetadata, validate_append, validate_limit,
};

/// An event store in memory. Cheap to clone; clones share the data.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<State>>,
    head: Arc<watch::Sender<u64>>,
}

#[derive(Debug, Default)]
struct State {
    log: Vec<RecordedEvent>,
    streams: HashMap<StreamId, StreamState>,
    ids: HashMap<Uuid, (StreamId, u64, u64)>,
    snapshots: HashMap<StreamId, Snapshot>,
}

#[derive(Debug, Default)]
struct StreamState {
    /// Positions of the stream's events, index = version - 1.
    positions: Vec<u64>,
    metadata: StreamMetadata,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            inner: Arc::default(),
            head: Arc::new(watch::Sender::new(0)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl EventStore for MemoryStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, EventStoreError> {
        validate_append(&events)?;
        let mut state = self.lock();
        // Idempotency by event id.
        let stored: Vec<_> = events
            .iter()
            .filter_map(|e| state.ids.get(&e.id).cloned())
            .collect();
        if !stored.is_empty() {
            let first = &stored[0];
            let same_append = stored.len() == events.len()
                && stored
                    .iter()
                    .enumerate()
                    .all(|(i, (s, v, _))| s == stream && *v == first.1 + i as u64);
            if !same_append {
                let clash = events
                    .iter()
                    .find(|e| state.ids.contains_key(&e.id))
                    .map_or(Uuid::nil(), |e| e.id);
                return Err(EventStoreError::IdempotencyConflict {
                    stream: stream.clone(),
                    event_id: clash,
                });
            }
            let last = stored.last().expect("not empty");
            return Ok(AppendResult {
                next_version: last.1,
                global_position: last.2,
            });
        }
        let version = state
            .streams
            .get(stream)
            .map_or(0, |s| s.positions.len() as u64);
        if !expected.matches(version) {
            return Err(EventStoreError::WrongExpectedVersion {
                stream: stream.clone(),
                expected,
                actual: version,
            });
        }
        let recorded_at = Utc::now();
        let mut position = state.log.len() as u64;
        let mut next_version = version;
        for event in events {
            position += 1;
            next_version += 1;
            state
                .ids
                .insert(event.id, (stream.clone(), next_version, position));
            state.log.push(RecordedEvent {
                id: event.id,
                stream: stream.clone(),
                version: next_version,
                position,
                event_type: event.event_type,
                schema_version: event.schema_version,
                data: event.data,
                metadata: event.metadata,
                recorded_at,
            });
        }
        let entry = state.streams.entry(stream.clone()).or_default();
        entry
            .positions
            .extend((version + 1..=next_version).map(|v| position - (next_version - v)));
        entry.metadata.deleted = false;
        drop(state);
        self.head.send_replace(position);
        Ok(AppendResult {
            next_version,
            global_position: position,
        })
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from: u64,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, EventStoreError> {
        validate_limit(limit)?;
        let state = self.lock();
        let Some(entry) = state.streams.get(stream) else {
            return Ok(Vec::new());
        };
        let version = entry.positions.len() as u64;
        let first = entry.metadata.first_visible(version);
        let event = |v: u64| state.log[(entry.positions[(v - 1) as usize] - 1) as usize].clone();
        let events = match direction {
            Direction::Forwards => (from.max(first)..=version).take(limit).map(event).collect(),
            Direction::Backwards => {
                let start = from.min(version);
                if start < first {
                    Vec::new()
                } else {
                    (first..=start).rev().take(limit).map(event).collect()
                }
            }
        };
        Ok(events)
    }

    async fn read_all(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, EventStoreError> {
        validate_limit(limit)?;
        let state = self.lock();
        let start = usize::try_from(from.max(1) - 1).unwrap_or(usize::MAX);
        Ok(state.log.iter().skip(start).take(limit).cloned().collect())
    }

    async fn stream_info(&self, stream: &StreamId) -> Result<Option<StreamInfo>, EventStoreError> {
        let state = self.lock();
        Ok(state.streams.get(stream).map(|s| StreamInfo {
            version: s.positions.len() as u64,
            metadata: s.metadata,
        }))
    }

    async fn set_stream_metadata(
        &self,
        stream: &StreamId,
        metadata: StreamMetadata,
    ) -> Result<(), EventStoreError> {
        self.lock()
            .streams
            .entry(stream.clone())
            .or_default()
            .metadata = metadata;
        Ok(())
    }

    async fn head(&self) -> Result<u64, EventStoreError> {
        Ok(self.lock().log.len() as u64)
    }

    fn watch_head(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, EventStoreError> {
        Ok(self.lock().snapshots.get(stream).cloned())
    }

    async fn save_snapshot(
        &self,
        stream: &StreamId,
        snapshot: Snapshot,
    ) -> Result<(), EventStoreError> {
        let mut state = self.lock();
        match state.snapshots.get(stream) {
            Some(existing) if existing.version > snapshot.version => {}
            _ => {
                state.snapshots.insert(stream.clone(), snapshot);
            }
        }
        Ok(())
    }
}
