//! An event-sourced bank account on the SQLite backend, with a catch-up subscription printing
//! every event: `cargo run -p trellis-eventstore --example bank`.

use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use trellis_eventstore::{
    Aggregate, DomainEvent, Metadata, Repository, RepositoryError, SqliteStore, subscribe_all,
};

#[derive(Debug, Default, Serialize, Deserialize)]
struct Account {
    balance_cents: i64,
}

#[derive(Debug, Clone)]
enum Command {
    Deposit(i64),
    Withdraw(i64),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum Event {
    Deposited { amount_cents: i64 },
    Withdrew { amount_cents: i64 },
}

impl DomainEvent for Event {}

#[derive(Debug, thiserror::Error)]
#[error("insufficient funds: the balance is {0} cents")]
struct InsufficientFunds(i64);

impl Aggregate for Account {
    const TYPE: &'static str = "account";
    type Command = Command;
    type Event = Event;
    type Error = InsufficientFunds;

    fn handle(&self, command: Command) -> Result<Vec<Event>, InsufficientFunds> {
        match command {
            Command::Deposit(amount_cents) => Ok(vec![Event::Deposited { amount_cents }]),
            Command::Withdraw(amount_cents) if amount_cents > self.balance_cents => {
                Err(InsufficientFunds(self.balance_cents))
            }
            Command::Withdraw(amount_cents) => Ok(vec![Event::Withdrew { amount_cents }]),
        }
    }

    fn apply(&mut self, event: &Event) {
        match event {
            Event::Deposited { amount_cents } => self.balance_cents += amount_cents,
            Event::Withdrew { amount_cents } => self.balance_cents -= amount_cents,
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(&format!(
        "sqlite://{}",
        dir.path().join("bank.db").display()
    ))
    .await?;
    let accounts = Repository::<Account, _>::new(store.clone()).with_snapshots(100);

    let mut log = Box::pin(subscribe_all(store.clone(), 1));
    let printer = tokio::spawn(async move {
        while let Ok(Some(Ok(event))) =
            tokio::time::timeout(Duration::from_millis(500), log.next()).await
        {
            println!(
                "  #{} {} v{} {} {}",
                event.position, event.stream, event.version, event.event_type, event.data
            );
        }
    });

    for command in [
        Command::Deposit(5_000),
        Command::Withdraw(1_200),
        Command::Withdraw(9_999),
    ] {
        match accounts
            .execute("alice", command.clone(), Metadata::default())
            .await
        {
            Ok(done) => println!(
                "{command:?}: balance {} cents at version {}",
                done.state.balance_cents, done.version
            ),
            Err(RepositoryError::Domain(refused)) => println!("{command:?}: refused, {refused}"),
            Err(other) => return Err(other.into()),
        }
    }
    printer.await?;
    Ok(())
}
