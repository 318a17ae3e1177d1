//! Sets telemetry up, then carries one trace from a "publisher" span to a "consumer" span
//! through a message map, the way a bus envelope does.
//!
//! Run with `cargo run -p trellis-telemetry --example propagate`.

use std::collections::HashMap;

use trellis_telemetry::{TelemetryConfig, TelemetryError, propagation};

fn main() -> Result<(), TelemetryError> {
    let _guard = trellis_telemetry::init(TelemetryConfig::new("propagate-example"))?;

    let publish = tracing::info_span!("publish", message.kind = "order.created");
    let mut envelope = HashMap::new();
    publish.in_scope(|| {
        if let Some(traceparent) = propagation::current_traceparent() {
            envelope.insert(propagation::TRACEPARENT.to_owned(), traceparent);
        }
        tracing::info!("published");
    });

    let consume = tracing::info_span!("consume", message.kind = "order.created");
    propagation::set_parent_from_map(&consume, &envelope);
    consume.in_scope(|| tracing::info!(trace_id = ?propagation::trace_id(&consume), "consumed"));

    println!(
        "publisher trace {:?}, consumer trace {:?}",
        propagation::trace_id(&publish),
        propagation::trace_id(&consume)
    );
    Ok(())
}
