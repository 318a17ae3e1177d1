//! The SQL backends: one implementation, two dialects.
//!
//! SQLite and PostgreSQL share everything but a few statements and behaviours, which each
//! engine's pool type states by implementing [`writer::Dialect`]: how a batch transaction
//! starts and locks (`BEGIN IMMEDIATE` / an advisory lock taken by `es_number`), how it reads
//! committed state and writes and numbers rows ([`writer::BatchTx`]), how many writer tasks
//! run, which errors are lost races, where positions live and how the head is read. The group
//! commit writer and the batch decision are plain generic code ([`writer`]); the
//! `EventStore` impl is one macro body expanded per engine ([`event_store`] says why).
//! Each engine module keeps its schema, its batch statements, `open` and, for PostgreSQL, the
//! `LISTEN` task that wakes subscriptions in other processes.

#[macro_use]
mod event_store;
pub(crate) mod postgres;
pub(crate) mod sqlite;
pub(crate) mod writer;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::error::EventStoreError;
use crate::types::{Metadata, RecordedEvent, StreamId};

/// A stored row before its JSON is parsed.
pub(crate) struct RawEvent {
    pub(crate) position: i64,
    pub(crate) stream: String,
    pub(crate) version: i64,
    pub(crate) id: Uuid,
    pub(crate) event_type: String,
    pub(crate) schema_version: i32,
    pub(crate) data: Result<serde_json::Value, String>,
    pub(crate) metadata: Result<Metadata, String>,
    pub(crate) recorded_at: DateTime<Utc>,
}

impl RawEvent {
    /// Turns the row into an event, naming the stream, version and type when its stored JSON
    /// is malformed.
    pub(crate) fn into_event(self) -> Result<RecordedEvent, EventStoreError> {
        let stream = StreamId::new(self.stream)?;
        let version = writer::to_u64(self.version);
        let schema_version = u32::try_from(self.schema_version).unwrap_or(0);
        let fail = |reason: String, event_type: &str| EventStoreError::Decode {
            stream: stream.clone(),
            version,
            event_type: event_type.to_owned(),
            schema_version,
            reason,
        };
        let data = self.data.map_err(|e| {
            fail(
                format!("stored data is not valid JSON: {e}"),
                &self.event_type,
            )
        })?;
        let metadata = self.metadata.map_err(|e| {
            fail(
                format!("stored metadata is not valid: {e}"),
                &self.event_type,
            )
        })?;
        Ok(RecordedEvent {
            id: self.id,
            stream: stream.clone(),
            version,
            position: writer::to_u64(self.position),
            event_type: self.event_type,
            schema_version,
            data,
            metadata,
            recorded_at: self.recorded_at,
        })
    }
}

/// The `SELECT … FROM` of an event read: columns named as [`RawEvent`]'s fields, ids and JSON
/// cast to text so both engines decode the same types, the events table aliased `e`.
pub(crate) fn select_event<D: writer::Dialect>() -> String {
    format!(
        "SELECT {} AS position, e.stream_id, e.version, CAST(e.event_id AS TEXT) AS event_id, \
         e.event_type, e.schema_version, CAST(e.data AS TEXT) AS data, \
         CAST(e.metadata AS TEXT) AS metadata, e.recorded_at FROM {}",
        D::POSITION,
        D::EVENTS_FROM
    )
}

/// Moves a head watch forward (never back), telling receivers only on a change.
pub(crate) fn raise(head: &tokio::sync::watch::Sender<u64>, position: u64) {
    head.send_if_modified(|current| {
        if position > *current {
            *current = position;
            true
        } else {
            false
        }
    });
}
