//! OTLP/gRPC export that never holds a request up: a bounded queue in front of the SDK's batch
//! processor, with what it drops and exports counted.
//!
//! The SDK's `BatchSpanProcessor` already drops spans when its queue is full, but it only
//! counts them privately (a log line at shutdown). So [`BoundedBatch`] keeps its own count of
//! the spans it has handed over and the exporter has not yet taken, refuses a span once that
//! reaches the queue's size, and counts the refusal in
//! [`SPANS_DROPPED`]`{reason="queue_full"}`. The batch processor's own queue is as large, and
//! holds only spans that count here, so it never fills and every drop is one this module
//! counted. A batch the exporter fails to deliver (collector down, timeout) is counted under
//! `reason="export_failed"`.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider, Span, SpanData, SpanExporter,
    SpanProcessor,
};

use crate::TelemetryError;

/// Spans not exported, by service and reason (`queue_full`, `export_failed`): a counter.
pub const SPANS_DROPPED: &str = "trellis_telemetry_spans_dropped_total";

/// Spans the OTLP collector accepted, by service: a counter.
pub const SPANS_EXPORTED: &str = "trellis_telemetry_spans_exported_total";

/// The export queue's size when `OTEL_BSP_MAX_QUEUE_SIZE` does not set one (the
/// OpenTelemetry default).
pub const QUEUE_MAX_DEFAULT: usize = 2_048;

/// Describes the span export metrics, so `/metrics` carries their `# HELP` lines. Cheap, and
/// harmless to repeat.
pub fn describe_span_metrics() {
    metrics::describe_counter!(
        SPANS_DROPPED,
        "Finished spans never exported over OTLP, by service and reason (queue_full: the export queue was full; export_failed: the collector did not take the batch)"
    );
    metrics::describe_counter!(
        SPANS_EXPORTED,
        "Finished spans the OTLP collector accepted, by service"
    );
}

/// How to build an exporting tracer provider for one service name.
#[derive(Debug, Clone)]
pub(crate) struct Exporting {
    /// The runtime the gRPC channels' workers run on (a provider may be built for a new
    /// service name from any thread).
    runtime: tokio::runtime::Handle,
    /// The collector, e.g. `http://127.0.0.1:4317`.
    endpoint: String,
    /// How many spans may wait for export, per service.
    queue_max: usize,
}

impl Exporting {
    pub(crate) fn new(runtime: tokio::runtime::Handle, endpoint: String, queue_max: usize) -> Self {
        Self {
            runtime,
            endpoint,
            queue_max: queue_max.max(1),
        }
    }

    /// A provider whose resource names `service` and whose spans go to the collector in
    /// batches through a bounded queue.
    pub(crate) fn provider(&self, service: &str) -> Result<SdkTracerProvider, TelemetryError> {
        // The tonic channel spawns its worker on the current runtime when it is built.
        let _entered = self.runtime.enter();
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(self.endpoint.clone())
            .build()?;
        let service: Arc<str> = Arc::from(service);
        let waiting = Arc::new(AtomicUsize::new(0));
        let exporter = CountingExporter {
            inner: exporter,
            waiting: Arc::clone(&waiting),
            service: Arc::clone(&service),
        };
        let batch = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_max_queue_size(self.queue_max)
                    .build(),
            )
            .build();
        let processor = BoundedBatch {
            inner: batch,
            waiting,
            queue_max: self.queue_max,
            service: Arc::clone(&service),
        };
        Ok(SdkTracerProvider::builder()
            .with_resource(resource(&service))
            .with_span_processor(processor)
            .build())
    }
}

/// The resource of `service`'s spans: `service.name` plus whatever the standard detectors
/// find (`OTEL_RESOURCE_ATTRIBUTES`, the SDK's name and version).
pub(crate) fn resource(service: &str) -> Resource {
    Resource::builder()
        .with_service_name(service.to_owned())
        .build()
}

/// The export queue's size: `OTEL_BSP_MAX_QUEUE_SIZE` when it is a positive number, else
/// [`QUEUE_MAX_DEFAULT`].
pub(crate) fn queue_max_from(value: Option<&str>) -> usize {
    value
        .and_then(|value| value.trim().parse::<usize>().ok())
        .filter(|size| *size > 0)
        .unwrap_or(QUEUE_MAX_DEFAULT)
}

/// A batch span processor that refuses, and counts, spans once `queue_max` wait for export.
struct BoundedBatch {
    inner: BatchSpanProcessor,
    /// Spans handed to `inner` that its exporter has not taken yet.
    waiting: Arc<AtomicUsize>,
    queue_max: usize,
    service: Arc<str>,
}

