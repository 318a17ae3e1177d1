use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use trellis_resilience::{Backoff, ResilienceError, RetryBudget, RetryPolicy};

fn constant(delay: Duration) -> Backoff {
    Backoff {
        initial: delay,
        max: delay,
        multiplier: 1.0,
        full_jitter: false,
    }
}

#[tokio::test(start_paused = true)]
async fn retries_until_success_with_growing_backoff() {
    // Two failures then a success: three attempts, waiting 100 ms then 200 ms (no jitter).
    let retry = RetryPolicy::builder()
        .max_attempts(5)
        .backoff(Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            multiplier: 2.0,
            full_jitter: false,
        })
        .build()
        .expect("valid");
    let attempts = AtomicU32::new(0);
    let started = Instant::now();
    let answer = retry
        .call(|| async {
            let n = attempts.fetch_add(1, Ordering::SeqCst) + 1;
            if n < 3 { Err("flaky") } else { Ok(n) }
        })
        .await;
    assert_eq!(answer.ok(), Some(3));
    assert_eq!(started.elapsed(), Duration::from_millis(300));
}

#[tokio::test(start_paused = true)]
async fn stops_at_max_attempts_and_returns_the_last_error() {
    // An always-failing call is attempted exactly max_attempts times.
    let retry = RetryPolicy::builder()
        .max_attempts(4)
        .backoff(constant(Duration::from_millis(10)))
        .build()
        .expect("valid");
    let attempts = AtomicU32::new(0);
    let answer: Result<(), _> = retry
        .call(|| async {
            let n = attempts.fetch_add(1, Ordering::SeqCst) + 1;
            Err(format!("failure {n}"))
        })
        .await;
    assert_eq!(attempts.load(Ordering::SeqCst), 4);
    assert!(matches!(answer, Err(ResilienceError::Inner(message)) if message == "failure 4"));
}

#[tokio::test(start_paused = true)]
async fn stops_at_the_retry_budget() {
    // 100 calls to a dead upstream with 5 attempts each would be 500 attempts; a budget of
    // 10 % retries (none banked) holds the load to 100 first attempts plus 10 retries.
    let retry = RetryPolicy::builder()
        .max_attempts(5)
        .backoff(constant(Duration::from_millis(1)))
        .budget(RetryBudget::new(0.1, 0, 100))
        .build()
        .expect("valid");
    let attempts = AtomicU32::new(0);
    for _ in 0..100 {
        let _ = retry
            .call(|| async {
                attempts.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>("down")
            })
            .await;
    }
    assert_eq!(attempts.load(Ordering::SeqCst), 110);
}

#[tokio::test(start_paused = true)]
async fn never_sleeps_past_the_callers_deadline() {
    // With a 60 ms backoff and a 100 ms deadline, a second attempt starts at 60 ms, and the
    // third (at 120 ms) is never started: the call returns the last error before the deadline.
    let retry = RetryPolicy::builder()
        .max_attempts(10)
        .backoff(constant(Duration::from_millis(60)))
        .build()
        .expect("valid");
    let attempts = AtomicU32::new(0);
    let started = Instant::now();
    let deadline = started + Duration::from_millis(100);
    let answer: Result<(), _> = retry
        .call_if(
            &|r: Result<&(), &&str>| r.is_err(),
            Some(deadline),
            || async {
                attempts.fetch_add(1, Ordering::SeqCst);
                Err("nope")
            },
        )
        .await;
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    assert!(matches!(answer, Err(ResilienceError::Inner("nope"))));
    assert!(started.elapsed() < Duration::from_millis(100));
}

#[tokio::test(start_paused = true)]
async fn an_attempt_still_running_at_the_deadline_is_cancelled() {
    // max_elapsed bounds the whole call, including a hanging attempt.
    let retry = RetryPolicy::builder()
        .max_elapsed(Duration::from_millis(250))
        .build()
        .expect("valid");
    let started = Instant::now();
    let answer = retry.call(std::future::pending::<Result<(), &str>>).await;
    assert!(matches!(answer, Err(ResilienceError::Timeout(_))));
    assert_eq!(started.elapsed(), Duration::from_millis(250));
}

#[tokio::test(start_paused = true)]
async fn a_non_retryable_error_is_returned_at_once() {
    // The predicate decides: a "bad request" is final.
    let retry = RetryPolicy::builder()
        .max_attempts(5)
        .build()
        .expect("valid");
    let attempts = AtomicU32::new(0);
    let only_transient = |r: Result<&(), &&str>| matches!(r, Err(&"transient"));
    let answer = retry
        .call_if(&only_transient, None, || async {
            attempts.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>("bad request")
        })
        .await;
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
    assert!(answer.is_err());
}

#[test]
fn invalid_settings_are_named() {
    // Zero attempts and a shrinking backoff are configuration errors.
    assert_eq!(
        RetryPolicy::builder()
            .max_attempts(0)
            .build()
            .expect_err("invalid")
            .setting,
        "max_attempts"
    );
    let shrinking = Backoff {
        multiplier: 0.5,
        ..Backoff::default()
    };
    assert_eq!(
        RetryPolicy::builder()
            .backoff(shrinking)
            .build()
            .expect_err("invalid")
            .setting,
        "backoff.multiplier"
    );
}
