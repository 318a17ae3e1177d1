//! Exactly-once effects: the inbox on SQLite and PostgreSQL, and the transactional outbox
//! relayed through a relay that is killed between publish and mark.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use sqlx::{PgPool, SqlitePool};
use tokio::sync::Notify;
use trellis_bus::inbox::{Handled, PgInbox, SqliteInbox};
use trellis_bus::outbox::{PgOutbox, SqliteOutbox};
use trellis_bus::{
    Bus, BusError, Envelope, HandlerError, InMemoryBus, Message, SubscribeOptions, Subscription,
};

use crate::helpers::TempDir;

async fn sqlite_pool(dir: &TempDir) -> anyhow::Result<SqlitePool> {
    crate::helpers::service_db(
        dir,
        Duration::from_secs(5),
        "CREATE TABLE effects (message_id TEXT NOT NULL, subject TEXT NOT NULL, n INTEGER NOT NULL)",
    )
    .await
}

fn message(group: &str, n: u64) -> Message {
    Message {
        topic: "orders.created".to_owned(),
        group: group.to_owned(),
        envelope: Envelope::new(
            "order.created",
            "test",
            "o-1",
            serde_json::json!({ "n": n }),
        )
        .with_sequence(n),
    }
}

async fn record_effect_sqlite(
    inbox: &SqliteInbox,
    message: &Message,
) -> Result<Handled<()>, HandlerError> {
    let id = message.envelope.id.to_string();
    let subject = message.envelope.subject.clone();
    let n = i64::try_from(message.envelope.sequence.unwrap_or_default()).unwrap_or_default();
    inbox
        .handle_once(message, move |tx| {
            Box::pin(async move {
                sqlx::query("INSERT INTO effects (message_id, subject, n) VALUES (?, ?, ?)")
                    .bind(id)
                    .bind(subject)
                    .bind(n)
                    .execute(&mut **tx)
                    .await?;
                Ok(())
            })
        })
        .await
}

#[tokio::test]
async fn a_redelivered_message_has_no_second_effect_with_the_sqlite_inbox() -> anyhow::Result<()> {
    // Goal: handle_once runs the handler's write once per message id and group, rolls both
    // back when the handler fails, and lets another group handle the same message.
    let dir = TempDir::new("sqlite_inbox")?;
    let pool = sqlite_pool(&dir).await?;
    let inbox = SqliteInbox::new(pool.clone()).await?;
    let first = message("billing", 1);

    let failed = inbox
        .handle_once(&first, |tx| {
            Box::pin(async move {
                sqlx::query("INSERT INTO effects (message_id, subject, n) VALUES ('x', 'o-1', 0)")
                    .execute(&mut **tx)
                    .await?;
                Err::<(), _>(HandlerError::transient("test", "boom"))
            })
        })
        .await;
    ensure!(failed.is_err());
    ensure!(record_effect_sqlite(&inbox, &first).await? == Handled::Done(()));
    ensure!(record_effect_sqlite(&inbox, &first).await? == Handled::Duplicate);
    let other_group = Message {
        group: "audit".to_owned(),
        ..first.clone()
    };
    ensure!(record_effect_sqlite(&inbox, &other_group).await? == Handled::Done(()));
    let effects: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM effects")
        .fetch_one(&pool)
        .await?;
    ensure!(
        effects == 2,
        "{effects} effects: the failed attempt left nothing, the duplicate nothing"
    );
    Ok(())
}

