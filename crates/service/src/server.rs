//! One listener for REST and gRPC, with health, readiness and metrics.

use std::future::Future;

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use trellis_telemetry::http::TraceContextServerLayer;
use trellis_telemetry::metrics::{PrometheusHandle, metrics_router};

use crate::{ApiError, Db};

/// Why serving stopped with an error.
#[derive(Debug, thiserror::Error)]
#[error("serving failed: {0}")]
pub struct ServeError(#[from] std::io::Error);

impl ServeError {
    /// Whether serving again may work: an interrupted or timed-out accept is passing; a
    /// listener that failed for another reason (its address gone, too many open files) is not
    /// fixed by trying again at once.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.0.kind(),
            std::io::ErrorKind::Interrupted
                | std::io::ErrorKind::TimedOut
                | std::io::ErrorKind::WouldBlock
        )
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then lets in-flight requests finish.
///
/// Adds `GET /healthz` (the process answers), `GET /readyz` (503 `database_unavailable` when
/// `db` does not answer) and `GET /metrics` (when a Prometheus handle is given), a JSON 404
/// for unknown paths, and the W3C trace-context layer. HTTP/1.1 and HTTP/2 (h2c, which gRPC
/// uses) are both spoken on the one port.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    db: Option<Db>,
    metrics: Option<PrometheusHandle>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let mut app = app
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let db = db.clone();
                async move {
                    match db {
                        Some(db) => match db.ping().await {
                            Ok(()) => "ready".into_response(),
                            Err(e) => ApiError::unavailable(
                                "database_unavailable",
                                format!("the database does not answer: {e}"),
                            )
                            .into_response(),
                        },
                        None => "ready".into_response(),
                    }
                }
            }),
        )
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such path").into_response()
        });
    if let Some(handle) = metrics {
        app = app.merge(metrics_router(handle));
    }
    let app = app.layer(TraceContextServerLayer::new());
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::ServeError;

    #[test]
    fn a_passing_accept_fault_is_retryable_and_a_lost_address_is_not() {
        let passing = ServeError::from(std::io::Error::from(std::io::ErrorKind::Interrupted));
        let lasting = ServeError::from(std::io::Error::from(std::io::ErrorKind::AddrInUse));
        assert!(passing.is_retryable());
        assert!(!lasting.is_retryable());
    }
}
