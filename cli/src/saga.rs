//! `trellis saga`: list and inspect sagas in a saga log, and act on them as an operator.
//!
//! Actions (retry, cancel, skip) write a transition to the log; the engines running the
//! saga's definition pick it up with their recovery loop. They fail while a live engine holds
//! the saga's lease.
//!
//! `trellis saga choreography show CORRELATION_ID --db URL` shows a choreographed saga: its
//! timeline rebuilt from the choreography log in the service's own database (`--db` names that
//! database, where its bus inbox lives).

use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use trellis_saga::{
    AnyChoreographyLog, AnySagaStore, Inspector, SagaFilter, SagaId, SagaStatus, SagaStore,
    SagaSummary,
};
use uuid::Uuid;

/// The saga log and the action.
#[derive(Debug, Args)]
pub(crate) struct SagaArgs {
    /// The saga log: `sqlite://PATH` or `postgres://USER@HOST/DB` (for `choreography`: the
    /// service's database holding the choreography log). Required.
    #[arg(long, env = "TRELLIS_SAGA_DB", global = true)]
    db: Option<String>,
    /// Who the log names as the operator of retry, cancel and skip (default `cli:$USER`).
    #[arg(long)]
    operator: Option<String>,
    #[command(subcommand)]
    command: SagaCommand,
}

#[derive(Debug, Subcommand)]
enum SagaCommand {
    /// Lists sagas, oldest first.
    List {
        /// Only these statuses (repeat or comma-separate: running, compensating, completed,
        /// failed, stuck).
        #[arg(long, value_delimiter = ',')]
        status: Vec<String>,
        /// Only this definition.
        #[arg(long)]
        definition: Option<String>,
        /// Only sagas started at least this many seconds ago.
        #[arg(long)]
        older_than_secs: Option<u64>,
        /// Only sagas started at most this many seconds ago.
        #[arg(long)]
        younger_than_secs: Option<u64>,
        /// At most this many.
        #[arg(long)]
        limit: Option<usize>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Shows one saga's timeline (steps, attempts, timings, errors, compensation) as JSON.
    Show {
        /// The saga's id.
        id: Uuid,
    },
    /// Gives a stuck (or failing) step or compensation a fresh retry budget.
    Retry {
        /// The saga's id.
        id: Uuid,
    },
    /// Cancels a running saga: its completed steps (and the one in flight) compensate now.
    Cancel {
        /// The saga's id.
        id: Uuid,
        /// Why, for the log.
        #[arg(long, default_value = "cancelled from the CLI")]
        reason: String,
    },
    /// Skips the saga's current (stuck, failing or interrupted) step; recorded in the log.
    Skip {
        /// The saga's id.
        id: Uuid,
        /// The step to skip (must be the current one).
        step: String,
    },
    /// Deletes completed and failed sagas whose last change is older than N days (never
    /// stuck ones).
    Purge {
        /// The age in days.
        #[arg(long)]
        older_than_days: u64,
    },
    /// Choreographed sagas, from the choreography log in the service's database.
    Choreography {
        #[command(subcommand)]
        command: ChoreographyCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ChoreographyCommand {
    /// Shows one flow's timeline (steps, outcome, compensation) as JSON.
    Show {
        /// The flow's correlation id.
        correlation_id: Uuid,
    },
}

impl SagaArgs {
    pub(crate) async fn run(self) -> anyhow::Result<()> {
        let operator = self.operator.clone().unwrap_or_else(|| {
            format!(
                "cli:{}",
                std::env::var("USER").unwrap_or_else(|_| "unknown".to_owned())
            )
        });
        let db = self
            .db
            .context("--db (or TRELLIS_SAGA_DB) is required: sqlite://PATH or postgres://...")?;
        if let SagaCommand::Choreography { command } = self.command {
            return choreography(&db, command).await;
        }
        refuse_missing_sqlite_file(&db, "no saga log")?;
        let store = AnySagaStore::open(&db)
            .await
            .with_context(|| format!("saga log {}", redacted(&db)))?;
        run(Inspector::new(store).with_operator(operator), self.command).await
    }
}

/// An inspecting command must not create an empty SQLite file where the operator mistyped a
/// path: it fails with `{what} at PATH` instead.
fn refuse_missing_sqlite_file(db: &str, what: &str) -> anyhow::Result<()> {
    if let Some(rest) = db.strip_prefix("sqlite://") {
        let path = rest.split('?').next().unwrap_or(rest);
        if !std::path::Path::new(path).exists() {
            bail!("{what} at {path}");
        }
    }
    Ok(())
}

/// The URL for a message: a PostgreSQL URL (which may hold a password) is not printed.
fn redacted(db: &str) -> &str {
    if db.starts_with("postgres://") || db.starts_with("postgresql://") {
        "on PostgreSQL"
    } else {
        db
    }
}

/// `trellis saga choreography ...` on the service database at `db`.
async fn choreography(db: &str, command: ChoreographyCommand) -> anyhow::Result<()> {
    let ChoreographyCommand::Show { correlation_id } = command;
    refuse_missing_sqlite_file(db, "no database")?;
    let timeline = AnyChoreographyLog::connect(db)
        .await
        .with_context(|| format!("choreography log {}", redacted(db)))?
        .timeline(correlation_id)
        .await;
    let timeline = match timeline {
        Err(trellis_saga::SagaError::NotFound(_)) => {
            bail!("no choreography recorded for correlation id {correlation_id}")
        }
        other => other?,
    };
    println!("{}", serde_json::to_string_pretty(&timeline)?);
    Ok(())
}

async fn run<S: SagaStore>(inspector: Inspector<S>, command: SagaCommand) -> anyhow::Result<()> {
    match command {
        SagaCommand::List {
            status,
            definition,
            older_than_secs,
            younger_than_secs,
            limit,
            json,
        } => {
            let mut filter = SagaFilter::new();
            for text in &status {
                let status = SagaStatus::parse(text).with_context(|| {
                    format!(
                        "unknown status {text:?} (running, compensating, completed, failed, stuck)"
                    )
                })?;
                filter = filter.with_status(status);
            }
            if let Some(definition) = definition {
                filter = filter.with_definition(definition);
            }
            let now = chrono::Utc::now();
            if let Some(secs) = older_than_secs {
                filter = filter.with_created_before(now - seconds(secs)?);
            }
            if let Some(secs) = younger_than_secs {
                filter = filter.with_created_after(now - seconds(secs)?);
            }
            if let Some(limit) = limit {
                filter = filter.with_limit(limit);
            }
            let sagas = inspector.list(&filter).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&sagas)?);
            } else {
                print_table(&sagas);
            }
        }
        SagaCommand::Show { id } => {
            let timeline = inspector.show(SagaId::from_uuid(id)).await?;
            println!("{}", serde_json::to_string_pretty(&timeline)?);
        }
        SagaCommand::Retry { id } => {
            let written = inspector.retry(SagaId::from_uuid(id)).await?;
            report(id, &written);
        }
        SagaCommand::Cancel { id, reason } => {
            let written = inspector.cancel(SagaId::from_uuid(id), &reason).await?;
            report(id, &written);
        }
        SagaCommand::Skip { id, step } => {
            let written = inspector.skip(SagaId::from_uuid(id), &step).await?;
            report(id, &written);
        }
        SagaCommand::Purge { older_than_days } => {
            let age = Duration::from_secs(older_than_days.saturating_mul(24 * 3600));
            let purged = inspector.purge(age).await?;
            println!("purged {purged} saga(s)");
        }
        SagaCommand::Choreography { .. } => bail!("choreography commands read no saga log"),
    }
    Ok(())
}

