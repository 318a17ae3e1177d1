//! The loop against a scripted model: tool use, errors the model recovers from, limits, and an
//! endpoint that fails.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::Barrier;
use trellis_agent::{
    Agent, Limits, OpenAiClient, OpenAiConfig, RunOutcome, StopReason, ToolRegistry,
};
use trellis_resilience::{
    Backoff, CircuitBreaker, Clock, RetryBudget, RetryPolicy, SharedClock, SlidingWindow,
};

use crate::support::{Double, Lookup, agent, caller, client, memory};
use trellis_agent::testing::{Script, Turn, calls, text, tool_results};

fn finished(outcome: &RunOutcome) -> (StopReason, Option<String>) {
    match outcome {
        RunOutcome::Finished { stop, answer } => (stop.clone(), answer.clone()),
        other => panic!("the run did not finish: {other:?}"),
    }
}

#[tokio::test]
async fn two_parallel_calls_then_an_answer() {
    let script = Script::start(vec![
        Turn::Answer(calls(&[
            ("call_a", "lookup", r#"{"key":"alpha"}"#),
            ("call_b", "lookup", r#"{"key":"be"}"#),
        ])),
        Turn::Answer(text("alpha has 5 letters, be has 2.")),
    ])
    .await;
    // Both calls must be in flight at once to pass the barrier.
    let runs = Arc::new(AtomicU32::new(0));
    let tools = ToolRegistry::builder()
        .tool(Lookup {
            barrier: Some(Arc::new(Barrier::new(2))),
            runs: runs.clone(),
        })
        .unwrap()
        .build();
    let agent = agent(memory(), Arc::new(client(&script)), tools);
    let (_, outcome) = tokio::time::timeout(
        Duration::from_secs(10),
        agent.run(&caller(), "how long are alpha and be?"),
    )
    .await
    .expect("parallel calls do not wait for each other")
    .unwrap();
    assert_eq!(
        finished(&outcome),
        (
            StopReason::EndTurn,
            Some("alpha has 5 letters, be has 2.".into())
        )
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    let requests = script.requests();
    assert_eq!(requests.len(), 2);
    // The first request offers the tool with its schema, and parallel calls.
    let tool = &requests[0]["tools"][0]["function"];
    assert_eq!(tool["name"], "lookup");
    assert_eq!(tool["parameters"]["type"], "object");
    assert_eq!(tool["parameters"]["required"][0], "key");
    assert_eq!(requests[0]["parallel_tool_calls"], true);
    // The second carries the assistant's calls and both results, in the model's order.
    let results = tool_results(&requests[1]);
    assert_eq!(results.len(), 2);
    assert_eq!(results[0].0, "call_a");
    assert_eq!(results[1].0, "call_b");
    let first: Value = serde_json::from_str(&results[0].1).unwrap();
    assert_eq!(first["length"], 5);
    let assistant = &requests[1]["messages"][1];
    assert_eq!(assistant["role"], "assistant");
    assert_eq!(
        assistant["tool_calls"][1]["function"]["arguments"],
        r#"{"key":"be"}"#
    );
}

#[tokio::test]
async fn a_bad_argument_comes_back_as_an_error_the_model_corrects() {
    let script = Script::start(vec![
        Turn::Answer(calls(&[("c1", "double", r#"{"n":"seven"}"#)])),
        Turn::With(Box::new(|request: &Value| {
            let results = tool_results(request);
            assert!(results[0].1.contains("invalid arguments"), "{results:?}");
            assert!(
                results[0].1.contains("/n"),
                "the error names the field: {results:?}"
            );
            calls(&[("c2", "double", r#"{"n":7}"#)])
        })),
        Turn::Answer(text("14")),
    ])
    .await;
    let runs = Arc::new(AtomicU32::new(0));
    let tools = ToolRegistry::builder()
        .tool(Double { runs: runs.clone() })
        .unwrap()
        .build();
    let agent = agent(memory(), Arc::new(client(&script)), tools);
    let (id, outcome) = agent.run(&caller(), "double seven").await.unwrap();
    assert_eq!(finished(&outcome), (StopReason::EndTurn, Some("14".into())));
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the bad call never reached the tool"
    );
    let (_, state) = agent.load(id).await.unwrap();
    assert!(!state.calls[0].outcome.as_ref().unwrap().ok);
    assert_eq!(
        state.calls[1].outcome.as_ref().unwrap().content,
        r#"{"doubled":14}"#
    );
}

#[tokio::test]
async fn schema_constraints_are_checked_not_only_types() {
    let script = Script::start(vec![
        Turn::Answer(calls(&[
            ("c1", "double", r#"{"n":0}"#),
            ("c2", "double", "not json"),
        ])),
        Turn::Answer(text("ok")),
    ])
    .await;
    let runs = Arc::new(AtomicU32::new(0));
    let tools = ToolRegistry::builder()
        .tool(Double { runs: runs.clone() })
        .unwrap()
        .build();
    let agent = agent(memory(), Arc::new(client(&script)), tools);
    agent.run(&caller(), "double zero").await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    let results = tool_results(&script.requests()[1]);
    assert!(results[0].1.contains("minimum"), "{results:?}");
    assert!(results[1].1.contains("not JSON"), "{results:?}");
}

#[tokio::test]
async fn an_unknown_tool_is_an_error_result_naming_the_tools() {
    let script = Script::start(vec![
        Turn::Answer(calls(&[("c1", "delete_everything", "{}")])),
        Turn::Answer(text("I cannot do that.")),
    ])
    .await;
    let tools = ToolRegistry::builder()
        .tool(Double {
            runs: Arc::default(),
        })
        .unwrap()
        .build();
    let agent = agent(memory(), Arc::new(client(&script)), tools);
    let (_, outcome) = agent.run(&caller(), "delete everything").await.unwrap();
    assert_eq!(finished(&outcome).0, StopReason::EndTurn);
    let results = tool_results(&script.requests()[1]);
    assert!(
        results[0].1.contains("unknown tool `delete_everything`"),
        "{results:?}"
    );
    assert!(results[0].1.contains("double"), "{results:?}");
}

#[tokio::test]
async fn the_step_limit_stops_a_model_that_never_ends_its_turn() {
    let script = Script::start(vec![]).await;
    let n = Arc::new(AtomicU64::new(0));
    script.otherwise(move |_| {
        let i = n.fetch_add(1, Ordering::SeqCst);
        Turn::Answer(calls(&[(&format!("c{i}"), "double", r#"{"n":1}"#)]))
    });
    let tools = ToolRegistry::builder()
        .tool(Double {
            runs: Arc::default(),
        })
        .unwrap()
        .build();
    let agent = agent(memory(), Arc::new(client(&script)), tools).with_limits(Limits {
        max_steps: 3,
        ..Limits::default()
    });
    let (id, outcome) = agent.run(&caller(), "loop").await.unwrap();
    assert_eq!(finished(&outcome), (StopReason::StepLimit, None));
    assert_eq!(script.requests().len(), 3);
    let (instance, state) = agent.load(id).await.unwrap();
    assert_eq!(instance.status, trellis_saga::SagaStatus::Completed);
    assert_eq!(state.calls.len(), 3);
}

#[tokio::test]
async fn the_token_budget_stops_the_run() {
    let script = Script::start(vec![]).await;
    script.otherwise(|_| Turn::Answer(calls(&[("c", "double", r#"{"n":1}"#)])));
    let tools = ToolRegistry::builder()
        .tool(Double {
            runs: Arc::default(),
        })
        .unwrap()
        .build();
    // Each scripted answer reports 28 tokens.
    let agent = agent(memory(), Arc::new(client(&script)), tools).with_limits(Limits {
        max_tokens: 60,
        ..Limits::default()
    });
    let (_, outcome) = agent.run(&caller(), "loop").await.unwrap();
    assert_eq!(finished(&outcome).0, StopReason::TokenBudget);
    assert_eq!(script.requests().len(), 3);
}

#[tokio::test]
async fn an_endpoint_answering_500_is_retried_and_the_run_recovers() {
    let script = Script::start(vec![
        Turn::Status(500),
        Turn::Status(503),
        Turn::Answer(text("hello")),
    ])
    .await;
    let agent = agent(
        memory(),
        Arc::new(client(&script)),
        ToolRegistry::builder().build(),
    );
    let (_, outcome) = agent.run(&caller(), "hi").await.unwrap();
    assert_eq!(
        finished(&outcome),
        (StopReason::EndTurn, Some("hello".into()))
    );
    assert_eq!(script.requests().len(), 3);
}

#[tokio::test]
async fn a_refused_request_is_not_retried() {
    let script = Script::start(vec![Turn::Status(400), Turn::Answer(text("never"))]).await;
    let agent = agent(
        memory(),
        Arc::new(client(&script)),
        ToolRegistry::builder().build(),
    );
    let (id, outcome) = agent.run(&caller(), "hi").await.unwrap();
    let (stop, _) = finished(&outcome);
    assert!(
        matches!(&stop, StopReason::Error { message } if message.contains("400")),
        "{stop:?}"
    );
    assert_eq!(script.requests().len(), 1);
    let (instance, _) = agent.load(id).await.unwrap();
    assert_eq!(instance.status, trellis_saga::SagaStatus::Failed);
}

#[derive(Debug, Default, Clone)]
struct ManualClock(Arc<AtomicU64>);

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_millis(self.0.load(Ordering::SeqCst))
    }
}

#[tokio::test]
async fn the_retry_budget_and_the_breaker_bound_the_load_on_a_failing_endpoint() {
    let script = Script::start(vec![]).await;
    script.otherwise(|_| Turn::Status(500));
    let clock = ManualClock::default();
    // One banked retry and no deposits: the first run retries once, later runs do not.
    let retry = RetryPolicy::builder()
        .max_attempts(3)
        .backoff(Backoff {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(1),
            multiplier: 1.0,
            full_jitter: false,
        })
        .budget(RetryBudget::new(0.0, 1, 1))
        .build()
        .unwrap();
    let breaker = CircuitBreaker::builder("llm-test")
        .sliding_window(SlidingWindow::Count(4))
        .minimum_calls(3)
        .failure_rate_threshold(0.5)
        .open_duration(Duration::from_secs(30))
        .clock(SharedClock::new(clock.clone()))
        .build()
        .unwrap();
    let llm = Arc::new(
        OpenAiClient::new(OpenAiConfig::new(script.base_url(), "scripted"))
            .unwrap()
            .with_retry(retry)
            .with_breaker(breaker),
    );
    let agent: Agent<_> = agent(memory(), llm.clone(), ToolRegistry::builder().build());
    let stop = |o: &RunOutcome| finished(o).0;

    let (_, first) = agent.run(&caller(), "hi").await.unwrap();
    assert!(matches!(stop(&first), StopReason::Error { .. }));
    assert_eq!(
        script.requests().len(),
        2,
        "one retry, from the banked budget"
    );
    let (_, second) = agent.run(&caller(), "hi").await.unwrap();
    assert!(matches!(stop(&second), StopReason::Error { .. }));
    assert_eq!(script.requests().len(), 3, "the budget is spent: no retry");

    // Three failures of the last three calls: the breaker opens and the endpoint is spared.
    assert_eq!(
        llm.breaker().state(),
        trellis_resilience::BreakerState::Open
    );
    let (_, third) = agent.run(&caller(), "hi").await.unwrap();
    match stop(&third) {
        StopReason::Error { message } => assert!(message.contains("circuit breaker"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(script.requests().len(), 3, "an open breaker sends nothing");

    // The endpoint recovers; after the open duration one trial call closes the breaker.
    script.otherwise(|_| Turn::Answer(text("back")));
    clock.0.fetch_add(31_000, Ordering::SeqCst);
    let (_, fourth) = agent.run(&caller(), "hi").await.unwrap();
    assert_eq!(
        finished(&fourth),
        (StopReason::EndTurn, Some("back".into()))
    );
    assert_ne!(
        llm.breaker().state(),
        trellis_resilience::BreakerState::Open
    );
}

#[tokio::test]
async fn lenient_answers_from_servers_that_bend_the_format_are_read() {
    let script = Script::start(vec![
        // arguments as an object, no id, finish_reason "", no usage
        Turn::Answer(serde_json::json!({"choices": [{"finish_reason": "", "message": {
            "role": "assistant",
            "tool_calls": [{"type": "function", "function": {"name": "double", "arguments": {"n": 2}}}]
        }}]})),
        // content as parts, finish_reason null
        Turn::Answer(serde_json::json!({"choices": [{"finish_reason": null, "message": {
            "role": "assistant", "content": [{"type": "text", "text": "four"}]
        }}]})),
    ])
    .await;
    let runs = Arc::new(AtomicU32::new(0));
    let tools = ToolRegistry::builder()
        .tool(Double { runs: runs.clone() })
        .unwrap()
        .build();
    let agent = agent(memory(), Arc::new(client(&script)), tools);
    let (_, outcome) = agent.run(&caller(), "double two").await.unwrap();
    assert_eq!(
        finished(&outcome),
        (StopReason::EndTurn, Some("four".into()))
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
