//! AI agents on trellis: typed tools with JSON Schema, a durable agent loop, an
//! OpenAI-compatible LLM client, an operator's HTTP surface for approvals, and an MCP server.
//!
//! - [`tool`]: a [`Tool`] is a name, a description, an input type whose JSON Schema schemars
//!   derives, an output type and an async `execute` given a [`ToolContext`] (the [`Caller`]
//!   with their token, a deadline, an idempotency key). The [`ToolRegistry`] validates
//!   arguments against the schema (jsonschema) before a tool runs, and runs each call behind a
//!   timeout, a circuit breaker per tool and a bound on concurrent calls; every failure comes
//!   back as a [`ToolFailure`] the model reads, never as a crash of the loop.
//! - [`llm`]: the [`Llm`] trait and [`OpenAiClient`] for any OpenAI-compatible
//!   `chat/completions` endpoint (tool calls, parallel tool calls, lenient answers, retries
//!   with a budget, a breaker on the endpoint).
//! - [`run`]: the [`Agent`] loop, durable on a trellis-saga log: each model answer and each
//!   tool call is a recorded step, so a killed run resumes without asking the model again for
//!   an answer it has and without repeating a finished call; calls that change state carry an
//!   idempotency key from the run and the call, may wait (durably) for an operator's approval,
//!   and are undone when the run is denied or cancelled. Limits on steps, tokens and wall time;
//!   the outcome says why the run stopped ([`StopReason`]).
//! - [`http`]: list, show, approve, deny and cancel runs over HTTP; [`mcp`]: the registry's
//!   tools over the Model Context Protocol (stdio and streamable HTTP, with rmcp).
//!
//! # Why the loop is ours
//! The loop is the product: what the anchors (OpenAI's and Anthropic's tool-use loops, Dapr
//! Agents, LangGraph) keep in memory or in a checkpoint store of their own, trellis keeps in
//! the saga log it already has, with its leases, its inspector and its compensation records.
//! See docs/decisions/0011-durable-agent-loop.md.
//!
//! # Example
//! ```
//! use std::sync::Arc;
//! use schemars::JsonSchema;
//! use serde::{Deserialize, Serialize};
//! use trellis_agent::tool::BoxFuture;
//! use trellis_agent::{
//!     Agent, Caller, ChatRequest, Llm, LlmError, Message, Reply, RunOutcome, StopReason, Tool,
//!     ToolCall, ToolContext, ToolError, ToolRegistry, Usage,
//! };
//!
//! struct Clock;
//! #[derive(Deserialize, JsonSchema)]
//! struct NoInput {}
//! #[derive(Serialize, Deserialize)]
//! struct Now { unix: u64 }
//! impl Tool for Clock {
//!     type Input = NoInput;
//!     type Output = Now;
//!     fn name(&self) -> &str { "now" }
//!     fn description(&self) -> &str { "The time, in seconds since 1970." }
//!     async fn execute(&self, _: NoInput, _: &ToolContext) -> Result<Now, ToolError> {
//!         Ok(Now { unix: 1_800_000_000 })
//!     }
//! }
//!
//! /// A model that calls `now` once, then answers with what it read.
//! struct Scripted;
//! impl Llm for Scripted {
//!     fn complete<'a>(&'a self, request: ChatRequest<'a>) -> BoxFuture<'a, Result<Reply, LlmError>> {
//!         Box::pin(async move {
//!             let reply = match request.messages.last() {
//!                 Some(Message::Tool { content, .. }) => Reply {
//!                     content: Some(format!("It is {content}.")),
//!                     tool_calls: vec![], finish_reason: "stop".into(), usage: Usage::default(),
//!                 },
//!                 _ => Reply {
//!                     content: None,
//!                     tool_calls: vec![ToolCall { id: "c1".into(), name: "now".into(), arguments: "{}".into() }],
//!                     finish_reason: "tool_calls".into(), usage: Usage::default(),
//!                 },
//!             };
//!             Ok(reply)
//!         })
//!     }
//!     fn model(&self) -> &str { "scripted" }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let tools = ToolRegistry::builder().tool(Clock)?.build();
//! let store = Arc::new(trellis_saga::InMemorySagaStore::new()); // or SQLite / PostgreSQL
//! let agent = Agent::new(store, Arc::new(Scripted), tools);
//! let caller = Caller::new("user-1", "customer");
//! let (_run, outcome) = agent.run(&caller, "what time is it?").await?;
//! assert_eq!(outcome, RunOutcome::Finished {
//!     stop: StopReason::EndTurn,
//!     answer: Some(r#"It is {"unix":1800000000}."#.into()),
//! });
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod http;
pub mod llm;
pub mod mcp;
pub mod run;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tool;

pub use llm::{
    ChatRequest, Llm, LlmError, Message, OpenAiClient, OpenAiConfig, Reply, ToolCall, Usage,
};
pub use run::{Agent, AgentError, CallRecord, Limits, RunEvent, RunOutcome, RunState, StopReason};
pub use tool::{
    Caller, Effect, Tool, ToolContext, ToolError, ToolFailure, ToolRegistry, ToolRegistryBuilder,
    ToolSpec,
};
