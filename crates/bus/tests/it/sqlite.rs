//! The conformance suite on the SQLite durable log, and its process-level durability.

use trellis_bus::sqlite::SqliteBus;

use crate::helpers::TempDir;

async fn setup(test: &str) -> Option<(SqliteBus, String, TempDir)> {
    let dir = TempDir::new(test).expect("temp dir");
    let bus = SqliteBus::open_path(dir.file("bus.db"))
        .await
        .expect("open the log");
    Some((bus, "lite".to_owned(), dir))
}

crate::conformance_tests!(setup, #[tokio::test(flavor = "multi_thread", worker_threads = 2)], 10_000);

mod processes {
    use std::collections::HashSet;
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    use std::time::Duration;

    use anyhow::{Context as _, ensure};
    use trellis_bus::sqlite::SqliteBus;
    use trellis_bus::{Bus, Envelope, SubscribeOptions};
    use uuid::Uuid;

    use crate::helpers::TempDir;

    const CHILD_DB: &str = "TRELLIS_BUS_TEST_CHILD_DB";
    const MESSAGES: usize = 300;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_killed_publisher_process_loses_nothing_it_acknowledged_and_processes_share_the_file()
    -> anyhow::Result<()> {
        // Goal: a child process publishes into the shared file while this process consumes
        // from it; after the child is killed with SIGKILL, every message the child saw
        // acknowledged is delivered here. In child mode this test is the publisher.
        if let Ok(path) = std::env::var(CHILD_DB) {
            return publish_until_killed(&path).await;
        }
        let dir = TempDir::new("killed_publisher")?;
        let path = dir.file("shared.db");
        let bus = SqliteBus::open_path(&path).await?;
        let mut sub = bus
            .subscribe("shared.>", "reader", SubscribeOptions::default())
            .await?;
        let mut child = Command::new(std::env::current_exe()?)
            .args([
                "--exact",
                "sqlite::processes::a_killed_publisher_process_loses_nothing_it_acknowledged_and_processes_share_the_file",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DB, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().context("child stdout")?;
        let reader = std::thread::spawn(move || {
            let mut acked = HashSet::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // libtest may print its own text before ours on the first line.
                if let Some(at) = line.find("acked ")
                    && let Ok(id) = Uuid::parse_str(line[at + 6..].trim())
                {
                    acked.insert(id);
                }
                if acked.len() >= MESSAGES {
                    break;
                }
            }
            acked
        });
        let mut received = HashSet::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while received.len() < MESSAGES && tokio::time::Instant::now() < deadline {
            for delivery in sub.fetch(100, Duration::from_millis(500)).await? {
                received.insert(delivery.envelope().id);
                delivery.ack().await?;
            }
        }
        let acked = tokio::task::spawn_blocking(move || reader.join())
            .await?
            .map_err(|_| anyhow::anyhow!("reader thread panicked"))?;
        // The child now idles holding the file open; kill it hard.
        child.kill()?;
        child.wait()?;
        ensure!(
            acked.len() == MESSAGES,
            "the child acknowledged {}",
            acked.len()
        );
        ensure!(
            acked.is_subset(&received),
            "{} acknowledged messages missing",
            acked.difference(&received).count()
        );
        // Reopening after the kill sees the same log: nothing is pending for the group.
        drop(sub);
        drop(bus);
        let reopened = SqliteBus::open_path(&path).await?;
        let mut again = reopened
            .subscribe("shared.>", "reader", SubscribeOptions::default())
            .await?;
        ensure!(
            again
                .fetch(10, Duration::from_millis(300))
                .await?
                .is_empty()
        );
        let mut late = reopened
            .subscribe("shared.>", "late-joiner", SubscribeOptions::default())
            .await?;
        let mut replayed = 0;
        loop {
            let batch = late.fetch(500, Duration::from_millis(300)).await?;
            if batch.is_empty() {
                break;
            }
            replayed += batch.len();
            for delivery in batch {
                delivery.ack().await?;
            }
        }
        ensure!(
            replayed == MESSAGES,
            "a new group replays the log: {replayed}"
        );
        Ok(())
    }

    async fn publish_until_killed(path: &str) -> anyhow::Result<()> {
        let bus = SqliteBus::open_path(path).await?;
        let mut stdout = std::io::stdout();
        for n in 0..MESSAGES {
            let envelope = Envelope::new(
                "test.shared",
                "child",
                format!("c{}", n % 7),
                serde_json::json!({ "n": n }),
            );
            let id = envelope.id;
            bus.publish("shared.events", envelope).await?;
            writeln!(stdout, "acked {id}")?;
            stdout.flush()?;
        }
        // Wait to be killed (bounded, in case the parent died).
        tokio::time::sleep(Duration::from_secs(60)).await;
        Ok(())
    }
}

mod retention {
    use std::time::Duration;

    use anyhow::ensure;
    use trellis_bus::sqlite::{SqliteBus, SqliteBusConfig};
    use trellis_bus::{Bus, Envelope, SubscribeOptions};

    use crate::helpers::TempDir;

    #[tokio::test]
    async fn pruning_removes_only_messages_every_group_has_finished_with() -> anyhow::Result<()> {
        // Goal: with zero retention, a prune removes handled messages but keeps one a group
        // has not acknowledged yet, and a group created afterwards sees only what remains.
        let dir = TempDir::new("prune")?;
        let config = SqliteBusConfig::from_path(dir.file("bus.db")).with_retention(Duration::ZERO);
        let bus = SqliteBus::open(config).await?;
        let mut sub = bus
            .subscribe("p.*", "done", SubscribeOptions::default())
            .await?;
        for n in 0..3 {
            bus.publish(
                "p.x",
                Envelope::new("t", "s", format!("s{n}"), serde_json::json!(n)),
            )
            .await?;
        }
        for delivery in sub.fetch(10, Duration::from_secs(2)).await? {
            delivery.ack().await?;
        }
        bus.publish(
            "p.x",
            Envelope::new("t", "s", "late", serde_json::json!("late")),
        )
        .await?;
        let held = sub.fetch(10, Duration::from_secs(2)).await?;
        ensure!(held.len() == 1);
        tokio::time::sleep(Duration::from_millis(5)).await;
        let removed = bus.prune().await?;
        ensure!(removed == 3, "pruned {removed}");
        drop(held);
        let mut newcomer = bus
            .subscribe("p.*", "newcomer", SubscribeOptions::default())
            .await?;
        let seen = newcomer.fetch(10, Duration::from_millis(300)).await?;
        ensure!(seen.len() == 1 && seen[0].envelope().subject == "late");
        Ok(())
    }
}
