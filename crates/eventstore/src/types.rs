//! The event store's vocabulary: streams, versions, positions, events.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::EventStoreError;

/// The longest stream id, in bytes.
pub const STREAM_ID_BYTES_MAX: usize = 256;
/// The most events one append may carry.
pub const APPEND_EVENTS_MAX: usize = 10_000;
/// The largest event type name, in bytes.
pub const EVENT_TYPE_BYTES_MAX: usize = 256;
/// The largest serialized event (data plus metadata), in bytes.
pub const EVENT_BYTES_MAX: usize = 1024 * 1024;
/// The most events one read may return.
pub const READ_LIMIT_MAX: usize = 10_000;

/// The name of a stream: 1 to 256 bytes of printable text.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StreamId(String);

impl StreamId {
    /// Checks and wraps a stream name.
    ///
    /// # Errors
    /// [`EventStoreError::InvalidInput`] for an empty, oversize or non-printable name.
    pub fn new(name: impl Into<String>) -> Result<Self, EventStoreError> {
        let name = name.into();
        if name.is_empty() || name.len() > STREAM_ID_BYTES_MAX {
            return Err(EventStoreError::invalid(format!(
                "a stream id must be 1 to {STREAM_ID_BYTES_MAX} bytes"
            )));
        }
        if name.chars().any(char::is_control) {
            return Err(EventStoreError::invalid(
                "a stream id must not contain control characters",
            ));
        }
        Ok(Self(name))
    }

    /// The stream's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for StreamId {
    type Error = EventStoreError;

    fn try_from(name: String) -> Result<Self, Self::Error> {
        Self::new(name)
    }
}

impl From<StreamId> for String {
    fn from(id: StreamId) -> Self {
        id.0
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the stream's version must be for an append to go ahead (optimistic concurrency).
///
/// Versions count a stream's events from 1: a stream whose last event has version 7 is "at
/// version 7"; an empty or never-written stream is at version 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExpectedVersion {
    /// Append whatever the version.
    Any,
    /// The stream must have no events (it may not exist yet).
    NoStream,
    /// The stream's last event must have this version (`Exact(0)` is the same as `NoStream`).
    Exact(u64),
}

impl ExpectedVersion {
    /// Whether a stream at `actual` satisfies this expectation.
    pub fn matches(self, actual: u64) -> bool {
        match self {
            Self::Any => true,
            Self::NoStream => actual == 0,
            Self::Exact(expected) => expected == actual,
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("any"),
            Self::NoStream => f.write_str("no stream"),
            Self::Exact(v) => write!(f, "{v}"),
        }
    }
}

/// Which way [`read_stream`](crate::EventStore::read_stream) walks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From `from` towards the newest event.
    Forwards,
    /// From `from` towards the oldest event (`u64::MAX` starts at the newest).
    Backwards,
}

/// Context carried with every event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// The id shared by every message of one business flow (an order's saga, say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<Uuid>,
    /// The id of the message that caused this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
    /// The W3C trace context of the write, so readers can continue the trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// An event to append.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// The event's id (UUIDv7 by default). Re-appending the same ids is idempotent.
    pub id: Uuid,
    /// The event's type name.
    pub event_type: String,
    /// The schema version of `data` (1 for a type's first shape).
    pub schema_version: u32,
    /// The payload.
    pub data: serde_json::Value,
    /// Correlation, causation and trace context.
    pub metadata: Metadata,
}

impl NewEvent {
    /// A new event with a fresh UUIDv7 id, schema version 1 and empty metadata.
    pub fn new(event_type: impl Into<String>, data: serde_json::Value) -> Self {
        Self {
            id: Uuid::now_v7(),
            event_type: event_type.into(),
            schema_version: 1,
            data,
            metadata: Metadata::default(),
        }
    }

    /// Sets the id.
    #[must_use]
    pub fn with_id(mut self, id: Uuid) -> Self {
        self.id = id;
        self
    }

    /// Sets the schema version.
    #[must_use]
    pub fn with_schema_version(mut self, version: u32) -> Self {
        self.schema_version = version;
        self
    }

