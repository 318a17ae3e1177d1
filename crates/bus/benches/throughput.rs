//! Publish + consume + ack throughput of 1 KB messages, and end-to-end latency percentiles,
//! for the SQLite log and NATS JetStream (with a bare async-nats loop as the same-run
//! baseline).
//!
//! Run: `cargo bench -p trellis-bus --bench throughput`. NATS parts need the server at
//! `TRELLIS_TEST_NATS_URL` (default `nats://127.0.0.1:4222`) and are skipped without it.
//! Each criterion iteration pushes `MESSAGES` messages through; the latency pass prints
//! p50/p99 of (handler receipt − envelope time) under the same load.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures_util::StreamExt;
use tokio::runtime::Runtime;
use trellis_bus::nats::{NatsBus, NatsBusConfig};
use trellis_bus::sqlite::SqliteBus;
use trellis_bus::{Bus, Envelope, SubscribeOptions, Subscription};

/// Messages per measured iteration.
const MESSAGES: usize = 20_000;
/// Publishes in flight at once.
const PUBLISH_CONCURRENCY: usize = 256;
/// Most messages a consumer holds.
const IN_FLIGHT: usize = 1_024;
/// The JSON body size that makes a ~1 KB envelope.
const BLOB_BYTES: usize = 820;

fn envelope(n: usize) -> Envelope {
    Envelope::new(
        "bench.happened",
        "bench",
        format!("s{}", n % 1_000),
        serde_json::json!({ "n": n, "blob": "x".repeat(BLOB_BYTES) }),
    )
}

/// Publishes `MESSAGES` with bounded concurrency while consuming them; returns the elapsed
/// time and each message's end-to-end latency.
async fn pump<B: Bus + Clone + 'static>(
    bus: &B,
    sub: &mut Subscription,
    topic: &str,
) -> (Duration, Vec<Duration>) {
    let started = Instant::now();
    let publisher = {
        let bus = bus.clone();
        let topic = topic.to_owned();
        tokio::spawn(async move {
            futures_util::stream::iter(0..MESSAGES)
                .for_each_concurrent(PUBLISH_CONCURRENCY, |n| {
                    let (bus, topic) = (bus.clone(), topic.clone());
                    async move {
                        bus.publish(&topic, envelope(n)).await.expect("publish");
                    }
                })
                .await;
        })
    };
    let mut latencies = Vec::with_capacity(MESSAGES);
    while latencies.len() < MESSAGES {
        let batch = sub
            .fetch(IN_FLIGHT, Duration::from_secs(10))
            .await
            .expect("fetch");
        assert!(
            !batch.is_empty(),
            "no progress for 10 s: {} of {MESSAGES} consumed, publisher finished: {}",
            latencies.len(),
            publisher.is_finished()
        );
        let now = chrono::Utc::now();
        for delivery in &batch {
            let latency = (now - delivery.envelope().time)
                .to_std()
                .unwrap_or_default();
            latencies.push(latency);
        }
        futures_util::future::join_all(batch.into_iter().map(|d| d.ack()))
            .await
            .into_iter()
            .collect::<Result<Vec<()>, _>>()
            .expect("ack");
    }
    publisher.await.expect("publisher");
    (started.elapsed(), latencies)
}

/// Messages in the paced latency pass.
const PACED_MESSAGES: usize = 2_000;
/// The paced pass's publish interval (1,000 msgs/s).
const PACED_INTERVAL: Duration = Duration::from_millis(1);

