//! Event-sourced aggregates: the rules live in `handle`, state changes in `apply`.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::EventStoreError;
use crate::types::{NewEvent, RecordedEvent};
use crate::upcast::Upcasters;

/// A domain event type: an externally tagged serde enum (serde's default), one variant per
/// event type. The variant name is stored as the event type and its fields as the data.
pub trait DomainEvent: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {
    /// The schema version each event type is written with today (1 unless it changed shape).
    /// Older stored versions are upcast to this one on read.
    fn schema_version(event_type: &str) -> u32 {
        let _ = event_type;
        1
    }
}

/// An event-sourced aggregate, in the cqrs-es style.
///
/// `handle` holds every business rule and decides which events a command produces, without
/// changing state; `apply` only changes state and never fails (an event is a fact).
pub trait Aggregate: Default + Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The aggregate's type; streams are named `{TYPE}-{id}`.
    const TYPE: &'static str;
    /// The schema of the serialized state. Bump it when the state's shape changes: snapshots
    /// with another schema are ignored and rebuilt from events.
    const SNAPSHOT_SCHEMA: u32 = 1;
    /// What callers ask the aggregate to do. `Clone` so a command can be retried after a
    /// version conflict.
    type Command: Clone + Send + Sync;
    /// What happened.
    type Event: DomainEvent;
    /// Why a command was refused.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Decides the events a command produces.
    ///
    /// # Errors
    /// The business rule the command breaks.
    fn handle(&self, command: Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// Changes the state by one event.
    fn apply(&mut self, event: &Self::Event);
}

/// Splits a domain event into its type name and data.
///
/// # Errors
/// [`EventStoreError::InvalidInput`] when the event does not serialize as an externally tagged
/// enum variant.
pub fn encode<E: DomainEvent>(event: &E) -> Result<NewEvent, EventStoreError> {
    let value = serde_json::to_value(event)
        .map_err(|e| EventStoreError::invalid(format!("event does not serialize: {e}")))?;
    let (event_type, data) = match value {
        serde_json::Value::String(name) => (name, serde_json::Value::Null),
        serde_json::Value::Object(map) if map.len() == 1 => {
            map.into_iter().next().expect("one entry")
        }
        _ => {
            return Err(EventStoreError::invalid(
                "domain events must be externally tagged enums (serde's default)",
            ));
        }
    };
    let schema_version = E::schema_version(&event_type);
    Ok(NewEvent::new(event_type, data).with_schema_version(schema_version))
}

/// Turns a stored event into a domain event, upcasting old schema versions first.
///
/// # Errors
/// [`EventStoreError::Decode`] naming the stream, version and type, for an unknown type,
/// malformed data, a schema newer than this code, or a missing or failing upcaster.
pub fn decode<E: DomainEvent>(
    event: &RecordedEvent,
    upcasters: &Upcasters,
) -> Result<E, EventStoreError> {
    let fail = |reason: String| EventStoreError::Decode {
        stream: event.stream.clone(),
        version: event.version,
        event_type: event.event_type.clone(),
        schema_version: event.schema_version,
        reason,
    };
    let current = E::schema_version(&event.event_type);
    if event.schema_version > current {
        return Err(fail(format!(
            "written with schema v{}, this code knows up to v{current}",
            event.schema_version
        )));
    }
    let data = upcasters
        .upcast(
            &event.event_type,
            event.schema_version,
            current,
            event.data.clone(),
        )
        .map_err(fail)?;
    let tagged = if data.is_null() {
        serde_json::Value::String(event.event_type.clone())
    } else {
        serde_json::Value::Object(serde_json::Map::from_iter([(
            event.event_type.clone(),
            data,
        )]))
    };
    serde_json::from_value(tagged)
        .map_err(|e| fail(format!("unknown event type or malformed data: {e}")))
}
