//! The transactional outbox relays: what they hold while the bus is slow.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use sqlx::SqlitePool;
use tokio::sync::{Notify, Semaphore};
use trellis_bus::outbox::{PgOutbox, SqliteOutbox};
use trellis_bus::{Bus, BusError, Envelope, InMemoryBus, SubscribeOptions, Subscription};

use crate::helpers::TempDir;

/// How long a test waits for a write that must not be blocked; far above a normal commit, so
/// hitting it means the write was stuck behind the relay.
const WRITE_WAIT_MAX: Duration = Duration::from_secs(10);

/// A bus whose publishes wait at a gate the test opens; `entered` fires when one is waiting.
#[derive(Debug, Clone)]
struct GatedBus {
    inner: InMemoryBus,
    gate: Arc<Semaphore>,
    entered: Arc<Notify>,
}

impl GatedBus {
    fn new(inner: InMemoryBus) -> Self {
        Self {
            inner,
            gate: Arc::new(Semaphore::new(0)),
            entered: Arc::new(Notify::new()),
        }
    }

    fn open(&self) {
        self.gate.add_permits(Semaphore::MAX_PERMITS / 2);
    }
}

impl Bus for GatedBus {
    async fn publish(&self, topic: &str, envelope: Envelope) -> Result<(), BusError> {
        self.entered.notify_one();
        let permit = self.gate.acquire().await.map_err(|_| BusError::Closed)?;
        permit.forget();
        self.inner.publish(topic, envelope).await
    }