#[tokio::test]
async fn a_redelivered_message_has_no_second_effect_with_the_postgres_inbox() -> anyhow::Result<()>
{
    // Goal: the PostgreSQL inbox behaves like the SQLite one, including for two concurrent
    // deliveries of one message.
    let Some(db) = trellis_testkit::postgres("pg_inbox").await else {
        return Ok(());
    };
    let pool = PgPool::connect(&db.url).await?;
    sqlx::query("CREATE TABLE effects (message_id UUID NOT NULL)")
        .execute(&pool)
        .await?;
    let inbox = PgInbox::new(pool.clone()).await?;
    let first = message("billing", 1);
    let handle = |inbox: PgInbox, message: Message| async move {
        let id = message.envelope.id;
        inbox
            .handle_once(&message, move |tx| {
                Box::pin(async move {
                    sqlx::query("INSERT INTO effects (message_id) VALUES ($1)")
                        .bind(id)
                        .execute(&mut **tx)
                        .await?;
                    // Hold the transaction open so the concurrent duplicate has to wait.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok(())
                })
            })
            .await
    };
    let (a, b) = tokio::join!(
        handle(inbox.clone(), first.clone()),
        handle(inbox.clone(), first.clone())
    );
    let outcomes = [a?, b?];
    ensure!(outcomes.contains(&Handled::Done(())) && outcomes.contains(&Handled::Duplicate));
    ensure!(handle(inbox.clone(), first.clone()).await? == Handled::Duplicate);
    let effects: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM effects")
        .fetch_one(&pool)
        .await?;
    ensure!(effects == 1);
    pool.close().await;
    Ok(())
}

/// A bus whose publish reaches the real bus, then never returns: the relay "dies" after the
/// publish and before it marks the row, when the test aborts its task.
#[derive(Debug, Clone)]
struct DiesAfterPublish {
    inner: InMemoryBus,
    published: Arc<Notify>,
}

