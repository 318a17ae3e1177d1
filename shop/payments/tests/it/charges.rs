//! Charge: one capture per order, declines, validation, the admin view.

use serde_json::Value;
use shop_payment_provider::ProviderConfig;

use crate::{Backend, on_both_backends, start};

on_both_backends!(
    repeated_and_concurrent_charges_capture_once,
    a_declined_order_stays_declined_without_calling_the_provider,
    bad_charges_are_refused,
    the_admin_view_shows_a_payment_to_administrators_only,
    retries_recover_an_answer_lost_after_capture,
    a_repeat_settles_an_unknown_outcome_without_a_second_capture,
    a_slow_provider_times_out_as_unavailable,
);

async fn repeated_and_concurrent_charges_capture_once(backend: Backend) {
    // Ten racing Charge calls and three repeats for one order: one capture, one payment id.
    let Some(h) = start(
        backend,
        "concurrent_charges",
        ProviderConfig::default(),
        |_| {},
    )
    .await
    else {
        return;
    };
    let racing: Vec<_> = (0..10)
        .map(|_| {
            let client = h.client.clone();
            tokio::spawn(async move {
                let mut client = client;
                client
                    .charge(shop_contracts::proto::ChargeRequest {
                        order_id: "order-1".into(),
                        user_id: "user-1".into(),
                        amount_cents: 4_200,
                    })
                    .await
                    .expect("charge")
                    .into_inner()
            })
        })
        .collect();
    let mut ids = std::collections::HashSet::new();
    for call in racing {
        let answer = call.await.expect("task");
        assert_eq!(answer.status, "captured", "{answer:?}");
        ids.insert(answer.payment_id);
    }
    for _ in 0..3 {
        let answer = h.charge("order-1", 4_200).await.expect("repeat");
        assert_eq!(answer.status, "captured");
        ids.insert(answer.payment_id);
    }
    assert_eq!(ids.len(), 1, "one payment id: {ids:?}");
    assert!(ids.iter().all(|id| id.starts_with("ch_")));
    assert_eq!(h.provider.stats().captures, 1);
    assert_eq!(h.payment_status("order-1").await, "captured");
    // Another order is its own capture.
    assert_eq!(
        h.charge("order-2", 100).await.expect("charge").status,
        "captured"
    );
    assert_eq!(h.provider.stats().captures, 2);
}

async fn a_declined_order_stays_declined_without_calling_the_provider(backend: Backend) {
    let config = ProviderConfig {
        card_limit_cents: 1_000,
        ..ProviderConfig::default()
    };
    let Some(h) = start(backend, "declined", config, |_| {}).await else {
        return;
    };
    let answer = h.charge("big", 5_000).await.expect("charge");
    assert_eq!(answer.status, "declined");
    assert!(
        answer.message.contains("card_declined"),
        "{}",
        answer.message
    );
    // The provider is down now, yet the recorded decline answers at once.
    h.outage(true);
    let again = h.charge("big", 5_000).await.expect("repeat");
    assert_eq!(again.status, "declined");
    assert_eq!(
        h.provider.stats().failures_injected,
        0,
        "the provider was not called"
    );
    assert_eq!(h.payment_status("big").await, "declined");
    // Nothing was captured, so there is nothing to refund, even with the provider down.
    assert_eq!(h.refund("big").await, "none");
    assert_eq!(h.provider.stats().captures, 0);
}

async fn bad_charges_are_refused(backend: Backend) {
    let Some(h) = start(backend, "bad_charges", ProviderConfig::default(), |_| {}).await else {
        return;
    };
    for (order, amount) in [("", 100), ("o", 0), ("o", -1), (&*"x".repeat(200), 100)] {
        let status = h.charge(order, amount).await.expect_err("refused");
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{order:?} {amount}"
        );
    }
    // A recorded order with another amount is refused, not charged.
    assert_eq!(h.charge("o", 100).await.expect("charge").status, "captured");
    h.outage(true);
    let status = h.charge("p", 100).await.expect("answer");
    assert_eq!(status.status, "unavailable");
    h.outage(false);
    let status = h.charge("p", 999).await.expect_err("different amount");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert_eq!(h.provider.stats().captures, 1);
}

