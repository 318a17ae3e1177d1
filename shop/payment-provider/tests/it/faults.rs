//! Injected faults: latency, failure rate, outage, failure after capture.

use std::time::Duration;

use axum::http::StatusCode;
use shop_payment_provider::ProviderConfig;

use crate::{call, charge, provider};

#[tokio::test(start_paused = true)]
async fn latency_delays_every_v1_call() {
    let (router, _) = provider(ProviderConfig {
        latency_ms: 1_500,
        ..ProviderConfig::default()
    })
    .await;
    let started = tokio::time::Instant::now();
    let (status, _) = charge(&router, "slow", 10).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(started.elapsed() >= Duration::from_millis(1_500));
    // Stats and admin answer at once.
    let started = tokio::time::Instant::now();
    call(&router, "GET", "/v1/stats", None).await;
    call(&router, "GET", "/admin/config", None).await;
    assert!(started.elapsed() < Duration::from_millis(1_500));
}

#[tokio::test]
async fn an_outage_fails_every_call_before_any_state_changes() {
    let (router, handle) = provider(ProviderConfig {
        outage: true,
        ..ProviderConfig::default()
    })
    .await;
    let (status, body) = charge(&router, "k", 10).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["error"]["code"], "provider_outage");
    let (status, _) = call(&router, "GET", "/v1/charges?idempotency_key=k", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let stats = handle.stats();
    assert_eq!(
        (stats.captures, stats.charges_kept, stats.failures_injected),
        (0, 0, 2)
    );
    // The provider recovers: the key was never used, so it captures now.
    handle
        .set_config(ProviderConfig::default())
        .expect("valid config");
    let (status, _) = charge(&router, "k", 10).await;
    assert_eq!(status, StatusCode::CREATED);
}

#[tokio::test]
async fn a_failure_rate_of_one_fails_without_capturing() {
    let (router, handle) = provider(ProviderConfig {
        failure_rate: 1.0,
        ..ProviderConfig::default()
    })
    .await;
    for n in 0..4 {
        let (status, body) = charge(&router, &format!("k{n}"), 10).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["error"]["code"], "injected_failure");
    }
    let stats = handle.stats();
    assert_eq!(
        (stats.captures, stats.charges_kept, stats.failures_injected),
        (0, 0, 4)
    );
}

#[tokio::test]
async fn failure_after_capture_captures_then_loses_the_answer() {
    // The caller sees 500 (an unknown outcome, never the 503 that means "nothing was done"),
    // but the money was taken: a retry with the key finds it.
    let (router, handle) = provider(ProviderConfig {
        fail_after_capture_rate: 1.0,
        ..ProviderConfig::default()
    })
    .await;
    let (status, body) = charge(&router, "lost", 10).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(body["error"]["code"], "injected_failure_after_capture");
    let (_, found) = call(&router, "GET", "/v1/charges?idempotency_key=lost", None).await;
    assert_eq!(found["items"][0]["status"], "captured");
    let (status, replay) = charge(&router, "lost", 10).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(replay["id"], found["items"][0]["id"]);
    let stats = handle.stats();
    assert_eq!((stats.captures, stats.failures_injected), (1, 1));
}
