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

mod retention {
    use std::time::Duration;

    use anyhow::ensure;
    use async_nats::jetstream::stream::DiscardPolicy;
    use trellis_bus::nats::{NatsBus, NatsBusConfig};
    use trellis_bus::{Bus, Envelope, SubscribeOptions};

    /// The age limit that stands in for the old 7-day default, so the test runs in seconds.
    const SHORT_AGE: Duration = Duration::from_secs(1);
    /// How long the test lets messages sit unconsumed: past `SHORT_AGE` plus the server's
    /// expiry pass.
    const UNCONSUMED_FOR: Duration = Duration::from_millis(2_500);

    async fn delivered(bus: &NatsBus, group: &str, subject: &str) -> anyhow::Result<bool> {
        let mut sub = bus
            .subscribe("kept.*", group, SubscribeOptions::default())
            .await?;
        let mut found = false;
        loop {
            let batch = sub.fetch(100, Duration::from_secs(1)).await?;
            if batch.is_empty() {
                return Ok(found);
            }
            found |= batch.iter().any(|d| d.envelope().subject == subject);
            for delivery in batch {
                delivery.ack().await?;
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unconsumed_message_survives_what_the_default_would_have_dropped()
    -> anyhow::Result<()> {
        // Goal: an age limit drops a message no group consumed in time (shown with a 1 s age
        // standing in for the old 7-day default); connecting with the default configuration
        // lifts the limit on the existing stream, so a message left unconsumed past that age
        // is still delivered to a group declared afterwards, and a full stream refuses new
        // messages (discard new) instead of dropping old ones.
        let Some(nats) = trellis_testkit::nats("unconsumed_survives").await else {
            return Ok(());
        };
        let aged =
            NatsBus::connect(NatsBusConfig::new(&nats.url, &nats.prefix).with_max_age(SHORT_AGE))
                .await?;
        aged.publish(
            "kept.one",
            Envelope::new("t", "s", "early", serde_json::json!(1)),
        )
        .await?;
        tokio::time::sleep(UNCONSUMED_FOR).await;
        ensure!(
            !delivered(&aged, "late-a", "early").await?,
            "the age limit dropped the unconsumed message"
        );
        drop(aged);

        let bus = NatsBus::connect(NatsBusConfig::new(&nats.url, &nats.prefix)).await?;
        bus.publish(
            "kept.one",
            Envelope::new("t", "s", "kept", serde_json::json!(2)),
        )
        .await?;
        tokio::time::sleep(UNCONSUMED_FOR).await;
        ensure!(
            delivered(&bus, "late-b", "kept").await?,
            "an unconsumed message outlived the old age limit"
        );

        let client = async_nats::connect(&nats.url).await?;
        let context = async_nats::jetstream::new(client);
        let mut stream = context
            .get_stream(format!("{}_BUS", nats.prefix.to_ascii_uppercase()))
            .await?;
        let config = stream.info().await?.config.clone();
        ensure!(config.max_age.is_zero(), "max_age {:?}", config.max_age);
        ensure!(
            config.discard == DiscardPolicy::New,
            "discard {:?}",
            config.discard
        );

        let small = NatsBus::connect(
            NatsBusConfig::new(&nats.url, format!("{}_full", nats.prefix))
                .with_message_bytes_max(1024)
                .with_max_bytes(16 * 1024),
        )
        .await?;
        let body = "x".repeat(700);
        let mut refused = None;
        for n in 0..100 {
            let subject = if n == 0 { "first" } else { "more" };
            let envelope = Envelope::new("t", "s", subject, serde_json::json!(body));
            if let Err(error) = small.publish("kept.one", envelope).await {
                refused = Some(error);
                break;
            }
        }
        ensure!(
            refused
                .as_ref()
                .is_some_and(|e| e.to_string().contains("full")),
            "a full stream refuses publishes: {refused:?}"
        );
        ensure!(
            delivered(&small, "reader", "first").await?,
            "the oldest message was kept"
        );
        Ok(())
    }
}
