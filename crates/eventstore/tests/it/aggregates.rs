use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::json;
use trellis_eventstore::{
    AggregateTest, Direction, EventStore, EventStoreError, ExpectedVersion, MemoryStore, Metadata,
    NewEvent, Repository, RepositoryError, Snapshot, SqliteStore, StreamId, Upcasters,
};

use crate::account::{Account, AccountCommand, AccountError, AccountEvent, upcasters};

fn repo(store: MemoryStore) -> Repository<Account, MemoryStore> {
    Repository::new(store)
        .with_upcasters(upcasters())
        .expect("complete chain")
}

#[test]
fn given_when_then_checks_the_rules() {
    // The business rules, without a store: given past events, a command yields events or an error.
    AggregateTest::<Account>::given_no_events()
        .when(AccountCommand::Open {
            owner: "ada".into(),
        })
        .then_expect_events([AccountEvent::Opened {
            owner: "ada".into(),
        }]);
    AggregateTest::<Account>::given([
        AccountEvent::Opened {
            owner: "ada".into(),
        },
        AccountEvent::Deposited { amount_cents: 500 },
    ])
    .when(AccountCommand::Withdraw { amount_cents: 200 })
    .then_expect_events([AccountEvent::Withdrew { amount_cents: 200 }]);
    let error = AggregateTest::<Account>::given([AccountEvent::Opened {
        owner: "ada".into(),
    }])
    .when(AccountCommand::Withdraw { amount_cents: 1 })
    .then_expect_error();
    assert_eq!(
        error,
        AccountError::InsufficientFunds {
            balance_cents: 0,
            asked_cents: 1
        }
    );
}

