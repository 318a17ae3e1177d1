//! The backend conformance suite: every [`EventStore`] backend must pass every check here.
//!
//! Each check is a `pub async fn` generic over the store; [`conformance_tests!`] expands to one
//! `#[tokio::test]` per check for a backend factory. Enabled by the `testkit` feature.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use uuid::Uuid;

use crate::{
    Direction, EventStore, EventStoreError, ExpectedVersion, Metadata, NewEvent, Snapshot,
    StreamId, StreamMetadata, subscribe_all,
};

/// How long a concurrency check may take before it is declared hung.
const CHECK_TIMEOUT: Duration = Duration::from_secs(60);

fn stream(name: &str) -> StreamId {
    StreamId::new(format!("{name}-{}", Uuid::now_v7().simple())).expect("valid stream id")
}

fn event(n: u64) -> NewEvent {
    NewEvent::new("Numbered", json!({ "n": n }))
}

fn events(range: std::ops::Range<u64>) -> Vec<NewEvent> {
    range.map(event).collect()
}

/// Appended events read back with every field intact, versions from 1, positions rising.
pub async fn append_and_read_back<S: EventStore>(store: S) {
    let s = stream("roundtrip");
    let correlation = Uuid::now_v7();
    let first = NewEvent::new("OrderPlaced", json!({"items": [1, 2], "note": "ünïcödé"}))
        .with_schema_version(2)
        .with_metadata(Metadata {
            correlation_id: Some(correlation),
            causation_id: None,
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        });
    let result = store
        .append(&s, ExpectedVersion::NoStream, vec![first.clone(), event(2)])
        .await
        .expect("append");
    assert_eq!(result.next_version, 2);
    let read = store
        .read_stream(&s, 1, Direction::Forwards, 10)
        .await
        .expect("read");
    assert_eq!(read.len(), 2);
    assert_eq!(read[0].id, first.id);
    assert_eq!(read[0].event_type, "OrderPlaced");
    assert_eq!(read[0].schema_version, 2);
    assert_eq!(read[0].data, first.data);
    assert_eq!(read[0].metadata, first.metadata);
    assert_eq!((read[0].version, read[1].version), (1, 2));
    assert_eq!(read[1].position, read[0].position + 1);
    assert_eq!(read[1].position, result.global_position);
    let info = store.stream_info(&s).await.expect("info").expect("exists");
    assert_eq!(info.version, 2);
    assert!(store.head().await.expect("head") >= result.global_position);
}

/// Version checks: `NoStream`, `Exact` and `Any`, with the actual version in the error.
pub async fn expected_version_is_enforced<S: EventStore>(store: S) {
    let s = stream("versions");
    store
        .append(&s, ExpectedVersion::NoStream, events(0..3))
        .await
        .expect("create");
    match store
        .append(&s, ExpectedVersion::NoStream, events(3..4))
        .await
    {
        Err(EventStoreError::WrongExpectedVersion { actual, .. }) => assert_eq!(actual, 3),
        other => panic!("expected a version conflict, got {other:?}"),
    }
    match store
        .append(&s, ExpectedVersion::Exact(2), events(3..4))
        .await
    {
        Err(EventStoreError::WrongExpectedVersion {
            actual, expected, ..
        }) => {
            assert_eq!((actual, expected), (3, ExpectedVersion::Exact(2)));
        }
        other => panic!("expected a version conflict, got {other:?}"),
    }
    let ok = store
        .append(&s, ExpectedVersion::Exact(3), events(3..4))
        .await
        .expect("exact version");
    assert_eq!(ok.next_version, 4);
    let any = store
        .append(&s, ExpectedVersion::Any, events(4..5))
        .await
        .expect("any");
    assert_eq!(any.next_version, 5);
    let fresh = stream("versions-fresh");
    match store
        .append(&fresh, ExpectedVersion::Exact(1), events(0..1))
        .await
    {
        Err(EventStoreError::WrongExpectedVersion { actual, .. }) => assert_eq!(actual, 0),
        other => panic!("expected a version conflict, got {other:?}"),
    }
    assert!(
        store
            .read_stream(&fresh, 1, Direction::Forwards, 10)
            .await
            .expect("read")
            .is_empty(),
        "a failed append stores nothing"
    );
}