fn seconds(secs: u64) -> anyhow::Result<chrono::Duration> {
    i64::try_from(secs)
        .ok()
        .and_then(chrono::Duration::try_seconds)
        .with_context(|| format!("{secs} seconds is too long"))
}

fn report(id: Uuid, written: &trellis_saga::Transition) {
    let kind = serde_json::to_value(written)
        .ok()
        .and_then(|value| value["type"].as_str().map(str::to_owned))
        .unwrap_or_default();
    println!("saga {id}: recorded {kind}; an engine running its definition picks it up");
}

fn print_table(sagas: &[SagaSummary]) {
    println!(
        "{:<36}  {:<24}  {:<12}  {:>5}  {:<20}  {:<20}  lease",
        "id", "definition", "status", "log", "created", "updated"
    );
    for saga in sagas {
        println!(
            "{:<36}  {:<24}  {:<12}  {:>5}  {:<20}  {:<20}  {}",
            saga.id,
            format!("{}@{}", saga.definition, saga.version),
            saga.status.as_str(),
            saga.transitions,
            saga.created_at.format("%Y-%m-%d %H:%M:%S"),
            saga.updated_at.format("%Y-%m-%d %H:%M:%S"),
            saga.lease_owner.as_deref().unwrap_or("-")
        );
    }
    println!("{} saga(s)", sagas.len());
}
