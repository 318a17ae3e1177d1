//! The message envelope every trellis message carries (DESIGN.md), and its limits.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::BusError;

/// Default largest serialized message, in bytes (1 MiB, NATS's default payload limit).
pub const MESSAGE_BYTES_MAX_DEFAULT: usize = 1024 * 1024;
/// Most headers one envelope may carry.
pub const HEADERS_COUNT_MAX: usize = 64;
/// Longest header name, in bytes.
pub const HEADER_NAME_BYTES_MAX: usize = 128;
/// Longest `type`, `source` or `subject`, in bytes.
pub const ATTRIBUTE_BYTES_MAX: usize = 256;
/// The header a redriven message carries: how many times it came back from the DLQ.
pub const REDRIVE_COUNT_HEADER: &str = "trellis-redrive-count";
/// The header carrying W3C `tracestate` next to the envelope's `traceparent`.
pub const TRACESTATE_HEADER: &str = "tracestate";

/// A message on the bus: CloudEvents-style attributes and a JSON body.
///
/// Build one with [`Envelope::new`] and the `with_*` steps; when `traceparent` is empty,
/// [`crate::Bus::publish`] fills it with a PRODUCER span's, a child of the current span (see
/// [`crate::produce_span`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Unique id (UUIDv7, so ids sort by creation time). Inboxes deduplicate on it.
    pub id: Uuid,
    /// What happened or is asked for, e.g. `order.created`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Who produced it, e.g. `orders`.
    pub source: String,
    /// The aggregate or entity it is about; messages with one subject are handled in order.
    pub subject: String,
    /// When it was produced.
    pub time: DateTime<Utc>,
    /// Position in the subject's stream, when the producer has one (the event store's version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
    /// The id shared by every message of one business flow (an order's saga).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<Uuid>,
    /// The id of the message that caused this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
    /// W3C `traceparent` of the producer's span.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// Free-form string headers (`tracestate`, redrive count, application metadata).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// The body.
    pub data: serde_json::Value,
}

impl Envelope {
    /// A new envelope with a fresh UUIDv7 id and the current time.
    pub fn new(
        kind: impl Into<String>,
        source: impl Into<String>,
        subject: impl Into<String>,
        data: serde_json::Value,
    ) -> Self {
        Self {
            id: Uuid::now_v7(),
            kind: kind.into(),
            source: source.into(),
            subject: subject.into(),
            time: Utc::now(),
            sequence: None,
            correlation_id: None,
            causation_id: None,
            traceparent: None,
            headers: BTreeMap::new(),
            data,
        }
    }

    /// A new envelope whose data is `data` serialized as JSON.
    ///
    /// # Errors
    /// [`BusError::InvalidEnvelope`] when `data` does not serialize.
    pub fn from_data<T: Serialize>(
        kind: impl Into<String>,
        source: impl Into<String>,
        subject: impl Into<String>,
        data: &T,
    ) -> Result<Self, BusError> {
        let value = serde_json::to_value(data)
            .map_err(|error| BusError::InvalidEnvelope(format!("data: {error}")))?;
        Ok(Self::new(kind, source, subject, value))
    }

    /// Sets the per-subject sequence.
    #[must_use]
    pub fn with_sequence(mut self, sequence: u64) -> Self {
        self.sequence = Some(sequence);
        self
    }

    /// Sets the correlation id.
    #[must_use]
    pub fn with_correlation_id(mut self, id: Uuid) -> Self {
        self.correlation_id = Some(id);
        self
    }

    /// Sets the causation id.
    #[must_use]
    pub fn with_causation_id(mut self, id: Uuid) -> Self {
        self.causation_id = Some(id);
        self
    }

    /// Marks this message as caused by `cause`: same correlation id (or the cause's id when it
    /// has none), causation id = the cause's id.
    #[must_use]
    pub fn caused_by(mut self, cause: &Envelope) -> Self {
        self.correlation_id = Some(cause.correlation_id.unwrap_or(cause.id));
        self.causation_id = Some(cause.id);
        self
    }

