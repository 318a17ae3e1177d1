//! What [`init`](crate::init) sets up: service name, log format, filter and exporter.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::TelemetryError;

/// The filter used when neither the configuration nor `RUST_LOG` sets one.
pub const DEFAULT_FILTER: &str = "info";

/// How log lines are written to standard output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Coloured, multi-field lines for a person at a terminal.
    #[default]
    Human,
    /// One JSON object per line, for log collectors.
    Json,
}

impl LogFormat {
    /// The name this format parses from: `"human"` or `"json"`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Human => "human",
            Self::Json => "json",
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LogFormat {
    type Err = TelemetryError;

    /// Parses `human` or `json`, ignoring ASCII case and surrounding whitespace.
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let trimmed = input.trim();
        if trimmed.eq_ignore_ascii_case("human") {
            Ok(Self::Human)
        } else if trimmed.eq_ignore_ascii_case("json") {
            Ok(Self::Json)
        } else {
            Err(TelemetryError::InvalidLogFormat(input.to_owned()))
        }
    }
}

/// Settings for [`init`](crate::init).
///
/// Start from [`TelemetryConfig::new`] and adjust with the `with_*` steps:
///
/// ```
/// use trellis_telemetry::{LogFormat, TelemetryConfig};
///
/// let config = TelemetryConfig::new("orders")
///     .with_log_format(LogFormat::Json)
///     .with_filter("info,trellis_bus=debug")
///     .with_otlp_endpoint("http://127.0.0.1:4317");
/// assert_eq!(config.service_name(), "orders");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelemetryConfig {
    service_name: String,
    log_format: LogFormat,
    filter: Option<String>,
    otlp_endpoint: Option<String>,
}

impl TelemetryConfig {
    /// A configuration for `service_name` with human logs, the filter from `RUST_LOG` (else
    /// [`DEFAULT_FILTER`]) and no span exporter.
    #[must_use]
    pub fn new(service_name: impl Into<String>) -> Self {
        Self {
            service_name: service_name.into(),
            log_format: LogFormat::default(),
            filter: None,
            otlp_endpoint: None,
        }
    }

    /// Writes log lines in `log_format`.
    #[must_use]
    pub fn with_log_format(mut self, log_format: LogFormat) -> Self {
        self.log_format = log_format;
        self
    }

    /// Uses `filter` (`EnvFilter` syntax, e.g. `"info,trellis_bus=debug"`) instead of `RUST_LOG`.
    #[must_use]
    pub fn with_filter(mut self, filter: impl Into<String>) -> Self {
        self.filter = Some(filter.into());
        self
    }

