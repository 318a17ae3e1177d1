//! Durability: a run killed mid-way resumes from its log without asking the model again for a
//! recorded answer and without repeating a finished call; approvals wait across restarts; an
//! aborted run undoes what it changed.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::Semaphore;
use trellis_agent::run::{self, DEFINITION};
use trellis_agent::{RunOutcome, StopReason};
use trellis_saga::{SagaStatus, SagaStore, SqliteSagaStore, Transition};

use crate::support::{FakeShop, agent, caller, client, registry};
use trellis_agent::testing::{Script, Turn, calls, text, tool_results};

fn place(id: &str) -> Turn {
    Turn::Answer(calls(&[(
        id,
        "place_order",
        r#"{"product":"p-1","quantity":2}"#,
    )]))
}

/// How many requests asked for the first answer (only the user's prompt in them).
fn first_step_requests(script: &Script) -> usize {
    script
        .requests()
        .iter()
        .filter(|r| r["messages"].as_array().unwrap().len() == 1)
        .count()
}

async fn sqlite(dir: &tempfile::TempDir) -> Arc<SqliteSagaStore> {
    let url = format!("sqlite://{}", dir.path().join("agent.db").display());
    Arc::new(SqliteSagaStore::open(&url).await.unwrap())
}

#[tokio::test]
async fn a_run_killed_after_placing_an_order_resumes_without_placing_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let script = Script::start(vec![place("c1"), Turn::Hang]).await;
    let shop = Arc::new(FakeShop::default());
    let store = sqlite(&dir).await;
    let first = agent(
        store.clone(),
        Arc::new(client(&script)),
        registry(&shop, false),
    );
    let id = first.start(&caller(), "order two of p-1").await.unwrap();
    let running = tokio::spawn(async move { first.drive(id, &caller()).await });
    // The order is placed and recorded; the run now waits for the model's next answer: kill it.
    script.hung.notified().await;
    running.abort();
    let _ = running.await;
    drop(store);
    assert_eq!(shop.placed(), 1);
    assert_eq!(shop.executions.load(Ordering::SeqCst), 1);

    // A new process on the same log.
    script.push(Turn::Answer(text("Order 1 is placed.")));
    let store = sqlite(&dir).await;
    let second = agent(
        store.clone(),
        Arc::new(client(&script)),
        registry(&shop, false),
    );
    let outcome = second.drive(id, &caller()).await.unwrap();
    assert_eq!(
        outcome,
        RunOutcome::Finished {
            stop: StopReason::EndTurn,
            answer: Some("Order 1 is placed.".into())
        }
    );
    assert_eq!(
        shop.executions.load(Ordering::SeqCst),
        1,
        "the finished call did not run again"
    );
    assert_eq!(shop.placed(), 1);
    assert_eq!(
        first_step_requests(&script),
        1,
        "the recorded answer was not asked for again"
    );
    // The resumed request carries the recorded result.
    let last = script.requests().last().unwrap().clone();
    assert_eq!(tool_results(&last)[0].1, r#"{"order_id":1}"#);
    let (instance, _) = second.load(id).await.unwrap();
    assert_eq!(instance.status, SagaStatus::Completed);
    assert_eq!(instance.definition, DEFINITION);
}

#[tokio::test]
async fn a_call_in_flight_when_the_run_died_runs_again_with_the_same_idempotency_key() {
    let dir = tempfile::tempdir().unwrap();
    let script = Script::start(vec![place("c1")]).await;
    let gate = Arc::new(Semaphore::new(0));
    let shop = Arc::new(FakeShop {
        gate: Some(gate.clone()),
        ..FakeShop::default()
    });
    let store = sqlite(&dir).await;
    let first = agent(
        store.clone(),
        Arc::new(client(&script)),
        registry(&shop, false),
    );
    let id = first.start(&caller(), "order").await.unwrap();
    let running = tokio::spawn(async move { first.drive(id, &caller()).await });
    while shop.executions.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The call is in flight (its effect may or may not have happened): kill the run, and let
    // the shop finish that first request anyway (as a real server would).
    running.abort();
    let _ = running.await;
    gate.add_permits(1);
    drop(store);
    tokio::time::sleep(Duration::from_millis(20)).await;

    gate.add_permits(10);
    script.push(Turn::Answer(text("done")));
    let store = sqlite(&dir).await;
    let second = agent(store, Arc::new(client(&script)), registry(&shop, false));
    let outcome = second.drive(id, &caller()).await.unwrap();
    assert!(matches!(
        outcome,
        RunOutcome::Finished {
            stop: StopReason::EndTurn,
            ..
        }
    ));
    // The call ran twice, but with one key: one order.
    assert_eq!(shop.executions.load(Ordering::SeqCst), 2);
    assert_eq!(shop.placed(), 1);
    assert_eq!(first_step_requests(&script), 1);
}