/// Publishes `PACED_MESSAGES` one at a time every `PACED_INTERVAL` (well below capacity) while
/// consuming, and prints end-to-end latency percentiles: the cost of one hop, not a queue.
async fn paced<B: Bus + Clone + 'static>(name: &str, bus: &B, sub: &mut Subscription, topic: &str) {
    let publisher = {
        let (bus, topic) = (bus.clone(), topic.to_owned());
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(PACED_INTERVAL);
            for n in 0..PACED_MESSAGES {
                ticker.tick().await;
                bus.publish(&topic, envelope(n)).await.expect("publish");
            }
        })
    };
    let mut latencies = Vec::with_capacity(PACED_MESSAGES);
    while latencies.len() < PACED_MESSAGES {
        let batch = sub
            .fetch(IN_FLIGHT, Duration::from_secs(10))
            .await
            .expect("fetch");
        assert!(!batch.is_empty(), "no progress for 10 s");
        let now = chrono::Utc::now();
        for delivery in batch {
            latencies.push(
                (now - delivery.envelope().time)
                    .to_std()
                    .unwrap_or_default(),
            );
            delivery.ack().await.expect("ack");
        }
    }
    publisher.await.expect("publisher");
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    eprintln!(
        "{name} at 1,000 msgs/s: end-to-end p50 {:.2} ms, p99 {:.2} ms",
        at(0.50).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3
    );
}

fn report(name: &str, elapsed: Duration, mut latencies: Vec<Duration>) -> f64 {
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    let rate = MESSAGES as f64 / elapsed.as_secs_f64();
    eprintln!(
        "{name}: {rate:.0} msgs/s, end-to-end p50 {:.2} ms, p99 {:.2} ms",
        at(0.50).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3
    );
    rate
}