impl Bus for DiesAfterPublish {
    async fn publish(&self, topic: &str, envelope: Envelope) -> Result<(), BusError> {
        self.inner.publish(topic, envelope).await?;
        self.published.notify_one();
        std::future::pending().await
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

/// Consumes everything the group gets until `count` distinct effects exist or time runs out;
/// returns how many deliveries were handled.
async fn consume_with_sqlite_inbox(
    sub: &mut Subscription,
    inbox: &SqliteInbox,
    pool: &SqlitePool,
    count: i64,
) -> anyhow::Result<usize> {
    let mut deliveries = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let effects: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM effects")
            .fetch_one(pool)
            .await?;
        if effects >= count {
            // Drain what is still queued (the duplicate may arrive last).
            for delivery in sub.fetch(100, Duration::from_millis(200)).await? {
                deliveries += 1;
                record_effect_sqlite(inbox, delivery.message()).await?;
                delivery.ack().await?;
            }
            return Ok(deliveries);
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "only {effects} effects"
        );
        for delivery in sub.fetch(100, Duration::from_millis(200)).await? {
            deliveries += 1;
            record_effect_sqlite(inbox, delivery.message()).await?;
            delivery.ack().await?;
        }
    }
}

#[tokio::test]
async fn a_relay_killed_between_publish_and_mark_still_yields_one_effect_per_message()
-> anyhow::Result<()> {
    // Goal: the service writes state and outbox rows in one transaction; the first relay is
    // killed right after its first publish (before marking), a second relay publishes again,
    // and the consumer's inbox turns the duplicate into no second effect, in order.
    let dir = TempDir::new("outbox_kill")?;
    let pool = sqlite_pool(&dir).await?;
    let outbox = SqliteOutbox::new(pool.clone()).await?;
    let inbox = SqliteInbox::new(pool.clone()).await?;
    sqlx::query("CREATE TABLE orders (id TEXT PRIMARY KEY)")
        .execute(&pool)
        .await?;
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO orders (id) VALUES ('o-1')")
        .execute(&mut *tx)
        .await?;
    for n in 1..=5 {
        let envelope = Envelope::new(
            "order.updated",
            "orders",
            "o-1",
            serde_json::json!({ "n": n }),
        )
        .with_sequence(n);
        SqliteOutbox::enqueue(&mut tx, "orders.updated", &envelope).await?;
    }
    tx.commit().await?;

    let bus = InMemoryBus::new();
    let mut sub = bus
        .subscribe("orders.*", "projector", SubscribeOptions::default())
        .await?;
    let dying = DiesAfterPublish {
        inner: bus.clone(),
        published: Arc::new(Notify::new()),
    };
    let relay = {
        let (outbox, dying) = (outbox.clone(), dying.clone());
        tokio::spawn(async move { outbox.relay_once(&dying, 100).await })
    };
    tokio::time::timeout(Duration::from_secs(10), dying.published.notified())
        .await
        .context("the first relay published")?;
    relay.abort();
    ensure!(relay.await.is_err_and(|error| error.is_cancelled()));
    let unsent: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM bus_outbox")
        .fetch_one(&pool)
        .await?;
    ensure!(
        unsent == 5,
        "the killed relay marked nothing ({unsent} left)"
    );

    let report = outbox.relay_once(&bus, 100).await?;
    ensure!(report.published == 5 && report.lag.is_some());
    let deliveries = consume_with_sqlite_inbox(&mut sub, &inbox, &pool, 5).await?;
    ensure!(
        deliveries == 6,
        "{deliveries} deliveries: one duplicate expected"
    );
    let effects: Vec<i64> = sqlx::query_scalar("SELECT n FROM effects ORDER BY rowid")
        .fetch_all(&pool)
        .await?;
    ensure!(effects == vec![1, 2, 3, 4, 5], "effects {effects:?}");
    ensure!(outbox.relay_once(&bus, 100).await?.published == 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_postgres_relays_share_the_outbox_without_reordering_a_subject() -> anyhow::Result<()> {
    // Goal: two relays run concurrently over one PostgreSQL outbox; every row is published and
    // each subject's messages reach the bus in their written order.
    let Some(db) = trellis_testkit::postgres("pg_outbox_relays").await else {
        return Ok(());
    };
    let pool = PgPool::connect(&db.url).await?;
    let outbox = PgOutbox::new(pool.clone()).await?;
    const SUBJECTS: u64 = 8;
    const PER_SUBJECT: u64 = 40;
    for n in 1..=PER_SUBJECT {
        let mut tx = pool.begin().await?;
        for subject in 0..SUBJECTS {
            let envelope = Envelope::new(
                "order.updated",
                "orders",
                format!("o-{subject}"),
                serde_json::json!({ "n": n }),
            )
            .with_sequence(n);
            PgOutbox::enqueue(&mut tx, "orders.updated", &envelope).await?;
        }
        tx.commit().await?;
    }
    let bus = InMemoryBus::new();
    let mut sub = bus
        .subscribe(
            "orders.*",
            "checker",
            SubscribeOptions::default().with_unordered(),
        )
        .await?;
    let shutdown = Arc::new(Notify::new());
    let relays: Vec<_> = (0..2)
        .map(|_| {
            let (outbox, bus, shutdown) = (outbox.clone(), bus.clone(), Arc::clone(&shutdown));
            let pool = pool.clone();
            tokio::spawn(async move {
                // Small rounds so the relays interleave.
                while outbox.relay_once(&bus, 3).await?.published > 0 || {
                    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM bus_outbox")
                        .fetch_one(&pool)
                        .await?;
                    left > 0
                } {}
                drop(shutdown);
                Ok::<(), anyhow::Error>(())
            })
        })
        .collect();
    for relay in relays {
        tokio::time::timeout(Duration::from_secs(30), relay).await???;
    }
    let mut seen: std::collections::HashMap<String, Vec<u64>> = Default::default();
    loop {
        let batch = sub.fetch(500, Duration::from_millis(200)).await?;
        if batch.is_empty() {
            break;
        }
        for delivery in batch {
            seen.entry(delivery.envelope().subject.clone())
                .or_default()
                .push(delivery.envelope().sequence.unwrap_or_default());
            delivery.ack().await?;
        }
    }
    ensure!(seen.len() == SUBJECTS as usize);
    for (subject, sequences) in &seen {
        let expected: Vec<u64> = (1..=PER_SUBJECT).collect();
        ensure!(*sequences == expected, "{subject} arrived as {sequences:?}");
    }
    pool.close().await;
    Ok(())
}
