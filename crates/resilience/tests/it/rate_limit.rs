use std::time::Duration;

use tokio::time::Instant;
use trellis_resilience::{RateLimiter, ResilienceError};

#[tokio::test(start_paused = true)]
async fn a_spent_burst_is_rejected_with_the_time_to_wait() {
    // 10 per second with a burst of 2: the third call is refused for 100 ms.
    let limiter = RateLimiter::builder("api")
        .per_second(10)
        .burst(2)
        .build()
        .expect("valid");
    limiter.acquire::<()>().await.expect("1");
    limiter.acquire::<()>().await.expect("2");
    match limiter.acquire::<()>().await {
        Err(ResilienceError::RateLimited { retry_after }) => {
            assert_eq!(retry_after, Duration::from_millis(100))
        }
        other => panic!("expected RateLimited, got {other:?}"),
    }
    tokio::time::advance(Duration::from_millis(100)).await;
    limiter.acquire::<()>().await.expect("a cell replenished");
}

#[tokio::test(start_paused = true)]
async fn a_call_within_max_wait_waits_for_its_turn() {
    // With max_wait, the limiter delays instead of refusing.
    let limiter = RateLimiter::builder("api")
        .per_second(10)
        .burst(1)
        .max_wait(Duration::from_millis(150))
        .build()
        .expect("valid");
    let started = Instant::now();
    for _ in 0..2 {
        limiter
            .call(|| async { Ok::<_, &str>(()) })
            .await
            .expect("admitted");
    }
    assert_eq!(started.elapsed(), Duration::from_millis(100));
}

#[test]
fn a_zero_rate_is_a_config_error() {
    // Zero calls per second is refused at build time.
    assert_eq!(
        RateLimiter::builder("x")
            .per_second(0)
            .build()
            .expect_err("invalid")
            .setting,
        "per_second"
    );
}
