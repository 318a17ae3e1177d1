use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;
use trellis_resilience::{BreakerState, CircuitBreaker, Outcome, ResilienceError, SlidingWindow};

use crate::support::{ManualClock, fail, ok};

fn breaker(window: u32, minimum: u32, half_open: u32) -> CircuitBreaker {
    CircuitBreaker::builder("test")
        .sliding_window(SlidingWindow::Count(window))
        .minimum_calls(minimum)
        .failure_rate_threshold(0.5)
        .open_duration(Duration::from_secs(10))
        .half_open_calls(half_open)
        .build()
        .expect("valid settings")
}

#[tokio::test(start_paused = true)]
async fn opens_after_the_failure_threshold_and_then_rejects_without_calling() {
    // Five failures in a window of ten, with a minimum of five calls, reach the 50 % threshold.
    let breaker = breaker(10, 5, 2);
    for _ in 0..5 {
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert!(matches!(
            breaker.call(fail).await,
            Err(ResilienceError::Inner("boom"))
        ));
    }
    assert_eq!(breaker.state(), BreakerState::Open);

    let ran = AtomicUsize::new(0);
    let rejected = breaker
        .call(|| async {
            ran.fetch_add(1, Ordering::SeqCst);
            Ok::<_, &str>(())
        })
        .await;
    match rejected {
        Err(ResilienceError::BreakerOpen { name, retry_after }) => {
            assert_eq!(&*name, "test");
            assert_eq!(retry_after, Duration::from_secs(10));
        }
        other => panic!("expected BreakerOpen, got {other:?}"),
    }
    assert_eq!(
        ran.load(Ordering::SeqCst),
        0,
        "a rejected call never reaches the callee"
    );

    tokio::time::advance(Duration::from_secs(4)).await;
    let err = breaker.call(ok).await.expect_err("still open");
    assert_eq!(
        err.retry_after(),
        Some(Duration::from_secs(6)),
        "the rejection says when the next trial is"
    );
}

#[tokio::test(start_paused = true)]
async fn does_not_open_before_the_minimum_number_of_calls() {
    // Four failures out of four is 100 %, but the minimum is five calls.
    let breaker = breaker(10, 5, 2);
    for _ in 0..4 {
        let _ = breaker.call(fail).await;
    }
    assert_eq!(breaker.state(), BreakerState::Closed);
    assert_eq!(breaker.window().failures, 4);
}

#[tokio::test(start_paused = true)]
async fn successes_keep_the_failure_rate_under_the_threshold() {
    // Alternating outcomes give 50 % only if a failure comes last; 4 of 10 stays closed.
    let breaker = breaker(10, 10, 2);
    for i in 0..10 {
        let _ = if i % 5 < 3 {
            breaker.call(ok).await
        } else {
            breaker.call(fail).await
        };
    }
    assert_eq!(breaker.window().calls, 10);
    assert_eq!(breaker.window().failures, 4);
    assert_eq!(breaker.state(), BreakerState::Closed);
}