    /// Sets the `traceparent`.
    #[must_use]
    pub fn with_traceparent(mut self, traceparent: impl Into<String>) -> Self {
        self.traceparent = Some(traceparent.into());
        self
    }

    /// Adds a header.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Decodes the data into `T`.
    ///
    /// # Errors
    /// [`BusError::Decode`] when it does not fit: the message is poison for this handler.
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, BusError> {
        T::deserialize(&self.data).map_err(|error| BusError::Decode {
            type_name: std::any::type_name::<T>(),
            reason: error.to_string(),
        })
    }

    /// How many times this message came back from a dead-letter queue.
    #[must_use]
    pub fn redrive_count(&self) -> u32 {
        self.headers
            .get(REDRIVE_COUNT_HEADER)
            .and_then(|count| count.parse().ok())
            .unwrap_or(0)
    }

    /// The trace context as the string map `trellis_telemetry::propagation` reads.
    #[must_use]
    pub fn trace_map(&self) -> HashMap<String, String> {
        let mut map = HashMap::new();
        if let Some(traceparent) = &self.traceparent {
            map.insert("traceparent".to_owned(), traceparent.clone());
        }
        if let Some(state) = self.headers.get(TRACESTATE_HEADER) {
            map.insert(TRACESTATE_HEADER.to_owned(), state.clone());
        }
        map
    }

    /// Checks the attribute rules; sizes are checked by [`Envelope::to_bytes_limited`].
    pub(crate) fn validate(&self) -> Result<(), BusError> {
        for (name, value) in [
            ("type", &self.kind),
            ("source", &self.source),
            ("subject", &self.subject),
        ] {
            if value.is_empty() {
                return Err(BusError::InvalidEnvelope(format!("{name} is empty")));
            }
            if value.len() > ATTRIBUTE_BYTES_MAX {
                return Err(BusError::InvalidEnvelope(format!(
                    "{name} is longer than {ATTRIBUTE_BYTES_MAX} bytes"
                )));
            }
        }
        if self.headers.len() > HEADERS_COUNT_MAX {
            return Err(BusError::InvalidEnvelope(format!(
                "{} headers, at most {HEADERS_COUNT_MAX} allowed",
                self.headers.len()
            )));
        }
        if let Some(name) = self
            .headers
            .keys()
            .find(|name| name.is_empty() || name.len() > HEADER_NAME_BYTES_MAX)
        {
            return Err(BusError::InvalidEnvelope(format!(
                "header name {:?} is empty or longer than {HEADER_NAME_BYTES_MAX} bytes",
                name.chars().take(40).collect::<String>()
            )));
        }
        Ok(())
    }

    /// Validates and serializes, refusing anything over `limit_bytes`.
    pub(crate) fn to_bytes_limited(&self, limit_bytes: usize) -> Result<Vec<u8>, BusError> {
        self.validate()?;
        let bytes = serde_json::to_vec(self)
            .map_err(|error| BusError::InvalidEnvelope(format!("does not serialize: {error}")))?;
        if bytes.len() > limit_bytes {
            return Err(BusError::MessageTooLarge {
                size_bytes: bytes.len(),
                limit_bytes,
            });
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `bus_envelope` fuzz target (fuzz/corpus/bus_envelope/float_drift): numbers
    /// in the data must survive a hop through the bus exactly, or a message's content changes
    /// each time it is relayed or redriven.
    #[test]
    fn an_envelope_survives_serialisation_unchanged_with_any_number_in_its_data() {
        let text = r#"{"id":"0193a3a1-7c1e-7cc0-8f1e-3d2a1b0c9d8e","type":"order.created","source":"orders","subject":"o-1","time":"2026-11-27T10:11:12.123456789Z","data":{"x":0.1,"y":1e308,"z":-2.0,"n":184467442073709551615,"m":2.2250738585072011e-308}}"#;
        let envelope: Envelope = serde_json::from_str(text).expect("decodes");
        let bytes = serde_json::to_vec(&envelope).expect("encodes");
        let again: Envelope = serde_json::from_slice(&bytes).expect("decodes again");
        assert_eq!(again, envelope);
    }
}
