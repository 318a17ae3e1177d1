//! Shared fixtures: one telemetry setup per binary and a traced test server.

use std::net::SocketAddr;
use std::sync::OnceLock;

use axum::Router;
use axum::http::{HeaderMap, HeaderValue};
use axum::routing::get;
use tokio::net::TcpListener;
use trellis_telemetry::http::TraceContextServerLayer;
use trellis_telemetry::{TelemetryConfig, TelemetryGuard, propagation};

/// Header in which the test server echoes the trace id of its own `http.server` span.
pub(crate) const SEEN_TRACE_ID: &str = "x-seen-trace-id";

/// Header in which the test server echoes the `traceparent` it received, or `none`.
pub(crate) const SEEN_TRACEPARENT: &str = "x-seen-traceparent";

/// Installs telemetry once for this test binary; every test calls it first.
pub(crate) fn telemetry() {
    static GUARD: OnceLock<TelemetryGuard> = OnceLock::new();
    GUARD.get_or_init(|| {
        // `warn` keeps test output quiet; spans still get trace ids (INFO floor for spans).
        trellis_telemetry::init(TelemetryConfig::new("trellis-telemetry-it").with_filter("warn"))
            .expect("the first init in this binary succeeds")
    });
}

/// Starts an axum server on 127.0.0.1:0 behind `TraceContextServerLayer` and returns its
/// address. `GET /trace` answers 200 and echoes what the server saw in two headers.
pub(crate) async fn spawn_traced_server() -> anyhow::Result<SocketAddr> {
    let app = Router::new()
        .route("/trace", get(report_trace))
        .layer(TraceContextServerLayer::new());
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(address)
}

async fn report_trace(request_headers: HeaderMap) -> (HeaderMap, &'static str) {
    let mut headers = HeaderMap::new();
    let trace_id = propagation::trace_id(&tracing::Span::current()).unwrap_or_default();
    if let Ok(value) = HeaderValue::from_str(&trace_id) {
        headers.insert(SEEN_TRACE_ID, value);
    }
    let traceparent = request_headers
        .get(propagation::TRACEPARENT)
        .cloned()
        .unwrap_or(HeaderValue::from_static("none"));
    headers.insert(SEEN_TRACEPARENT, traceparent);
    (headers, "ok")
}

/// Whether `value` is 32 lower-case hex digits and not all zeros: a valid W3C trace id.
pub(crate) fn is_valid_trace_id(value: &str) -> bool {
    value.len() == 32
        && value
            .bytes()
            .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
        && value.bytes().any(|byte| byte != b'0')
}
