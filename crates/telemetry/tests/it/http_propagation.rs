//! Trace context across a real HTTP round trip, through both tower layers.

use anyhow::Context as _;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{ServiceBuilder, ServiceExt};
use tracing::Instrument;
use trellis_telemetry::http::TraceContextClientLayer;
use trellis_telemetry::propagation;

use crate::helpers::{self, SEEN_TRACE_ID, SEEN_TRACEPARENT};

fn header<'a>(response: &'a hyper::Response<hyper::body::Incoming>, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
}

#[tokio::test]
async fn the_server_span_continues_the_trace_of_the_client_parent_span() -> anyhow::Result<()> {
    // Goal: a request sent through the client layer from inside a span is handled in a server
    // span of the same trace, over real TCP, with a well-formed traceparent on the wire.
    helpers::telemetry();
    let address = helpers::spawn_traced_server().await?;
    let client = ServiceBuilder::new()
        .layer(TraceContextClientLayer::new())
        .service(Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>());

    let parent = tracing::info_span!("test.parent");
    let parent_trace_id = propagation::trace_id(&parent).context("parent has a trace id")?;
    let request = Request::get(format!("http://{address}/trace")).body(Empty::new())?;
    let response = client.oneshot(request).instrument(parent).await?;

    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, SEEN_TRACE_ID), parent_trace_id);
    let traceparent = header(&response, SEEN_TRACEPARENT).to_owned();
    assert!(
        propagation::is_valid_traceparent(&traceparent),
        "server received {traceparent:?}"
    );
    assert!(
        traceparent.starts_with(&format!("00-{parent_trace_id}-")),
        "server received {traceparent:?}, parent trace is {parent_trace_id}"
    );
    let _ = response.into_body().collect().await?;
    Ok(())
}

#[tokio::test]
async fn two_requests_from_one_parent_span_share_its_trace() -> anyhow::Result<()> {
    // Goal: the client layer creates a fresh child per call, and both calls stay in the trace.
    helpers::telemetry();
    let address = helpers::spawn_traced_server().await?;
    let client = ServiceBuilder::new()
        .layer(TraceContextClientLayer::new())
        .service(Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>());

    let parent = tracing::info_span!("test.parent");
    let parent_trace_id = propagation::trace_id(&parent).context("parent has a trace id")?;
    let mut seen_parents = Vec::new();
    for _ in 0..2 {
        let request = Request::get(format!("http://{address}/trace")).body(Empty::new())?;
        let response = client
            .clone()
            .oneshot(request)
            .instrument(parent.clone())
            .await?;
        assert_eq!(header(&response, SEEN_TRACE_ID), parent_trace_id);
        seen_parents.push(header(&response, SEEN_TRACEPARENT).to_owned());
    }
    assert_ne!(
        seen_parents[0], seen_parents[1],
        "each call is its own client span"
    );
    Ok(())
}

#[tokio::test]
async fn a_request_without_traceparent_starts_a_new_trace() -> anyhow::Result<()> {
    // Goal: with no incoming context the server span is a root with a valid trace id.
    helpers::telemetry();
    let address = helpers::spawn_traced_server().await?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();

    let request = Request::get(format!("http://{address}/trace")).body(Empty::new())?;
    let response = client.request(request).await?;

    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, SEEN_TRACEPARENT), "none");
    assert!(helpers::is_valid_trace_id(header(&response, SEEN_TRACE_ID)));
    Ok(())
}

#[tokio::test]
async fn a_malformed_traceparent_is_ignored_and_a_new_trace_starts() -> anyhow::Result<()> {
    // Goal: each malformed shape gets 200 and a valid trace id unrelated to the bad header;
    // the request goes through a plain client so the header reaches the server as written.
    helpers::telemetry();
    let address = helpers::spawn_traced_server().await?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();

    let malformed = [
        "garbage",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e473600-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
    ];
    for traceparent in malformed {
        let request = Request::get(format!("http://{address}/trace"))
            .header(propagation::TRACEPARENT, traceparent)
            .body(Empty::new())?;
        let response = client.request(request).await?;

        assert_eq!(response.status(), StatusCode::OK, "for {traceparent:?}");
        assert_eq!(header(&response, SEEN_TRACEPARENT), traceparent);
        let seen = header(&response, SEEN_TRACE_ID);
        assert!(
            helpers::is_valid_trace_id(seen),
            "for {traceparent:?}: {seen:?}"
        );
        // The malformed trace-id field (if any) must not reappear, whole or zero-padded.
        let bad_trace_field = traceparent.split('-').nth(1).unwrap_or("garbage");
        assert!(
            !seen.ends_with(&bad_trace_field.to_ascii_lowercase()),
            "for {traceparent:?} the server continued the bad trace: {seen}"
        );
    }
    Ok(())
}