impl fmt::Debug for BoundedBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoundedBatch")
            .field("service", &self.service)
            .field("queue_max", &self.queue_max)
            .field("waiting", &self.waiting.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl SpanProcessor for BoundedBatch {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        // Reserve a place first, so two threads cannot both take the last one.
        let before = self.waiting.fetch_add(1, Ordering::AcqRel);
        if before >= self.queue_max {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            metrics::counter!(
                SPANS_DROPPED,
                "service" => Cow::<'static, str>::Owned(self.service.to_string()),
                "reason" => "queue_full"
            )
            .increment(1);
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// An exporter that releases [`BoundedBatch`]'s places as it takes spans and counts the
/// outcome of each batch.
struct CountingExporter<E> {
    inner: E,
    waiting: Arc<AtomicUsize>,
    service: Arc<str>,
}

impl<E: fmt::Debug> fmt::Debug for CountingExporter<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CountingExporter")
            .field("inner", &self.inner)
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let count = batch.len();
        let result = self.inner.export(batch).await;
        // The places are released once the batch is gone either way, so the spans held for
        // export (queued, batched or in flight) never exceed the queue's size. Saturating: a
        // span taken in before this exporter counted (none today) must not wrap around.
        let _ = self
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |waiting| {
                Some(waiting.saturating_sub(count))
            });
        describe_span_metrics();
        let service = Cow::<'static, str>::Owned(self.service.to_string());
        let count = u64::try_from(count).unwrap_or(u64::MAX);
        match &result {
            Ok(()) => metrics::counter!(SPANS_EXPORTED, "service" => service).increment(count),
            Err(_) => metrics::counter!(
                SPANS_DROPPED,
                "service" => service,
                "reason" => "export_failed"
            )
            .increment(count),
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use opentelemetry::trace::{Tracer as _, TracerProvider as _};
    use opentelemetry_sdk::error::OTelSdkError;

    use super::*;

    /// An exporter that holds each batch until released, then records it.
    #[derive(Debug, Clone, Default)]
    struct Stuck {
        open: Arc<std::sync::atomic::AtomicBool>,
        got: Arc<Mutex<usize>>,
    }

    impl SpanExporter for Stuck {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            // The batch processor runs this on its own thread, so a blocking wait is fine.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !self.open.load(Ordering::Acquire) {
                if std::time::Instant::now() > deadline {
                    return Err(OTelSdkError::Timeout(Duration::from_secs(10)));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            *self.got.lock().expect("not poisoned") += batch.len();
            Ok(())
        }
    }

    #[test]
    fn the_queue_size_comes_from_the_variable_when_it_is_a_positive_number() {
        // A broken or zero OTEL_BSP_MAX_QUEUE_SIZE falls back to the default, never to 0.
        assert_eq!(queue_max_from(Some(" 16 ")), 16);
        assert_eq!(queue_max_from(Some("0")), QUEUE_MAX_DEFAULT);
        assert_eq!(queue_max_from(Some("many")), QUEUE_MAX_DEFAULT);
        assert_eq!(queue_max_from(None), QUEUE_MAX_DEFAULT);
    }

    #[test]
    fn spans_beyond_the_queue_are_refused_at_once_and_the_rest_reach_the_exporter() {
        // Ten spans end while the collector hangs; a queue of four holds four (the fourth
        // starts an export that hangs) and refuses six without blocking, and once the
        // collector answers exactly those four arrive.
        let stuck = Stuck::default();
        let waiting = Arc::new(AtomicUsize::new(0));
        let exporter = CountingExporter {
            inner: stuck.clone(),
            waiting: Arc::clone(&waiting),
            service: Arc::from("test"),
        };
        let batch = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_max_queue_size(4)
                    .with_scheduled_delay(Duration::from_secs(3600))
                    .build(),
            )
            .build();
        let processor = BoundedBatch {
            inner: batch,
            waiting: Arc::clone(&waiting),
            queue_max: 4,
            service: Arc::from("test"),
        };
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .build();
        let tracer = provider.tracer("test");
        let started = std::time::Instant::now();
        for _ in 0..10 {
            tracer.in_span("work", |_| {});
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "ending spans blocked"
        );
        stuck.open.store(true, Ordering::Release);
        provider
            .force_flush()
            .expect("the open exporter takes the batch");
        assert_eq!(*stuck.got.lock().expect("not poisoned"), 4);
        assert_eq!(waiting.load(Ordering::Acquire), 0);
        let _ = provider.shutdown_with_timeout(Duration::from_secs(1));
    }
}
