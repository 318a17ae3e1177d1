//! Global setup happens once, and a second attempt is an error rather than a panic.

use trellis_telemetry::{TelemetryConfig, TelemetryError};

use crate::helpers;

#[test]
fn a_second_init_is_refused_with_an_error() {
    // Goal: after the binary's shared init, another init returns AlreadyInitialized.
    helpers::telemetry();
    let again = trellis_telemetry::init(TelemetryConfig::new("second"));
    assert!(matches!(again, Err(TelemetryError::AlreadyInitialized)));
}

#[test]
fn spans_have_valid_trace_ids_without_any_exporter() {
    // Goal: the SDK provider gives every span a real trace id even though nothing is exported.
    helpers::telemetry();
    let span = tracing::info_span!("test.no_exporter");
    let trace_id = trellis_telemetry::propagation::trace_id(&span).unwrap_or_default();
    assert!(helpers::is_valid_trace_id(&trace_id), "{trace_id:?}");
}
