//! The durable agent loop on the real shop: the shop's tools through the gateway, a scripted
//! model, a run killed after it placed an order, and a denial that cancels what the run placed.

use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use trellis_agent::testing::{Script, Turn, calls, text, tool_results};
use trellis_agent::{Agent, Caller, OpenAiClient, OpenAiConfig, RunOutcome, StopReason, run};
use trellis_saga::{Lease, SagaStatus, SqliteSagaStore};

use crate::harness::{Backend, TestShop};

async fn caller(shop: &TestShop, token: &str) -> Caller {
    let (status, me) = shop
        .call(Method::GET, "/api/users/me", Some(token), None)
        .await;
    assert_eq!(status, 200, "{me}");
    Caller::new(me["id"].as_str().unwrap(), me["role"].as_str().unwrap()).with_bearer(token)
}

async fn log(dir: &tempfile::TempDir) -> Arc<SqliteSagaStore> {
    let url = format!("sqlite://{}", dir.path().join("agent-runs.db").display());
    Arc::new(SqliteSagaStore::open(&url).await.unwrap())
}

fn agent(shop: &TestShop, store: Arc<SqliteSagaStore>, script: &Script) -> Agent<SqliteSagaStore> {
    let llm = OpenAiClient::new(OpenAiConfig::new(script.base_url(), "scripted")).unwrap();
    let tools = shop_agent::registry(&shop.base).unwrap();
    Agent::new(store, Arc::new(llm), tools)
        .with_lease(Lease::new("e2e-agent", Duration::from_secs(30)))
}

async fn orders_of(shop: &TestShop, token: &str) -> Vec<Value> {
    let (status, body) = shop
        .call(Method::GET, "/api/orders", Some(token), None)
        .await;
    assert_eq!(status, 200, "{body}");
    body["items"].as_array().cloned().expect("a page of orders")
}

/// The caller's orders once the read model lists at least `at_least` (it is eventually
/// consistent: an order accepted a moment ago may not be listed yet), within 10 s.
async fn orders_listed(shop: &TestShop, token: &str, at_least: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let orders = orders_of(shop, token).await;
        if orders.len() >= at_least || tokio::time::Instant::now() >= deadline {
            return orders;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn place(product: &str, id: &str) -> Turn {
    let args = json!({"items": [{"product_id": product, "quantity": 2}]}).to_string();
    Turn::Answer(calls(&[(id, "place_order", &args)]))
}

#[tokio::test]
async fn a_killed_run_resumes_without_placing_a_second_order() {
    let Some(shop) = TestShop::start(Backend::Sqlite, "agent_resume").await else {
        return;
    };
    let token = shop.customer("agent-user").await;
    let me = caller(&shop, &token).await;
    let product = shop.product("Lamp", 2_000, 10).await;
    let script = Script::start(vec![place(&product, "c1"), Turn::Hang]).await;
    let dir = tempfile::tempdir().unwrap();

    let first = agent(&shop, log(&dir).await, &script);
    let (id, outcome) = first.run(&me, "buy two lamps").await.unwrap();
    assert!(
        matches!(outcome, RunOutcome::AwaitingApproval { .. }),
        "{outcome:?}"
    );
    assert!(
        orders_of(&shop, &token).await.is_empty(),
        "nothing is placed before approval"
    );
    run::approve(first.store(), id, None, "ops").await.unwrap();
    let running = tokio::spawn({
        let me = me.clone();
        async move { first.drive(id, &me).await }
    });
    // The order is placed and recorded; the run waits for the model: kill it there.
    script.hung.notified().await;
    running.abort();
    let _ = running.await;
    assert_eq!(orders_listed(&shop, &token, 1).await.len(), 1);

    script.push(Turn::Answer(text("Your order is placed.")));
    let second = agent(&shop, log(&dir).await, &script);
    let outcome = second.drive(id, &me).await.unwrap();
    assert_eq!(
        outcome,
        RunOutcome::Finished {
            stop: StopReason::EndTurn,
            answer: Some("Your order is placed.".into())
        }
    );
    // A second order, if the resumed run placed one, would be listed within the bound too.
    let orders = orders_listed(&shop, &token, 2).await;
    assert_eq!(orders.len(), 1, "one order, not two: {orders:?}");
    let asked_first = script
        .requests()
        .iter()
        .filter(|r| {
            r["messages"]
                .as_array()
                .unwrap()
                .iter()
                .all(|m| m["role"] != "assistant")
        })
        .count();
    assert_eq!(
        asked_first, 1,
        "the recorded first answer was not asked for again"
    );
    let result = tool_results(script.requests().last().unwrap());
    assert!(
        result[0].1.contains(orders[0]["id"].as_str().unwrap()),
        "{result:?}"
    );
    shop.stop().await;
}

#[tokio::test]
async fn a_denial_cancels_the_order_the_run_placed() {
    let Some(shop) = TestShop::start(Backend::Sqlite, "agent_deny").await else {
        return;
    };
    let token = shop.customer("agent-user").await;
    let me = caller(&shop, &token).await;
    let product = shop.product("Kettle", 3_000, 10).await;
    // The provider is down: the placed order stays PENDING (payment retrying), so it can
    // still be cancelled when the operator denies the run's next call.
    let (status, body) = shop
        .call(
            Method::PUT,
            "/api/admin/provider",
            Some(shop.admin()),
            Some(json!({"outage": true})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let script = Script::start(vec![place(&product, "c1"), place(&product, "c2")]).await;
    let dir = tempfile::tempdir().unwrap();
    let store = log(&dir).await;
    let agent = agent(&shop, store.clone(), &script);

    let (id, outcome) = agent.run(&me, "buy two kettles, twice").await.unwrap();
    assert!(matches!(outcome, RunOutcome::AwaitingApproval { .. }));
    run::approve(&*store, id, None, "ops").await.unwrap();
    let outcome = agent.drive(id, &me).await.unwrap();
    let RunOutcome::AwaitingApproval { calls } = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(calls[0].label(), "2.1:place_order");
    let placed = orders_listed(&shop, &token, 1).await;
    assert_eq!(placed.len(), 1);
    let order_id = placed[0]["id"].as_str().unwrap().to_owned();

    run::deny(&*store, id, None, "ops", "one is enough")
        .await
        .unwrap();
    let outcome = agent.drive(id, &me).await.unwrap();
    assert!(
        matches!(
            &outcome,
            RunOutcome::Finished {
                stop: StopReason::Denied { .. },
                ..
            }
        ),
        "{outcome:?}"
    );
    let (instance, _) = agent.load(id).await.unwrap();
    assert_eq!(instance.status, SagaStatus::Failed);
    let order = shop.settled(&token, &order_id).await;
    assert_eq!(order["status"], "CANCELLED", "{order}");
    assert_eq!(
        orders_of(&shop, &token).await.len(),
        1,
        "the denied call placed nothing"
    );
    shop.stop().await;
}
