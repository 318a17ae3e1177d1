//! Process-wide setup: the tracing subscriber, the OpenTelemetry tracer provider and the
//! global propagator.

use std::io::IsTerminal;
use std::time::Duration;

use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Subscriber;
use tracing_subscriber::filter::{EnvFilter, FilterExt, LevelFilter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{Layer, Registry};

use crate::export::{self, Exporting};
use crate::service::ServiceTracer;
use crate::{LogFormat, TelemetryConfig, TelemetryError};

/// How long dropping the guard waits for buffered spans to be exported.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// The least severe level whose spans always reach the OpenTelemetry layer, whatever the log
/// filter says: trace context must keep flowing through a service that logs only warnings.
const SPAN_LEVEL_FLOOR: LevelFilter = LevelFilter::INFO;

/// Installs tracing and OpenTelemetry for this process.
///
/// This sets up, once per process:
/// - a `tracing-subscriber` registry with a fmt layer writing to standard output in
///   [`LogFormat::Human`] or [`LogFormat::Json`], filtered by the configured filter, else
///   `RUST_LOG`, else `info`;
/// - always, a `tracing-opentelemetry` layer backed by an SDK tracer provider, so every span has
///   real W3C trace and span ids even when nothing is exported. It sees the spans the filter
///   enables plus every span at `INFO` or above, so raising the log level to `warn` does not
///   break trace propagation;
/// - when [`TelemetryConfig::with_otlp_endpoint`] was set (or the `OTEL_*` variables did, see
///   [`TelemetryConfig::with_otel_env`]), OTLP/gRPC export: one tracer provider per service
///   name (see [`service`](crate::service)), each with its own bounded batch queue of
///   `OTEL_BSP_MAX_QUEUE_SIZE` spans (2048 by default). A full queue drops spans and counts
///   them in [`SPANS_DROPPED`](crate::export::SPANS_DROPPED); ending a span never waits for
///   the collector;
/// - W3C Trace Context as the global OpenTelemetry text-map propagator, and the provider as the
///   global tracer provider, for other OpenTelemetry instrumentation in the process.
///
/// Keep the returned guard alive for as long as the process should trace (typically in `main`);
/// dropping it flushes and shuts the tracer provider down.
///
/// # Errors
///
/// - [`TelemetryError::InvalidFilter`] if the filter does not parse;
/// - [`TelemetryError::AlreadyInitialized`] if a global tracing subscriber is already installed,
///   for example by an earlier call: `init` never panics on a second call;
/// - [`TelemetryError::NoRuntime`] if an OTLP endpoint is set and no Tokio runtime is running;
/// - [`TelemetryError::Exporter`] if the OTLP exporter cannot be built.
///
/// # Examples
///
/// ```
/// use trellis_telemetry::{TelemetryConfig, TelemetryError};
///
/// let _guard = trellis_telemetry::init(TelemetryConfig::new("doc-example"))?;
/// tracing::info!("traced");
///
/// // A second call is refused rather than replacing the first setup.
/// let again = trellis_telemetry::init(TelemetryConfig::new("doc-example"));
/// assert!(matches!(again, Err(TelemetryError::AlreadyInitialized)));
/// # Ok::<(), TelemetryError>(())
/// ```
pub fn init(config: TelemetryConfig) -> Result<TelemetryGuard, TelemetryError> {
    let filter = config.effective_filter();
    let log_filter = parse_filter(&filter)?;
    let span_filter = parse_filter(&filter)?.or(SPAN_LEVEL_FLOOR);

    let tracer = service_tracer(&config)?;
    let otel_layer = tracing_opentelemetry::layer()
        .with_tracer(tracer.clone())
        .with_filter(span_filter);
    let subscriber = Registry::default()
        .with(otel_layer)
        .with(fmt_layer(config.log_format()).with_filter(log_filter));

    if tracing::subscriber::set_global_default(subscriber).is_err() {
        // Nothing was installed; release the providers we built (and their exporters).
        let _ = tracer.shutdown(SHUTDOWN_TIMEOUT);
        return Err(TelemetryError::AlreadyInitialized);
    }
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    opentelemetry::global::set_tracer_provider(tracer.default_provider().clone());
    if let Some(endpoint) = config.otlp_endpoint() {
        tracing::info!(
            endpoint,
            service = config.service_name(),
            "exporting spans over OTLP/gRPC"
        );
        if let Ok(protocol) = std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL")
            && !protocol.trim().is_empty()
            && protocol.trim() != "grpc"
        {
            tracing::warn!(
                %protocol,
                "OTEL_EXPORTER_OTLP_PROTOCOL asks for another protocol; trellis exports OTLP over gRPC only"
            );
        }
    }

    Ok(TelemetryGuard { tracer })
}

/// Keeps tracing alive; dropping it flushes pending spans and shuts the tracer provider down.
///
/// Returned by [`init`]. Hold it in `main` until the service has drained. With an OTLP exporter,
/// drop it while the Tokio runtime is still running (the gRPC client runs on it); the flush waits
/// at most five seconds.
#[derive(Debug)]
#[must_use = "dropping the guard shuts the tracer provider down straight away"]
pub struct TelemetryGuard {
    tracer: ServiceTracer,
}

impl TelemetryGuard {
    /// Exports every finished span now and waits for the collector's answers (each export
    /// waits at most the OTLP timeout, ten seconds unless `OTEL_EXPORTER_OTLP_TIMEOUT` says
    /// otherwise). Without export this does nothing.
    ///
    /// Call it from a multi-thread runtime or a plain thread, never on a current-thread
    /// runtime's own thread: the exporters need the runtime to make progress while this
    /// blocks.
    ///
    /// # Errors
    ///
    /// What each provider that could not flush said, joined in one message.
    pub fn force_flush(&self) -> Result<(), String> {
        self.tracer.force_flush()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Err(error) = self.tracer.shutdown(SHUTDOWN_TIMEOUT) {
            tracing::warn!(%error, "telemetry shutdown did not flush every span");
        }
    }
}

fn parse_filter(filter: &str) -> Result<EnvFilter, TelemetryError> {
    EnvFilter::builder()
        .parse(filter)
        .map_err(|source| TelemetryError::InvalidFilter {
            filter: filter.to_owned(),
            source,
        })
}

/// The tracer behind the OpenTelemetry layer: with an OTLP endpoint, one exporting provider
/// per service; without, one provider that only hands out ids.
fn service_tracer(config: &TelemetryConfig) -> Result<ServiceTracer, TelemetryError> {
    let Some(endpoint) = config.otlp_endpoint() else {
        let provider = SdkTracerProvider::builder()
            .with_resource(export::resource(config.service_name()))
            .build();
        return Ok(ServiceTracer::new(
            config.service_name().to_owned(),
            provider,
            None,
        ));
    };
    // The tonic channel spawns its worker on the current runtime and panics without one.
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return Err(TelemetryError::NoRuntime);
    };
    let queue_max =
        export::queue_max_from(std::env::var("OTEL_BSP_MAX_QUEUE_SIZE").ok().as_deref());
    let exporting = Exporting::new(runtime, endpoint.to_owned(), queue_max);
    let provider = exporting.provider(config.service_name())?;
    Ok(ServiceTracer::new(
        config.service_name().to_owned(),
        provider,
        Some(exporting),
    ))
}

