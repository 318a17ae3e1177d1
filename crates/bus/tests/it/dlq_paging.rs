//! The dead-letter queue at scale: listing pages through every letter, however many, and
//! counting them all for the DLQ gauges.

use std::collections::HashSet;

use anyhow::{Context as _, ensure};
use chrono::Utc;
use trellis_bus::{
    DeadLetter, DeadLetterFilter, DeadLetterReason, DeadLetterState, DeadLetters, Envelope,
};
use uuid::Uuid;

/// More letters than the old NATS listing looked at (10,000).
const LETTERS: usize = 10_050;

fn letter(group: &str, n: usize) -> DeadLetter {
    let now = Utc::now();
    DeadLetter {
        id: Uuid::now_v7(),
        group: group.to_owned(),
        topic: "orders.created".to_owned(),
        envelope: Envelope::new(
            "order.created",
            "test",
            format!("o-{n}"),
            serde_json::json!(n),
        ),
        reason: DeadLetterReason::MaxDeliveries,
        attempts: 5,
        first_failure_at: now,
        last_failure_at: now,
        error_kind: "test".to_owned(),
        // Every tenth letter has a distinct error, for filtered paging.
        error: if n.is_multiple_of(10) {
            format!("tenth {n} failed")
        } else {
            format!("letter {n} failed")
        },
        fingerprint: "test: letter # failed".to_owned(),
        state: DeadLetterState::Dead,
        redrive_count: 0,
    }
}

/// Follows the cursors from the first page to the last; returns every letter.
async fn page_through<D: DeadLetters>(
    dlq: &D,
    filter: &DeadLetterFilter,
) -> anyhow::Result<Vec<DeadLetter>> {
    let mut filter = filter.clone();
    let mut all = Vec::new();
    for _ in 0..1_000 {
        let page = dlq.list_page(&filter).await?;
        ensure!(
            page.dead_letters.len() <= filter.limit(),
            "a page over its limit"
        );
        all.extend(page.dead_letters);
        match page.next_cursor {
            Some(next) => filter.cursor = Some(next),
            None => return Ok(all),
        }
    }
    anyhow::bail!("the cursor never reached the end")
}

/// Pages through `written` with and without filters, and checks nothing is missed, repeated
/// or out of order.
async fn check_pages<D: DeadLetters>(dlq: &D, written: &[DeadLetter]) -> anyhow::Result<()> {
    let everything = DeadLetterFilter {
        group: Some("many".to_owned()),
        ..DeadLetterFilter::default()
    };
    let all = page_through(dlq, &everything).await?;
    ensure!(
        all.len() == LETTERS,
        "{} of {LETTERS} letters listed",
        all.len()
    );
    let ids: Vec<Uuid> = all.iter().map(|letter| letter.id).collect();
    let expected: Vec<Uuid> = written.iter().map(|letter| letter.id).collect();
    ensure!(ids == expected, "letters listed out of order or changed");
    ensure!(ids.iter().collect::<HashSet<_>>().len() == LETTERS);

    let tenths = page_through(
        dlq,
        &DeadLetterFilter {
            error_contains: Some("tenth".to_owned()),
            topic: Some("orders.*".to_owned()),
            limit: Some(100),
            ..everything.clone()
        },
    )
    .await?;
    ensure!(
        tenths.len() == LETTERS.div_ceil(10),
        "{} tenths",
        tenths.len()
    );
    ensure!(
        tenths
            .iter()
            .all(|letter| letter.error.starts_with("tenth"))
    );
    let other_topic = dlq
        .list_page(&DeadLetterFilter {
            topic: Some("payments.*".to_owned()),
            ..everything.clone()
        })
        .await?;
    ensure!(other_topic.dead_letters.is_empty());

    let last = written.last().context("letters")?;
    ensure!(
        dlq.get(last.id).await?.id == last.id,
        "the last letter is found by id"
    );

    // The stats the DLQ gauges export count every letter, not a page of them.
    let stats = dlq.stats().await?;
    ensure!(
        stats.len() == 1 && stats[0].group == "many" && stats[0].dead == LETTERS as u64,
        "stats {stats:?}"
    );
    let oldest = written
        .iter()
        .map(|letter| letter.last_failure_at.timestamp_millis())
        .min();
    ensure!(
        stats[0]
            .oldest_dead_lettered_at
            .map(|at| at.timestamp_millis())
            == oldest,
        "oldest {:?}, expected {oldest:?}",
        stats[0].oldest_dead_lettered_at
    );
    Ok(())
}

mod sqlite {
    use trellis_bus::DeadLetter;
    use trellis_bus::sqlite::SqliteBus;

    use super::{LETTERS, check_pages, letter};
    use crate::helpers::TempDir;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dlq_listing_pages_past_ten_thousand_letters() -> anyhow::Result<()> {
        // Goal: with 10,050 dead letters in the SQLite DLQ, following the cursor lists each
        // once and in order, filtered listings page the same way, and the last is found.
        let dir = TempDir::new("dlq_pages_sqlite")?;
        let bus = SqliteBus::open_path(dir.file("bus.db")).await?;
        let letters: Vec<DeadLetter> = (0..LETTERS).map(|n| letter("many", n)).collect();
        let mut tx = bus.pool().begin().await?;
        for letter in &letters {
            sqlx::query(
                "INSERT INTO bus_dead_letters (id, grp, topic, envelope, reason, attempts, \
                 first_failure_ms, last_failure_ms, error_kind, error, fingerprint, state, \
                 redrive_count) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'dead', 0)",
            )
            .bind(letter.id.to_string())
            .bind(&letter.group)
            .bind(&letter.topic)
            .bind(serde_json::to_string(&letter.envelope)?)
            .bind(letter.reason.as_str())
            .bind(i64::from(letter.attempts))
            .bind(letter.first_failure_at.timestamp_millis())
            .bind(letter.last_failure_at.timestamp_millis())
            .bind(&letter.error_kind)
            .bind(&letter.error)
            .bind(&letter.fingerprint)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        check_pages(&bus, &letters).await
    }
}

mod nats {
    use trellis_bus::DeadLetter;
    use trellis_bus::nats::{NatsBus, NatsBusConfig};

    use super::{LETTERS, check_pages, letter};

    /// Writes `LETTERS` dead letters straight into the DLQ stream (as consumers would).
    async fn fill(nats_url: &str, prefix: &str, group: &str) -> anyhow::Result<Vec<DeadLetter>> {
        let client = async_nats::connect(nats_url).await?;
        let context = async_nats::jetstream::new(client);
        let letters: Vec<DeadLetter> = (0..LETTERS).map(|n| letter(group, n)).collect();
        let subject = format!("{prefix}.dlq.letter.{group}");
        for chunk in letters.chunks(500) {
            let mut acks = Vec::with_capacity(chunk.len());
            for letter in chunk {
                let payload = serde_json::to_vec(letter)?;
                acks.push(context.publish(subject.clone(), payload.into()).await?);
            }
            for ack in acks {
                ack.await?;
            }
        }
        Ok(letters)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dlq_listing_pages_past_ten_thousand_letters() -> anyhow::Result<()> {
        // Goal: with 10,050 dead letters in the NATS DLQ (the old listing looked at 10,000),
        // following the cursor lists each once and in order, filtered listings page the same
        // way, and the last letter is found by id.
        let Some(nats) = trellis_testkit::nats("dlq_pages_nats").await else {
            return Ok(());
        };
        let bus = NatsBus::connect(NatsBusConfig::new(&nats.url, &nats.prefix)).await?;
        let letters = fill(&nats.url, &nats.prefix, "many").await?;
        check_pages(&bus, &letters).await
    }
}
