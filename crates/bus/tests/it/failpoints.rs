//! Crashes at every durable boundary of the bus (feature `failpoints`): after a publish's
//! commit, before a delivery's ack, after the inbox committed a handler's effect, and in the
//! outbox relay after publishing and before deleting the rows.
//!
//! A crash is the failpoint failing (an error: the caller survives and gives up) or panicking
//! (the task dies), then dropping every component (bus, subscription, pools) and opening them
//! again from what survives: the SQLite files, the PostgreSQL database, the NATS stream. After
//! each crash a consumer with an inbox drains its group, and the test checks that every
//! message had exactly one effect: redelivery happens, the inbox absorbs it.
//!
//! fail's registry is global to the process, so every case runs in sequence inside one test
//! holding a `FailScenario`, and each point is scoped to a topic or group no other test uses
//! (`return(SCOPE)`), so the tests running beside this one are never hit.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use fail::FailScenario;
use sqlx::{PgPool, SqlitePool};
use trellis_bus::failpoints::{
    DELIVERY_BEFORE_ACK, INBOX_AFTER_COMMIT, OUTBOX_AFTER_PUBLISH, PUBLISH_AFTER_COMMIT,
};
use trellis_bus::inbox::{Handled, PgInbox, SqliteInbox};
use trellis_bus::nats::{NatsBus, NatsBusConfig};
use trellis_bus::outbox::{PgOutbox, SqliteOutbox};
use trellis_bus::sqlite::SqliteBus;
use trellis_bus::{Bus, Envelope, HandlerError, Message, RetryPolicy, SubscribeOptions};
use uuid::Uuid;

use crate::helpers::TempDir;

/// Short, so a message left unacked by a crash comes back within the test.
const ACK_WAIT: Duration = Duration::from_millis(300);

#[derive(Debug, Clone, Copy)]
enum Mode {
    /// The failpoint returns an error.
    Error,
    /// The failpoint panics.
    Panic,
}

impl Mode {
    fn action(self, scope: &str) -> String {
        match self {
            Mode::Error => format!("return({scope})"),
            Mode::Panic => format!("return({scope}:panic)"),
        }
    }
}

