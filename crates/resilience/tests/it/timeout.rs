use std::time::Duration;

use tower::{Layer, ServiceExt, service_fn};
use trellis_resilience::{ResilienceError, TimeoutLayer, with_timeout};

#[tokio::test(start_paused = true)]
async fn a_slow_future_times_out_and_a_fast_one_does_not() {
    // The limit cancels the slow call and passes the fast one's answer through.
    let slow = with_timeout(Duration::from_millis(50), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok::<_, &str>(1)
    });
    assert!(
        matches!(slow.await, Err(ResilienceError::Timeout(d)) if d == Duration::from_millis(50))
    );
    let fast = with_timeout(Duration::from_millis(50), async { Ok::<_, &str>(2) });
    assert_eq!(fast.await.ok(), Some(2));
}

#[tokio::test(start_paused = true)]
async fn the_timeout_layer_cancels_slow_calls() {
    // As tower middleware, the same limit applies per call.
    let service = TimeoutLayer::new(Duration::from_millis(20)).layer(service_fn(
        |delay_ms: u64| async move {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            Ok::<_, &str>(delay_ms)
        },
    ));
    assert_eq!(service.clone().oneshot(5).await.ok(), Some(5));
    assert!(matches!(
        service.oneshot(50).await,
        Err(ResilienceError::Timeout(_))
    ));
}
