//! Prometheus metrics behind the `metrics` facade.
//!
//! Libraries and services record through the `metrics` facade macros only
//! (`metrics::counter!`, `metrics::histogram!`, …); the binary calls [`install_prometheus`] once
//! and serves [`metrics_router`] on `/metrics`. See `docs/decisions/0002-metrics-facade.md`.
//!
//! Histograms whose names end in `_seconds` get [`LATENCY_BUCKETS_SECONDS`] and those ending in
//! `_batch_size` get [`BATCH_SIZE_BUCKETS`], so they render as Prometheus histograms
//! (aggregatable across instances) rather than summaries.
//!
//! Every scrape ([`render`], which [`metrics_router`] serves) also carries the process basics
//! (`process_cpu_seconds_total`, `process_resident_memory_bytes`, `process_open_fds`, … from
//! `/proc/self` on Linux) and the Tokio runtime's (`trellis_runtime_workers`,
//! `trellis_runtime_alive_tasks`, …). docs/metrics.md lists every metric trellis emits.
//!
//! ```
//! let handle = trellis_telemetry::metrics::install_prometheus()?;
//! metrics::counter!("orders_placed_total").increment(1);
//! metrics::histogram!("order_placement_duration_seconds").record(0.012);
//! assert!(handle.render().contains("orders_placed_total 1"));
//! let app: axum::Router = trellis_telemetry::metrics::metrics_router(handle);
//! # drop(app);
//! # Ok::<(), trellis_telemetry::TelemetryError>(())
//! ```

use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::http::header;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

pub use metrics_exporter_prometheus::PrometheusHandle;

use crate::TelemetryError;

mod process;

/// The content type of the Prometheus text exposition format served on `/metrics`.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Upper bounds, in seconds, of the buckets for every histogram named `*_seconds`: from half a
/// millisecond (an in-memory hop) to ten seconds (a request about to time out).
pub const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Upper bounds of the buckets for every histogram named `*_batch_size` (items per batch, such
/// as appends per event-store commit): powers of two up to the largest batches trellis makes.
pub const BATCH_SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];

/// How often buffered histogram samples are folded into their buckets when nobody scrapes,
/// so memory stays bounded between scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
static INSTALL: Mutex<()> = Mutex::new(());

/// Installs the Prometheus recorder as the process-wide `metrics` recorder, once.
///
/// The first call installs it and starts a small background thread that folds histogram
/// samples into buckets every few seconds; later calls (from any thread) return a handle to
/// the same recorder, so every part of a process may call this freely.
///
/// # Errors
///
/// [`TelemetryError::Metrics`] if another `metrics` recorder was already installed by
/// something else in the process.
pub fn install_prometheus() -> Result<PrometheusHandle, TelemetryError> {
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    // Serialise first installs: two racing callers must not both try to set the recorder.
    let _installing = INSTALL.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }

    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".to_owned()),
            LATENCY_BUCKETS_SECONDS,
        )?
        .set_buckets_for_metric(
            Matcher::Suffix("_batch_size".to_owned()),
            BATCH_SIZE_BUCKETS,
        )?
        .install_recorder()?;
    spawn_upkeep(handle.clone());
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// The text a scrape gets: everything recorded through the `metrics` facade, then the process
/// and runtime basics, read now. The runtime families appear when called inside a Tokio
/// runtime (as a request handler is), the process ones on Linux.
pub fn render(handle: &PrometheusHandle) -> String {
    let mut body = handle.render();
    process::render_into(&mut body);
    body
}

/// An axum router serving `GET /metrics` from `handle` in the Prometheus text format (see
/// [`render`]).
///
/// Merge it into a service's router: `app.merge(metrics_router(handle))`.
pub fn metrics_router(handle: PrometheusHandle) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let body = render(&handle);
            async move { ([(header::CONTENT_TYPE, CONTENT_TYPE)], body) }
        }),
    )
}

fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("trellis-metrics-upkeep".to_owned())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                handle.run_upkeep();
            }
        });
    if let Err(error) = spawned {
        // Scrapes still fold samples in; only memory between scrapes is unbounded.
        tracing::warn!(%error, "cannot start the metrics upkeep thread");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installing_twice_returns_the_same_recorder() {
        // A second install is not an error and shares the first recorder.
        let first = install_prometheus().expect("first install");
        let second = install_prometheus().expect("second install is not an error");
        metrics::counter!("telemetry_unit_double_install_total").increment(3);
        assert!(
            first
                .render()
                .contains("telemetry_unit_double_install_total 3")
        );
        assert!(
            second
                .render()
                .contains("telemetry_unit_double_install_total 3")
        );
    }

    #[test]
    fn a_seconds_histogram_renders_with_latency_buckets() {
        // Histograms named *_seconds get the latency buckets, not a summary.
        let handle = install_prometheus().expect("install");
        metrics::histogram!("telemetry_unit_latency_seconds").record(0.003);
        let rendered = handle.render();
        assert!(
            rendered.contains("telemetry_unit_latency_seconds_bucket{le=\"0.005\"} 1"),
            "{rendered}"
        );
        assert!(
            rendered.contains("telemetry_unit_latency_seconds_count 1"),
            "{rendered}"
        );
    }

    #[test]
    fn a_batch_size_histogram_renders_with_batch_buckets() {
        // Histograms named *_batch_size get the power-of-two buckets.
        let handle = install_prometheus().expect("install");
        metrics::histogram!("telemetry_unit_append_batch_size").record(3.0);
        let rendered = handle.render();
        assert!(
            rendered.contains("telemetry_unit_append_batch_size_bucket{le=\"4\"} 1"),
            "{rendered}"
        );
        assert!(
            rendered.contains("telemetry_unit_append_batch_size_bucket{le=\"2\"} 0"),
            "{rendered}"
        );
    }

    #[test]
    fn racing_first_installs_all_succeed() {
        // Concurrent first installs are serialised and all succeed.
        let threads: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(install_prometheus))
            .collect();
        for thread in threads {
            let result = thread.join().expect("install thread does not panic");
            assert!(result.is_ok());
        }
    }
}
