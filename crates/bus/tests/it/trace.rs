//! Trace context through the bus: the consumer's span continues the producer's trace, also
//! after a dead letter is redriven.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use tokio::sync::mpsc;
use tracing::Instrument as _;
use trellis_bus::{
    Bus, DeadLetterFilter, DeadLetters, Envelope, HandlerError, InMemoryBus, Message,
    SubscribeOptions,
};
use trellis_telemetry::propagation;

use crate::helpers;

#[tokio::test]
async fn a_consumers_span_continues_the_producers_trace_even_after_a_redrive() -> anyhow::Result<()>
{
    // Goal: publish inside a producer span; the handler run by Subscription::run sees the
    // producer's trace id on its current span, first when it rejects the message and again
    // when the dead letter is redriven.
    helpers::telemetry();
    let bus = InMemoryBus::new();
    let sub = bus
        .subscribe("traced.*", "tracer", SubscribeOptions::default())
        .await?;
    let (seen, mut seen_rx) = mpsc::channel::<Option<String>>(8);
    let handler = move |message: Arc<Message>| {
        let seen = seen.clone();
        async move {
            let trace_id = propagation::trace_id(&tracing::Span::current());
            let _ = seen.send(trace_id).await;
            if message.envelope.redrive_count() == 0 {
                Err(HandlerError::permanent("test", "first time fails"))
            } else {
                Ok(())
            }
        }
    };
    let stop = Arc::new(tokio::sync::Notify::new());
    let consumer = {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move { sub.run(handler, async move { stop.notified().await }).await })
    };

    let producer = tracing::info_span!("test.producer");
    let producer_trace = propagation::trace_id(&producer).context("producer has a trace id")?;
    let envelope = Envelope::new("traced.happened", "test", "t-1", serde_json::json!({}));
    bus.publish("traced.happened", envelope)
        .instrument(producer)
        .await?;

    let first = tokio::time::timeout(Duration::from_secs(5), seen_rx.recv())
        .await?
        .flatten();
    ensure!(
        first.as_deref() == Some(producer_trace.as_str()),
        "consumer trace {first:?}"
    );

    let letters = bus.list(&DeadLetterFilter::default()).await?;
    ensure!(letters.len() == 1);
    bus.redrive(letters[0].id, "test").await?;
    let second = tokio::time::timeout(Duration::from_secs(5), seen_rx.recv())
        .await?
        .flatten();
    ensure!(
        second.as_deref() == Some(producer_trace.as_str()),
        "redriven trace {second:?}"
    );

    stop.notify_one();
    consumer.await??;
    ensure!(bus.list(&DeadLetterFilter::default()).await?.is_empty());
    Ok(())
}