#[tokio::test]
async fn an_approval_wait_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let script = Script::start(vec![place("c1"), Turn::Answer(text("placed"))]).await;
    let shop = Arc::new(FakeShop::default());
    let store = sqlite(&dir).await;
    let first = agent(
        store.clone(),
        Arc::new(client(&script)),
        registry(&shop, true),
    );
    let (id, outcome) = first.run(&caller(), "order").await.unwrap();
    let RunOutcome::AwaitingApproval { calls } = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].label(), "1.1:place_order");
    assert_eq!(
        shop.executions.load(Ordering::SeqCst),
        0,
        "nothing runs before approval"
    );
    drop(first);
    drop(store);

    // Driving again while nobody decided still waits, and records the wait once.
    let store = sqlite(&dir).await;
    let second = agent(
        store.clone(),
        Arc::new(client(&script)),
        registry(&shop, true),
    );
    assert!(matches!(
        second.drive(id, &caller()).await.unwrap(),
        RunOutcome::AwaitingApproval { .. }
    ));
    let waits = |instance: &trellis_saga::SagaInstance| {
        instance
            .records
            .iter()
            .filter(|r| {
                matches!(&r.transition,
            Transition::StepExecuting { step, .. } if step.starts_with("approve-"))
            })
            .count()
    };
    assert_eq!(waits(&store.load(id).await.unwrap().unwrap()), 1);

    // An operator approves from another process, then the run goes on.
    let decided = run::approve(&*store, id, Some("1.1"), "ops@example.com")
        .await
        .unwrap();
    assert_eq!(decided.len(), 1);
    let outcome = second.drive(id, &caller()).await.unwrap();
    assert_eq!(
        outcome,
        RunOutcome::Finished {
            stop: StopReason::EndTurn,
            answer: Some("placed".into())
        }
    );
    assert_eq!(shop.live_orders(), 1);
    assert_eq!(first_step_requests(&script), 1);
}

