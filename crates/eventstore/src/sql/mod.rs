//! The SQL backends and what they share.

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