#[tokio::test]
async fn the_repository_runs_commands_and_refuses_broken_rules() {
    // Commands append events with the loaded version; a refused command appends nothing.
    let store = MemoryStore::new();
    let accounts = repo(store.clone());
    accounts
        .execute(
            "a1",
            AccountCommand::Open {
                owner: "ada".into(),
            },
            Metadata::default(),
        )
        .await
        .expect("open");
    let done = accounts
        .execute(
            "a1",
            AccountCommand::Deposit { amount_cents: 700 },
            Metadata::default(),
        )
        .await
        .expect("deposit");
    assert_eq!((done.version, done.state.balance_cents), (2, 700));
    let refused = accounts
        .execute(
            "a1",
            AccountCommand::Withdraw { amount_cents: 900 },
            Metadata::default(),
        )
        .await;
    assert!(matches!(
        refused,
        Err(RepositoryError::Domain(
            AccountError::InsufficientFunds { .. }
        ))
    ));
    let stream = StreamId::new("account-a1").expect("valid");
    assert_eq!(
        store
            .stream_info(&stream)
            .await
            .expect("info")
            .expect("exists")
            .version,
        2
    );
    let loaded = accounts.load("a1").await.expect("load");
    assert_eq!(loaded.state.balance_cents, 700);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commands_are_retried_after_conflicts_and_none_is_lost() {
    // Twenty deposits racing on one account: conflicts are retried, every deposit lands once.
    let store = MemoryStore::new();
    let accounts = repo(store.clone()).with_conflict_retries(50);
    accounts
        .execute(
            "race",
            AccountCommand::Open {
                owner: "ada".into(),
            },
            Metadata::default(),
        )
        .await
        .expect("open");
    let retried = Arc::new(AtomicU32::new(0));
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (accounts, retried) = (accounts.clone(), retried.clone());
            tokio::spawn(async move {
                let done = accounts
                    .execute(
                        "race",
                        AccountCommand::Deposit { amount_cents: 10 },
                        Metadata::default(),
                    )
                    .await
                    .expect("deposit eventually lands");
                retried.fetch_add(done.attempts - 1, Ordering::SeqCst);
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
    let loaded = accounts.load("race").await.expect("load");
    assert_eq!((loaded.version, loaded.state.balance_cents), (21, 200));
}

#[tokio::test]
async fn loading_with_a_recent_snapshot_reads_only_newer_events() {
    // 100,000 stored events: the first load replays them all and saves a snapshot; the next
    // load starts from the snapshot and reads only the five events appended since.
    let store = MemoryStore::new();
    let accounts = repo(store.clone()).with_snapshots(1_000);
    accounts
        .execute(
            "big",
            AccountCommand::Open {
                owner: "ada".into(),
            },
            Metadata::default(),
        )
        .await
        .expect("open");
    let stream = StreamId::new("account-big").expect("valid");
    let mut version = 1;
    while version < 100_000 {
        let batch: Vec<_> = (0..(100_000 - version).min(10_000))
            .map(|_| NewEvent::new("Deposited", json!({"amount_cents": 1})).with_schema_version(2))
            .collect();
        version = store
            .append(&stream, ExpectedVersion::Exact(version), batch)
            .await
            .expect("append")
            .next_version;
    }
    let first = accounts.load("big").await.expect("load");
    assert_eq!((first.events_read, first.snapshot_version), (100_000, None));
    for _ in 0..5 {
        accounts
            .execute(
                "big",
                AccountCommand::Deposit { amount_cents: 1 },
                Metadata::default(),
            )
            .await
            .expect("deposit");
    }
    let second = accounts.load("big").await.expect("load");
    assert_eq!(second.snapshot_version, Some(100_000));
    assert_eq!(second.events_read, 5);
    assert_eq!(second.state.balance_cents, 99_999 + 5);
}

#[tokio::test]
async fn a_snapshot_of_an_older_schema_is_ignored_and_rebuilt() {
    // A snapshot whose schema differs from today's is never deserialized into the state.
    let store = MemoryStore::new();
    let accounts = repo(store.clone()).with_snapshots(2);
    accounts
        .execute(
            "s",
            AccountCommand::Open {
                owner: "ada".into(),
            },
            Metadata::default(),
        )
        .await
        .expect("open");
    accounts
        .execute(
            "s",
            AccountCommand::Deposit { amount_cents: 300 },
            Metadata::default(),
        )
        .await
        .expect("deposit");
    let stream = StreamId::new("account-s").expect("valid");
    // An old schema whose fields would misread as a huge balance if it were trusted.
    let stale = Snapshot {
        version: 2,
        schema_version: 0,
        state: json!({"owner": "mallory", "balance_cents": 1_000_000, "closed": false}),
    };
    store.save_snapshot(&stream, stale).await.expect("save");
    let loaded = accounts.load("s").await.expect("load");
    assert_eq!(loaded.state.balance_cents, 300);
    assert_eq!(loaded.snapshot_version, None);
    let rebuilt = store
        .load_snapshot(&stream)
        .await
        .expect("load snapshot")
        .expect("rebuilt");
    assert_eq!(rebuilt.schema_version, 1);
    assert_eq!(rebuilt.state["balance_cents"], 300);
}

#[tokio::test]
async fn stored_v1_events_are_upcast_into_todays_types() {
    // Fixtures written by an older version of the code (Deposited v1 in euros) load as v2.
    let store = MemoryStore::new();
    let stream = StreamId::new("account-legacy").expect("valid");
    let fixtures = vec![
        NewEvent::new("Opened", json!({"owner": "grace"})),
        NewEvent::new("Deposited", json!({"amount": 12})),
        NewEvent::new("Deposited", json!({"amount": 3})),
        NewEvent::new("Deposited", json!({"amount_cents": 50})).with_schema_version(2),
    ];
    store
        .append(&stream, ExpectedVersion::NoStream, fixtures)
        .await
        .expect("fixtures");
    let loaded = repo(store).load("legacy").await.expect("load");
    assert_eq!(loaded.state.balance_cents, 1_550);
    assert_eq!(loaded.state.owner.as_deref(), Some("grace"));
}

#[test]
fn an_upcaster_chain_with_a_gap_is_refused_at_start_up() {
    // Deposited is at v2 today: a chain that stops at v1 → v2 is fine, one that skips is not.
    let gap = Upcasters::new().register("Withdrew", 2, Ok);
    let error = gap
        .check::<AccountEvent>()
        .expect_err("Withdrew is at v1: a v2 → v3 step is past today's schema");
    assert_eq!(error.event_type, "Withdrew");
    let hole = upcasters()
        .register("Opened", 1, Ok)
        .register("Opened", 3, Ok);
    assert!(hole.check::<AccountEvent>().is_err());
    assert!(upcasters().check::<AccountEvent>().is_ok());
}

#[tokio::test]
async fn undecodable_events_are_errors_naming_stream_version_and_type() {
    // An unknown type, a failing upcaster and a schema from the future each fail the load,
    // naming where; nothing is skipped silently.
    let cases = [
        (NewEvent::new("Exploded", json!({})), "Exploded"),
        (
            NewEvent::new("Deposited", json!({"amount": "twelve"})),
            "Deposited",
        ),
        (
            NewEvent::new("Withdrew", json!({"amount_cents": 1})).with_schema_version(9),
            "Withdrew",
        ),
    ];
    for (i, (bad, event_type)) in cases.into_iter().enumerate() {
        let store = MemoryStore::new();
        let id = format!("bad{i}");
        let stream = StreamId::new(format!("account-{id}")).expect("valid");
        store
            .append(
                &stream,
                ExpectedVersion::NoStream,
                vec![NewEvent::new("Opened", json!({"owner": "x"})), bad],
            )
            .await
            .expect("append");
        match repo(store).load(&id).await {
            Err(EventStoreError::Decode {
                stream: s,
                version,
                event_type: t,
                ..
            }) => {
                assert_eq!((s, version, t.as_str()), (stream, 2, event_type));
            }
            other => panic!("expected a decode error, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn malformed_stored_json_is_an_error_naming_the_event() {
    // Corrupting a row's JSON behind the store's back gives a decode error, not a panic.
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("events.db").display());
    let store = SqliteStore::open(&url).await.expect("open");
    let stream = StreamId::new("account-corrupt").expect("valid");
    store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![NewEvent::new("Opened", json!({"owner": "x"}))],
        )
        .await
        .expect("append");
    sqlx::query("UPDATE es_events SET data = '{not json' WHERE stream_id = 'account-corrupt'")
        .execute(store.pool())
        .await
        .expect("corrupt");
    match store.read_stream(&stream, 1, Direction::Forwards, 10).await {
        Err(EventStoreError::Decode {
            version,
            event_type,
            ..
        }) => assert_eq!((version, event_type.as_str()), (1, "Opened")),
        other => panic!("expected a decode error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_cached_repository_sees_writes_made_elsewhere() {
    let store = MemoryStore::new();
    let cached = repo(store.clone()).with_cache(16);
    // Another process writing to the same store.
    let elsewhere = repo(store.clone());
    let run = |repository: &Repository<Account, MemoryStore>, command| {
        let repository = repository.clone();
        async move {
            repository
                .execute("a1", command, Metadata::default())
                .await
                .expect("accepted")
        }
    };
    run(
        &cached,
        AccountCommand::Open {
            owner: "ada".into(),
        },
    )
    .await;
    run(&cached, AccountCommand::Deposit { amount_cents: 100 }).await;
    run(&elsewhere, AccountCommand::Deposit { amount_cents: 400 }).await;
    // The cached balance (100) would refuse this; the refusal is checked on a fresh load.
    let withdrew = run(&cached, AccountCommand::Withdraw { amount_cents: 300 }).await;
    assert_eq!(withdrew.state.balance_cents, 200);
    assert_eq!(withdrew.version, 4);
    // A write elsewhere makes the cached version stale: the append conflicts, the command
    // runs again on the fresh state.
    run(&elsewhere, AccountCommand::Deposit { amount_cents: 50 }).await;
    let deposited = run(&cached, AccountCommand::Deposit { amount_cents: 1 }).await;
    assert_eq!(deposited.attempts, 2);
    assert_eq!((deposited.state.balance_cents, deposited.version), (251, 6));
    // A load reads only what the cache has not seen.
    run(&elsewhere, AccountCommand::Withdraw { amount_cents: 51 }).await;
    let loaded = cached.load("a1").await.expect("load");
    assert_eq!((loaded.state.balance_cents, loaded.version), (200, 7));
    assert_eq!(loaded.events_read, 1);
    // The cached state answers at once, even when it is behind.
    run(&elsewhere, AccountCommand::Deposit { amount_cents: 5 }).await;
    let hint = cached.load_cached("a1").await.expect("cached");
    assert_eq!((hint.state.balance_cents, hint.version), (200, 7));
    assert_eq!(cached.load("a1").await.expect("load").version, 8);
    // A real refusal is still a refusal.
    let refused = cached
        .execute(
            "a1",
            AccountCommand::Withdraw {
                amount_cents: 1_000,
            },
            Metadata::default(),
        )
        .await;
    assert!(matches!(
        refused,
        Err(RepositoryError::Domain(
            AccountError::InsufficientFunds { .. }
        ))
    ));
    // A cache of one entry serves two aggregates correctly (it only evicts).
    let small = repo(store.clone()).with_cache(1);
    for (id, amount) in [("b1", 10), ("b2", 20), ("b1", 30), ("b2", 40)] {
        if small.load(id).await.expect("load").version == 0 {
            small
                .execute(
                    id,
                    AccountCommand::Open { owner: id.into() },
                    Metadata::default(),
                )
                .await
                .expect("open");
        }
        small
            .execute(
                id,
                AccountCommand::Deposit {
                    amount_cents: amount,
                },
                Metadata::default(),
            )
            .await
            .expect("deposit");
    }
    assert_eq!(small.load("b1").await.expect("b1").state.balance_cents, 40);
    // Without a cache, load_cached is a load.
    let plain = repo(store.clone());
    assert_eq!(plain.load_cached("a1").await.expect("load").version, 8);
    assert_eq!(small.load("b2").await.expect("b2").state.balance_cents, 60);
}

#[tokio::test]
async fn a_command_on_a_new_id_appends_without_reading_and_an_existing_stream_falls_back() {
    let store = MemoryStore::new();
    let repository = repo(store.clone()).with_cache(8);
    let opened = repository
        .execute_on_new(
            "n1",
            AccountCommand::Open {
                owner: "ada".into(),
            },
            Metadata::default(),
        )
        .await
        .expect("opened");
    assert_eq!((opened.version, opened.events.len()), (1, 1));
    // The id was not new after all: the rules run on the stored state.
    let again = repository
        .execute_on_new(
            "n1",
            AccountCommand::Open {
                owner: "bob".into(),
            },
            Metadata::default(),
        )
        .await;
    assert!(matches!(
        again,
        Err(RepositoryError::Domain(AccountError::AlreadyOpen))
    ));
    let deposited = repo(store.clone())
        .execute_on_new(
            "n1",
            AccountCommand::Deposit { amount_cents: 7 },
            Metadata::default(),
        )
        .await
        .expect("falls back to the stored state");
    assert_eq!((deposited.state.balance_cents, deposited.version), (7, 2));
    assert_eq!(
        repository
            .load("n1")
            .await
            .expect("load")
            .state
            .owner
            .as_deref(),
        Some("ada")
    );
}