/// Re-sending an append after a lost answer succeeds without duplicates; a partial or
/// misplaced overlap is refused.
pub async fn reappend_is_idempotent<S: EventStore>(store: S) {
    let s = stream("idempotent");
    let batch = events(0..3);
    let first = store
        .append(&s, ExpectedVersion::NoStream, batch.clone())
        .await
        .expect("append");
    let again = store
        .append(&s, ExpectedVersion::NoStream, batch.clone())
        .await
        .expect("idempotent retry");
    assert_eq!(first, again);
    let later = store
        .append(&s, ExpectedVersion::Exact(3), events(3..4))
        .await
        .expect("append more");
    let still = store
        .append(&s, ExpectedVersion::Exact(0), batch.clone())
        .await
        .expect("retry after more appends");
    assert_eq!(still, first);
    assert_eq!(
        store
            .read_stream(&s, 1, Direction::Forwards, 100)
            .await
            .expect("read")
            .len(),
        4
    );
    assert_eq!(later.next_version, 4);

    let mixed = vec![batch[0].clone(), event(9)];
    assert!(matches!(
        store.append(&s, ExpectedVersion::Any, mixed).await,
        Err(EventStoreError::IdempotencyConflict { .. })
    ));
    let other = stream("idempotent-other");
    assert!(matches!(
        store.append(&other, ExpectedVersion::Any, batch).await,
        Err(EventStoreError::IdempotencyConflict { .. })
    ));
    assert_eq!(
        store
            .read_stream(&s, 1, Direction::Forwards, 100)
            .await
            .expect("read")
            .len(),
        4
    );
}

/// Reads forwards and backwards honour `from` and `limit`; `read_all` is in position order.
pub async fn reads_honour_direction_and_limits<S: EventStore>(store: S) {
    let s = stream("reads");
    store
        .append(&s, ExpectedVersion::NoStream, events(0..10))
        .await
        .expect("append");
    let forwards = store
        .read_stream(&s, 4, Direction::Forwards, 3)
        .await
        .expect("read");
    assert_eq!(
        forwards.iter().map(|e| e.version).collect::<Vec<_>>(),
        [4, 5, 6]
    );
    let backwards = store
        .read_stream(&s, u64::MAX, Direction::Backwards, 3)
        .await
        .expect("read");
    assert_eq!(
        backwards.iter().map(|e| e.version).collect::<Vec<_>>(),
        [10, 9, 8]
    );
    let from_middle = store
        .read_stream(&s, 2, Direction::Backwards, 5)
        .await
        .expect("read");
    assert_eq!(
        from_middle.iter().map(|e| e.version).collect::<Vec<_>>(),
        [2, 1]
    );
    assert!(
        store
            .read_stream(&s, 11, Direction::Forwards, 5)
            .await
            .expect("read")
            .is_empty()
    );
    let start = forwards[0].position - 3;
    let all = store.read_all(start, 5).await.expect("read all");
    assert_eq!(all.len(), 5);
    assert!(all.windows(2).all(|w| w[1].position == w[0].position + 1));
    assert!(matches!(
        store.read_all(1, 0).await,
        Err(EventStoreError::InvalidInput(_))
    ));
    assert!(matches!(
        store.append(&s, ExpectedVersion::Any, Vec::new()).await,
        Err(EventStoreError::InvalidInput(_))
    ));
    let oversize = NewEvent::new(
        "Huge",
        json!({ "blob": "x".repeat(crate::EVENT_BYTES_MAX) }),
    );
    assert!(matches!(
        store.append(&s, ExpectedVersion::Any, vec![oversize]).await,
        Err(EventStoreError::InvalidInput(_))
    ));
    let duplicate = event(1);
    assert!(matches!(
        store
            .append(&s, ExpectedVersion::Any, vec![duplicate.clone(), duplicate])
            .await,
        Err(EventStoreError::InvalidInput(_))
    ));
}

