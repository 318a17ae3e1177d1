use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tower::{Layer, ServiceExt, service_fn};
use trellis_resilience::{
    Backoff, BreakerState, CircuitBreaker, CircuitBreakerLayer, RateLimiter, Resilience,
    ResilienceError, ResilienceLayer, RetryPolicy, RetryTransient, ServerErrors, SlidingWindow,
};

fn http_breaker() -> CircuitBreaker {
    CircuitBreaker::builder("upstream")
        .sliding_window(SlidingWindow::Count(4))
        .minimum_calls(4)
        .build()
        .expect("valid")
}

fn respond(status: u16) -> Result<http::Response<()>, &'static str> {
    Ok(http::Response::builder()
        .status(status)
        .body(())
        .expect("valid response"))
}

#[tokio::test(start_paused = true)]
async fn a_4xx_is_not_the_upstreams_fault_but_a_5xx_is() {
    // Through the layer with the HTTP classifier, 404s keep the breaker closed and 503s open it.
    let breaker = http_breaker();
    let layer = CircuitBreakerLayer::new(breaker.clone()).with_classifier(ServerErrors);
    let not_found = layer.layer(service_fn(|_: ()| async { respond(404) }));
    for _ in 0..8 {
        not_found.clone().oneshot(()).await.expect("answered");
    }
    assert_eq!(breaker.state(), BreakerState::Closed);
    let unavailable = layer.layer(service_fn(|_: ()| async { respond(503) }));
    // The window of four now holds two successes and two failures: 50 % opens it.
    for _ in 0..2 {
        unavailable.clone().oneshot(()).await.expect("answered");
    }
    assert_eq!(breaker.state(), BreakerState::Open);
    assert!(matches!(
        unavailable.oneshot(()).await,
        Err(ResilienceError::BreakerOpen { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn the_stack_layer_retries_transient_statuses_through_the_breaker() {
    // A 503 then a 200: the stack retries once and answers 200; the breaker saw both attempts.
    let attempts = Arc::new(AtomicU32::new(0));
    let service = {
        let attempts = attempts.clone();
        service_fn(move |_: ()| {
            let n = attempts.fetch_add(1, Ordering::SeqCst);
            async move { respond(if n == 0 { 503 } else { 200 }) }
        })
    };
    let breaker = http_breaker();
    let stack = Resilience::builder()
        .retry(
            RetryPolicy::builder()
                .max_attempts(3)
                .backoff(Backoff::default())
                .build()
                .expect("valid"),
        )
        .circuit_breaker(breaker.clone())
        .timeout(Duration::from_secs(1))
        .build();
    let service = ResilienceLayer::new(stack)
        .with_policies(ServerErrors, RetryTransient)
        .layer(service);
    let response = service.oneshot(()).await.expect("answered");
    assert_eq!(response.status(), 200);
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    let window = breaker.window();
    assert_eq!((window.calls, window.failures), (2, 1));
}

#[tokio::test(start_paused = true)]
async fn timeouts_count_against_the_breaker_but_rate_limits_do_not() {
    // A timed-out attempt is a failure of the callee; a local rate-limit rejection is not.
    let breaker = CircuitBreaker::builder("b")
        .sliding_window(SlidingWindow::Count(10))
        .minimum_calls(1)
        .failure_rate_threshold(1.0)
        .build()
        .expect("valid");
    let limited = Resilience::builder()
        .circuit_breaker(breaker.clone())
        .rate_limiter(
            RateLimiter::builder("r")
                .per_second(1)
                .burst(1)
                .build()
                .expect("valid"),
        )
        .build();
    limited
        .call(|| async { Ok::<_, &str>(()) })
        .await
        .expect("first call admitted");
    assert!(matches!(
        limited.call(|| async { Ok::<_, &str>(()) }).await,
        Err(ResilienceError::RateLimited { .. })
    ));
    assert_eq!(
        breaker.window().calls,
        1,
        "the rate-limited attempt was not counted"
    );

    let breaker = CircuitBreaker::builder("t")
        .minimum_calls(1)
        .failure_rate_threshold(1.0)
        .build()
        .expect("valid");
    let timed = Resilience::builder()
        .circuit_breaker(breaker.clone())
        .timeout(Duration::from_millis(10))
        .build();
    let answer = timed.call(std::future::pending::<Result<(), &str>>).await;
    assert!(matches!(answer, Err(ResilienceError::Timeout(_))));
    assert_eq!(
        breaker.state(),
        BreakerState::Open,
        "one timeout at a 100 % threshold opens it"
    );
}

#[tokio::test(start_paused = true)]
async fn retry_does_not_hammer_an_open_breaker() {
    // Once the breaker opens mid-call, the remaining attempts are not made.
    let breaker = CircuitBreaker::builder("b")
        .sliding_window(SlidingWindow::Count(2))
        .minimum_calls(2)
        .build()
        .expect("valid");
    let stack = Resilience::builder()
        .retry(
            RetryPolicy::builder()
                .max_attempts(10)
                .without_budget()
                .build()
                .expect("valid"),
        )
        .circuit_breaker(breaker.clone())
        .build();
    let attempts = AtomicU32::new(0);
    let answer = stack
        .call(|| async {
            attempts.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>("down")
        })
        .await;
    assert!(matches!(answer, Err(ResilienceError::BreakerOpen { .. })));
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
}
