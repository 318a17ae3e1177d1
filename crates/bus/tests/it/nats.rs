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

mod parking {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use anyhow::{Context as _, ensure};
    use tokio::sync::Notify;
    use trellis_bus::nats::{NatsBus, NatsBusConfig};
    use trellis_bus::{Bus, Envelope, HandlerError, RetryPolicy, SubscribeOptions};

    /// The retry delay of the failing message: long enough that the healthy subject's
    /// messages, handled without any delay, all come first.
    const RETRY_DELAY: Duration = Duration::from_secs(3);
    /// The bound on the whole scenario, so a regression fails instead of hanging.
    const SCENARIO_WAIT_MAX: Duration = Duration::from_secs(60);

    /// One handler call.
    #[derive(Debug, Clone)]
    struct Call {
        subject: String,
        n: u64,
        /// A1's attempt number (0 for the other messages).
        attempt: u32,
        ok: bool,
    }

    fn event(subject: &str, n: u64) -> Envelope {
        Envelope::new("t", "s", subject, serde_json::json!(n)).with_sequence(n)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_poison_message_blocks_only_its_own_subject() -> anyhow::Result<()> {
        // Goal: with every subject in one partition, subject A's first message fails twice
        // (3 s retry delay) before it succeeds; subject B's messages, published after it, are
        // all handled before A's second attempt, and A's later message waits behind A's first.
        let Some(nats) = trellis_testkit::nats("poison_blocks_subject").await else {
            return Ok(());
        };
        let bus = NatsBus::connect(NatsBusConfig::new(&nats.url, &nats.prefix).with_partitions(1))
            .await?;
        let retry = RetryPolicy::new(5)?
            .with_backoff(RETRY_DELAY, RETRY_DELAY, 1.0)?
            .without_jitter();
        let sub = bus
            .subscribe(
                "parts.*",
                "handler",
                SubscribeOptions::default().with_retry(retry),
            )
            .await?;
        bus.publish("parts.a", event("A", 1)).await?;
        for n in 1..=5 {
            bus.publish("parts.b", event("B", n)).await?;
        }
        bus.publish("parts.a", event("A", 2)).await?;

        // Every handler call, in order.
        let events: Arc<Mutex<Vec<Call>>> = Arc::default();
        let done = Arc::new(Notify::new());
        let handler = {
            let (events, done) = (Arc::clone(&events), Arc::clone(&done));
            let attempts = Arc::new(Mutex::new(0_u32));
            move |message: Arc<trellis_bus::Message>| {
                let (events, done, attempts) = (
                    Arc::clone(&events),
                    Arc::clone(&done),
                    Arc::clone(&attempts),
                );
                async move {
                    let envelope = &message.envelope;
                    let n = envelope.sequence.unwrap_or_default();
                    let mut attempt = 0;
                    let ok = if envelope.subject == "A" && n == 1 {
                        let mut attempts = attempts.lock().expect("attempts lock");
                        *attempts += 1;
                        attempt = *attempts;
                        attempt >= 3
                    } else {
                        true
                    };
                    let mut log = events.lock().expect("events lock");
                    log.push(Call {
                        subject: envelope.subject.clone(),
                        n,
                        attempt,
                        ok,
                    });
                    if log.iter().filter(|call| call.ok).count() == 7 {
                        done.notify_one();
                    }
                    if ok {
                        Ok(())
                    } else {
                        Err(HandlerError::transient("test", "A1 fails"))
                    }
                }
            }
        };
        let shutdown = Arc::new(Notify::new());
        let runner = {
            let shutdown = Arc::clone(&shutdown);
            tokio::spawn(async move { sub.run(handler, shutdown.notified_owned()).await })
        };
        let finished = tokio::time::timeout(SCENARIO_WAIT_MAX, done.notified()).await;
        shutdown.notify_one();
        runner.await??;
        let log = events.lock().expect("events lock").clone();
        finished.context(format!("not every message was handled: {log:?}"))?;

        let position = |subject: &str, n: u64, attempt: u32| {
            log.iter()
                .position(|call| call.subject == subject && call.n == n && call.attempt == attempt)
        };
        let a_second = position("A", 1, 2).context("A1's second attempt")?;
        let a_success = position("A", 1, 3).context("A1's third attempt")?;
        let a_later = position("A", 2, 0).context("A2")?;
        for n in 1..=5 {
            let b = position("B", n, 0).context("a B message")?;
            ensure!(b < a_second, "B{n} waited for A1's retry: {log:?}");
        }
        let b_order: Vec<u64> = log
            .iter()
            .filter(|call| call.subject == "B")
            .map(|call| call.n)
            .collect();
        ensure!(b_order == [1, 2, 3, 4, 5], "B handled as {b_order:?}");
        ensure!(a_later > a_success, "A2 passed A1: {log:?}");
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_parked_subject_keeps_its_order_across_competing_consumers() -> anyhow::Result<()> {
        // Goal: two subscriptions of one group share one partition, first in one process
        // (one connection), then as two processes would (two connections, which share no
        // memory); A's first message fails once and is parked by whichever subscription got
        // it, and A's later messages, taken from the partition by either subscription, queue
        // behind it: A is handled 1..=6 in order, once each, and B's messages all arrive.
        let Some(nats) = trellis_testkit::nats("parked_competing").await else {
            return Ok(());
        };
        let config = NatsBusConfig::new(&nats.url, &nats.prefix).with_partitions(1);
        let shared = NatsBus::connect(config.clone()).await?;
        competing_scenario([shared.clone(), shared], "oneprocess").await?;
        let apart = [
            NatsBus::connect(config.clone()).await?,
            NatsBus::connect(config).await?,
        ];
        competing_scenario(apart, "twoprocesses").await
    }

    async fn competing_scenario(buses: [NatsBus; 2], group: &str) -> anyhow::Result<()> {
        let retry = RetryPolicy::new(5)?
            .with_backoff(Duration::from_millis(500), Duration::from_millis(500), 1.0)?
            .without_jitter();
        let options = SubscribeOptions::default().with_retry(retry);
        let mut subs = Vec::new();
        for bus in &buses {
            subs.push(
                bus.subscribe(&format!("{group}.*"), group, options.clone())
                    .await?,
            );
        }
        let topic = |subject: &str| format!("{group}.{subject}");
        for n in 1..=6 {
            buses[0].publish(&topic("a"), event("A", n)).await?;
            buses[0].publish(&topic("b"), event("B", n)).await?;
        }
        let handled: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
        let failed_once = Arc::new(Mutex::new(false));
        let mut workers = tokio::task::JoinSet::new();
        for mut sub in subs {
            let (handled, failed_once) = (Arc::clone(&handled), Arc::clone(&failed_once));
            workers.spawn(async move {
                let deadline = tokio::time::Instant::now() + SCENARIO_WAIT_MAX;
                while handled.lock().expect("lock").len() < 12 {
                    ensure!(tokio::time::Instant::now() < deadline, "timed out");
                    for delivery in sub.fetch(4, Duration::from_millis(200)).await? {
                        let envelope = delivery.envelope().clone();
                        let n = envelope.sequence.unwrap_or_default();
                        let fail = envelope.subject == "A"
                            && n == 1
                            && !std::mem::replace(&mut *failed_once.lock().expect("lock"), true);
                        if fail {
                            delivery
                                .fail(&HandlerError::transient("test", "A1 fails once"))
                                .await?;
                        } else {
                            handled.lock().expect("lock").push((envelope.subject, n));
                            delivery.ack().await?;
                        }
                    }
                }
                Ok::<(), anyhow::Error>(())
            });
        }
        while let Some(joined) = workers.join_next().await {
            joined??;
        }
        let handled = handled.lock().expect("lock").clone();
        let of = |subject: &str| -> Vec<u64> {
            handled
                .iter()
                .filter(|(s, _)| s == subject)
                .map(|(_, n)| *n)
                .collect()
        };
        ensure!(of("A") == [1, 2, 3, 4, 5, 6], "A handled as {:?}", of("A"));
        ensure!(of("B") == [1, 2, 3, 4, 5, 6], "B handled as {:?}", of("B"));
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_letters_first_failure_survives_reopening_the_nats_bus() -> anyhow::Result<()> {
        // Goal: for an ordered and an unordered group, a message fails once, the bus is
        // stopped and connected again (a restart), and the second failure dead-letters it:
        // the letter's first-failure time is the first failure's, not the last one's.
        let Some(nats) = trellis_testkit::nats("first_failure_restart").await else {
            return Ok(());
        };
        let retry = RetryPolicy::new(2)?
            .with_backoff(Duration::from_secs(1), Duration::from_secs(1), 1.0)?
            .without_jitter();
        // A short ack wait, so a delivery stranded by the restart comes back quickly.
        let ordered = SubscribeOptions::default()
            .with_retry(retry)
            .with_ack_wait(Duration::from_secs(2))?;
        first_failure_survives_a_restart(&nats, "ordered", ordered.clone()).await?;
        first_failure_survives_a_restart(&nats, "unordered", ordered.with_unordered()).await
    }

    async fn first_failure_survives_a_restart(
        nats: &trellis_testkit::TestNats,
        group: &str,
        options: SubscribeOptions,
    ) -> anyhow::Result<()> {
        let pattern = format!("{group}.*");
        let first_failed_by = {
            let bus = NatsBus::connect(NatsBusConfig::new(&nats.url, &nats.prefix)).await?;
            let mut sub = bus.subscribe(&pattern, group, options.clone()).await?;
            bus.publish(&format!("{group}.one"), event("R", 1)).await?;
            let delivery = sub
                .fetch(1, Duration::from_secs(10))
                .await?
                .pop()
                .context("first delivery")?;
            delivery
                .fail(&HandlerError::transient("test", "first failure"))
                .await?;
            let failed_by = chrono::Utc::now();
            // A graceful stop: the subscription goes, and a request on the same connection
            // makes sure the server has processed everything sent before it (acks are
            // fire-and-forget) before the connection closes.
            drop(sub);
            trellis_bus::DeadLetters::actions(&bus, 1).await?;
            failed_by
        };
        let bus = NatsBus::connect(NatsBusConfig::new(&nats.url, &nats.prefix)).await?;
        let mut sub = bus.subscribe(&pattern, group, options).await?;
        let delivery = sub
            .fetch(1, Duration::from_secs(20))
            .await?
            .pop()
            .with_context(|| format!("{group}: the second delivery"))?;
        ensure!(
            delivery.attempt() == 2,
            "{group}: attempt {}",
            delivery.attempt()
        );
        delivery
            .fail(&HandlerError::transient("test", "second failure"))
            .await?;
        let filter = trellis_bus::DeadLetterFilter {
            group: Some(group.to_owned()),
            ..Default::default()
        };
        let deadline = tokio::time::Instant::now() + SCENARIO_WAIT_MAX;
        let letter = loop {
            if let Some(letter) = trellis_bus::DeadLetters::list(&bus, &filter).await?.pop() {
                break letter;
            }
            ensure!(tokio::time::Instant::now() < deadline, "no dead letter");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        ensure!(
            letter.first_failure_at <= first_failed_by
                && letter.first_failure_at < letter.last_failure_at,
            "{group}: first failure {} (first failed by {first_failed_by}), last {}",
            letter.first_failure_at,
            letter.last_failure_at
        );
        ensure!(letter.attempts == 2);
        Ok(())
    }
}
