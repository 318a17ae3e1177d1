//! The agent loop's own cost, the LLM client's cost and the cost of durability, against a plain
//! loop with no log measured in the same run.
//!
//! Every case runs the same conversation: the model asks for one call of a trivial tool
//! (`echo`, which answers its argument) per answer for `rounds` answers, then ends its turn
//! with a text. A run of `rounds` = 1 is 3 steps (model answer, tool call, model answer), as
//! the log names them (`llm-1`, `tool-1.1:echo`, `llm-2`); `rounds` = 8 is 17 steps.
//! Criterion's throughput is in steps, so `thrpt` reads as steps per second.
//!
//! - `raw/*`: the non-durable baseline, a plain loop written here that asks the same [`Llm`]
//!   and calls the same [`ToolRegistry`] (argument validation, timeout, breaker, bulkhead) and
//!   keeps the conversation in a `Vec`, without any log.
//! - `memory/*`: [`Agent::run`] on [`InMemorySagaStore`]: every step recorded (the whole run
//!   state serialised into each record), no disk.
//! - `sqlite/*`: [`Agent::run`] on [`SqliteSagaStore`] in a temporary directory (WAL,
//!   `synchronous = FULL`, as the store opens): every record committed and fsynced before the
//!   loop acts on it.
//!
//! The model is either `inproc` (an [`Llm`] written here that answers at once, no HTTP) or
//! `http` ([`OpenAiClient`] against [`Script`], the scripted OpenAI-compatible server of
//! `trellis_agent::testing`, on loopback).
//!
//! Run: `cargo bench -p trellis-agent --bench agent`.
#![allow(missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::runtime::Runtime;
use trellis_agent::testing::{Script, Turn, calls, text};
use trellis_agent::tool::BoxFuture;
use trellis_agent::{
    Agent, Caller, ChatRequest, Llm, LlmError, Message, OpenAiClient, OpenAiConfig, Reply,
    RunOutcome, StopReason, Tool, ToolCall, ToolContext, ToolError, ToolRegistry, ToolSpec, Usage,
};
use trellis_saga::{InMemorySagaStore, SagaStore, SqliteSagaStore};

/// Tool-call rounds per run (one model answer with one call each, then a final answer).
const ROUNDS: [u32; 2] = [1, 8];
/// The final answer's text.
const ANSWER: &str = "done";

fn steps(rounds: u32) -> u64 {
    u64::from(2 * rounds + 1)
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The trivial tool: answers its argument.
struct Echo;

#[derive(Deserialize, JsonSchema)]
struct EchoInput {
    /// Any number.
    n: u32,
}

#[derive(Serialize, Deserialize)]
struct EchoOutput {
    n: u32,
}

impl Tool for Echo {
    type Input = EchoInput;
    type Output = EchoOutput;
    fn name(&self) -> &str {
        "echo"
    }
    fn description(&self) -> &str {
        "Answers the number it is given."
    }
    async fn execute(&self, input: EchoInput, _ctx: &ToolContext) -> Result<EchoOutput, ToolError> {
        Ok(EchoOutput { n: input.n })
    }
}

fn registry() -> ToolRegistry {
    ToolRegistry::builder()
        .tool(Echo)
        .expect("echo registers")
        .build()
}

/// How many answers with a tool call the conversation has had so far.
fn answered(messages: &[Message]) -> u32 {
    let n = messages
        .iter()
        .filter(|m| matches!(m, Message::Assistant { .. }))
        .count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// A model in this process that answers at once: one call of `echo` per answer for `rounds`
/// answers, then a text.
struct InProcess {
    rounds: u32,
}

impl Llm for InProcess {
    fn complete<'a>(&'a self, request: ChatRequest<'a>) -> BoxFuture<'a, Result<Reply, LlmError>> {
        let done = answered(request.messages);
        Box::pin(async move {
            Ok(if done < self.rounds {
                Reply {
                    content: None,
                    tool_calls: vec![ToolCall {
                        id: format!("call_{done}"),
                        name: "echo".into(),
                        arguments: format!(r#"{{"n":{done}}}"#),
                    }],
                    finish_reason: "tool_calls".into(),
                    usage: Usage {
                        prompt_tokens: 20,
                        completion_tokens: 8,
                    },
                }
            } else {
                Reply {
                    content: Some(ANSWER.into()),
                    tool_calls: Vec::new(),
                    finish_reason: "stop".into(),
                    usage: Usage {
                        prompt_tokens: 10,
                        completion_tokens: 5,
                    },
                }
            })
        })
    }

    fn model(&self) -> &str {
        "in-process"
    }
}

/// The scripted HTTP model answering the same conversation as [`InProcess`].
async fn scripted(rounds: u32) -> Script {
    let script = Script::start(Vec::new()).await;
    script.otherwise(move |body: &Value| {
        let done = body["messages"]
            .as_array()
            .map_or(0, |m| m.iter().filter(|m| m["role"] == "assistant").count());
        let done = u32::try_from(done).unwrap_or(u32::MAX);
        Turn::Answer(if done < rounds {
            calls(&[(
                &format!("call_{done}"),
                "echo",
                &format!(r#"{{"n":{done}}}"#),
            )])
        } else {
            text(ANSWER)
        })
    });
    script
}

fn caller() -> Caller {
    Caller::new("user-1", "customer")
}

/// The non-durable baseline: the same model and registry in a plain loop, no log.
async fn raw_run(llm: &dyn Llm, tools: &ToolRegistry, caller: &Caller, prompt: &str) -> String {
    let specs: Vec<ToolSpec> = tools.specs().cloned().collect();
    let mut messages = vec![Message::User {
        content: prompt.to_owned(),
    }];
    for step in 1.. {
        let reply = llm
            .complete(ChatRequest {
                messages: &messages,
                tools: &specs,
                max_tokens: None,
            })
            .await
            .expect("the model answers");
        messages.push(Message::Assistant {
            content: reply.content.clone(),
            tool_calls: reply.tool_calls.clone(),
        });
        if reply.tool_calls.is_empty() {
            return reply.content.unwrap_or_default();
        }
        for (i, call) in reply.tool_calls.iter().enumerate() {
            let ctx = ToolContext::new(
                caller.clone(),
                Duration::from_secs(600),
                format!("raw:{step}.{}", i + 1),
            );
            let content = match tools.call_json(&call.name, &call.arguments, &ctx).await {
                Ok(value) => value.to_string(),
                Err(failure) => failure.to_model_text(),
            };
            messages.push(Message::Tool {
                tool_call_id: call.id.clone(),
                content,
            });
        }
    }
    unreachable!("the loop returns")
}

async fn agent_run<S: SagaStore>(agent: &Agent<S>, caller: &Caller, prompt: &str) {
    let (_, outcome) = agent.run(caller, prompt).await.expect("the run");
    assert!(
        matches!(
            &outcome,
            RunOutcome::Finished { stop: StopReason::EndTurn, answer: Some(a) } if a == ANSWER
        ),
        "{outcome:?}"
    );
}

fn time_raw(
    group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &Runtime,
    name: String,
    llm: &dyn Llm,
    tools: &ToolRegistry,
) {
    let caller = caller();
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    let answer = raw_run(llm, tools, &caller, "echo some numbers").await;
                    assert_eq!(answer, ANSWER);
                }
                started.elapsed()
            })
        });
    });
}

