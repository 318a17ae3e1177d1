//! Tracing, OpenTelemetry and metrics for trellis services: one call to set up, one trace
//! across every hop.
//!
//! # Overview
//!
//! - [`init`] installs logging (human or JSON lines, filtered by `RUST_LOG` or configuration)
//!   and an OpenTelemetry tracer provider behind `tracing`, so every `tracing` span has real
//!   W3C trace and span ids, and optionally exports spans over OTLP/gRPC.
//! - [`propagation`] reads and writes W3C `traceparent` / `tracestate` in HTTP headers and in a
//!   message's string map. A malformed `traceparent` is ignored and a new trace starts.
//! - [`http`] has tower layers: [`TraceContextServerLayer`](http::TraceContextServerLayer)
//!   continues the caller's trace on the server side, and
//!   [`TraceContextClientLayer`](http::TraceContextClientLayer) sends the current trace along
//!   on the client side.
//! - [`metrics`] installs the Prometheus recorder behind the `metrics` facade and serves
//!   `/metrics`.
//! - [`service`] names the service a span belongs to when one process hosts several
//!   (`trellis up`): each service's spans are exported under their own `service.name`.
//! - [`export`] is the OTLP/gRPC export path: a bounded queue that never blocks a request,
//!   with dropped and exported spans counted.
//!
//! # How it fits with the other trellis crates
//!
//! DESIGN.md requires every hop to propagate `traceparent`:
//! gateway → service → bus message → consumer → saga step. Each crate does its part with
//! this one. `trellis-gateway` and every shop service wrap their routers in the server layer
//! and their HTTP clients in the client layer. `trellis-bus` stores
//! [`propagation::current_traceparent`] in each envelope when it publishes, and calls
//! [`propagation::set_parent_from_map`] on the consumer's span when it delivers.
//! `trellis-saga` runs each saga inside a span, so its steps' calls join one trace.
//! Libraries record metrics through the `metrics` facade only. The binary (`trellis up`,
//! `trellis serve`) calls [`init`] and [`metrics::install_prometheus`] once at start.
//!
//! This crate has no cargo features. The OTLP exporter is always compiled in and turned on at
//! run time by [`TelemetryConfig::with_otlp_endpoint`] or by the standard variables
//! (`OTEL_EXPORTER_OTLP_ENDPOINT` and friends, read by [`TelemetryConfig::with_otel_env`]);
//! off by default. docs/tracing.md lists the variables and the spans of an order.
//!
//! # Example
//!
//! ```
//! use std::collections::HashMap;
//!
//! use trellis_telemetry::{LogFormat, TelemetryConfig, propagation};
//!
//! # fn main() -> Result<(), trellis_telemetry::TelemetryError> {
//! let format: LogFormat = "json".parse()?;
//! let _guard = trellis_telemetry::init(
//!     TelemetryConfig::new("orders").with_log_format(format).with_filter("warn"),
//! )?;
//!
//! // Publishing: the message carries the current span's trace context.
//! let publish = tracing::info_span!("publish");
//! let mut envelope = HashMap::new();
//! publish.in_scope(|| {
//!     let traceparent = propagation::current_traceparent().expect("publish is entered");
//!     envelope.insert("traceparent".to_owned(), traceparent);
//! });
//!
//! // Consuming: the handler's span continues the publisher's trace.
//! let consume = tracing::info_span!("consume");
//! assert!(propagation::set_parent_from_map(&consume, &envelope));
//! assert_eq!(propagation::trace_id(&consume), propagation::trace_id(&publish));
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

mod config;
mod error;
pub mod export;
pub mod http;
mod init;
pub mod metrics;
pub mod propagation;
pub mod service;

pub use config::{DEFAULT_FILTER, LogFormat, TelemetryConfig};
pub use error::TelemetryError;
pub use init::{TelemetryGuard, init};