    /// Sets the metadata.
    #[must_use]
    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedEvent {
    /// The event's id.
    pub id: Uuid,
    /// The stream it belongs to.
    pub stream: StreamId,
    /// Its version in the stream (1 for the first event).
    pub version: u64,
    /// Its position in the global log (1 for the first event ever), in commit order.
    pub position: u64,
    /// The event's type name.
    pub event_type: String,
    /// The schema version of `data`.
    pub schema_version: u32,
    /// The payload.
    pub data: serde_json::Value,
    /// Correlation, causation and trace context.
    pub metadata: Metadata,
    /// When the store recorded it.
    pub recorded_at: DateTime<Utc>,
}

/// The outcome of a successful append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendResult {
    /// The stream's version after the append: pass `ExpectedVersion::Exact(next_version)` to
    /// append after it.
    pub next_version: u64,
    /// The global position of the last event appended.
    pub global_position: u64,
}

/// Settings stored with a stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamMetadata {
    /// Reads of the stream return at most the newest `max_count` events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_count: Option<u64>,
    /// Reads of the stream skip versions below this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncate_before: Option<u64>,
    /// Soft-deleted: the stream reads as empty; appending to it again undeletes it and numbering
    /// continues where it stopped.
    #[serde(default)]
    pub deleted: bool,
}

impl StreamMetadata {
    /// The lowest version a read of a stream at `version` may return.
    pub fn first_visible(&self, version: u64) -> u64 {
        let mut first = 1;
        if let Some(before) = self.truncate_before {
            first = first.max(before);
        }
        if let Some(max) = self.max_count {
            first = first.max(version.saturating_sub(max) + 1);
        }
        if self.deleted {
            first = first.max(version + 1);
        }
        first
    }
}

/// A stream's current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamInfo {
    /// The version of its last event (0 if it has none).
    pub version: u64,
    /// Its settings.
    pub metadata: StreamMetadata,
}

/// A snapshot of an aggregate's state, valid up to a stream version.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The stream version the state includes.
    pub version: u64,
    /// The schema version of the serialized state; a reader with another version ignores it.
    pub schema_version: u32,
    /// The serialized state.
    pub state: serde_json::Value,
}

/// Checks an append's events before any backend sees them.
pub(crate) fn validate_append(events: &[NewEvent]) -> Result<(), EventStoreError> {
    if events.is_empty() {
        return Err(EventStoreError::invalid(
            "an append needs at least one event",
        ));
    }
    if events.len() > APPEND_EVENTS_MAX {
        return Err(EventStoreError::invalid(format!(
            "an append carries at most {APPEND_EVENTS_MAX} events"
        )));
    }
    let mut ids = std::collections::HashSet::with_capacity(events.len());
    for event in events {
        if !ids.insert(event.id) {
            return Err(EventStoreError::invalid(format!(
                "event id {} appears twice in one append",
                event.id
            )));
        }
        if event.event_type.is_empty() || event.event_type.len() > EVENT_TYPE_BYTES_MAX {
            return Err(EventStoreError::invalid(format!(
                "an event type must be 1 to {EVENT_TYPE_BYTES_MAX} bytes"
            )));
        }
        if event.schema_version == 0 {
            return Err(EventStoreError::invalid(format!(
                "event {}: schema versions start at 1",
                event.id
            )));
        }
        let size = serde_json::to_vec(&event.data).map_or(usize::MAX, |bytes| bytes.len())
            + event.metadata.traceparent.as_ref().map_or(0, String::len);
        if size > EVENT_BYTES_MAX {
            return Err(EventStoreError::invalid(format!(
                "event {} is {size} bytes; the limit is {EVENT_BYTES_MAX}",
                event.id
            )));
        }
    }
    Ok(())
}

/// Checks a read's limit.
pub(crate) fn validate_limit(limit: usize) -> Result<(), EventStoreError> {
    if limit == 0 || limit > READ_LIMIT_MAX {
        return Err(EventStoreError::invalid(format!(
            "a read limit must be 1 to {READ_LIMIT_MAX}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_are_checked() {
        assert!(StreamId::new("order-1").is_ok());
        assert!(StreamId::new("").is_err());
        assert!(StreamId::new("a\nb").is_err());
        assert!(StreamId::new("x".repeat(STREAM_ID_BYTES_MAX + 1)).is_err());
    }

    #[test]
    fn the_first_visible_version_combines_every_rule() {
        let none = StreamMetadata::default();
        assert_eq!(none.first_visible(10), 1);
        let max = StreamMetadata {
            max_count: Some(3),
            ..none
        };
        assert_eq!(max.first_visible(10), 8);
        let truncated = StreamMetadata {
            truncate_before: Some(9),
            ..max
        };
        assert_eq!(truncated.first_visible(10), 9);
        let deleted = StreamMetadata {
            deleted: true,
            ..none
        };
        assert_eq!(deleted.first_visible(10), 11);
    }
}
