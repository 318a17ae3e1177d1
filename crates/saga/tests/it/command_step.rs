//! Asynchronous steps over the memory bus: a command, a correlated reply, a failure reply and
//! a reply that never comes, under paused time.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use trellis_bus::{Bus, InMemoryBus, Message, SubscribeOptions};
use trellis_saga::command_step::{IDEMPOTENCY_HEADER, Replies, command_step, reply_to};
use trellis_saga::{InMemorySagaStore, SagaDefinition, SagaEngine, SagaStatus, Step, Transition};

use crate::support::{Ledger, quick_retry};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Checkout {
    amount_cents: u64,
    reserved: bool,
    charge_id: Option<String>,
}

/// How the payments participant answers.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Payments {
    Charges,
    Declines,
    Silent,
}

/// Runs a payments participant on `bus`: it charges once per idempotency key (counted in
/// `charges`) and replies to every command, duplicates included.
async fn payments(
    bus: &Arc<InMemoryBus>,
    mode: Payments,
    charges: Arc<Mutex<BTreeMap<String, u32>>>,
) {
    let subscription = bus
        .subscribe("payments.commands", "payments", SubscribeOptions::default())
        .await
        .expect("subscribe");
    let replies = bus.clone();
    tokio::spawn(subscription.run(
        move |message: Arc<Message>| {
            let (replies, charges) = (replies.clone(), charges.clone());
            async move {
                let command = &message.envelope;
                let key = command.headers[IDEMPOTENCY_HEADER].clone();
                let reply = match mode {
                    Payments::Silent => return Ok(()),
                    Payments::Declines => reply_to(
                        command,
                        "payment.failed",
                        "payments",
                        serde_json::json!({ "error": "card declined" }),
                    ),
                    Payments::Charges => {
                        *charges
                            .lock()
                            .expect("charges")
                            .entry(key.clone())
                            .or_insert(0) += 1;
                        reply_to(
                            command,
                            "payment.charged",
                            "payments",
                            serde_json::json!({ "charge_id": format!("ch-{key}") }),
                        )
                    }
                };
                replies.publish("payments.events", reply).await?;
                Ok(())
            }
        },
        std::future::pending(),
    ));
}

async fn checkout(bus: &Arc<InMemoryBus>, ledger: &Ledger) -> SagaDefinition<Checkout> {
    let replies = Replies::listen(bus.as_ref(), "payments.events", "saga-engine-1")
        .await
        .expect("listen");
    let ledger_forward = ledger.clone();
    let ledger_backward = ledger.clone();
    let reserve = Step::new("reserve", move |checkout: &mut Checkout, step| {
        let ledger = ledger_forward.clone();
        Box::pin(async move {
            ledger.apply(&step.idempotency_key());
            checkout.reserved = true;
            Ok(())
        })
    })
    .compensate(move |checkout: &mut Checkout, step| {
        let ledger = ledger_backward.clone();
        Box::pin(async move {
            ledger.undo(&step.idempotency_key(), "reserve");
            checkout.reserved = false;
            Ok(())
        })
    });
    let charge = command_step(
        "charge",
        bus.clone(),
        replies,
        "payments.commands",
        |checkout: &Checkout, _step| {
            (
                "payment.charge".to_owned(),
                serde_json::json!({ "amount_cents": checkout.amount_cents }),
            )
        },
        |checkout: &mut Checkout, reply| {
            checkout.charge_id = reply.data["charge_id"].as_str().map(str::to_owned);
            Ok(())
        },
    )
    .timeout(Duration::from_secs(5))
    .retry(quick_retry(2));
    SagaDefinition::builder("checkout", 1)
        .step(reserve)
        .step(charge)
        .build()
        .expect("valid")
}

fn order() -> Checkout {
    Checkout {
        amount_cents: 1299,
        ..Checkout::default()
    }
}

#[tokio::test(start_paused = true)]
async fn a_command_step_completes_when_its_correlated_reply_arrives() {
    // Goal: the step publishes the command with the saga's correlation and idempotency key,
    // the participant's reply (matched by correlation id and step) completes it, and the reply
    // updates the context.
    let bus = Arc::new(InMemoryBus::new());
    let charges = Arc::default();
    payments(&bus, Payments::Charges, Arc::clone(&charges)).await;
    let ledger = Ledger::default();
    let engine = SagaEngine::new(InMemorySagaStore::new()).register(checkout(&bus, &ledger).await);
    let id = engine.start("checkout", &order()).await.expect("start");
    let instance = engine.load(id).await.expect("load");
    assert_eq!(instance.status, SagaStatus::Completed);
    let context: Checkout = instance.context().expect("context");
    assert_eq!(context.charge_id, Some(format!("ch-{id}:charge")));
    assert_eq!(
        *charges.lock().expect("charges"),
        BTreeMap::from([(format!("{id}:charge"), 1)])
    );
}

#[tokio::test(start_paused = true)]
async fn a_failure_reply_fails_the_step_and_compensates_the_steps_before_it() {
    // Goal: a `*.failed` reply is a permanent step failure carrying the reply's error.
    let bus = Arc::new(InMemoryBus::new());
    payments(&bus, Payments::Declines, Arc::default()).await;
    let ledger = Ledger::default();
    let engine = SagaEngine::new(InMemorySagaStore::new()).register(checkout(&bus, &ledger).await);
    let id = engine.start("checkout", &order()).await.expect("start");
    let instance = engine.load(id).await.expect("load");
    assert_eq!(
        instance.last().transition,
        Transition::Failed {
            step: "charge".to_owned(),
            error: "card declined".to_owned()
        }
    );
    ledger.with(|state| assert_eq!(state.compensation_order, ["reserve"]));
}

#[tokio::test(start_paused = true)]
async fn a_reply_that_never_comes_times_out_each_attempt_then_compensates() {
    // Goal: under paused time, each attempt waits its 5 s timeout, the command is published
    // again for attempt 2, and the saga then compensates; no real time passes.
    let bus = Arc::new(InMemoryBus::new());
    payments(&bus, Payments::Silent, Arc::default()).await;
    let ledger = Ledger::default();
    let engine = SagaEngine::new(InMemorySagaStore::new()).register(checkout(&bus, &ledger).await);
    let started = tokio::time::Instant::now();
    let id = engine.start("checkout", &order()).await.expect("start");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(10) && elapsed < Duration::from_secs(11),
        "two attempts of 5 s: {elapsed:?}"
    );
    let instance = engine.load(id).await.expect("load");
    assert_eq!(instance.status, SagaStatus::Failed);
    assert!(instance.records.iter().any(|record| record.transition
        == Transition::StepFailed {
            step: "charge".to_owned(),
            attempt: 2,
            retryable: true,
            error: "timed out after 5000 ms".to_owned(),
        }));
    ledger.with(|state| assert_eq!(state.compensation_order, ["reserve"]));
}

#[test]
fn the_former_bus_path_still_names_the_command_step_items() {
    // Goal: code written against `trellis_saga::bus` (the module's former name) still compiles.
    assert_eq!(
        trellis_saga::bus::STEP_HEADER,
        trellis_saga::command_step::STEP_HEADER
    );
}