/// Soft delete, truncate-before and max count shape what a stream read returns.
pub async fn stream_metadata_shapes_reads<S: EventStore>(store: S) {
    let s = stream("meta");
    store
        .append(&s, ExpectedVersion::NoStream, events(0..10))
        .await
        .expect("append");
    store
        .set_stream_metadata(
            &s,
            StreamMetadata {
                max_count: Some(3),
                ..Default::default()
            },
        )
        .await
        .expect("set");
    let versions =
        |events: Vec<crate::RecordedEvent>| events.iter().map(|e| e.version).collect::<Vec<_>>();
    assert_eq!(
        versions(
            store
                .read_stream(&s, 1, Direction::Forwards, 100)
                .await
                .expect("read")
        ),
        [8, 9, 10]
    );
    store
        .set_stream_metadata(
            &s,
            StreamMetadata {
                truncate_before: Some(6),
                ..Default::default()
            },
        )
        .await
        .expect("set");
    assert_eq!(
        versions(
            store
                .read_stream(&s, 1, Direction::Forwards, 100)
                .await
                .expect("read")
        ),
        [6, 7, 8, 9, 10]
    );
    assert_eq!(
        versions(
            store
                .read_stream(&s, 7, Direction::Backwards, 100)
                .await
                .expect("read")
        ),
        [7, 6]
    );

    store
        .delete_stream(&s, ExpectedVersion::Exact(10))
        .await
        .expect("soft delete");
    assert!(
        store
            .read_stream(&s, 1, Direction::Forwards, 100)
            .await
            .expect("read")
            .is_empty()
    );
    let info = store
        .stream_info(&s)
        .await
        .expect("info")
        .expect("still known");
    assert!(info.metadata.deleted);
    let undeleted = store
        .append(&s, ExpectedVersion::Exact(10), events(10..11))
        .await
        .expect("append undeletes");
    assert_eq!(
        undeleted.next_version, 11,
        "numbering continues after a soft delete"
    );
    assert_eq!(
        versions(
            store
                .read_stream(&s, 1, Direction::Forwards, 100)
                .await
                .expect("read")
        ),
        [6, 7, 8, 9, 10, 11]
    );
    assert!(matches!(
        store.delete_stream(&s, ExpectedVersion::Exact(3)).await,
        Err(EventStoreError::WrongExpectedVersion { actual: 11, .. })
    ));
}

/// Snapshots are stored per stream and a stale one never replaces a newer one.
pub async fn snapshots_keep_the_newest<S: EventStore>(store: S) {
    let s = stream("snap");
    assert!(store.load_snapshot(&s).await.expect("load").is_none());
    let newer = Snapshot {
        version: 20,
        schema_version: 1,
        state: json!({"count": 20}),
    };
    store.save_snapshot(&s, newer.clone()).await.expect("save");
    store
        .save_snapshot(
            &s,
            Snapshot {
                version: 10,
                schema_version: 1,
                state: json!({"count": 10}),
            },
        )
        .await
        .expect("save");
    assert_eq!(store.load_snapshot(&s).await.expect("load"), Some(newer));
}

/// Concurrent appenders racing on one stream: exactly one wins each version, and the versions
/// end up contiguous.
pub async fn racing_appenders_win_one_version_each<S: EventStore>(store: S) {
    const TASKS: u64 = 8;
    const APPENDS: u64 = 25;
    let s = stream("race");
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let (store, s) = (store.clone(), s.clone());
            tokio::spawn(async move {
                let mut wins = Vec::new();
                let mut conflicts = 0u64;
                while (wins.len() as u64) < APPENDS {
                    let version = store
                        .stream_info(&s)
                        .await
                        .expect("info")
                        .map_or(0, |i| i.version);
                    let e = NewEvent::new("Raced", json!({ "task": task }));
                    match store
                        .append(&s, ExpectedVersion::Exact(version), vec![e])
                        .await
                    {
                        Ok(result) => {
                            assert_eq!(result.next_version, version + 1);
                            wins.push(result.next_version);
                        }
                        Err(EventStoreError::WrongExpectedVersion { .. }) => conflicts += 1,
                        Err(other) => panic!("unexpected error: {other}"),
                    }
                }
                (wins, conflicts)
            })
        })
        .collect();
    let mut won = Vec::new();
    for task in tasks {
        let (wins, _) = tokio::time::timeout(CHECK_TIMEOUT, task)
            .await
            .expect("no hang")
            .expect("task");
        won.extend(wins);
    }
    won.sort_unstable();
    let expected: Vec<u64> = (1..=TASKS * APPENDS).collect();
    assert_eq!(won, expected, "each version is won by exactly one appender");
    let read = store
        .read_stream(&s, 1, Direction::Forwards, 1_000)
        .await
        .expect("read");
    assert_eq!(
        read.iter().map(|e| e.version).collect::<Vec<_>>(),
        expected,
        "versions are contiguous"
    );
}