async fn open(breaker: &CircuitBreaker) {
    for _ in 0..10 {
        let _ = breaker.call(fail).await;
    }
    assert_eq!(breaker.state(), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn closes_after_the_permitted_trial_calls_succeed() {
    // After the open duration, three trial successes close the breaker with an empty window.
    let breaker = breaker(10, 5, 3);
    open(&breaker).await;
    tokio::time::advance(Duration::from_secs(10)).await;
    for expected in [
        BreakerState::HalfOpen,
        BreakerState::HalfOpen,
        BreakerState::Closed,
    ] {
        breaker.call(ok).await.expect("trial call admitted");
        assert_eq!(breaker.state(), expected);
    }
    assert_eq!(breaker.window().calls, 0, "closing starts a fresh window");
}

#[tokio::test(start_paused = true)]
async fn reopens_when_a_trial_call_fails() {
    // One failed trial sends the breaker back to OPEN for a full open duration.
    let breaker = breaker(10, 5, 3);
    open(&breaker).await;
    tokio::time::advance(Duration::from_secs(10)).await;
    breaker.call(ok).await.expect("first trial");
    assert!(matches!(
        breaker.call(fail).await,
        Err(ResilienceError::Inner(_))
    ));
    assert_eq!(breaker.state(), BreakerState::Open);
    let err = breaker.call(ok).await.expect_err("open again");
    assert_eq!(err.retry_after(), Some(Duration::from_secs(10)));
}

#[tokio::test(start_paused = true)]
async fn slow_calls_trip_the_breaker() {
    // Calls that succeed but take longer than the slow-call threshold open the breaker.
    let breaker = CircuitBreaker::builder("slow")
        .sliding_window(SlidingWindow::Count(10))
        .minimum_calls(4)
        .slow_calls(Duration::from_millis(100), 0.5)
        .build()
        .expect("valid settings");
    for _ in 0..3 {
        breaker.call(ok).await.expect("fast call");
    }
    for _ in 0..3 {
        breaker
            .call(|| async {
                tokio::time::sleep(Duration::from_millis(150)).await;
                Ok::<_, &str>(())
            })
            .await
            .expect("slow but successful");
    }
    assert_eq!(
        breaker.state(),
        BreakerState::Open,
        "3 slow of 6 calls is 50 %"
    );
    assert_eq!(breaker.window().slow_calls, 3);
}

#[tokio::test(start_paused = true)]
async fn a_time_window_forgets_old_failures() {
    // Failures older than the window no longer count towards the rate.
    let breaker = CircuitBreaker::builder("timed")
        .sliding_window(SlidingWindow::Time(Duration::from_secs(10)))
        .minimum_calls(4)
        .build()
        .expect("valid settings");
    for _ in 0..3 {
        let _ = breaker.call(fail).await;
    }
    tokio::time::advance(Duration::from_secs(11)).await;
    let _ = breaker.call(fail).await;
    for _ in 0..3 {
        breaker.call(ok).await.expect("closed");
    }
    assert_eq!(
        breaker.state(),
        BreakerState::Closed,
        "1 failure of 4 calls in the window"
    );
    assert_eq!(breaker.window().calls, 4);
}

#[tokio::test(start_paused = true)]
async fn transitions_are_broadcast_and_watched() {
    // Every state change reaches the broadcast subscribers and the watch channel.
    let breaker = breaker(10, 5, 1);
    let mut events = breaker.transitions();
    let watch = breaker.subscribe();
    open(&breaker).await;
    tokio::time::advance(Duration::from_secs(10)).await;
    breaker.call(ok).await.expect("trial");
    let mut seen = Vec::new();
    while let Ok(t) = events.try_recv() {
        seen.push((t.from, t.to));
    }
    assert_eq!(
        seen,
        [
            (BreakerState::Closed, BreakerState::Open),
            (BreakerState::Open, BreakerState::HalfOpen),
            (BreakerState::HalfOpen, BreakerState::Closed)
        ]
    );
    assert_eq!(*watch.borrow(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn operators_can_force_and_reset_the_breaker() {
    // Forced open rejects everything; forced closed never trips; reset returns to CLOSED.
    let breaker = breaker(10, 5, 1);
    breaker.force_open();
    assert!(matches!(
        breaker.call(ok).await,
        Err(ResilienceError::BreakerOpen { .. })
    ));
    breaker.force_closed();
    for _ in 0..20 {
        let _ = breaker.call(fail).await;
    }
    assert_eq!(breaker.state(), BreakerState::ForcedClosed);
    breaker.reset();
    assert_eq!(breaker.state(), BreakerState::Closed);
    assert_eq!(breaker.window().calls, 0);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_trial_call_gives_its_slot_back() {
    // Dropping an admitted trial's future must not leave HALF_OPEN waiting forever.
    let breaker = breaker(10, 5, 1);
    open(&breaker).await;
    tokio::time::advance(Duration::from_secs(10)).await;
    let hanging = breaker.call(std::future::pending::<Result<(), &str>>);
    let timed_out = tokio::time::timeout(Duration::from_millis(10), hanging).await;
    assert!(timed_out.is_err());
    assert_eq!(breaker.state(), BreakerState::HalfOpen);
    breaker
        .call(ok)
        .await
        .expect("the freed slot admits a new trial");
    assert_eq!(breaker.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn ignored_outcomes_do_not_count() {
    // A classifier can mark results as saying nothing about the callee.
    let breaker = breaker(10, 2, 1);
    let ignore_all = |_: Result<&u32, &&str>| Outcome::Ignored;
    for _ in 0..10 {
        let _ = breaker.call_classified(&ignore_all, fail).await;
    }
    assert_eq!(breaker.window().calls, 0);
    assert_eq!(breaker.state(), BreakerState::Closed);
}

#[test]
fn invalid_settings_are_named() {
    // The builder reports which setting is out of range.
    let err = CircuitBreaker::builder("x")
        .failure_rate_threshold(1.5)
        .build()
        .expect_err("invalid");
    assert_eq!(err.setting, "failure_rate_threshold");
    let err = CircuitBreaker::builder("x")
        .sliding_window(SlidingWindow::Count(0))
        .build()
        .expect_err("invalid");
    assert_eq!(err.setting, "sliding_window");
    let err = CircuitBreaker::builder("x")
        .half_open_calls(0)
        .build()
        .expect_err("invalid");
    assert_eq!(err.setting, "half_open_calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_never_admits_more_than_its_permitted_calls_under_1000_tasks() {
    // 1,000 tasks on two worker threads race for the trial slots; exactly the permitted number
    // get in, the rest are rejected, and the successful trials then close the breaker.
    const PERMITTED: u32 = 5;
    let clock = ManualClock::default();
    let breaker = CircuitBreaker::builder("race")
        .sliding_window(SlidingWindow::Count(10))
        .minimum_calls(5)
        .half_open_calls(PERMITTED)
        .open_duration(Duration::from_secs(1))
        .clock(clock.shared())
        .build()
        .expect("valid settings");
    while breaker.state() == BreakerState::Closed {
        breaker
            .try_acquire()
            .expect("closed")
            .record(Outcome::Failure);
    }
    assert_eq!(breaker.state(), BreakerState::Open);
    clock.advance(Duration::from_secs(1));

    let admitted = Arc::new(AtomicUsize::new(0));
    let in_flight_max = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(Semaphore::new(0));
    let start = Arc::new(tokio::sync::Barrier::new(1_000));
    let tasks: Vec<_> = (0..1_000)
        .map(|_| {
            let (breaker, admitted, in_flight_max, release, start) = (
                breaker.clone(),
                admitted.clone(),
                in_flight_max.clone(),
                release.clone(),
                start.clone(),
            );
            tokio::spawn(async move {
                start.wait().await;
                breaker
                    .call(|| async {
                        let now = admitted.fetch_add(1, Ordering::SeqCst) + 1;
                        in_flight_max.fetch_max(now, Ordering::SeqCst);
                        let _go = release.acquire().await.expect("never closed");
                        Ok::<_, &str>(())
                    })
                    .await
            })
        })
        .collect();
    // Wait until every task has either finished (rejected) or been admitted and parked.
    let mut results = Vec::new();
    let mut pending = tasks;
    while results.len() + admitted.load(Ordering::SeqCst) < 1_000 {
        let (done, rest): (Vec<_>, Vec<_>) = pending.into_iter().partition(|t| t.is_finished());
        for task in done {
            results.push(task.await.expect("task"));
        }
        pending = rest;
        tokio::task::yield_now().await;
    }
    let (done, rest): (Vec<_>, Vec<_>) = pending.into_iter().partition(|t| t.is_finished());
    for task in done {
        results.push(task.await.expect("task"));
    }
    pending = rest;
    assert_eq!(admitted.load(Ordering::SeqCst), PERMITTED as usize);
    assert_eq!(in_flight_max.load(Ordering::SeqCst), PERMITTED as usize);
    let rejected = results
        .iter()
        .filter(|r| matches!(r, Err(ResilienceError::BreakerOpen { .. })))
        .count();
    assert_eq!(rejected, 1_000 - PERMITTED as usize);
    assert_eq!(breaker.state(), BreakerState::HalfOpen);

    release.add_permits(1_000);
    for task in pending {
        task.await.expect("task").expect("trial succeeds");
    }
    assert_eq!(breaker.state(), BreakerState::Closed);
}

#[test]
fn state_calls_and_rejections_are_exported_as_metrics() {
    // With a Prometheus recorder installed, the breaker reports its state, calls by outcome,
    // rejections and transitions under its name.
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, || {
        let breaker = CircuitBreaker::builder("metered")
            .sliding_window(SlidingWindow::Count(4))
            .minimum_calls(4)
            .build()
            .expect("valid settings");
        breaker
            .try_acquire()
            .expect("closed")
            .record(Outcome::Success);
        breaker
            .try_acquire()
            .expect("closed")
            .record(Outcome::Success);
        breaker
            .try_acquire()
            .expect("closed")
            .record(Outcome::Failure);
        breaker
            .try_acquire()
            .expect("closed")
            .record(Outcome::Failure);
        assert_eq!(breaker.state(), BreakerState::Open);
        assert!(breaker.try_acquire().is_err());
    });
    let text = handle.render();
    for expected in [
        r#"trellis_breaker_calls_total{breaker="metered",outcome="success"} 2"#,
        r#"trellis_breaker_calls_total{breaker="metered",outcome="failure"} 2"#,
        r#"trellis_breaker_rejections_total{breaker="metered"} 1"#,
        r#"trellis_breaker_state{breaker="metered"} 1"#,
        r#"trellis_breaker_transitions_total{breaker="metered",from="closed",to="open"} 1"#,
    ] {
        assert!(text.contains(expected), "missing `{expected}` in:\n{text}");
    }
}