/// Arms failpoint `name` for `scope` until dropped, so a failing case never leaves it armed.
struct Armed(&'static str);

impl Armed {
    fn new(name: &'static str, mode: Mode, scope: &str) -> anyhow::Result<Self> {
        fail::cfg(name, &mode.action(scope)).map_err(anyhow::Error::msg)?;
        Ok(Self(name))
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        fail::remove(self.0);
    }
}

/// Runs `work` as its own task and checks that the armed failpoint crashed it as `mode` says.
async fn crashes<T, E>(
    mode: Mode,
    work: impl Future<Output = Result<T, E>> + Send + 'static,
) -> anyhow::Result<()>
where
    T: Send + 'static,
    E: Display + Send + 'static,
{
    match (mode, tokio::spawn(work).await) {
        (_, Ok(Ok(_))) => bail!("the failpoint did not fire"),
        (Mode::Error, Ok(Err(error))) => {
            ensure!(
                error.to_string().contains("failpoint"),
                "another error: {error}"
            );
            Ok(())
        }
        (Mode::Panic, Err(join)) if join.is_panic() => Ok(()),
        (mode, Ok(Err(error))) => bail!("{mode:?}: failed with {error} instead"),
        (mode, Err(join)) => bail!("{mode:?}: the task ended with {join}"),
    }
}

fn options() -> anyhow::Result<SubscribeOptions> {
    Ok(SubscribeOptions::default().with_ack_wait(ACK_WAIT)?)
}

fn envelope(subject: &str, n: u64) -> Envelope {
    Envelope::new(
        "fp.event",
        "failpoints",
        subject,
        serde_json::json!({ "n": n }),
    )
}

/// A consumer's service database: the inbox and the effects table.
async fn service_pool(dir: &TempDir) -> anyhow::Result<SqlitePool> {
    crate::helpers::service_db(
        dir,
        Duration::from_secs(5),
        "CREATE TABLE IF NOT EXISTS effects (message_id TEXT NOT NULL)",
    )
    .await
}

/// The handler's effect: one row per run, so a second run of one message shows.
async fn handle(inbox: &SqliteInbox, message: &Message) -> Result<Handled<()>, HandlerError> {
    let id = message.envelope.id.to_string();
    inbox
        .handle_once(message, move |tx| {
            Box::pin(async move {
                sqlx::query("INSERT INTO effects (message_id) VALUES (?)")
                    .bind(id)
                    .execute(&mut **tx)
                    .await?;
                Ok(())
            })
        })
        .await
}

/// The message ids with an effect, one entry per effect, sorted.
async fn effects(pool: &SqlitePool) -> anyhow::Result<Vec<Uuid>> {
    let ids: Vec<String> = sqlx::query_scalar("SELECT message_id FROM effects ORDER BY message_id")
        .fetch_all(pool)
        .await?;
    Ok(ids.iter().map(|id| id.parse()).collect::<Result<_, _>>()?)
}

fn sorted(mut ids: Vec<Uuid>) -> Vec<Uuid> {
    ids.sort_unstable();
    ids
}

/// Handles and acks everything group `group` has, until nothing more arrives within a few
/// ack waits; returns what the inbox said for each delivery.
async fn drain<B: Bus>(
    bus: &B,
    pattern: &str,
    group: &str,
    inbox: &SqliteInbox,
) -> anyhow::Result<Vec<Handled<()>>> {
    let mut subscription = bus.subscribe(pattern, group, options()?).await?;
    let mut outcomes = Vec::new();
    loop {
        let batch = subscription.fetch(100, ACK_WAIT * 4).await?;
        if batch.is_empty() {
            return Ok(outcomes);
        }
        for delivery in batch {
            outcomes.push(handle(inbox, delivery.message()).await?);
            delivery.ack().await?;
        }
    }
}

fn count(outcomes: &[Handled<()>]) -> (usize, usize) {
    let done = outcomes.iter().filter(|o| **o == Handled::Done(())).count();
    (done, outcomes.len() - done)
}

/// Whether `outcomes` hold `effects` first deliveries and at least `copies` deduplicated ones.
/// At least, not exactly: a delivery the drain does not settle within the 300 ms ack wait (a
/// slow fsync on a loaded machine) comes back once more as one more duplicate, which is the
/// bus keeping its promise. The effects themselves are checked exactly by each test.
fn copies_with_one_effect_each(outcomes: &[Handled<()>], effects: usize, copies: usize) -> bool {
    let (done, again) = count(outcomes);
    done == effects && again >= copies
}

/// Opens the bus again from what survives a crash.
trait Reopen: Send + Sync {
    type Bus: Bus + Clone + 'static;
    fn open(&self) -> impl Future<Output = anyhow::Result<Self::Bus>> + Send;
}

struct SqliteFile(std::path::PathBuf);

impl Reopen for SqliteFile {
    type Bus = SqliteBus;
    async fn open(&self) -> anyhow::Result<SqliteBus> {
        Ok(SqliteBus::open_path(&self.0).await?)
    }
}

struct NatsStream(NatsBusConfig);

impl Reopen for NatsStream {
    type Bus = NatsBus;
    async fn open(&self) -> anyhow::Result<NatsBus> {
        Ok(NatsBus::connect(self.0.clone()).await?)
    }
}

/// A publisher that crashes after the bus stored its message publishes it again (it never
/// heard back): two copies, one effect.
async fn publish_after_commit<R: Reopen>(
    mode: Mode,
    reopen: &R,
    dir: &TempDir,
) -> anyhow::Result<()> {
    let (topic, group) = ("fpa.publish", "fp-publish");
    let bus = reopen.open().await?;
    drop(bus.subscribe(topic, group, options()?).await?);
    let sent = envelope("s-1", 1);
    {
        let _armed = Armed::new(PUBLISH_AFTER_COMMIT, mode, topic)?;
        let (bus, sent) = (bus.clone(), sent.clone());
        crashes(mode, async move { bus.publish(topic, sent).await }).await?;
    }
    drop(bus);

    let bus = reopen.open().await?;
    bus.publish(topic, sent.clone()).await?;
    let pool = service_pool(dir).await?;
    let inbox = SqliteInbox::new(pool.clone()).await?;
    let outcomes = drain(&bus, topic, group, &inbox).await?;
    ensure!(
        copies_with_one_effect_each(&outcomes, 1, 1),
        "two copies, one effect: {outcomes:?}"
    );
    ensure!(effects(&pool).await? == vec![sent.id]);
    Ok(())
}

/// A consumer that crashes after its effect and before the ack gets the message again; the
/// inbox skips it.
async fn delivery_before_ack<R: Reopen>(
    mode: Mode,
    reopen: &R,
    dir: &TempDir,
) -> anyhow::Result<()> {
    let (topic, group) = ("fpa.ack", "fp-ack");
    let bus = reopen.open().await?;
    let mut subscription = bus.subscribe(topic, group, options()?).await?;
    let sent = envelope("s-1", 1);
    bus.publish(topic, sent.clone()).await?;
    let pool = service_pool(dir).await?;
    let inbox = SqliteInbox::new(pool.clone()).await?;
    let delivery = subscription
        .fetch(1, Duration::from_secs(5))
        .await?
        .pop()
        .context("the message is delivered")?;
    ensure!(handle(&inbox, delivery.message()).await? == Handled::Done(()));
    {
        let _armed = Armed::new(DELIVERY_BEFORE_ACK, mode, group)?;
        crashes(mode, async move { delivery.ack().await }).await?;
    }
    drop((subscription, inbox, pool, bus));

    let bus = reopen.open().await?;
    let pool = service_pool(dir).await?;
    let inbox = SqliteInbox::new(pool.clone()).await?;
    let outcomes = drain(&bus, topic, group, &inbox).await?;
    ensure!(
        outcomes == [Handled::Duplicate],
        "redelivered once, skipped: {outcomes:?}"
    );
    ensure!(effects(&pool).await? == vec![sent.id]);
    Ok(())
}

/// The inbox committed the effect and the consumer died before it could ack: the
/// redelivery is a duplicate.
async fn inbox_after_commit<R: Reopen>(
    mode: Mode,
    reopen: &R,
    dir: &TempDir,
) -> anyhow::Result<()> {
    let (topic, group) = ("fpa.inbox", "fp-inbox");
    let bus = reopen.open().await?;
    let mut subscription = bus.subscribe(topic, group, options()?).await?;
    let sent = envelope("s-1", 1);
    bus.publish(topic, sent.clone()).await?;
    let pool = service_pool(dir).await?;
    let inbox = SqliteInbox::new(pool.clone()).await?;
    let delivery = subscription
        .fetch(1, Duration::from_secs(5))
        .await?
        .pop()
        .context("the message is delivered")?;
    {
        let _armed = Armed::new(INBOX_AFTER_COMMIT, mode, group)?;
        let (inbox, message) = (inbox.clone(), delivery.message().clone());
        crashes(mode, async move { handle(&inbox, &message).await }).await?;
    }
    drop((delivery, subscription, inbox, pool, bus));

    let bus = reopen.open().await?;
    let pool = service_pool(dir).await?;
    let inbox = SqliteInbox::new(pool.clone()).await?;
    let outcomes = drain(&bus, topic, group, &inbox).await?;
    ensure!(
        outcomes == [Handled::Duplicate],
        "redelivered once, skipped: {outcomes:?}"
    );
    ensure!(effects(&pool).await? == vec![sent.id]);
    Ok(())
}

/// The same through `Subscription::run`, the loop services use: the failing inbox is a
/// transient handler error, the message is retried and found already handled.
async fn inbox_after_commit_in_the_consumer_loop<R: Reopen>(
    reopen: &R,
    dir: &TempDir,
) -> anyhow::Result<()> {
    let (topic, group) = ("fpa.loop", "fp-loop");
    let bus = reopen.open().await?;
    let retry = RetryPolicy::new(10)?.with_backoff(
        Duration::from_millis(10),
        Duration::from_millis(50),
        2.0,
    )?;
    let subscription = bus
        .subscribe(topic, group, options()?.with_retry(retry))
        .await?;
    let sent: Vec<Envelope> = (1..=3).map(|n| envelope(&format!("s-{n}"), n)).collect();
    for envelope in &sent {
        bus.publish(topic, envelope.clone()).await?;
    }
    let pool = service_pool(dir).await?;
    let inbox = SqliteInbox::new(pool.clone()).await?;
    let duplicates = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    {
        // Fires once per message: a redelivery is a duplicate and returns before the point.
        let _armed = Armed::new(INBOX_AFTER_COMMIT, Mode::Error, group)?;
        let (inbox, seen) = (inbox.clone(), duplicates.clone());
        let handler = move |message: std::sync::Arc<Message>| {
            let (inbox, seen) = (inbox.clone(), seen.clone());
            async move {
                if handle(&inbox, &message).await? == Handled::Duplicate {
                    seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                Ok(())
            }
        };
        let watched = duplicates.clone();
        let all_retried = async move {
            while watched.load(std::sync::atomic::Ordering::SeqCst) < 3 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(
            Duration::from_secs(30),
            subscription.run(handler, all_retried),
        )
        .await
        .context("every message was retried within 30 s")??;
    }
    ensure!(effects(&pool).await? == sorted(sent.iter().map(|e| e.id).collect()));
    Ok(())
}

/// A relay that dies after publishing and before deleting its rows publishes them again
/// after the restart: every row reaches the consumer, and each has one effect.
async fn sqlite_outbox_after_publish<R: Reopen>(
    mode: Mode,
    reopen: &R,
    dir: &TempDir,
) -> anyhow::Result<()> {
    let (topic, group) = ("fpa.outbox", "fp-outbox");
    let bus = reopen.open().await?;
    drop(bus.subscribe(topic, group, options()?).await?);
    let pool = service_pool(dir).await?;
    let outbox = SqliteOutbox::new(pool.clone()).await?;
    let sent = [envelope("s-1", 1), envelope("s-1", 2), envelope("s-2", 3)];
    let mut tx = pool.begin().await?;
    for envelope in &sent {
        SqliteOutbox::enqueue(&mut tx, topic, envelope).await?;
    }
    tx.commit().await?;
    {
        let _armed = Armed::new(OUTBOX_AFTER_PUBLISH, mode, topic)?;
        let (outbox, bus) = (outbox.clone(), bus.clone());
        crashes(mode, async move { outbox.relay_once(&bus, 100).await }).await?;
    }
    drop((outbox, pool, bus));

    let bus = reopen.open().await?;
    let pool = service_pool(dir).await?;
    let outbox = SqliteOutbox::new(pool.clone()).await?;
    ensure!(
        outbox.relay_once(&bus, 100).await?.published == 3,
        "relayed again"
    );
    ensure!(
        outbox.relay_once(&bus, 100).await?.published == 0,
        "and only once"
    );
    let inbox = SqliteInbox::new(pool.clone()).await?;
    let outcomes = drain(&bus, topic, group, &inbox).await?;
    ensure!(
        copies_with_one_effect_each(&outcomes, 3, 3),
        "each row twice, one effect each: {outcomes:?}"
    );
    ensure!(effects(&pool).await? == sorted(sent.iter().map(|e| e.id).collect()));
    Ok(())
}

/// The PostgreSQL relay: its transaction rolls back with the crash, so the rows stay.
async fn pg_outbox_after_publish(mode: Mode, dir: &TempDir) -> anyhow::Result<()> {
    let Some(db) = trellis_testkit::postgres("fp_pg_outbox").await else {
        return Ok(());
    };
    let (topic, group) = ("fpa.pgoutbox", "fp-pgoutbox");
    let reopen = SqliteFile(dir.file("bus.db"));
    let bus = reopen.open().await?;
    drop(bus.subscribe(topic, group, options()?).await?);
    let pg = PgPool::connect(&db.url).await?;
    let outbox = PgOutbox::new(pg.clone()).await?;
    let sent = [envelope("s-1", 1), envelope("s-1", 2), envelope("s-2", 3)];
    let mut tx = pg.begin().await?;
    for envelope in &sent {
        PgOutbox::enqueue(&mut tx, topic, envelope).await?;
    }
    tx.commit().await?;
    {
        let _armed = Armed::new(OUTBOX_AFTER_PUBLISH, mode, topic)?;
        let (outbox, bus) = (outbox.clone(), bus.clone());
        crashes(mode, async move { outbox.relay_once(&bus, 100).await }).await?;
    }
    drop((outbox, bus));
    pg.close().await;

    let bus = reopen.open().await?;
    let pg = PgPool::connect(&db.url).await?;
    let outbox = PgOutbox::new(pg.clone()).await?;
    ensure!(
        outbox.relay_once(&bus, 100).await?.published == 3,
        "relayed again"
    );
    ensure!(
        outbox.relay_once(&bus, 100).await?.published == 0,
        "and only once"
    );
    pg.close().await;
    let pool = service_pool(dir).await?;
    let inbox = SqliteInbox::new(pool.clone()).await?;
    let outcomes = drain(&bus, topic, group, &inbox).await?;
    ensure!(
        copies_with_one_effect_each(&outcomes, 3, 3),
        "each row twice, one effect each: {outcomes:?}"
    );
    ensure!(effects(&pool).await? == sorted(sent.iter().map(|e| e.id).collect()));
    Ok(())
}

/// The PostgreSQL inbox committed the effect; the redelivery is a duplicate.
async fn pg_inbox_after_commit(mode: Mode, dir: &TempDir) -> anyhow::Result<()> {
    let Some(db) = trellis_testkit::postgres("fp_pg_inbox").await else {
        return Ok(());
    };
    let (topic, group) = ("fpa.pginbox", "fp-pginbox");
    let reopen = SqliteFile(dir.file("bus.db"));
    let bus = reopen.open().await?;
    let mut subscription = bus.subscribe(topic, group, options()?).await?;
    let sent = envelope("s-1", 1);
    bus.publish(topic, sent.clone()).await?;
    let pg = PgPool::connect(&db.url).await?;
    sqlx::query("CREATE TABLE effects (message_id UUID NOT NULL)")
        .execute(&pg)
        .await?;
    let handle = |inbox: PgInbox, message: Message| async move {
        let id = message.envelope.id;
        inbox
            .handle_once(&message, move |tx| {
                Box::pin(async move {
                    sqlx::query("INSERT INTO effects (message_id) VALUES ($1)")
                        .bind(id)
                        .execute(&mut **tx)
                        .await?;
                    Ok(())
                })
            })
            .await
    };
    let inbox = PgInbox::new(pg.clone()).await?;
    let delivery = subscription
        .fetch(1, Duration::from_secs(5))
        .await?
        .pop()
        .context("the message is delivered")?;
    {
        let _armed = Armed::new(INBOX_AFTER_COMMIT, mode, group)?;
        let message = (**delivery.message()).clone();
        crashes(mode, handle(inbox.clone(), message)).await?;
    }
    drop((delivery, subscription, inbox, bus));
    pg.close().await;

    let bus = reopen.open().await?;
    let pg = PgPool::connect(&db.url).await?;
    let inbox = PgInbox::new(pg.clone()).await?;
    let mut subscription = bus.subscribe(topic, group, options()?).await?;
    let mut outcomes = Vec::new();
    loop {
        let batch = subscription.fetch(100, ACK_WAIT * 4).await?;
        if batch.is_empty() {
            break;
        }
        for delivery in batch {
            outcomes.push(handle(inbox.clone(), (**delivery.message()).clone()).await?);
            delivery.ack().await?;
        }
    }
    ensure!(
        outcomes == [Handled::Duplicate],
        "redelivered once, skipped: {outcomes:?}"
    );
    let ids: Vec<Uuid> = sqlx::query_scalar("SELECT message_id FROM effects")
        .fetch_all(&pg)
        .await?;
    ensure!(ids == vec![sent.id]);
    pg.close().await;
    Ok(())
}

/// Every case with both crash modes, on the SQLite log, then the boundaries that NATS and
/// PostgreSQL have of their own (skipped outside CI when their servers do not answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_any_durable_boundary_loses_no_message_and_repeats_no_effect()
-> anyhow::Result<()> {
    let scenario = FailScenario::setup();
    for mode in [Mode::Error, Mode::Panic] {
        // One directory (bus file, service database) per case.
        let lite = |name: &str| -> anyhow::Result<(SqliteFile, TempDir)> {
            let dir = TempDir::new(name)?;
            Ok((SqliteFile(dir.file("bus.db")), dir))
        };
        let (bus, dir) = lite("fp_publish")?;
        publish_after_commit(mode, &bus, &dir)
            .await
            .with_context(|| format!("SQLite, publish after commit, {mode:?}"))?;
        let (bus, dir) = lite("fp_ack")?;
        delivery_before_ack(mode, &bus, &dir)
            .await
            .with_context(|| format!("SQLite, delivery before ack, {mode:?}"))?;
        let (bus, dir) = lite("fp_inbox")?;
        inbox_after_commit(mode, &bus, &dir)
            .await
            .with_context(|| format!("SQLite, inbox after commit, {mode:?}"))?;
        let (bus, dir) = lite("fp_outbox")?;
        sqlite_outbox_after_publish(mode, &bus, &dir)
            .await
            .with_context(|| format!("SQLite, outbox after publish, {mode:?}"))?;
        pg_outbox_after_publish(mode, &TempDir::new("fp_pg_outbox")?)
            .await
            .with_context(|| format!("PostgreSQL, outbox after publish, {mode:?}"))?;
        pg_inbox_after_commit(mode, &TempDir::new("fp_pg_inbox")?)
            .await
            .with_context(|| format!("PostgreSQL, inbox after commit, {mode:?}"))?;
        if let Some(nats) = trellis_testkit::nats("fp_nats").await {
            let stream = NatsStream(NatsBusConfig::new(&nats.url, &nats.prefix));
            publish_after_commit(mode, &stream, &TempDir::new("fp_nats_publish")?)
                .await
                .with_context(|| format!("NATS, publish after commit, {mode:?}"))?;
            delivery_before_ack(mode, &stream, &TempDir::new("fp_nats_ack")?)
                .await
                .with_context(|| format!("NATS, delivery before ack, {mode:?}"))?;
        }
    }
    let dir = TempDir::new("fp_loop")?;
    inbox_after_commit_in_the_consumer_loop(&SqliteFile(dir.file("bus.db")), &dir)
        .await
        .context("SQLite, inbox after commit, Subscription::run")?;
    scenario.teardown();
    Ok(())
}
