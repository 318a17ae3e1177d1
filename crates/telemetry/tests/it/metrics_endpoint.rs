//! The /metrics endpoint renders what the `metrics` facade recorded.

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use tower::ServiceExt;
use trellis_telemetry::metrics::{CONTENT_TYPE, install_prometheus, metrics_router};

#[tokio::test]
async fn metrics_renders_a_counter_incremented_through_the_facade() -> anyhow::Result<()> {
    // Goal: a counter bumped with metrics::counter! appears on GET /metrics in the Prometheus
    // text format, with the exposition content type.
    let handle = install_prometheus()?;
    metrics::counter!("telemetry_it_orders_total", "outcome" => "confirmed").increment(2);

    let request = Request::get("/metrics").body(Body::empty())?;
    let response = metrics_router(handle).oneshot(request).await?;

    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.as_bytes()),
        Some(CONTENT_TYPE.as_bytes())
    );
    let body = response.into_body().collect().await?.to_bytes();
    let text = std::str::from_utf8(&body)?;
    assert!(
        text.contains("telemetry_it_orders_total{outcome=\"confirmed\"} 2"),
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn a_latency_histogram_renders_as_prometheus_buckets() -> anyhow::Result<()> {
    // Goal: histograms named *_seconds get buckets, so they aggregate across instances.
    let handle = install_prometheus()?;
    metrics::histogram!("telemetry_it_request_duration_seconds").record(0.2);

    let text = handle.render();

    assert!(
        text.contains("# TYPE telemetry_it_request_duration_seconds histogram"),
        "{text}"
    );
    assert!(
        text.contains("telemetry_it_request_duration_seconds_bucket{le=\"0.25\"} 1"),
        "{text}"
    );
    Ok(())
}
