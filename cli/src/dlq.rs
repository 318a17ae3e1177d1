//! `trellis dlq`: inspect dead letters and act on them, on any bus backend.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use trellis_bus::{AnyBus, DeadLetter, DeadLetterFilter, DeadLetterState, DeadLetters};
use uuid::Uuid;

/// The bus and the action.
#[derive(Debug, Args)]
pub(crate) struct DlqArgs {
    /// The bus holding the dead letters: `sqlite://PATH` or `nats://HOST:PORT`.
    #[arg(long, env = "TRELLIS_BUS_URL")]
    bus: String,
    /// The NATS stream and subject prefix (ignored for SQLite).
    #[arg(long, env = "TRELLIS_BUS_PREFIX", default_value = "shop")]
    prefix: String,
    #[command(subcommand)]
    command: DlqCommand,
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// Lists dead letters, oldest first, or their failure groups with `--groups`.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// Group by failure fingerprint (error kind + normalised message) with counts.
        #[arg(long)]
        groups: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Shows one dead letter, with its message, as JSON.
    Show {
        /// The dead letter's id.
        id: Uuid,
    },
    /// Sends dead letters back to their topic: one by id, a failure group by `--fingerprint`,
    /// or everything a filter selects with `--all`.
    Replay {
        /// The dead letter's id.
        id: Option<Uuid>,
        /// Redrive every dead letter with this failure fingerprint.
        #[arg(long, conflicts_with = "id")]
        fingerprint: Option<String>,
        /// Redrive everything the filter flags select.
        #[arg(long, conflicts_with_all = ["id", "fingerprint"])]
        all: bool,
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Deletes a dead letter, or moves it out of the queue with `--archive`.
    Discard {
        /// The dead letter's id.
        id: Uuid,
        /// Keep it for the record instead of deleting it.
        #[arg(long)]
        archive: bool,
    },
}

/// Which dead letters.
#[derive(Debug, Args)]
struct FilterArgs {
    /// Only this consumer group.
    #[arg(long)]
    group: Option<String>,
    /// Only topics matching this pattern (`orders.*`).
    #[arg(long)]
    topic: Option<String>,
    /// Only this message type.
    #[arg(long = "type")]
    kind: Option<String>,
    /// Only errors containing this text.
    #[arg(long)]
    error: Option<String>,
    /// Only dead letters whose last failure is at least this many seconds old.
    #[arg(long)]
    older_than_secs: Option<u64>,
    /// At most this many.
    #[arg(long)]
    limit: Option<usize>,
    /// Archived dead letters instead of those in the queue.
    #[arg(long)]
    archived: bool,
}

impl FilterArgs {
    fn to_filter(&self) -> DeadLetterFilter {
        DeadLetterFilter {
            group: self.group.clone(),
            topic: self.topic.clone(),
            kind: self.kind.clone(),
            error_contains: self.error.clone(),
            older_than: self.older_than_secs.map(Duration::from_secs),
            limit: self.limit,
            state: self.archived.then_some(DeadLetterState::Archived),
            ..DeadLetterFilter::default()
        }
    }
}

/// Who the action log names.
fn actor() -> String {
    format!(
        "cli:{}",
        std::env::var("USER").unwrap_or_else(|_| "unknown".to_owned())
    )
}

impl DlqArgs {
    pub(crate) async fn run(self) -> anyhow::Result<()> {
        let bus = AnyBus::connect(&self.bus, &self.prefix)
            .await
            .with_context(|| format!("bus {}", self.bus))?;
        match self.command {
            DlqCommand::List {
                filter,
                groups,
                json,
            } => {
                let filter = filter.to_filter();
                if groups {
                    let groups = bus.failure_groups(&filter).await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&groups)?);
                    } else {
                        println!(
                            "{:>6}  {:<24}  {:<40}  sample error",
                            "count", "kind", "fingerprint"
                        );
                        for group in groups {
                            println!(
                                "{:>6}  {:<24}  {:<40}  {}",
                                group.count,
                                group.error_kind,
                                group.fingerprint,
                                first_line(&group.sample_error)
                            );
                        }
                    }
                } else {
                    let letters = bus.list(&filter).await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&letters)?);
                    } else {
                        print_table(&letters);
                    }
                }
            }
            DlqCommand::Show { id } => {
                let letter = bus.get(id).await?;
                println!("{}", serde_json::to_string_pretty(&letter)?);
            }
            DlqCommand::Replay {
                id,
                fingerprint,
                all,
                filter,
            } => {
                let replayed = match (id, fingerprint, all) {
                    (Some(id), _, _) => {
                        bus.redrive(id, &actor()).await?;
                        vec![id]
                    }
                    (None, Some(fingerprint), _) => {
                        bus.redrive_group(&fingerprint, &actor()).await?
                    }
                    (None, None, true) => {
                        bus.redrive_matching(&filter.to_filter(), &actor()).await?
                    }
                    (None, None, false) => {
                        bail!("say what to replay: an id, --fingerprint FP, or --all with filters")
                    }
                };
                println!("replayed {} dead letter(s)", replayed.len());
                for id in replayed {
                    println!("{id}");
                }
            }
            DlqCommand::Discard { id, archive } => {
                if archive {
                    bus.archive(id, &actor()).await?;
                    println!("archived {id}");
                } else {
                    bus.discard(id, &actor()).await?;
                    println!("discarded {id}");
                }
            }
        }
        Ok(())
    }
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

fn print_table(letters: &[DeadLetter]) {
    println!(
        "{:<36}  {:<20}  {:<24}  {:>8}  {:<14}  error",
        "id", "group", "topic", "attempts", "reason"
    );
    for letter in letters {
        println!(
            "{:<36}  {:<20}  {:<24}  {:>8}  {:<14}  {}",
            letter.id,
            letter.group,
            letter.topic,
            letter.attempts,
            format!("{:?}", letter.reason),
            first_line(&letter.error)
        );
    }
    println!("{} dead letter(s)", letters.len());
}
