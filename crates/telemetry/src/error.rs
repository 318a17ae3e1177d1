//! The crate's one error type.

/// Everything that can go wrong while setting telemetry up.
///
/// Telemetry never fails a request: once [`init`](crate::init) and
/// [`install_prometheus`](crate::metrics::install_prometheus) have succeeded, propagation and the
/// tower layers have no error path of their own (a malformed `traceparent` simply starts a new
/// trace). So every variant here is a start-up problem for the caller to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    /// The caller passed a log filter that is not valid `EnvFilter` syntax.
    #[error("invalid log filter {filter:?}: {source}")]
    InvalidFilter {
        /// The filter string as given.
        filter: String,
        /// What the parser objected to.
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },

    /// The caller passed a log format other than `human` or `json`.
    #[error("invalid log format {0:?}: expected \"human\" or \"json\"")]
    InvalidLogFormat(String),

    /// A global tracing subscriber is already installed: [`init`](crate::init) runs once per
    /// process (a second call, or another library that installed its own subscriber).
    #[error("telemetry is already initialised: a global tracing subscriber is installed")]
    AlreadyInitialized,

    /// An OTLP endpoint was configured but no Tokio runtime is running: the gRPC exporter needs
    /// one, so call [`init`](crate::init) from inside the runtime.
    #[error("an OTLP endpoint is configured but init() was called outside a Tokio runtime")]
    NoRuntime,

    /// The OTLP span exporter could not be built from the given configuration.
    #[error("cannot build the OTLP span exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),

    /// The Prometheus recorder could not be built or installed.
    #[error("cannot install the Prometheus metrics recorder: {0}")]
    Metrics(#[from] metrics_exporter_prometheus::BuildError),
}

impl TelemetryError {
    /// Whether trying the same call again could succeed.
    ///
    /// Always `false`: every variant is a configuration or start-up ordering problem, which a
    /// retry does not change. The method exists so that resilience layers can ask every trellis
    /// error the same question.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::InvalidFilter { .. }
            | Self::InvalidLogFormat(_)
            | Self::AlreadyInitialized
            | Self::NoRuntime
            | Self::Exporter(_)
            | Self::Metrics(_) => false,
        }
    }
}
