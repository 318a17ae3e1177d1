//! The request metrics layer counts and times requests per matched route and per RPC.

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use tower::ServiceExt;
use trellis_telemetry::http::RequestMetricsLayer;
use trellis_telemetry::metrics::install_prometheus;

fn app() -> Router {
    Router::new()
        .route("/items/{id}", get(|| async { "an item" }))
        .route(
            "/shop.v1.Items/{*rpc}",
            post(|| async {
                // A trailers-only gRPC error, as tonic answers a failed unary call.
                (
                    [("content-type", "application/grpc"), ("grpc-status", "5")],
                    "",
                )
                    .into_response()
            }),
        )
        .layer(RequestMetricsLayer::new("items-it"))
}

async fn send(request: Request<Body>) -> anyhow::Result<StatusCode> {
    Ok(app().oneshot(request).await?.status())
}

#[tokio::test]
async fn requests_are_counted_by_matched_route_and_rpc_never_by_raw_path() -> anyhow::Result<()> {
    // Goal: two ids share one route series, an unknown path is `unmatched`, and a gRPC call is
    // counted under its RPC with the status code from the response headers.
    let handle = install_prometheus()?;
    for id in ["1", "2"] {
        let request = Request::get(format!("/items/{id}")).body(Body::empty())?;
        assert_eq!(send(request).await?, StatusCode::OK);
    }
    let request = Request::get("/nothing/here").body(Body::empty())?;
    assert_eq!(send(request).await?, StatusCode::NOT_FOUND);
    let request = Request::post("/shop.v1.Items/Get")
        .header("content-type", "application/grpc")
        .body(Body::empty())?;
    assert_eq!(send(request).await?, StatusCode::OK);

    let text = handle.render();
    let line = |name: &str, labels: &[(&str, &str)], value: &str| {
        let found = text.lines().any(|line| {
            line.starts_with(&format!("{name}{{"))
                && line.ends_with(&format!(" {value}"))
                && labels
                    .iter()
                    .all(|(key, val)| line.contains(&format!("{key}=\"{val}\"")))
        });
        assert!(found, "no {name} {labels:?} {value} in\n{text}");
    };
    line(
        "trellis_http_server_requests_total",
        &[
            ("service", "items-it"),
            ("method", "GET"),
            ("route", "/items/{id}"),
            ("status_class", "2xx"),
        ],
        "2",
    );
    line(
        "trellis_http_server_requests_total",
        &[
            ("service", "items-it"),
            ("route", "unmatched"),
            ("status_class", "4xx"),
        ],
        "1",
    );
    line(
        "trellis_http_server_request_duration_seconds_count",
        &[("service", "items-it"), ("route", "/items/{id}")],
        "2",
    );
    line(
        "trellis_grpc_server_requests_total",
        &[
            ("service", "items-it"),
            ("rpc", "/shop.v1.Items/Get"),
            ("code", "NOT_FOUND"),
        ],
        "1",
    );
    assert!(
        !text.contains("/items/1\""),
        "a raw path became a label value:\n{text}"
    );
    assert!(
        text.contains("# HELP trellis_http_server_requests_total "),
        "{text}"
    );
    Ok(())
}
