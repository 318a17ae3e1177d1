//! Trace context through a message's string map, as the bus carries it.

use std::collections::HashMap;

use anyhow::Context as _;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use trellis_telemetry::propagation;

use crate::helpers;

#[test]
fn a_consumer_span_continues_the_trace_injected_into_a_message_map() -> anyhow::Result<()> {
    // Goal: inject_map on the publisher side and set_parent_from_map on the consumer side keep
    // the trace id, as a bus envelope would carry it between processes.
    helpers::telemetry();
    let publish = tracing::info_span!("test.publish");
    let publish_trace_id = propagation::trace_id(&publish).context("publisher has a trace id")?;
    let mut envelope = HashMap::new();
    propagation::inject_map(&publish.context(), &mut envelope);

    let consume = tracing::info_span!(parent: None, "test.consume");
    assert!(propagation::set_parent_from_map(&consume, &envelope));

    assert_eq!(propagation::trace_id(&consume), Some(publish_trace_id));
    Ok(())
}

#[test]
fn current_traceparent_names_the_entered_span() -> anyhow::Result<()> {
    // Goal: the convenience for envelopes returns the entered span's trace, and an extract of
    // it yields the same trace id.
    helpers::telemetry();
    let span = tracing::info_span!("test.current");
    let trace_id = propagation::trace_id(&span).context("span has a trace id")?;
    let traceparent = span
        .in_scope(propagation::current_traceparent)
        .context("an entered span has a traceparent")?;

    assert!(propagation::is_valid_traceparent(&traceparent));
    assert!(traceparent.starts_with(&format!("00-{trace_id}-")));
    let map = HashMap::from([(propagation::TRACEPARENT.to_owned(), traceparent)]);
    let extracted = propagation::extract_map(&map);
    let consumer = tracing::info_span!(parent: None, "test.consume");
    let _ = consumer.set_parent(extracted);
    assert_eq!(propagation::trace_id(&consumer), Some(trace_id));
    Ok(())
}

#[test]
fn a_message_with_a_malformed_traceparent_leaves_the_consumer_on_a_new_trace() {
    // Goal: a bad envelope field is ignored, never an error, and the consumer gets a new trace.
    helpers::telemetry();
    let envelope = HashMap::from([(
        propagation::TRACEPARENT.to_owned(),
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01".to_owned(),
    )]);
    let consume = tracing::info_span!(parent: None, "test.consume");

    assert!(!propagation::set_parent_from_map(&consume, &envelope));
    let trace_id = propagation::trace_id(&consume).unwrap_or_default();
    assert!(helpers::is_valid_trace_id(&trace_id), "{trace_id:?}");
}
