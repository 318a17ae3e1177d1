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
/// for unknown paths, a JSON 405 (with `Allow`) for a known path called with a method it does
/// not take, and the W3C trace-context layer. HTTP/1.1 and HTTP/2 (h2c, which gRPC uses) are
/// both spoken on the one port.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    db: Option<Db>,
    metrics: Option<PrometheusHandle>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let app = with_defaults(app, db, metrics).layer(TraceContextServerLayer::new());
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

/// `app` with what [`serve`] adds to every service: health, readiness, metrics, and JSON
/// error answers for unknown paths and methods (axum's own are empty bodies).
fn with_defaults(app: Router, db: Option<Db>, metrics: Option<PrometheusHandle>) -> Router {
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
    // Last, so it reaches every route registered above (axum sets it on each one).
    app.method_not_allowed_fallback(|| async {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this path does not take this method; see Allow",
        )
        .into_response()
    })
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode, header};
    use axum::routing::get;
    use tower::ServiceExt as _;

    use super::{ServeError, with_defaults};

    async fn answer(app: &axum::Router, method: &str, path: &str) -> (StatusCode, String, String) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty())
            .expect("a request");
        let response = app.clone().oneshot(request).await.expect("infallible");
        let status = response.status();
        let allow = response
            .headers()
            .get(header::ALLOW)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = axum::body::to_bytes(response.into_body(), 64 * 1024)
            .await
            .expect("a body");
        (status, allow, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn an_unknown_path_or_method_gets_a_json_error() {
        // A service's own routes and the ones serve adds, called wrongly: 404 and 405 (with
        // Allow) as `{"error":{"code","message"}}`, never axum's empty bodies.
        let nested = axum::Router::new().route("/things", get(|| async { "nested" }));
        let app = with_defaults(
            axum::Router::new()
                .route("/notes", get(|| async { "notes" }))
                .nest("/admin", nested),
            None,
            None,
        );
        let (status, _, body) = answer(&app, "GET", "/nowhere").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body.contains(r#""code":"not_found""#), "{body}");
        for path in ["/notes", "/admin/things", "/healthz"] {
            let (status, allow, body) = answer(&app, "DELETE", path).await;
            assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{path}");
            assert!(allow.contains("GET"), "{path}: Allow {allow:?}");
            assert!(
                body.contains(r#""code":"method_not_allowed""#),
                "{path}: {body}"
            );
        }
        let (status, _, body) = answer(&app, "GET", "/notes").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "notes"));
    }

    #[test]
    fn a_passing_accept_fault_is_retryable_and_a_lost_address_is_not() {
        let passing = ServeError::from(std::io::Error::from(std::io::ErrorKind::Interrupted));
        let lasting = ServeError::from(std::io::Error::from(std::io::ErrorKind::AddrInUse));
        assert!(passing.is_retryable());
        assert!(!lasting.is_retryable());
    }
}
