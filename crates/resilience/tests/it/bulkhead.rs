use std::time::Duration;

use tokio::sync::oneshot;
use trellis_resilience::{Bulkhead, ResilienceError};

#[tokio::test(start_paused = true)]
async fn calls_beyond_slots_and_queue_are_rejected_and_waiters_time_out() {
    // Two slots and a queue of one: the third call waits, the fourth is rejected at once, and
    // the waiting call gives up after max_wait.
    let bulkhead = Bulkhead::new("db", 2, 1, Duration::from_millis(100)).expect("valid");
    let first = bulkhead.acquire::<()>().await.expect("slot 1");
    let _second = bulkhead.acquire::<()>().await.expect("slot 2");
    assert_eq!(bulkhead.in_flight(), 2);

    let waiter = {
        let bulkhead = bulkhead.clone();
        tokio::spawn(async move { bulkhead.acquire::<()>().await.map(|_| ()) })
    };
    tokio::task::yield_now().await;
    assert_eq!(bulkhead.waiting(), 1);
    assert!(
        matches!(
            bulkhead.acquire::<()>().await,
            Err(ResilienceError::BulkheadFull)
        ),
        "queue full"
    );

    tokio::time::advance(Duration::from_millis(101)).await;
    assert!(matches!(
        waiter.await.expect("task"),
        Err(ResilienceError::BulkheadFull)
    ));
    assert_eq!(bulkhead.waiting(), 0);

    // A waiter is served as soon as a slot frees up.
    let (tx, rx) = oneshot::channel();
    let waiter = {
        let bulkhead = bulkhead.clone();
        tokio::spawn(async move {
            let permit = bulkhead.acquire::<()>().await;
            let _ = tx.send(());
            permit.map(|_| ())
        })
    };
    tokio::task::yield_now().await;
    drop(first);
    rx.await.expect("waiter served");
    assert!(waiter.await.expect("task").is_ok());
}

#[tokio::test(start_paused = true)]
async fn call_runs_inside_a_slot() {
    // The closure runs only with a slot, and the slot is given back afterwards.
    let bulkhead = Bulkhead::new("db", 1, 0, Duration::ZERO).expect("valid");
    let answer = bulkhead
        .call(|| async { Ok::<_, &str>(bulkhead.in_flight()) })
        .await;
    assert_eq!(answer.ok(), Some(1));
    assert_eq!(bulkhead.in_flight(), 0);
}
