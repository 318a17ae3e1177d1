//! W3C Trace Context propagation over HTTP headers and message maps.
//!
//! Every trellis hop carries a [`traceparent`](https://www.w3.org/TR/trace-context/) (and its
//! `tracestate`): HTTP requests in headers, bus messages in their envelope's string map. These
//! functions always use the W3C Trace Context format, whatever the OpenTelemetry global
//! propagator is, so a hop never depends on start-up order.
//!
//! Extraction is strict: a `traceparent` that does not follow the specification exactly (wrong
//! version, lengths, case, or an all-zero id) is ignored as if it were absent, so the receiver
//! starts a new trace. It is never an error.
//!
//! ```
//! use std::collections::HashMap;
//!
//! use trellis_telemetry::propagation;
//!
//! let mut envelope = HashMap::new();
//! envelope.insert(
//!     "traceparent".to_owned(),
//!     "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
//! );
//! let remote = propagation::extract_map(&envelope);
//!
//! let mut outgoing = HashMap::new();
//! propagation::inject_map(&remote, &mut outgoing);
//! assert_eq!(outgoing["traceparent"], envelope["traceparent"]);
//! ```

use std::collections::HashMap;

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The header (and map key) carrying the trace id, parent span id and flags.
pub const TRACEPARENT: &str = "traceparent";

/// The header (and map key) carrying vendor-specific trace state.
pub const TRACESTATE: &str = "tracestate";

/// Writes `cx`'s span context into `headers` as `traceparent` and `tracestate`.
///
/// Existing values are replaced. Writes nothing when `cx` has no valid span context.
pub fn inject_headers(cx: &Context, headers: &mut HeaderMap) {
    TraceContextPropagator::new().inject_context(cx, &mut HeaderInjector(headers));
}

/// Reads the remote span context from `traceparent` / `tracestate` in `headers`.
///
/// Returns an empty [`Context`] (no span) when the header is missing or malformed.
#[must_use]
pub fn extract_headers(headers: &HeaderMap) -> Context {
    extract(&HeaderExtractor(headers))
}

/// Writes `cx`'s span context into a message's string map as `traceparent` and `tracestate`.
///
/// Keys are lower case. Writes nothing when `cx` has no valid span context.
pub fn inject_map(cx: &Context, map: &mut HashMap<String, String>) {
    TraceContextPropagator::new().inject_context(cx, map);
}

/// Reads the remote span context from a message's string map.
///
/// Keys are matched in lower case. Returns an empty [`Context`] when `traceparent` is missing
/// or malformed.
#[must_use]
pub fn extract_map(map: &HashMap<String, String>) -> Context {
    extract(map)
}

/// The `traceparent` of the current tracing span, for a message envelope's field.
///
/// `None` when there is no current span or it has no OpenTelemetry context (for example
/// before [`init`](crate::init)).
#[must_use]
pub fn current_traceparent() -> Option<String> {
    traceparent_of(&Span::current())
}

/// The `traceparent` naming `span` as the parent, for a header or an envelope field.
///
/// `None` when the span is disabled or has no OpenTelemetry context. Reading it starts the
/// span's OpenTelemetry side, so set a remote parent first.
#[must_use]
pub fn traceparent_of(span: &Span) -> Option<String> {
    let mut map = HashMap::new();
    inject_map(&span.context(), &mut map);
    map.remove(TRACEPARENT)
}

/// Makes the trace context carried by `map` the OpenTelemetry parent of `span`.
///
/// Call it right after creating a consumer's span and before entering it or reading its
/// context: once the span has started, its parent is fixed. Returns whether the parent was
/// set; `false` when the map carries no valid `traceparent` (the span keeps its own parent
/// and, if it is a root, starts a new trace) or the span had already started.
pub fn set_parent_from_map(span: &Span, map: &HashMap<String, String>) -> bool {
    let remote = extract_map(map);
    if !remote.has_active_span() {
        return false;
    }
    span.set_parent(remote).is_ok()
}

