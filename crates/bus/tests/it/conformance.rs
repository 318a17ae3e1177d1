//! The conformance suite every backend runs: generic checks over `Bus + DeadLetters`, and a
//! macro that instantiates each check as a test for one backend.
//!
//! Every check takes a bus and a topic prefix unique to the test, so tests run in parallel on
//! shared servers. Waits are bounded; on the in-memory backend they run on paused time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use trellis_bus::{
    Bus, BusError, DeadLetterFilter, DeadLetterReason, DeadLetters, Delivery, Envelope,
    HandlerError, RetryPolicy, SubscribeOptions, Subscription,
};
use uuid::Uuid;

/// The longest any check waits for a message that should arrive.
const ARRIVAL_WAIT: Duration = Duration::from_secs(20);
/// The ack wait checks use when they rely on redelivery.
const SHORT_ACK_WAIT: Duration = Duration::from_millis(600);

fn topic(prefix: &str, name: &str) -> String {
    format!("{prefix}.{name}")
}

fn envelope(subject: &str, sequence: u64) -> Envelope {
    Envelope::new(
        "test.happened",
        "conformance",
        subject,
        serde_json::json!({ "subject": subject, "n": sequence }),
    )
    .with_sequence(sequence)
}

fn options() -> SubscribeOptions {
    SubscribeOptions::default()
}

fn fast_retry(max_deliveries: u32) -> anyhow::Result<RetryPolicy> {
    Ok(RetryPolicy::new(max_deliveries)?.with_backoff(
        Duration::from_millis(10),
        Duration::from_millis(50),
        2.0,
    )?)
}

/// Fetches until `count` deliveries arrived or `ARRIVAL_WAIT` passed.
async fn fetch_exactly(sub: &mut Subscription, count: usize) -> anyhow::Result<Vec<Delivery>> {
    let deadline = tokio::time::Instant::now() + ARRIVAL_WAIT;
    let mut got = Vec::new();
    while got.len() < count {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            bail!("only {} of {count} deliveries arrived in time", got.len());
        }
        let max = (count - got.len()).min(trellis_bus::FETCH_BATCH_MAX);
        got.extend(sub.fetch(max, left.min(Duration::from_secs(2))).await?);
    }
    Ok(got)
}

