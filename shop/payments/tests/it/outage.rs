//! Failing fast while the provider is down: a charge that never reached the provider is
//! `failed` and refunded at once; one that may have reached it stays unknown until settled.

use std::time::Duration;

use shop_payment_provider::ProviderConfig;

use crate::charges::get_json;
use crate::{Backend, Front, on_both_backends, start, start_behind};

on_both_backends!(
    an_outage_fails_the_charge_and_the_refund_needs_no_provider,
    a_refused_connection_fails_the_charge,
    an_answer_lost_after_capture_is_refunded_once_the_provider_answers,
    a_timeout_then_refusals_stay_unknown_until_settled,
    an_interrupted_charge_stays_unknown_after_refusals,
);

fn outage() -> ProviderConfig {
    ProviderConfig {
        outage: true,
        ..ProviderConfig::default()
    }
}

async fn an_outage_fails_the_charge_and_the_refund_needs_no_provider(backend: Backend) {
    // Every attempt is refused with 503: nothing was captured, so the saga's compensation
    // answers "none" at once although the provider is still down.
    let Some(h) = start(backend, "outage_fails", outage(), |_| {}).await else {
        return;
    };
    let answer = h.charge("order-1", 700).await.expect("answer");
    assert_eq!(answer.status, "unavailable");
    assert!(
        answer.message.contains("nothing was charged"),
        "{}",
        answer.message
    );
    assert_eq!(h.payment_status("order-1").await, "failed");
    let (status, view) = get_json(
        &format!("{}/api/payments/order-1", h.http_base),
        Some("admin"),
    )
    .await;
    assert_eq!((status, view["status"].as_str()), (200, Some("failed")));
    let reached = h.provider.stats().failures_injected;
    assert!(reached >= 1, "the charge reached the provider's front door");

    assert!(h.provider.config().outage, "still down");
    assert_eq!(h.refund("order-1").await, "none");
    assert_eq!(
        h.provider.stats().failures_injected,
        reached,
        "the refund did not call the provider"
    );
    assert_eq!(h.payment_status("order-1").await, "refunded");
    assert_eq!(h.refund("order-1").await, "none");

    // The provider recovers: the cancelled order is never charged.
    h.outage(false);
    let status = h.charge("order-1", 700).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    let stats = h.provider.stats();
    assert_eq!(
        (stats.captures, stats.refunds, stats.charges_kept),
        (0, 0, 0)
    );
}

async fn a_refused_connection_fails_the_charge(backend: Backend) {
    // Nothing listens at the provider's address: no attempt connects, so nothing happened.
    let Some(h) = start_behind(
        backend,
        "connection_refused",
        ProviderConfig::default(),
        |_| {},
        Front::Nobody,
    )
    .await
    else {
        return;
    };
    let answer = h.charge("order-1", 700).await.expect("answer");
    assert_eq!(answer.status, "unavailable");
    assert_eq!(h.payment_status("order-1").await, "failed");
    assert_eq!(h.refund("order-1").await, "none");
    assert_eq!(h.payment_status("order-1").await, "refunded");
    let status = h.charge("order-1", 700).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
}

async fn an_answer_lost_after_capture_is_refunded_once_the_provider_answers(backend: Backend) {
    // The provider captures and answers 500 (the outcome is unknown): the order is not
    // `failed`, and Refund settles it with the provider and refunds the capture.
    let config = ProviderConfig {
        fail_after_capture_rate: 1.0,
        ..ProviderConfig::default()
    };
    let Some(h) = start(backend, "lost_after_capture", config, |r| {
        r.attempts_max = 1
    })
    .await
    else {
        return;
    };
    let answer = h.charge("order-1", 900).await.expect("answer");
    assert_eq!(answer.status, "unavailable");
    assert_eq!(h.payment_status("order-1").await, "unavailable");
    assert_eq!(h.refund("order-1").await, "refunded");
    let stats = h.provider.stats();
    assert_eq!((stats.captures, stats.refunds), (1, 1));
    assert_eq!(h.payment_status("order-1").await, "refunded");

    // A `failed` order charged again, whose answer is then lost, is unknown again too.
    h.outage(true);
    assert_eq!(
        h.charge("order-2", 400).await.expect("answer").status,
        "unavailable"
    );
    assert_eq!(h.payment_status("order-2").await, "failed");
    h.outage(false);
    assert_eq!(
        h.charge("order-2", 400).await.expect("answer").status,
        "unavailable"
    );
    assert_eq!(h.payment_status("order-2").await, "unavailable");
    // Three failures in five calls opened the breaker; once it lets trial calls through, the
    // refund settles the order.
    assert_eq!(h.refund("order-2").await, "unavailable");
    h.clock.advance(Duration::from_secs(31));
    assert_eq!(h.refund("order-2").await, "refunded");
    let stats = h.provider.stats();
    assert_eq!((stats.captures, stats.refunds), (2, 2));
}

async fn a_timeout_then_refusals_stay_unknown_until_settled(backend: Backend) {
    // The first attempt is sent and never answered (it may have been processed); the retries
    // are refused with 503. One attempt may have reached the provider, so the outcome stays
    // unknown: Refund must ask the provider, and waits for it to come back.
    let Some(h) = start_behind(
        backend,
        "timeout_then_refusals",
        outage(),
        |r| r.call_timeout = Duration::from_millis(200),
        Front::FirstConnectionHangs,
    )
    .await
    else {
        return;
    };
    let answer = h.charge("order-1", 500).await.expect("answer");
    assert_eq!(answer.status, "unavailable");
    assert_eq!(
        h.provider.stats().failures_injected,
        2,
        "the two retries were refused"
    );
    assert_eq!(h.payment_status("order-1").await, "unavailable");
    assert_eq!(h.refund("order-1").await, "unavailable");
    assert_eq!(h.payment_status("order-1").await, "unavailable");
    // The provider recovers and the breaker the outage opened lets trial calls through.
    h.outage(false);
    h.clock.advance(Duration::from_secs(31));
    assert_eq!(h.refund("order-1").await, "none");
    assert_eq!(h.payment_status("order-1").await, "refunded");
    let status = h.charge("order-1", 500).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert_eq!(h.provider.stats().captures, 0);
}

async fn an_interrupted_charge_stays_unknown_after_refusals(backend: Backend) {
    // A Charge is abandoned while its request hangs at the provider: its row stays `pending`,
    // as after a crash. A later Charge whose attempts are all refused must not call the order
    // `failed`: the first request may have been processed.
    let Some(h) = start_behind(
        backend,
        "interrupted_charge",
        outage(),
        |r| r.call_timeout = Duration::from_secs(1),
        Front::FirstConnectionHangs,
    )
    .await
    else {
        return;
    };
    let abandoned =
        tokio::time::timeout(Duration::from_millis(300), h.charge("order-1", 500)).await;
    assert!(abandoned.is_err(), "the first charge is still waiting");
    let answer = h.charge("order-1", 500).await.expect("answer");
    assert_eq!(answer.status, "unavailable");
    assert_eq!(h.payment_status("order-1").await, "unavailable");
    assert_eq!(h.refund("order-1").await, "unavailable");
    h.outage(false);
    h.clock.advance(Duration::from_secs(31));
    assert_eq!(h.refund("order-1").await, "none");
    assert_eq!(h.provider.stats().captures, 0);
}
