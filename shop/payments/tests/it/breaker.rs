//! The circuit breaker: an outage opens it so orders fail fast; recovery closes it.

use std::time::{Duration, Instant};

use shop_payment_provider::ProviderConfig;

use crate::{Backend, on_both_backends, start};

on_both_backends!(an_outage_opens_the_breaker_and_recovery_closes_it);

async fn an_outage_opens_the_breaker_and_recovery_closes_it(backend: Backend) {
    // The provider goes down: charges answer "unavailable", and after a few the breaker opens
    // and charges stop reaching the provider. The provider recovers; once the open duration
    // has passed (on the breaker's manual clock), trial calls close the breaker again.
    let Some(h) = start(backend, "breaker", ProviderConfig::default(), |_| {}).await else {
        return;
    };
    h.outage(true);
    let mut opened_after = None;
    for n in 0..10 {
        let answer = h.charge(&format!("down-{n}"), 100).await.expect("answer");
        assert_eq!(answer.status, "unavailable");
        if answer.message.contains("circuit breaker") {
            opened_after = Some(n);
            break;
        }
    }
    let opened_after = opened_after.expect("the breaker opened within 10 charges");
    assert!(
        opened_after >= 1,
        "at least one charge reached the provider"
    );
    let reached = h.provider.stats().failures_injected;
    for n in 0..5 {
        let started = Instant::now();
        let answer = h.charge(&format!("fast-{n}"), 100).await.expect("answer");
        assert_eq!(answer.status, "unavailable");
        assert!(
            answer.message.contains("circuit breaker"),
            "{}",
            answer.message
        );
        assert!(started.elapsed() < Duration::from_millis(500), "fails fast");
    }
    // No charge reached the provider's processing (each was refused with 503 or by the
    // breaker): they are `failed`, and their refunds answer at once without the provider.
    assert_eq!(h.payment_status("fast-0").await, "failed");
    assert_eq!(h.payment_status("down-0").await, "failed");
    assert_eq!(h.refund("down-0").await, "none");
    assert_eq!(h.payment_status("down-0").await, "refunded");
    assert_eq!(
        h.provider.stats().failures_injected,
        reached,
        "the provider was spared"
    );

    // Recovery: still open until the open duration has passed.
    h.outage(false);
    let answer = h.charge("up-0", 100).await.expect("answer");
    assert_eq!(answer.status, "unavailable");
    h.clock.advance(Duration::from_secs(31));
    for n in 1..=4 {
        let answer = h.charge(&format!("up-{n}"), 100).await.expect("answer");
        assert_eq!(answer.status, "captured", "{}", answer.message);
    }
    // Orders that failed during the outage can be charged once, unless already cancelled.
    assert_eq!(
        h.charge("up-0", 100).await.expect("answer").status,
        "captured"
    );
    assert_eq!(h.refund("down-0").await, "none");
    let status = h.charge("down-0", 100).await.expect_err("cancelled");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert_eq!(h.provider.stats().captures, 5);
}