pub(crate) async fn get_json(url: &str, role: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::new().get(url);
    if let Some(role) = role {
        let token = crate::key()
            .signer("gateway")
            .token("u1", role)
            .expect("signs");
        request = request.header(trellis_service::auth::IDENTITY_HEADER, token);
    }
    let response = request.send().await.expect("http");
    let status = response.status().as_u16();
    (status, response.json().await.expect("json"))
}

async fn the_admin_view_shows_a_payment_to_administrators_only(backend: Backend) {
    let Some(h) = start(backend, "admin_view", ProviderConfig::default(), |_| {}).await else {
        return;
    };
    let answer = h.charge("order-7", 1_234).await.expect("charge");
    let url = format!("{}/api/payments/order-7", h.http_base);
    let (status, body) = get_json(&url, Some("admin")).await;
    assert_eq!(status, 200);
    assert_eq!(body["order_id"], "order-7");
    assert_eq!(body["status"], "captured");
    assert_eq!(body["amount_cents"], 1_234);
    assert_eq!(body["provider_charge_id"], answer.payment_id.as_str());
    let (status, body) = get_json(&url, Some("customer")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("forbidden"))
    );
    let (status, _) = get_json(&url, None).await;
    assert_eq!(status, 401);
    let (status, body) =
        get_json(&format!("{}/api/payments/nope", h.http_base), Some("admin")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (status, doc) = get_json(&format!("{}/openapi.json", h.http_base), None).await;
    assert_eq!(status, 200);
    assert!(doc["paths"]["/api/payments/{order_id}"].is_object());
}

async fn retries_recover_an_answer_lost_after_capture(backend: Backend) {
    // The provider captures and then answers 503; the retry, under the same key, finds the
    // capture instead of making a second one.
    let config = ProviderConfig {
        fail_after_capture_rate: 1.0,
        ..ProviderConfig::default()
    };
    let Some(h) = start(backend, "lost_answer_retry", config, |_| {}).await else {
        return;
    };
    let answer = h.charge("order-1", 500).await.expect("charge");
    assert_eq!(answer.status, "captured");
    let stats = h.provider.stats();
    assert_eq!((stats.captures, stats.failures_injected), (1, 1));
}

async fn a_repeat_settles_an_unknown_outcome_without_a_second_capture(backend: Backend) {
    // One attempt, answer lost after capture: "unavailable". The saga charges again later and
    // gets the capture made the first time.
    let config = ProviderConfig {
        fail_after_capture_rate: 1.0,
        ..ProviderConfig::default()
    };
    let Some(h) = start(backend, "repeat_settles", config, |r| r.attempts_max = 1).await else {
        return;
    };
    let first = h.charge("order-1", 300).await.expect("charge");
    assert_eq!(first.status, "unavailable");
    let again = h.charge("order-1", 300).await.expect("repeat");
    assert_eq!(again.status, "captured");
    assert_eq!(h.payment_status("order-1").await, "captured");
    assert_eq!(h.provider.stats().captures, 1);
}

async fn a_slow_provider_times_out_as_unavailable(backend: Backend) {
    // The provider takes longer than the per-attempt timeout: the charge answers
    // "unavailable" within the call deadline instead of hanging.
    let config = ProviderConfig {
        latency_ms: 5_000,
        ..ProviderConfig::default()
    };
    let Some(h) = start(backend, "slow_provider", config, |r| {
        r.call_timeout = std::time::Duration::from_millis(100);
        r.call_deadline = std::time::Duration::from_millis(400);
    })
    .await
    else {
        return;
    };
    let started = std::time::Instant::now();
    let answer = h.charge("order-1", 300).await.expect("charge");
    assert_eq!(answer.status, "unavailable");
    assert!(
        answer.message.contains("did not answer"),
        "{}",
        answer.message
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(h.provider.stats().captures, 0);
}