/// The trace id of `span` as 32 lower-case hex digits, for tests and log fields.
///
/// `None` when the span is disabled or has no valid OpenTelemetry context (for example before
/// [`init`](crate::init)). Reading the id starts the span's OpenTelemetry side, so set a remote
/// parent first.
#[must_use]
pub fn trace_id(span: &Span) -> Option<String> {
    let cx = span.context();
    let otel_span = cx.span();
    let span_context = otel_span.span_context();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

/// Whether `value` is a `traceparent` the W3C Trace Context specification accepts.
///
/// Version `00` must be exactly `00-<32 hex>-<16 hex>-<2 hex>`; a later version must start the
/// same way and may only continue after a `-`. Hex digits are lower case, and neither id may be
/// all zeros. Version `ff` is invalid.
#[must_use]
pub fn is_valid_traceparent(value: &str) -> bool {
    // version(2) - trace-id(32) - parent-id(16) - flags(2)
    const LENGTH_V00: usize = 55;
    let bytes = value.trim().as_bytes();
    if bytes.len() < LENGTH_V00 {
        return false;
    }
    let (head, rest) = bytes.split_at(LENGTH_V00);
    let version = &head[0..2];
    let trace_id = &head[3..35];
    let parent_id = &head[36..52];
    let flags = &head[53..55];
    let dashes_in_place = head[2] == b'-' && head[35] == b'-' && head[52] == b'-';
    let lower_hex = |part: &[u8]| {
        part.iter()
            .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(byte))
    };
    let not_all_zero = |part: &[u8]| part.iter().any(|byte| *byte != b'0');
    let version_allows_rest = match version {
        b"00" => rest.is_empty(),
        b"ff" => false,
        _ => rest.is_empty() || rest[0] == b'-',
    };
    dashes_in_place
        && lower_hex(version)
        && lower_hex(trace_id)
        && lower_hex(parent_id)
        && lower_hex(flags)
        && not_all_zero(trace_id)
        && not_all_zero(parent_id)
        && version_allows_rest
}

/// Extracts with the W3C propagator after screening out a malformed `traceparent`: the SDK's
/// parser accepts some (for example a short trace id, which it zero-pads) that the
/// specification says to ignore.
fn extract(carrier: &dyn Extractor) -> Context {
    match carrier.get(TRACEPARENT) {
        Some(value) if is_valid_traceparent(value) => {
            TraceContextPropagator::new().extract(carrier)
        }
        _ => Context::new(),
    }
}

/// Adapts [`HeaderMap`] to OpenTelemetry's [`Injector`].
struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // The propagator only writes its two well-formed names and ASCII values; anything
        // that would not make a valid header is skipped rather than sent broken.
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// Adapts [`HeaderMap`] to OpenTelemetry's [`Extractor`].
struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn remote_trace_id(cx: &Context) -> Option<String> {
        let span = cx.span();
        let span_context = span.span_context();
        span_context
            .is_valid()
            .then(|| span_context.trace_id().to_string())
    }

    #[test]
    fn a_well_formed_traceparent_is_valid() {
        // The specification's example header, with optional surrounding whitespace, passes.
        assert!(is_valid_traceparent(VALID));
        assert!(is_valid_traceparent(&format!("  {VALID}  ")));
    }

    #[test]
    fn a_future_version_may_carry_extra_fields_after_a_dash() {
        // Versions above 00 may add fields, but only after a dash.
        let future = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra";
        assert!(is_valid_traceparent(future));
        let glued = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x";
        assert!(!is_valid_traceparent(glued));
    }

    #[test]
    fn malformed_traceparents_are_invalid() {
        // Each way the specification says to reject a header is rejected.
        for malformed in [
            "",
            "garbage",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473600-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(!is_valid_traceparent(malformed), "{malformed:?} passed");
        }
    }

    #[test]
    fn a_short_trace_id_is_ignored_although_the_sdk_parser_would_pad_it() {
        // The strict screen catches what the SDK parser lets through.
        let mut map = HashMap::new();
        map.insert(
            TRACEPARENT.to_owned(),
            "00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01".to_owned(),
        );
        assert_eq!(remote_trace_id(&extract_map(&map)), None);
    }

    #[test]
    fn headers_round_trip_the_trace_id_and_trace_state() {
        // Extracting then injecting headers reproduces both fields exactly.
        let mut incoming = HeaderMap::new();
        incoming.insert(TRACEPARENT, HeaderValue::from_static(VALID));
        incoming.insert(TRACESTATE, HeaderValue::from_static("vendor=value"));
        let cx = extract_headers(&incoming);
        assert_eq!(
            remote_trace_id(&cx).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );

        let mut outgoing = HeaderMap::new();
        inject_headers(&cx, &mut outgoing);
        assert_eq!(outgoing.get(TRACEPARENT), incoming.get(TRACEPARENT));
        assert_eq!(outgoing.get(TRACESTATE), incoming.get(TRACESTATE));
    }

    #[test]
    fn map_keys_are_matched_in_lower_case() {
        // A message map with the lower-case key yields a remote span context.
        let mut map = HashMap::new();
        map.insert(TRACEPARENT.to_owned(), VALID.to_owned());
        let cx = extract_map(&map);
        assert!(cx.has_active_span());
    }

    #[test]
    fn an_empty_context_injects_nothing() {
        // Without a span context neither carrier gets a header.
        let mut headers = HeaderMap::new();
        inject_headers(&Context::new(), &mut headers);
        assert!(headers.is_empty());
        let mut map = HashMap::new();
        inject_map(&Context::new(), &mut map);
        assert!(map.is_empty());
    }

    #[test]
    fn a_map_without_traceparent_does_not_reparent_a_span() {
        // A message without trace context leaves the consumer span's parent alone.
        let span = tracing::info_span!("consumer");
        assert!(!set_parent_from_map(&span, &HashMap::new()));
    }
}