#[tokio::test]
async fn a_denial_after_a_placed_order_undoes_it() {
    let script = Script::start(vec![
        place("c1"),
        place("c2"),
        Turn::Answer(text("never asked")),
    ])
    .await;
    let shop = Arc::new(FakeShop::default());
    let store = crate::support::memory();
    let agent = agent(
        store.clone(),
        Arc::new(client(&script)),
        registry(&shop, true),
    );
    let (id, outcome) = agent.run(&caller(), "order twice").await.unwrap();
    assert!(matches!(outcome, RunOutcome::AwaitingApproval { .. }));
    run::approve(&*store, id, None, "ops").await.unwrap();
    let outcome = agent.drive(id, &caller()).await.unwrap();
    let RunOutcome::AwaitingApproval { calls } = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(calls[0].label(), "2.1:place_order");
    assert_eq!(shop.live_orders(), 1);

    run::deny(&*store, id, None, "ops", "one order is enough")
        .await
        .unwrap();
    let outcome = agent.drive(id, &caller()).await.unwrap();
    match outcome {
        RunOutcome::Finished {
            stop: StopReason::Denied { call, reason },
            ..
        } => {
            assert_eq!(call, "2.1:place_order");
            assert!(reason.contains("one order is enough"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(shop.live_orders(), 0, "the placed order was undone");
    assert_eq!(shop.undos.load(Ordering::SeqCst), 1);
    assert_eq!(
        shop.executions.load(Ordering::SeqCst),
        1,
        "the denied call never ran"
    );
    let instance = store.load(id).await.unwrap().unwrap();
    assert_eq!(instance.status, SagaStatus::Failed);
    assert!(instance.records.iter().any(|r| matches!(&r.transition,
        Transition::StepCompensated { step } if step == "tool-1.1:place_order")));
    assert_eq!(script.requests().len(), 2);
}

#[tokio::test]
async fn an_operator_cancel_undoes_the_runs_changes() {
    let script = Script::start(vec![
        Turn::Answer(calls(&[(
            "c1",
            "place_order",
            r#"{"product":"p-1","quantity":1}"#,
        )])),
        place("c2"),
    ])
    .await;
    let shop = Arc::new(FakeShop::default());
    let store = crate::support::memory();
    // Placing needs no approval here; a second tool that does is what the run waits on.
    let tools = trellis_agent::ToolRegistry::builder()
        .tool(crate::support::PlaceOrder {
            shop: shop.clone(),
            approval: false,
        })
        .unwrap()
        .build();
    let agent = agent(store.clone(), Arc::new(client(&script)), tools);
    let id = agent.start(&caller(), "order").await.unwrap();
    // Let the script's third answer hang so the run is active; cancel it between drives
    // instead: drive until the model's third request.
    script.push(Turn::Hang);
    let runner = {
        let store = store.clone();
        let shop = shop.clone();
        let script = script.clone();
        tokio::spawn(async move {
            let tools = trellis_agent::ToolRegistry::builder()
                .tool(crate::support::PlaceOrder {
                    shop,
                    approval: false,
                })
                .unwrap()
                .build();
            crate::support::agent(store, Arc::new(client(&script)), tools)
                .drive(id, &caller())
                .await
        })
    };
    script.hung.notified().await;
    runner.abort();
    let _ = runner.await;
    assert_eq!(shop.live_orders(), 2);
    // The killed process held the lease under the same owner as ours; an operator's cancel
    // waits for no one once the run is released.
    store.release(id, "test-agent").await.unwrap();
    run::cancel(&*store, id, "ops", "customer called")
        .await
        .unwrap();
    let outcome = agent.drive(id, &caller()).await.unwrap();
    assert!(
        matches!(
            outcome,
            RunOutcome::Finished {
                stop: StopReason::Cancelled { .. },
                ..
            }
        ),
        "{outcome:?}"
    );
    assert_eq!(shop.live_orders(), 0);
    let timings = run::timings(&store.load(id).await.unwrap().unwrap());
    assert_eq!(
        timings
            .iter()
            .filter(|t| t.step.starts_with("undo "))
            .count(),
        2
    );
}

#[tokio::test]
async fn another_user_cannot_drive_a_run() {
    let script = Script::start(vec![Turn::Answer(text("hi"))]).await;
    let shop = Arc::new(FakeShop::default());
    let agent = agent(
        crate::support::memory(),
        Arc::new(client(&script)),
        registry(&shop, false),
    );
    let id = agent.start(&caller(), "hello").await.unwrap();
    let stranger = trellis_agent::Caller::new("user-2", "customer").with_bearer("t2");
    assert!(matches!(
        agent.drive(id, &stranger).await,
        Err(trellis_agent::AgentError::WrongCaller(_))
    ));
    assert!(script.requests().is_empty());
}

#[tokio::test]
async fn an_undo_that_is_refused_leaves_the_run_stuck_for_an_operator() {
    let script = Script::start(vec![place("c1"), place("c2")]).await;
    let shop = Arc::new(FakeShop {
        undo_refused: true,
        ..FakeShop::default()
    });
    let store = crate::support::memory();
    let agent = agent(
        store.clone(),
        Arc::new(client(&script)),
        registry(&shop, true),
    );
    let (id, _) = agent.run(&caller(), "order twice").await.unwrap();
    run::approve(&*store, id, None, "ops").await.unwrap();
    agent.drive(id, &caller()).await.unwrap();
    run::deny(&*store, id, None, "ops", "no").await.unwrap();
    let outcome = agent.drive(id, &caller()).await.unwrap();
    match &outcome {
        RunOutcome::Stuck { step, error } => {
            assert_eq!(step, "tool-1.1:place_order");
            assert!(error.contains("shipped"), "{error}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        store.load(id).await.unwrap().unwrap().status,
        SagaStatus::Stuck
    );
    assert_eq!(
        shop.live_orders(),
        1,
        "the order is still there, and the run says so"
    );
    // Driving a stuck run again changes nothing and says the same.
    assert_eq!(agent.drive(id, &caller()).await.unwrap(), outcome);
    assert_eq!(
        shop.undos.load(Ordering::SeqCst),
        1,
        "a refusal is not retried"
    );
}

#[test]
fn time_spent_waiting_for_a_decision_does_not_count_against_the_wall_time_limit() {
    use chrono::{TimeZone, Utc};
    let at = |s: i64| Utc.timestamp_opt(1_800_000_000 + s, 0).unwrap();
    let call = |requested: i64, decided: i64| trellis_agent::CallRecord {
        step: 1,
        index: 1,
        id: "c".into(),
        tool: "place_order".into(),
        arguments: "{}".into(),
        effect: Some(trellis_agent::Effect::Changes { approval: true }),
        requested_at: Some(at(requested)),
        decision: Some(trellis_agent::run::Decision {
            approved: true,
            operator: "ops".into(),
            reason: String::new(),
            at: at(decided),
        }),
        outcome: None,
        output: None,
        undone: false,
    };
    let state = trellis_agent::RunState {
        caller: trellis_agent::Caller::new("u", "customer"),
        model: "m".into(),
        limits: trellis_agent::Limits {
            max_wall_secs: 60,
            ..trellis_agent::Limits::default()
        },
        started_at: at(0),
        messages: vec![],
        steps: 1,
        usage: trellis_agent::Usage::default(),
        calls: vec![call(10, 3_610), call(20, 30)],
        stop: None,
        answer: None,
    };
    assert_eq!(state.waited(), chrono::Duration::seconds(3_610));
    assert_eq!(state.deadline(), at(60 + 3_610));
}