fn sqlite_log(c: &mut Criterion, runtime: &Runtime) {
    let dir = std::env::temp_dir().join(trellis_testkit::unique_name("bench_sqlite"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (bus, mut sub) = runtime.block_on(async {
        let bus = SqliteBus::open_path(dir.join("bus.db"))
            .await
            .expect("open");
        let options = SubscribeOptions::default()
            .with_in_flight_max(IN_FLIGHT)
            .expect("valid");
        let sub = bus
            .subscribe("bench.*", "bench", options)
            .await
            .expect("subscribe");
        (bus, sub)
    });
    let (elapsed, latencies) = runtime.block_on(pump(&bus, &mut sub, "bench.events"));
    report(
        "sqlite log (synchronous=FULL, group commit)",
        elapsed,
        latencies,
    );
    runtime.block_on(paced("sqlite log", &bus, &mut sub, "bench.events"));
    let mut group = c.benchmark_group("sqlite_log");
    group
        .sample_size(10)
        .throughput(Throughput::Elements(MESSAGES as u64));
    group.bench_function("publish_consume_ack_1kb", |b| {
        b.iter_custom(|iterations| {
            (0..iterations)
                .map(|_| runtime.block_on(pump(&bus, &mut sub, "bench.events")).0)
                .sum()
        });
    });
    group.finish();
    drop(sub);
    drop(bus);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The baseline: publish with 256 acks outstanding, consume with a pull stream, ack each.
async fn bare_nats(
    context: &jetstream::Context,
    prefix: &str,
    round: usize,
) -> (Duration, Vec<Duration>) {
    let subject = format!("{prefix}.bare");
    let stream = context
        .get_or_create_stream(stream::Config {
            name: format!("{}_BARE", prefix.to_ascii_uppercase()),
            subjects: vec![format!("{prefix}.bare")],
            ..Default::default()
        })
        .await
        .expect("stream");
    let consumer: consumer::PullConsumer = stream
        .get_or_create_consumer(
            &format!("bare{round}"),
            consumer::pull::Config {
                durable_name: Some(format!("bare{round}")),
                ack_policy: consumer::AckPolicy::Explicit,
                deliver_policy: consumer::DeliverPolicy::New,
                ..Default::default()
            },
        )
        .await
        .expect("consumer");
    let mut messages = consumer.messages().await.expect("messages");
    let started = Instant::now();
    let publisher = {
        let context = context.clone();
        tokio::spawn(async move {
            futures_util::stream::iter(0..MESSAGES)
                .for_each_concurrent(PUBLISH_CONCURRENCY, |n| {
                    let (context, subject) = (context.clone(), subject.clone());
                    async move {
                        let body = serde_json::to_vec(&envelope(n)).expect("json");
                        context
                            .publish(subject, body.into())
                            .await
                            .expect("publish")
                            .await
                            .expect("ack");
                    }
                })
                .await;
        })
    };
    let mut latencies = Vec::with_capacity(MESSAGES);
    while latencies.len() < MESSAGES {
        let message = messages
            .next()
            .await
            .expect("stream open")
            .expect("message");
        let envelope: Envelope = serde_json::from_slice(&message.payload).expect("envelope");
        latencies.push(
            (chrono::Utc::now() - envelope.time)
                .to_std()
                .unwrap_or_default(),
        );
        message.ack().await.expect("ack");
    }
    publisher.await.expect("publisher");
    (started.elapsed(), latencies)
}

/// Same-run comparison rounds: bare, ordered and unordered alternate so that noise from
/// other work on the machine hits each of them alike.
const ROUNDS: usize = 3;

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn nats(c: &mut Criterion, runtime: &Runtime) {
    let Some(nats) = runtime.block_on(trellis_testkit::nats("bench_nats")) else {
        return;
    };
    let context = runtime
        .block_on(async { jetstream::new(async_nats::connect(&nats.url).await.expect("connect")) });
    let mut buses = Vec::new();
    for (name, options) in [
        ("ordered", SubscribeOptions::default()),
        ("unordered", SubscribeOptions::default().with_unordered()),
    ] {
        let options = options.with_in_flight_max(IN_FLIGHT).expect("valid");
        let prefix = format!("{}_{name}", nats.prefix);
        let (bus, sub) = runtime.block_on(async {
            let bus = NatsBus::connect(NatsBusConfig::new(&nats.url, &prefix))
                .await
                .expect("bus");
            let sub = bus
                .subscribe("bench.*", name, options)
                .await
                .expect("subscribe");
            (bus, sub)
        });
        buses.push((name, bus, sub));
    }
    for (name, bus, sub) in &mut buses {
        runtime.block_on(paced(
            &format!("trellis-bus on NATS, {name}"),
            &*bus,
            sub,
            "bench.events",
        ));
    }
    let round = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut bare_rates = Vec::new();
    let mut bus_rates: Vec<Vec<f64>> = vec![Vec::new(); buses.len()];
    for _ in 0..ROUNDS {
        let n = round.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (elapsed, latencies) = runtime.block_on(bare_nats(&context, &nats.prefix, n));
        bare_rates.push(report("bare async-nats JetStream loop", elapsed, latencies));
        for (index, (name, bus, sub)) in buses.iter_mut().enumerate() {
            let (elapsed, latencies) = runtime.block_on(pump(&*bus, sub, "bench.events"));
            bus_rates[index].push(report(
                &format!("trellis-bus on NATS, {name}"),
                elapsed,
                latencies,
            ));
        }
    }
    let bare = median(bare_rates);
    for (index, (name, ..)) in buses.iter().enumerate() {
        let rate = median(bus_rates[index].clone());
        eprintln!(
            "median of {ROUNDS} rounds: NATS {name} {rate:.0} msgs/s, bare {bare:.0} msgs/s, ratio {:.2}",
            rate / bare
        );
    }

    let mut group = c.benchmark_group("nats");
    group
        .sample_size(10)
        .throughput(Throughput::Elements(MESSAGES as u64));
    for (name, bus, sub) in &mut buses {
        group.bench_function(format!("bus_{name}_publish_consume_ack_1kb"), |b| {
            b.iter_custom(|iterations| {
                (0..iterations)
                    .map(|_| runtime.block_on(pump(&*bus, sub, "bench.events")).0)
                    .sum()
            });
        });
    }
    group.bench_function("bare_async_nats_publish_consume_ack_1kb", |b| {
        b.iter_custom(|iterations| {
            (0..iterations)
                .map(|_| {
                    let n = round.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    runtime.block_on(bare_nats(&context, &nats.prefix, n)).0
                })
                .sum()
        });
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    sqlite_log(c, &runtime);
    nats(c, &runtime);
}

criterion_group!(throughput, benches);
criterion_main!(throughput);