    async fn subscribe(
        &self,
        pattern: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, BusError> {
        self.inner.subscribe(pattern, group, options).await
    }
}

async fn service_pool(dir: &TempDir) -> anyhow::Result<SqlitePool> {
    // A busy timeout shorter than WRITE_WAIT_MAX: a write stuck behind the lock fails with
    // "database is locked" instead of waiting for the timeout.
    crate::helpers::service_db(
        dir,
        Duration::from_secs(3),
        "CREATE TABLE orders (id TEXT PRIMARY KEY)",
    )
    .await
}

fn update(subject: &str, n: u64) -> Envelope {
    Envelope::new(
        "order.updated",
        "orders",
        subject,
        serde_json::json!({ "n": n }),
    )
    .with_sequence(n)
}

/// Reads everything the group has, acking it; returns `(subject, sequence)` in arrival order.
async fn drain(sub: &mut Subscription) -> anyhow::Result<Vec<(String, u64)>> {
    let mut seen = Vec::new();
    loop {
        let batch = sub.fetch(100, Duration::from_millis(100)).await?;
        if batch.is_empty() {
            return Ok(seen);
        }
        for delivery in batch {
            let envelope = delivery.envelope();
            seen.push((
                envelope.subject.clone(),
                envelope.sequence.unwrap_or_default(),
            ));
            delivery.ack().await?;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_relay_does_not_hold_the_write_lock_while_publishing() -> anyhow::Result<()> {
    // Goal: while the SQLite relay's publish is stuck on the bus, the service still commits a
    // write (with an outbox row) to the same database, and the relay then publishes every row
    // in per-subject order and removes exactly the rows it published.
    let dir = TempDir::new("outbox_write_lock")?;
    let pool = service_pool(&dir).await?;
    let outbox = SqliteOutbox::new(pool.clone()).await?;
    let mut tx = pool.begin().await?;
    for n in 1..=3 {
        SqliteOutbox::enqueue(&mut tx, "orders.updated", &update("o-1", n)).await?;
        SqliteOutbox::enqueue(&mut tx, "orders.updated", &update("o-2", n)).await?;
    }
    tx.commit().await?;

    let memory = InMemoryBus::new();
    let mut sub = memory
        .subscribe("orders.*", "projector", SubscribeOptions::default())
        .await?;
    let bus = GatedBus::new(memory);
    let relay = {
        let (outbox, bus) = (outbox.clone(), bus.clone());
        tokio::spawn(async move { outbox.relay_once(&bus, 100).await })
    };
    tokio::time::timeout(WRITE_WAIT_MAX, bus.entered.notified())
        .await
        .context("the relay started publishing")?;

    let write = async {
        let mut tx = pool.begin().await?;
        sqlx::query("INSERT INTO orders (id) VALUES ('o-3')")
            .execute(&mut *tx)
            .await?;
        SqliteOutbox::enqueue(&mut tx, "orders.updated", &update("o-3", 1)).await?;
        tx.commit().await?;
        Ok::<(), anyhow::Error>(())
    };
    let written = tokio::time::timeout(WRITE_WAIT_MAX, write).await;
    bus.open();
    let report = relay.await??;
    ensure!(
        matches!(written, Ok(Ok(()))),
        "a service write while the relay publishes: {written:?}"
    );
    ensure!(report.published == 6, "published {}", report.published);
    let left: Vec<String> = sqlx::query_scalar("SELECT subject FROM bus_outbox")
        .fetch_all(&pool)
        .await?;
    ensure!(left == ["o-3"], "rows left {left:?}");
    ensure!(outbox.relay_once(&bus, 100).await?.published == 1);

    let seen = drain(&mut sub).await?;
    for subject in ["o-1", "o-2"] {
        let sequences: Vec<u64> = seen
            .iter()
            .filter(|(s, _)| s == subject)
            .map(|(_, n)| *n)
            .collect();
        ensure!(sequences == [1, 2, 3], "{subject} arrived as {sequences:?}");
    }
    ensure!(seen.len() == 7, "{seen:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_outbox_relay_does_not_block_service_writes_while_publishing()
-> anyhow::Result<()> {
    // Goal: while the PostgreSQL relay's publish is stuck on the bus, the service still
    // commits a write with an outbox row for the same subject (the relay holds advisory
    // locks, not row locks), and the relay then finishes its round.
    let Some(db) = trellis_testkit::postgres("pg_outbox_write_lock").await else {
        return Ok(());
    };
    let pool = sqlx::PgPool::connect(&db.url).await?;
    let outbox = PgOutbox::new(pool.clone()).await?;
    sqlx::query("CREATE TABLE orders (id TEXT PRIMARY KEY)")
        .execute(&pool)
        .await?;
    let mut tx = pool.begin().await?;
    for n in 1..=3 {
        PgOutbox::enqueue(&mut tx, "orders.updated", &update("o-1", n)).await?;
    }
    tx.commit().await?;
    let memory = InMemoryBus::new();
    let mut sub = memory
        .subscribe("orders.*", "projector", SubscribeOptions::default())
        .await?;
    let bus = GatedBus::new(memory);
    let relay = {
        let (outbox, bus) = (outbox.clone(), bus.clone());
        tokio::spawn(async move { outbox.relay_once(&bus, 100).await })
    };
    tokio::time::timeout(WRITE_WAIT_MAX, bus.entered.notified())
        .await
        .context("the relay started publishing")?;
    let write = async {
        let mut tx = pool.begin().await?;
        sqlx::query("SET LOCAL lock_timeout = '3s'")
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO orders (id) VALUES ('o-1')")
            .execute(&mut *tx)
            .await?;
        PgOutbox::enqueue(&mut tx, "orders.updated", &update("o-1", 4)).await?;
        tx.commit().await?;
        Ok::<(), anyhow::Error>(())
    };
    let written = tokio::time::timeout(WRITE_WAIT_MAX, write).await;
    bus.open();
    let report = relay.await??;
    ensure!(
        matches!(written, Ok(Ok(()))),
        "a service write while the relay publishes: {written:?}"
    );
    ensure!(report.published == 3, "published {}", report.published);
    ensure!(outbox.relay_once(&bus, 100).await?.published == 1);
    let sequences: Vec<u64> = drain(&mut sub).await?.into_iter().map(|(_, n)| n).collect();
    ensure!(sequences == [1, 2, 3, 4], "arrived as {sequences:?}");
    pool.close().await;
    Ok(())
}
