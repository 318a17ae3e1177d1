//! The conformance suite on the in-memory backend, on paused time.

use trellis_bus::InMemoryBus;

async fn setup(_test: &str) -> Option<(InMemoryBus, String, ())> {
    Some((InMemoryBus::new(), "mem".to_owned(), ()))
}

crate::conformance_tests!(setup, #[tokio::test(start_paused = true)], 10_000);
