//! Refund: at most once, and settling outcomes the service could not see.

use shop_payment_provider::ProviderConfig;

use crate::{Backend, on_both_backends, start};

on_both_backends!(
    a_capture_is_refunded_once,
    a_lost_capture_is_found_and_refunded,
    an_order_refunded_before_any_charge_is_never_charged,
);

async fn a_capture_is_refunded_once(backend: Backend) {
    let Some(h) = start(backend, "refund_once", ProviderConfig::default(), |_| {}).await else {
        return;
    };
    h.charge("order-1", 800).await.expect("charge");
    assert_eq!(h.refund("order-1").await, "refunded");
    assert_eq!(h.refund("order-1").await, "refunded");
    assert_eq!(h.payment_status("order-1").await, "refunded");
    let stats = h.provider.stats();
    assert_eq!((stats.captures, stats.refunds), (1, 1));
    // A refunded order is not charged again.
    let status = h.charge("order-1", 800).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert_eq!(h.provider.stats().captures, 1);
}

async fn a_lost_capture_is_found_and_refunded(backend: Backend) {
    // One attempt only, and the provider loses its answer after capturing: payments records
    // `unavailable`, yet the money was taken. Refund settles it by the order's key and refunds.
    let config = ProviderConfig {
        fail_after_capture_rate: 1.0,
        ..ProviderConfig::default()
    };
    let Some(h) = start(backend, "lost_capture_refund", config, |r| {
        r.attempts_max = 1
    })
    .await
    else {
        return;
    };
    let answer = h.charge("order-1", 1_500).await.expect("charge");
    assert_eq!(answer.status, "unavailable");
    assert_eq!(h.payment_status("order-1").await, "unavailable");
    assert_eq!(h.provider.stats().captures, 1);
    // The provider is down for a moment: the refund must be tried again later.
    h.outage(true);
    assert_eq!(h.refund("order-1").await, "unavailable");
    h.outage(false);
    assert_eq!(h.refund("order-1").await, "refunded");
    assert_eq!(h.refund("order-1").await, "refunded");
    let stats = h.provider.stats();
    assert_eq!((stats.captures, stats.refunds), (1, 1));
    assert_eq!(h.payment_status("order-1").await, "refunded");
    let status = h.charge("order-1", 1_500).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert_eq!(h.provider.stats().captures, 1);
}

async fn an_order_refunded_before_any_charge_is_never_charged(backend: Backend) {
    // A compensation that overtakes its charge (or follows one that never reached the
    // provider) leaves nothing to refund, and a late charge must not capture.
    let Some(h) = start(backend, "refund_first", ProviderConfig::default(), |_| {}).await else {
        return;
    };
    assert_eq!(h.refund("early").await, "none");
    assert_eq!(h.refund("early").await, "none");
    let status = h.charge("early", 100).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    // An order whose charge never reached the provider: settled as "none".
    h.outage(true);
    assert_eq!(
        h.charge("never", 100).await.expect("answer").status,
        "unavailable"
    );
    h.outage(false);
    assert_eq!(h.refund("never").await, "none");
    assert_eq!(h.payment_status("never").await, "refunded");
    let status = h.charge("never", 100).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert_eq!(h.provider.stats().captures, 0);
}