    /// Exports spans in batches over OTLP/gRPC to `endpoint` (e.g. `http://127.0.0.1:4317`).
    #[must_use]
    pub fn with_otlp_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.otlp_endpoint = Some(endpoint.into());
        self
    }

    /// Applies the standard OpenTelemetry environment variables (see [`with_otel_vars`]).
    ///
    /// [`with_otel_vars`]: Self::with_otel_vars
    #[must_use]
    pub fn with_otel_env(self) -> Self {
        self.with_otel_vars(|name| std::env::var(name).ok())
    }

    /// Applies the standard OpenTelemetry variables, read through `var`:
    ///
    /// - `OTEL_SERVICE_NAME` replaces the service name;
    /// - `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else `OTEL_EXPORTER_OTLP_ENDPOINT`, turns OTLP/gRPC
    ///   export on, to that endpoint (an endpoint set in code stays);
    /// - `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` turns export off, whatever
    ///   else is set.
    ///
    /// Empty values count as unset. The SDK reads the rest itself when [`init`](crate::init)
    /// builds the providers: `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`, `OTEL_BSP_*`,
    /// `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_EXPORTER_OTLP_HEADERS` and
    /// `OTEL_RESOURCE_ATTRIBUTES`.
    ///
    /// ```
    /// use trellis_telemetry::TelemetryConfig;
    ///
    /// let vars = |name: &str| match name {
    ///     "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://collector:4317".to_owned()),
    ///     "OTEL_SERVICE_NAME" => Some("shop".to_owned()),
    ///     _ => None,
    /// };
    /// let config = TelemetryConfig::new("trellis").with_otel_vars(vars);
    /// assert_eq!(config.service_name(), "shop");
    /// assert_eq!(config.otlp_endpoint(), Some("http://collector:4317"));
    /// ```
    #[must_use]
    pub fn with_otel_vars(mut self, var: impl Fn(&str) -> Option<String>) -> Self {
        let set = |name: &str| var(name).filter(|value| !value.trim().is_empty());
        if let Some(name) = set("OTEL_SERVICE_NAME") {
            self.service_name = name.trim().to_owned();
        }
        if self.otlp_endpoint.is_none() {
            self.otlp_endpoint = set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                .or_else(|| set("OTEL_EXPORTER_OTLP_ENDPOINT"))
                .map(|endpoint| endpoint.trim().to_owned());
        }
        let disabled =
            set("OTEL_SDK_DISABLED").is_some_and(|value| value.trim().eq_ignore_ascii_case("true"));
        let no_exporter = set("OTEL_TRACES_EXPORTER")
            .is_some_and(|value| value.trim().eq_ignore_ascii_case("none"));
        if disabled || no_exporter {
            self.otlp_endpoint = None;
        }
        self
    }

    /// The `service.name` resource attribute spans carry.
    #[must_use]
    pub fn service_name(&self) -> &str {
        &self.service_name
    }

    /// How log lines are written.
    #[must_use]
    pub fn log_format(&self) -> LogFormat {
        self.log_format
    }

    /// The filter set with [`with_filter`](Self::with_filter), if any.
    #[must_use]
    pub fn filter(&self) -> Option<&str> {
        self.filter.as_deref()
    }

    /// The OTLP/gRPC endpoint spans are exported to, if any.
    #[must_use]
    pub fn otlp_endpoint(&self) -> Option<&str> {
        self.otlp_endpoint.as_deref()
    }

    /// The filter string in force: the configured one, else `RUST_LOG`, else [`DEFAULT_FILTER`].
    pub(crate) fn effective_filter(&self) -> String {
        self.filter
            .clone()
            .or_else(|| {
                std::env::var("RUST_LOG")
                    .ok()
                    .filter(|value| !value.trim().is_empty())
            })
            .unwrap_or_else(|| DEFAULT_FILTER.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_format_parses_both_names_in_any_case() {
        // A CLI flag may come in any case or with stray spaces and still parse.
        assert_eq!("human".parse::<LogFormat>().ok(), Some(LogFormat::Human));
        assert_eq!(" JSON ".parse::<LogFormat>().ok(), Some(LogFormat::Json));
    }

    #[test]
    fn unknown_log_format_is_rejected_with_a_message_naming_the_choices() {
        // A bad flag value fails with an error that tells the user what is accepted.
        let error = "yaml"
            .parse::<LogFormat>()
            .expect_err("yaml is not a log format");
        assert!(matches!(error, TelemetryError::InvalidLogFormat(ref given) if given == "yaml"));
        let message = error.to_string();
        assert!(
            message.contains("human") && message.contains("json"),
            "{message}"
        );
    }

    #[test]
    fn log_format_display_round_trips_through_from_str() {
        // What a format prints is what it parses from, so configs can be written back.
        for format in [LogFormat::Human, LogFormat::Json] {
            assert_eq!(format.to_string().parse::<LogFormat>().ok(), Some(format));
        }
    }

    #[test]
    fn explicit_filter_wins_over_the_default() {
        // A filter set in code takes precedence over RUST_LOG and the default.
        let config = TelemetryConfig::new("svc").with_filter("warn");
        assert_eq!(config.effective_filter(), "warn");
    }

    fn vars(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| (*value).to_owned())
        }
    }

    #[test]
    fn without_otel_variables_nothing_is_exported() {
        // Export is off by default: no endpoint variable, no exporter.
        let config = TelemetryConfig::new("svc").with_otel_vars(vars(&[]));
        assert_eq!(config.otlp_endpoint(), None);
        assert_eq!(config.service_name(), "svc");
    }

    #[test]
    fn the_traces_endpoint_wins_over_the_general_one() {
        // The signal-specific variable is the more specific setting, as the specification says.
        let config = TelemetryConfig::new("svc").with_otel_vars(vars(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://general:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317"),
        ]));
        assert_eq!(config.otlp_endpoint(), Some("http://traces:4317"));
    }

    #[test]
    fn a_disabled_sdk_or_no_exporter_turns_export_off_whatever_the_endpoint() {
        // OTEL_SDK_DISABLED=true and OTEL_TRACES_EXPORTER=none both win over an endpoint.
        let disabled: &'static [(&str, &str)] = &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_SDK_DISABLED", "TRUE"),
        ];
        let no_exporter: &'static [(&str, &str)] = &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ];
        for pairs in [disabled, no_exporter] {
            let config = TelemetryConfig::new("svc")
                .with_otlp_endpoint("http://code:4317")
                .with_otel_vars(vars(pairs));
            assert_eq!(config.otlp_endpoint(), None, "{pairs:?}");
        }
    }

    #[test]
    fn an_empty_service_name_variable_keeps_the_name_from_code() {
        // OTEL_SERVICE_NAME="" is unset, not a service called "".
        let config = TelemetryConfig::new("orders").with_otel_vars(vars(&[
            ("OTEL_SERVICE_NAME", " "),
            ("OTEL_SDK_DISABLED", "false"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
        ]));
        assert_eq!(config.service_name(), "orders");
        assert_eq!(config.otlp_endpoint(), Some("http://c:4317"));
    }

    #[test]
    fn a_new_config_exports_nothing_and_logs_for_humans() {
        // The defaults are quiet: human logs, RUST_LOG filter, no exporter.
        let config = TelemetryConfig::new("svc");
        assert_eq!(config.otlp_endpoint(), None);
        assert_eq!(config.log_format(), LogFormat::Human);
        assert_eq!(config.filter(), None);
    }
}