/// Runs the agent on a fresh in-memory store per sample (the store keeps every run, and a
/// sample of the fast cases makes tens of thousands).
fn time_memory(
    group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &Runtime,
    name: String,
    llm: &Arc<dyn Llm>,
    tools: &ToolRegistry,
) {
    let caller = caller();
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let agent = Agent::new(
                Arc::new(InMemorySagaStore::new()),
                llm.clone(),
                tools.clone(),
            );
            rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    agent_run(&agent, &caller, "echo some numbers").await;
                }
                started.elapsed()
            })
        });
    });
}

fn time_store<S: SagaStore>(
    group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &Runtime,
    name: String,
    agent: &Agent<S>,
) {
    let caller = caller();
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    agent_run(agent, &caller, "echo some numbers").await;
                }
                started.elapsed()
            })
        });
    });
}

fn agent(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("temp dir");
    let tools = registry();

    // In-process model: the loop's own cost, and the cost of the log (memory, SQLite).
    let sqlite = rt
        .block_on(SqliteSagaStore::open(&format!(
            "sqlite://{}",
            dir.path().join("agent.db").display()
        )))
        .expect("open the SQLite log");
    let sqlite = Arc::new(sqlite);
    {
        let mut group = c.benchmark_group("inproc");
        for rounds in ROUNDS {
            let llm = InProcess { rounds };
            let shared: Arc<dyn Llm> = Arc::new(InProcess { rounds });
            group.throughput(Throughput::Elements(steps(rounds)));
            group.sample_size(100);
            time_raw(&mut group, &rt, format!("raw/r{rounds}"), &llm, &tools);
            time_memory(
                &mut group,
                &rt,
                format!("memory/r{rounds}"),
                &shared,
                &tools,
            );
            // Milliseconds per run: fewer samples keep the case within its time.
            group.sample_size(20);
            let agent = Agent::new(sqlite.clone(), shared.clone(), tools.clone());
            time_store(&mut group, &rt, format!("sqlite/r{rounds}"), &agent);
        }
        group.finish();
    }

    // The same conversation through the OpenAI-compatible client, over loopback HTTP.
    {
        let mut group = c.benchmark_group("http");
        {
            let rounds = 1;
            let script = rt.block_on(scripted(rounds));
            let client = OpenAiClient::new(OpenAiConfig::new(script.base_url(), "scripted"))
                .expect("the client builds");
            let shared: Arc<dyn Llm> = Arc::new(client.clone());
            group.throughput(Throughput::Elements(steps(rounds)));
            group.sample_size(100);
            time_raw(&mut group, &rt, format!("raw/r{rounds}"), &client, &tools);
            time_memory(
                &mut group,
                &rt,
                format!("memory/r{rounds}"),
                &shared,
                &tools,
            );
        }
        group.finish();
    }
}

criterion_group!(benches, agent);
criterion_main!(benches);
