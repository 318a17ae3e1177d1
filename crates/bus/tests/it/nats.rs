//! The conformance suite on NATS JetStream, against the machine's server.

use trellis_bus::nats::{NatsBus, NatsBusConfig};
use trellis_testkit::TestNats;

async fn setup(test: &str) -> Option<(NatsBus, String, TestNats)> {
    let nats = trellis_testkit::nats(test).await?;
    let bus = NatsBus::connect(NatsBusConfig::new(&nats.url, &nats.prefix))
        .await
        .expect("connect the NATS bus");
    Some((bus, "t".to_owned(), nats))
}

crate::conformance_tests!(setup, #[tokio::test(flavor = "multi_thread", worker_threads = 2)], 10_000);