/// Polls the DLQ until `count` letters match `filter`.
async fn dead_letters_eventually<D: DeadLetters>(
    dlq: &D,
    filter: &DeadLetterFilter,
    count: usize,
) -> anyhow::Result<Vec<trellis_bus::DeadLetter>> {
    let deadline = tokio::time::Instant::now() + ARRIVAL_WAIT;
    loop {
        let letters = dlq.list(filter).await?;
        if letters.len() >= count {
            return Ok(letters);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("{} of {count} dead letters appeared in time", letters.len());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn group_filter(group: &str) -> DeadLetterFilter {
    DeadLetterFilter {
        group: Some(group.to_owned()),
        ..DeadLetterFilter::default()
    }
}

pub(crate) async fn published_envelopes_arrive_intact<B: Bus>(
    bus: &B,
    prefix: &str,
) -> anyhow::Result<()> {
    let mut sub = bus
        .subscribe(&topic(prefix, "*"), "intact", options())
        .await?;
    let sent = envelope("order-1", 1)
        .with_correlation_id(Uuid::now_v7())
        .with_header("x-tenant", "acme");
    bus.publish(&topic(prefix, "created"), sent.clone()).await?;
    let got = fetch_exactly(&mut sub, 1).await?;
    let delivery = got.into_iter().next().context("one delivery")?;
    ensure!(delivery.envelope() == &sent, "envelope changed in transit");
    ensure!(delivery.message().topic == topic(prefix, "created"));
    ensure!(delivery.attempt() == 1);
    delivery.ack().await?;
    let again = sub.fetch(1, Duration::from_millis(300)).await?;
    ensure!(again.is_empty(), "an acked message came back");
    Ok(())
}

pub(crate) async fn every_group_sees_every_message<B: Bus>(
    bus: &B,
    prefix: &str,
) -> anyhow::Result<()> {
    let pattern = topic(prefix, ">");
    let mut billing = bus.subscribe(&pattern, "billing", options()).await?;
    let mut shipping = bus.subscribe(&pattern, "shipping", options()).await?;
    for n in 0..5 {
        bus.publish(&topic(prefix, "a.b"), envelope(&format!("s{n}"), 1))
            .await?;
    }
    for sub in [&mut billing, &mut shipping] {
        let got = fetch_exactly(sub, 5).await?;
        let subjects: HashSet<String> = got.iter().map(|d| d.envelope().subject.clone()).collect();
        ensure!(subjects.len() == 5, "{} saw {subjects:?}", sub.group());
        for delivery in got {
            delivery.ack().await?;
        }
    }
    Ok(())
}

pub(crate) async fn a_killed_consumers_unacked_messages_go_to_a_new_consumer<B: Bus>(
    bus: &B,
    prefix: &str,
) -> anyhow::Result<()> {
    let options = options().with_ack_wait(SHORT_ACK_WAIT)?;
    let pattern = topic(prefix, "jobs");
    let mut first = bus.subscribe(&pattern, "workers", options.clone()).await?;
    let mut ids = Vec::new();
    for n in 0..10 {
        let sent = envelope(&format!("job-{n}"), 1);
        ids.push(sent.id);
        bus.publish(&pattern, sent).await?;
    }
    let batch = fetch_exactly(&mut first, 10).await?;
    let mut unacked = HashSet::new();
    for (index, delivery) in batch.into_iter().enumerate() {
        if index % 2 == 0 {
            delivery.ack().await?;
        } else {
            unacked.insert(delivery.envelope().id);
            // Simulates the crash: the delivery is never settled.
            drop(delivery);
        }
    }
    drop(first);
    let mut second = bus.subscribe(&pattern, "workers", options).await?;
    let redelivered = fetch_exactly(&mut second, unacked.len()).await?;
    let got: HashSet<Uuid> = redelivered.iter().map(|d| d.envelope().id).collect();
    ensure!(got == unacked, "redelivered {got:?}, expected {unacked:?}");
    ensure!(redelivered.iter().all(|d| d.attempt() == 2));
    for delivery in redelivered {
        delivery.ack().await?;
    }
    ensure!(
        second
            .fetch(10, Duration::from_millis(300))
            .await?
            .is_empty()
    );
    Ok(())
}

pub(crate) async fn competing_consumers_handle_each_message_once_after_inbox_dedup<B: Bus>(
    bus: &B,
    prefix: &str,
    count: usize,
) -> anyhow::Result<()> {
    const SUBJECTS: usize = 200;
    const CONSUMERS: usize = 4;
    let pattern = topic(prefix, "load");
    let options = options().with_in_flight_max(128)?;
    let mut subs = Vec::new();
    for _ in 0..CONSUMERS {
        subs.push(
            bus.subscribe(&pattern, "competing", options.clone())
                .await?,
        );
    }
    // Publish concurrently (so group-committing backends batch), per subject in order.
    let mut next_sequence = vec![0_u64; SUBJECTS];
    let mut batch = Vec::new();
    for n in 0..count {
        let subject = n % SUBJECTS;
        next_sequence[subject] += 1;
        batch.push(envelope(&format!("s{subject}"), next_sequence[subject]));
    }
    let mut by_subject: BTreeMap<usize, Vec<Envelope>> = BTreeMap::new();
    for (n, sent) in batch.into_iter().enumerate() {
        by_subject.entry(n % SUBJECTS).or_default().push(sent);
    }
    let publishers: Vec<_> = by_subject
        .into_values()
        .map(|envelopes| {
            let pattern = pattern.clone();
            async move {
                for sent in envelopes {
                    bus.publish(&pattern, sent).await?;
                }
                Ok::<(), BusError>(())
            }
        })
        .collect();
    for outcome in futures_util::future::join_all(publishers).await {
        outcome?;
    }

    // The "inbox": message ids whose effect happened, and the effect count.
    let inbox: Arc<Mutex<HashSet<Uuid>>> = Arc::default();
    let effects: Arc<Mutex<HashMap<String, Vec<u64>>>> = Arc::default();
    let mut workers = tokio::task::JoinSet::new();
    for mut sub in subs {
        let (inbox, effects) = (Arc::clone(&inbox), Arc::clone(&effects));
        workers.spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while tokio::time::Instant::now() < deadline {
                if inbox.lock().expect("inbox lock").len() >= count {
                    break;
                }
                let deliveries = sub.fetch(128, Duration::from_millis(200)).await?;
                for delivery in deliveries {
                    let envelope = delivery.envelope();
                    let first_time = inbox.lock().expect("inbox lock").insert(envelope.id);
                    if first_time {
                        effects
                            .lock()
                            .expect("effects lock")
                            .entry(envelope.subject.clone())
                            .or_default()
                            .push(envelope.sequence.unwrap_or_default());
                    }
                    match delivery.ack().await {
                        Ok(()) | Err(BusError::LeaseLost) => {}
                        Err(error) => return Err(error),
                    }
                }
            }
            Ok::<(), BusError>(())
        });
    }
    while let Some(joined) = workers.join_next().await {
        joined??;
    }
    let handled = inbox.lock().expect("inbox lock").len();
    ensure!(handled == count, "{handled} of {count} messages handled");
    let effects = effects.lock().expect("effects lock");
    let total: usize = effects.values().map(Vec::len).sum();
    ensure!(total == count, "{total} effects for {count} messages");
    for (subject, sequences) in effects.iter() {
        ensure!(
            sequences.windows(2).all(|w| w[0] < w[1]),
            "subject {subject} handled out of order: {sequences:?}"
        );
    }
    Ok(())
}

pub(crate) async fn messages_of_one_subject_are_handled_in_order_by_competing_consumers<B: Bus>(
    bus: &B,
    prefix: &str,
) -> anyhow::Result<()> {
    const SUBJECTS: u64 = 4;
    const PER_SUBJECT: u64 = 25;
    let pattern = topic(prefix, "ordered");
    for n in 1..=PER_SUBJECT {
        for subject in 0..SUBJECTS {
            bus.publish(&pattern, envelope(&format!("agg-{subject}"), n))
                .await?;
        }
    }
    let in_flight: Arc<Mutex<HashSet<String>>> = Arc::default();
    let seen: Arc<Mutex<HashMap<String, Vec<u64>>>> = Arc::default();
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..3_u64 {
        let sub = bus.subscribe(&pattern, "ordered", options()).await?;
        let (in_flight, seen) = (Arc::clone(&in_flight), Arc::clone(&seen));
        workers.spawn(run_ordered_worker(
            sub,
            worker,
            in_flight,
            seen,
            (SUBJECTS * PER_SUBJECT) as usize,
        ));
    }
    while let Some(joined) = workers.join_next().await {
        joined??;
    }
    let seen = seen.lock().expect("seen lock");
    for subject in 0..SUBJECTS {
        let sequences = seen
            .get(&format!("agg-{subject}"))
            .context("subject seen")?;
        let expected: Vec<u64> = (1..=PER_SUBJECT).collect();
        ensure!(
            *sequences == expected,
            "agg-{subject} handled as {sequences:?}"
        );
    }
    Ok(())
}

async fn run_ordered_worker(
    mut sub: Subscription,
    worker: u64,
    in_flight: Arc<Mutex<HashSet<String>>>,
    seen: Arc<Mutex<HashMap<String, Vec<u64>>>>,
    total: usize,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + ARRIVAL_WAIT;
    loop {
        let done: usize = seen.lock().expect("seen lock").values().map(Vec::len).sum();
        if done >= total {
            return Ok(());
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "ordered run timed out"
        );
        let deliveries = sub.fetch(8, Duration::from_millis(200)).await?;
        let handlers = deliveries.into_iter().map(|delivery| {
            let (in_flight, seen) = (Arc::clone(&in_flight), Arc::clone(&seen));
            async move {
                let subject = delivery.envelope().subject.clone();
                let entered = in_flight.lock().expect("lock").insert(subject.clone());
                ensure!(entered, "two messages of {subject} in flight at once");
                // A little work, different per worker, to interleave the consumers.
                tokio::time::sleep(Duration::from_millis(1 + worker * 2)).await;
                seen.lock()
                    .expect("lock")
                    .entry(subject.clone())
                    .or_default()
                    .push(delivery.envelope().sequence.unwrap_or_default());
                in_flight.lock().expect("lock").remove(&subject);
                delivery.ack().await?;
                Ok::<(), anyhow::Error>(())
            }
        });
        for outcome in futures_util::future::join_all(handlers).await {
            outcome?;
        }
    }
}

pub(crate) async fn a_failing_message_is_retried_then_dead_lettered_with_its_history<
    B: Bus + DeadLetters,
>(
    bus: &B,
    prefix: &str,
) -> anyhow::Result<()> {
    let options = options().with_retry(fast_retry(3)?);
    let pattern = topic(prefix, "payments");
    let mut sub = bus.subscribe(&pattern, "retrying", options).await?;
    let doomed = envelope("pay-1", 1);
    bus.publish(&pattern, doomed.clone()).await?;
    bus.publish(&pattern, envelope("pay-1", 2)).await?;
    let error = HandlerError::transient("provider", "charge 4711 failed: HTTP 503");
    for attempt in 1..=3 {
        let got = fetch_exactly(&mut sub, 1).await?;
        let delivery = got.into_iter().next().context("one delivery")?;
        ensure!(
            delivery.envelope().id == doomed.id,
            "the failing message blocks its subject"
        );
        ensure!(
            delivery.attempt() == attempt,
            "attempt {}",
            delivery.attempt()
        );
        delivery.fail(&error).await?;
    }
    // After the last failure the next message of the subject flows.
    let next = fetch_exactly(&mut sub, 1).await?;
    ensure!(next[0].envelope().sequence == Some(2));
    for delivery in next {
        delivery.ack().await?;
    }
    let letters = dead_letters_eventually(bus, &group_filter("retrying"), 1).await?;
    let letter = &letters[0];
    ensure!(letter.envelope.id == doomed.id);
    ensure!(letter.reason == DeadLetterReason::MaxDeliveries);
    ensure!(letter.attempts == 3, "attempts {}", letter.attempts);
    ensure!(letter.first_failure_at <= letter.last_failure_at);
    ensure!(
        letter.error.contains("HTTP 503"),
        "error {:?}",
        letter.error
    );
    ensure!(letter.error_kind == "provider");
    ensure!(letter.topic == pattern);
    Ok(())
}

pub(crate) async fn a_poison_message_goes_to_the_dlq_at_once<B: Bus + DeadLetters>(
    bus: &B,
    prefix: &str,
) -> anyhow::Result<()> {
    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct OrderPlaced {
        order_id: String,
        total_cents: u64,
    }
    let pattern = topic(prefix, "orders");
    let mut sub = bus
        .subscribe(&pattern, "poisoned", options().with_retry(fast_retry(5)?))
        .await?;
    let bad = Envelope::new(
        "order.placed",
        "orders",
        "o-9",
        serde_json::json!({"total": "x"}),
    );
    bus.publish(&pattern, bad.clone()).await?;
    let delivery = fetch_exactly(&mut sub, 1)
        .await?
        .pop()
        .context("delivery")?;
    match delivery.decode::<OrderPlaced>() {
        Ok(_) => bail!("bad data decoded"),
        Err(error) => delivery.fail(&HandlerError::from(error)).await?,
    }
    let letters = dead_letters_eventually(bus, &group_filter("poisoned"), 1).await?;
    ensure!(letters[0].reason == DeadLetterReason::Poison);
    ensure!(letters[0].attempts == 1, "poison is not retried");
    ensure!(letters[0].envelope.id == bad.id);
    ensure!(sub.fetch(1, Duration::from_millis(300)).await?.is_empty());
    Ok(())
}

pub(crate) async fn a_nack_redelivers_after_its_delay<B: Bus>(
    bus: &B,
    prefix: &str,
) -> anyhow::Result<()> {
    let pattern = topic(prefix, "later");
    let mut sub = bus.subscribe(&pattern, "nacking", options()).await?;
    bus.publish(&pattern, envelope("n-1", 1)).await?;
    let delivery = fetch_exactly(&mut sub, 1)
        .await?
        .pop()
        .context("delivery")?;
    let nacked_at = tokio::time::Instant::now();
    delivery.nack(Duration::from_millis(400)).await?;
    let again = fetch_exactly(&mut sub, 1)
        .await?
        .pop()
        .context("redelivery")?;
    ensure!(
        nacked_at.elapsed() >= Duration::from_millis(300),
        "redelivered after {:?}",
        nacked_at.elapsed()
    );
    ensure!(again.attempt() == 2);
    again.ack().await?;
    Ok(())
}

pub(crate) async fn an_oversize_message_is_refused_at_publish<B: Bus>(
    bus: &B,
    prefix: &str,
) -> anyhow::Result<()> {
    let big = "x".repeat(trellis_bus::MESSAGE_BYTES_MAX_DEFAULT + 1);
    let refused = bus
        .publish(
            &topic(prefix, "big"),
            Envelope::new("blob", "test", "b-1", serde_json::json!({ "blob": big })),
        )
        .await;
    ensure!(
        matches!(refused, Err(BusError::MessageTooLarge { .. })),
        "got {refused:?}"
    );
    let bad_topic = bus.publish("no spaces", envelope("s", 1)).await;
    ensure!(matches!(bad_topic, Err(BusError::InvalidName { .. })));
    Ok(())
}

pub(crate) async fn the_last_unsettled_delivery_is_dead_lettered_as_an_ack_timeout<
    B: Bus + DeadLetters,
>(
    bus: &B,
    prefix: &str,
) -> anyhow::Result<()> {
    let options = options()
        .with_retry(fast_retry(1)?)
        .with_ack_wait(SHORT_ACK_WAIT)?;
    let pattern = topic(prefix, "slow");
    let mut sub = bus.subscribe(&pattern, "timing-out", options).await?;
    bus.publish(&pattern, envelope("t-1", 1)).await?;
    drop(fetch_exactly(&mut sub, 1).await?);
    // The redelivery exceeds max_deliveries: fetch dead-letters it instead of returning it.
    let deadline = tokio::time::Instant::now() + ARRIVAL_WAIT;
    loop {
        ensure!(sub.fetch(1, Duration::from_millis(200)).await?.is_empty());
        if !bus.list(&group_filter("timing-out")).await?.is_empty() {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "no ack-timeout dead letter"
        );
    }
    let letters = bus.list(&group_filter("timing-out")).await?;
    ensure!(letters[0].reason == DeadLetterReason::AckTimeout);
    ensure!(letters[0].attempts == 2);
    Ok(())
}

pub(crate) async fn the_in_flight_limit_bounds_what_a_consumer_holds<B: Bus>(
    bus: &B,
    prefix: &str,
) -> anyhow::Result<()> {
    let pattern = topic(prefix, "bounded");
    let mut sub = bus
        .subscribe(&pattern, "bounded", options().with_in_flight_max(2)?)
        .await?;
    for n in 0..5 {
        bus.publish(&pattern, envelope(&format!("b{n}"), 1)).await?;
    }
    let held = fetch_exactly(&mut sub, 2).await?;
    ensure!(sub.available_in_flight() == 0);
    ensure!(sub.fetch(10, Duration::from_millis(200)).await?.is_empty());
    let mut held = held.into_iter();
    held.next().context("first")?.ack().await?;
    let more = fetch_exactly(&mut sub, 1).await?;
    ensure!(more.len() == 1);
    Ok(())
}

pub(crate) async fn a_redriven_dead_letter_returns_to_its_group_with_its_redrive_count<
    B: Bus + DeadLetters,
>(
    bus: &B,
    prefix: &str,
) -> anyhow::Result<()> {
    let pattern = topic(prefix, "redrive");
    let mut failing = bus.subscribe(&pattern, "failing", options()).await?;
    let mut bystander = bus.subscribe(&pattern, "bystander", options()).await?;
    let mut ids = Vec::new();
    for n in 0..3 {
        let sent = envelope(&format!("r{n}"), 1);
        ids.push(sent.id);
        bus.publish(&pattern, sent).await?;
    }
    for delivery in fetch_exactly(&mut bystander, 3).await? {
        delivery.ack().await?;
    }
    for delivery in fetch_exactly(&mut failing, 3).await? {
        let n = &delivery.envelope().subject.clone();
        delivery.term(&format!("customer {n} unknown")).await?;
    }
    let letters = dead_letters_eventually(bus, &group_filter("failing"), 3).await?;
    let groups = bus.failure_groups(&group_filter("failing")).await?;
    ensure!(
        groups.len() == 1 && groups[0].count == 3,
        "groups {groups:?}"
    );

    // Redrive one by id, then the rest by fingerprint.
    let one = letters[0].id;
    let shown = bus.get(one).await?;
    ensure!(shown.reason == DeadLetterReason::Rejected);
    bus.redrive(one, "test").await?;
    let rest = bus.redrive_group(&groups[0].fingerprint, "test").await?;
    ensure!(rest.len() == 2, "redrove {rest:?}");
    ensure!(bus.list(&group_filter("failing")).await?.is_empty());
    let actions = bus.actions(10).await?;
    ensure!(actions.len() >= 3, "actions logged: {actions:?}");

    let back = fetch_exactly(&mut failing, 3).await?;
    let back_ids: HashSet<Uuid> = back.iter().map(|d| d.envelope().id).collect();
    ensure!(back_ids == ids.iter().copied().collect::<HashSet<_>>());
    ensure!(back.iter().all(|d| d.envelope().redrive_count() == 1));
    for delivery in back {
        delivery.ack().await?;
    }
    ensure!(
        bystander
            .fetch(5, Duration::from_millis(300))
            .await?
            .is_empty(),
        "a redrive is for the failing group only"
    );
    Ok(())
}

pub(crate) async fn discarded_and_archived_dead_letters_leave_the_queue<B: Bus + DeadLetters>(
    bus: &B,
    prefix: &str,
) -> anyhow::Result<()> {
    let pattern = topic(prefix, "cleanup");
    let mut sub = bus.subscribe(&pattern, "cleanup", options()).await?;
    for n in 0..2 {
        bus.publish(&pattern, envelope(&format!("c{n}"), 1)).await?;
    }
    for delivery in fetch_exactly(&mut sub, 2).await? {
        delivery.term("not wanted").await?;
    }
    let letters = dead_letters_eventually(bus, &group_filter("cleanup"), 2).await?;
    bus.discard(letters[0].id, "test").await?;
    bus.archive(letters[1].id, "test").await?;
    ensure!(bus.list(&group_filter("cleanup")).await?.is_empty());
    let archived = bus
        .list(&DeadLetterFilter {
            state: Some(trellis_bus::DeadLetterState::Archived),
            ..group_filter("cleanup")
        })
        .await?;
    ensure!(archived.len() == 1 && archived[0].id == letters[1].id);
    ensure!(matches!(
        bus.redrive(letters[0].id, "test").await,
        Err(BusError::NotFound { .. })
    ));
    Ok(())
}

pub(crate) async fn a_group_keeps_the_pattern_it_was_created_with<B: Bus>(
    bus: &B,
    prefix: &str,
) -> anyhow::Result<()> {
    let first = bus
        .subscribe(&topic(prefix, "a.*"), "fixed", options())
        .await?;
    let again = bus
        .subscribe(&topic(prefix, "a.*"), "fixed", options())
        .await;
    ensure!(again.is_ok(), "the same pattern joins the group");
    let other = bus
        .subscribe(&topic(prefix, "b.*"), "fixed", options())
        .await;
    ensure!(
        matches!(other, Err(BusError::GroupConflict { .. })),
        "got {other:?}"
    );
    let bad = bus
        .subscribe(&topic(prefix, "a.>.b"), "other", options())
        .await;
    ensure!(matches!(bad, Err(BusError::InvalidName { .. })));
    drop(first);
    Ok(())
}

pub(crate) async fn a_pattern_list_delivers_its_topics_in_subject_order_and_nothing_else<B: Bus>(
    bus: &B,
    prefix: &str,
) -> anyhow::Result<()> {
    // One group on two patterns: it gets the topics either matches, one subject's messages
    // one at a time and in publish order across both, and none of the other topics.
    let list = format!("{},{}", topic(prefix, "c.*"), topic(prefix, "a.one"));
    let mut sub = bus.subscribe(&list, "listed", options()).await?;
    let published = [
        ("s1", "a.one"),
        ("s1", "b.two"),
        ("s1", "c.x"),
        ("s2", "c.y"),
        ("s1", "b.two"),
        ("s1", "a.one"),
        ("s2", "a.two"),
    ];
    for (sequence, (subject, name)) in (1_u64..).zip(published) {
        bus.publish(&topic(prefix, name), envelope(subject, sequence))
            .await?;
    }
    let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for _ in 0..4 {
        let got = fetch_exactly(&mut sub, 1).await?;
        for delivery in got {
            let name = delivery.message().topic.clone();
            ensure!(
                name.ends_with(".a.one") || name.contains(".c."),
                "{name} is not on the list"
            );
            seen.entry(delivery.envelope().subject.clone())
                .or_default()
                .push(delivery.envelope().sequence.unwrap_or_default());
            delivery.ack().await?;
        }
    }
    ensure!(
        seen == BTreeMap::from([("s1".to_owned(), vec![1, 3, 6]), ("s2".to_owned(), vec![4])]),
        "got {seen:?}"
    );
    let more = sub.fetch(8, Duration::from_millis(500)).await?;
    ensure!(
        more.is_empty(),
        "topics off the list arrived: {}",
        more.len()
    );
    // The same list in another order and with a repeat is the same subscription.
    let same = format!(
        "{},{},{}",
        topic(prefix, "a.one"),
        topic(prefix, "c.*"),
        topic(prefix, "a.one")
    );
    ensure!(bus.subscribe(&same, "listed", options()).await.is_ok());
    Ok(())
}

pub(crate) async fn a_group_can_replace_its_pattern_list_when_asked<B: Bus>(
    bus: &B,
    prefix: &str,
) -> anyhow::Result<()> {
    // A new release narrows a group from everything to a list: without the option the old
    // list is kept (a conflict); with it, messages published after the change are matched
    // against the new list.
    let first = bus
        .subscribe(&topic(prefix, ">"), "narrowed", options())
        .await?;
    drop(first);
    let list = format!("{},{}", topic(prefix, "a.one"), topic(prefix, "c.one"));
    let refused = bus.subscribe(&list, "narrowed", options()).await;
    ensure!(
        matches!(refused, Err(BusError::GroupConflict { .. })),
        "got {refused:?}"
    );
    let mut sub = bus
        .subscribe(&list, "narrowed", options().replacing_patterns())
        .await?;
    for (sequence, name) in (1_u64..).zip(["b.one", "a.one", "b.one", "c.one"]) {
        bus.publish(
            &topic(prefix, name),
            envelope(&format!("s{sequence}"), sequence),
        )
        .await?;
    }
    let got = fetch_exactly(&mut sub, 2).await?;
    let mut names: Vec<String> = got.iter().map(|d| d.message().topic.clone()).collect();
    names.sort();
    ensure!(
        names == [topic(prefix, "a.one"), topic(prefix, "c.one")],
        "got {names:?}"
    );
    for delivery in got {
        delivery.ack().await?;
    }
    let more = sub.fetch(8, Duration::from_millis(500)).await?;
    ensure!(
        more.is_empty(),
        "topics off the new list arrived: {}",
        more.len()
    );
    // Joining again with the new list needs no option.
    ensure!(bus.subscribe(&list, "narrowed", options()).await.is_ok());
    Ok(())
}

/// Instantiates every conformance check as a test. `$setup` is an async expression yielding
/// `Option<(bus, prefix, guard)>` (None skips), `$attr` the test attribute.
#[macro_export]
macro_rules! conformance_tests {
    ($setup:path, #[$attr:meta], $load:expr) => {
        $crate::conformance_tests!(@one $setup, $attr, published_envelopes_arrive_intact);
        $crate::conformance_tests!(@one $setup, $attr, every_group_sees_every_message);
        $crate::conformance_tests!(@one $setup, $attr, a_killed_consumers_unacked_messages_go_to_a_new_consumer);
        $crate::conformance_tests!(@one $setup, $attr, messages_of_one_subject_are_handled_in_order_by_competing_consumers);
        $crate::conformance_tests!(@one $setup, $attr, a_failing_message_is_retried_then_dead_lettered_with_its_history);
        $crate::conformance_tests!(@one $setup, $attr, a_poison_message_goes_to_the_dlq_at_once);
        $crate::conformance_tests!(@one $setup, $attr, a_nack_redelivers_after_its_delay);
        $crate::conformance_tests!(@one $setup, $attr, an_oversize_message_is_refused_at_publish);
        $crate::conformance_tests!(@one $setup, $attr, the_last_unsettled_delivery_is_dead_lettered_as_an_ack_timeout);
        $crate::conformance_tests!(@one $setup, $attr, the_in_flight_limit_bounds_what_a_consumer_holds);
        $crate::conformance_tests!(@one $setup, $attr, a_redriven_dead_letter_returns_to_its_group_with_its_redrive_count);
        $crate::conformance_tests!(@one $setup, $attr, discarded_and_archived_dead_letters_leave_the_queue);
        $crate::conformance_tests!(@one $setup, $attr, a_group_keeps_the_pattern_it_was_created_with);
        $crate::conformance_tests!(@one $setup, $attr, a_pattern_list_delivers_its_topics_in_subject_order_and_nothing_else);
        $crate::conformance_tests!(@one $setup, $attr, a_group_can_replace_its_pattern_list_when_asked);

        #[$attr]
        async fn ten_thousand_messages_through_four_competing_consumers_are_each_handled_once(
        ) -> anyhow::Result<()> {
            // Goal: the conformance check of the same name passes on this backend.
            let Some((bus, prefix, _guard)) = $setup(stringify!(competing)).await else {
                return Ok(());
            };
            $crate::conformance::competing_consumers_handle_each_message_once_after_inbox_dedup(
                &bus, &prefix, $load,
            )
            .await
        }
    };
    (@one $setup:path, $attr:meta, $check:ident) => {
        #[$attr]
        async fn $check() -> anyhow::Result<()> {
            // Goal: the conformance check of the same name passes on this backend.
            let Some((bus, prefix, _guard)) = $setup(stringify!($check)).await else {
                return Ok(());
            };
            $crate::conformance::$check(&bus, &prefix).await
        }
    };
}
