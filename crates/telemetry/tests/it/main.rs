//! Integration tests for trellis-telemetry, in one binary so global setup happens once.
//!
//! Every test calls [`helpers::telemetry`] first: it runs `init` once for the whole binary, and
//! tests run in parallel against that shared setup, so none of them depends on running alone.

mod helpers;
mod http_propagation;
mod init_once;
mod map_propagation;
mod metrics_endpoint;
mod request_metrics;