/// A `read_all` reader running while four writers append sees every position exactly once,
/// in order, with no gap.
pub async fn read_all_never_skips_while_writers_append<S: EventStore>(store: S) {
    let writers = vec![store.clone(), store.clone(), store.clone(), store.clone()];
    read_all_never_skips_with(writers, store).await;
}

/// As [`read_all_never_skips_while_writers_append`], with each writer on its own store
/// instance (its own pool and group-commit writer, as separate processes would have), so
/// their transactions really race on the database.
pub async fn read_all_never_skips_with<S: EventStore>(writers: Vec<S>, reader: S) {
    const APPENDS: u64 = 100;
    let store = reader;
    let writer_count = writers.len() as u64;
    let start = store.head().await.expect("head") + 1;
    let writers: Vec<_> = writers
        .into_iter()
        .enumerate()
        .map(|(w, store)| {
            tokio::spawn(async move {
                let s = stream(&format!("writer{w}"));
                for i in 0..APPENDS {
                    let batch = vec![event(i), event(i + 1_000)];
                    store
                        .append(&s, ExpectedVersion::Any, batch)
                        .await
                        .expect("append");
                }
            })
        })
        .collect();
    let expected_total = writer_count * APPENDS * 2;
    let reader = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut next = start;
            let mut seen = HashSet::new();
            while (seen.len() as u64) < expected_total {
                for e in store.read_all(next, 37).await.expect("read all") {
                    assert_eq!(e.position, next, "read_all returned a gap or a duplicate");
                    assert!(seen.insert(e.id), "event seen twice");
                    next += 1;
                }
                tokio::task::yield_now().await;
            }
            next
        })
    };
    for writer in writers {
        tokio::time::timeout(CHECK_TIMEOUT, writer)
            .await
            .expect("no hang")
            .expect("writer");
    }
    let next = tokio::time::timeout(CHECK_TIMEOUT, reader)
        .await
        .expect("reader caught up")
        .expect("reader");
    assert_eq!(next, start + expected_total);
}

/// A catch-up subscription replays history, then follows live appends, in order, without a
/// gap or a duplicate.
pub async fn subscription_catches_up_then_follows<S: EventStore>(store: S) {
    let s = stream("subscribe");
    let start = store.head().await.expect("head") + 1;
    store
        .append(&s, ExpectedVersion::NoStream, events(0..10))
        .await
        .expect("history");
    let mut subscription = Box::pin(subscribe_all(store.clone(), start));
    let live = {
        let (store, s) = (store.clone(), s.clone());
        tokio::spawn(async move {
            for i in 10..30 {
                store
                    .append(&s, ExpectedVersion::Any, vec![event(i)])
                    .await
                    .expect("live append");
            }
        })
    };
    let mut numbers = Vec::new();
    while numbers.len() < 30 {
        let next = tokio::time::timeout(CHECK_TIMEOUT, subscription.next())
            .await
            .expect("no stall");
        let e = next.expect("stream continues").expect("event");
        if e.stream == s {
            numbers.push(e.data["n"].as_u64().expect("n"));
        }
    }
    live.await.expect("live appends");
    assert_eq!(numbers, (0..30).collect::<Vec<_>>());
}

/// Expands to one `#[tokio::test]` per conformance check. `$factory` is an expression
/// evaluating to a future of `Option<(store, guard)>`: `None` skips (the factory prints why),
/// and `guard` lives until the check ends (a temp dir, a test database).
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr) => {
        $crate::conformance_tests!(@check $factory; append_and_read_back, expected_version_is_enforced,
            reappend_is_idempotent, reads_honour_direction_and_limits, stream_metadata_shapes_reads,
            snapshots_keep_the_newest, racing_appenders_win_one_version_each,
            read_all_never_skips_while_writers_append, subscription_catches_up_then_follows);
    };
    (@check $factory:expr; $($check:ident),+) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $check() {
                let Some((store, _guard)) = $factory.await else { return };
                $crate::testkit::$check(store).await;
            }
        )+
    };
}
