//! A tower service guarded by the full resilience stack, called against an upstream that
//! fails its first calls: run with `cargo run -p trellis-resilience --example guarded_service`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tower::{Layer, ServiceExt, service_fn};
use trellis_resilience::{
    Backoff, CircuitBreaker, Resilience, ResilienceLayer, RetryPolicy, RetryTransient,
    ServerErrors, SlidingWindow,
};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let calls = Arc::new(AtomicU32::new(0));
    let upstream = {
        let calls = calls.clone();
        service_fn(move |path: &'static str| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                // The first two calls hit a restarting upstream.
                let status = if n < 2 { 503 } else { 200 };
                let response = http::Response::builder()
                    .status(status)
                    .body(format!("{path}: {status}"));
                response.map_err(|e| e.to_string())
            }
        })
    };
    let breaker = CircuitBreaker::builder("inventory")
        .sliding_window(SlidingWindow::Count(20))
        .minimum_calls(10)
        .build()
        .expect("valid breaker settings");
    let stack = Resilience::builder()
        .retry(
            RetryPolicy::builder()
                .max_attempts(3)
                .backoff(Backoff {
                    initial: Duration::from_millis(20),
                    ..Backoff::default()
                })
                .build()
                .expect("valid retry settings"),
        )
        .circuit_breaker(breaker.clone())
        .timeout(Duration::from_millis(500))
        .build();
    let service = ResilienceLayer::new(stack)
        .with_policies(ServerErrors, RetryTransient)
        .layer(upstream);

    let response = service
        .oneshot("/stock/42")
        .await
        .expect("answered after retries");
    println!(
        "{} after {} upstream calls",
        response.body(),
        calls.load(Ordering::SeqCst)
    );
    let window = breaker.window();
    println!(
        "breaker {}: {} calls, {} failures in the window",
        breaker.state(),
        window.calls,
        window.failures
    );
}