fn fmt_layer<S>(format: LogFormat) -> Box<dyn Layer<S> + Send + Sync + 'static>
where
    S: Subscriber + for<'span> LookupSpan<'span>,
{
    // Logs go to stderr: a command's stdout stays its own output, and service supervisors
    // collect both streams anyway.
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Human => layer.with_ansi(std::io::stderr().is_terminal()).boxed(),
        LogFormat::Json => layer.json().with_ansi(false).boxed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unparsable_filter_names_the_offending_string() {
        // A bad filter is reported with the string that caused it.
        let error = parse_filter("info,[[[").expect_err("brackets are not filter syntax");
        assert!(matches!(
            error,
            TelemetryError::InvalidFilter { ref filter, .. } if filter == "info,[[["
        ));
    }

    #[test]
    fn an_otlp_endpoint_outside_a_runtime_is_refused_instead_of_panicking() {
        // Without a Tokio runtime the tonic exporter would panic, so setup returns an error instead.
        let config = TelemetryConfig::new("svc").with_otlp_endpoint("http://127.0.0.1:4317");
        let error = service_tracer(&config).expect_err("no Tokio runtime in a plain test");
        assert!(matches!(error, TelemetryError::NoRuntime));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_otlp_endpoint_inside_a_runtime_builds_a_provider_without_connecting() {
        // Building the exporter does not need the collector to be up.
        // Nothing listens on port 9, and the lazy channel must not care.
        let config = TelemetryConfig::new("svc").with_otlp_endpoint("http://127.0.0.1:9");
        let tracer = service_tracer(&config).expect("a lazy exporter builds offline");
        let _ = tracer.shutdown(Duration::from_millis(100));
    }
}
