//! Choosing a backend by URL, and following one stream.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use trellis_eventstore::{
    AnyStore, EventStore, EventStoreError, ExpectedVersion, NewEvent, StreamId, subscribe_stream,
};

#[tokio::test]
async fn a_backend_is_chosen_by_url_and_a_bad_url_is_named() {
    // memory: and sqlite:// open; an unknown scheme is a clear error naming the URL.
    let dir = tempfile::tempdir().expect("temp dir");
    let sqlite = format!("sqlite://{}", dir.path().join("any.db").display());
    for url in ["memory:", sqlite.as_str()] {
        let store = AnyStore::open(url).await.expect("opens");
        let stream = StreamId::new("any-1").expect("valid");
        let done = store
            .append(
                &stream,
                ExpectedVersion::NoStream,
                vec![NewEvent::new("Made", json!({}))],
            )
            .await;
        assert_eq!(done.expect("append").next_version, 1, "{url}");
    }
    match AnyStore::open("mysql://localhost/db").await {
        Err(EventStoreError::InvalidInput(message)) => {
            assert!(message.contains("mysql://localhost/db"), "{message}")
        }
        other => panic!("expected invalid input, got {other:?}"),
    }
}

#[tokio::test]
async fn a_stream_subscription_sees_only_its_stream_from_the_given_version() {
    // History from version 2 on, then live events, and nothing from other streams.
    let store = trellis_eventstore::MemoryStore::new();
    let mine = StreamId::new("orders-1").expect("valid");
    let other = StreamId::new("orders-2").expect("valid");
    let numbered = |n: u64| NewEvent::new("Numbered", json!({ "n": n }));
    store
        .append(&mine, ExpectedVersion::Any, (1..=3).map(numbered).collect())
        .await
        .expect("append");
    store
        .append(&other, ExpectedVersion::Any, vec![numbered(99)])
        .await
        .expect("append");
    let mut subscription = Box::pin(subscribe_stream(store.clone(), mine.clone(), 2));
    let writer = {
        let (store, mine, other) = (store.clone(), mine.clone(), other.clone());
        tokio::spawn(async move {
            store
                .append(&other, ExpectedVersion::Any, vec![numbered(100)])
                .await
                .expect("append");
            store
                .append(&mine, ExpectedVersion::Any, vec![numbered(4)])
                .await
                .expect("append");
        })
    };
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let event = tokio::time::timeout(Duration::from_secs(10), subscription.next())
            .await
            .expect("no stall")
            .expect("open")
            .expect("event");
        assert_eq!(event.stream, mine);
        seen.push(event.data["n"].as_u64().expect("n"));
    }
    writer.await.expect("writer");
    assert_eq!(seen, [2, 3, 4]);
}
