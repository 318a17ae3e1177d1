//! The durable agent loop.
//!
//! A run asks the model, runs the tool calls it asks for (in parallel), feeds the results back
//! and asks again, until the model ends its turn or a limit stops it. Every step is written to
//! a trellis-saga log ([`SagaStore`]) before and after it happens, with the run's whole state
//! ([`RunState`]) as the saga context, so a run whose process died resumes from its log:
//! an LLM answer that was recorded is not asked for again, a tool call that finished is not
//! run again, and a call that was in flight runs again with the same idempotency key
//! (`{run}:{step}.{call}`), which a service that honours the key turns into the first call's
//! answer.
//!
//! Names in the log: `llm-N` (the N-th model answer), `tool-N.I:NAME` (the I-th call of that
//! answer) and `approve-N.I:NAME` (an operator's decision on it). A call to a tool whose
//! [`Effect`] needs approval waits, durably, for [`approve`] or [`deny`]; a denial or an
//! operator's [`cancel`] aborts the run, and the calls that changed state are undone in reverse
//! order (the saga log's compensation records), before the run ends `Failed`.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use trellis_saga::{
    Lease, SagaError, SagaFilter, SagaId, SagaInstance, SagaRecord, SagaStatus, SagaStore,
    SagaSummary, Transition,
};

use crate::llm::{ChatRequest, Llm, LlmError, Message, ToolCall, Usage};
use crate::tool::{Caller, Effect, ToolContext, ToolFailure, ToolRegistry, ToolSpec};

/// The saga definition name agent runs are stored under.
pub const DEFINITION: &str = "agent-run";
/// The version of [`RunState`]'s layout.
pub const VERSION: u32 = 1;
/// How many times a compensation (an undo) is tried before the run is left `Stuck`.
pub const UNDO_ATTEMPTS: u32 = 3;
/// The most tool calls one model answer may make; calls beyond it get an error result.
pub const CALLS_PER_STEP_MAX: usize = 16;

/// Limits on one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// The most model answers.
    pub max_steps: u32,
    /// The most tokens (prompt and answer, summed over the run's model calls).
    pub max_tokens: u64,
    /// The longest a run may take, from its start to its last model call, in seconds.
    pub max_wall_secs: u64,
    /// The most tokens of one answer, asked of the model.
    pub max_answer_tokens: Option<u32>,
}

impl Default for Limits {
    /// 12 steps, 200,000 tokens, 10 minutes.
    fn default() -> Self {
        Self {
            max_steps: 12,
            max_tokens: 200_000,
            max_wall_secs: 600,
            max_answer_tokens: None,
        }
    }
}

/// Why a run stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StopReason {
    /// The model ended its turn with an answer.
    EndTurn,
    /// The run reached [`Limits::max_steps`] without an answer.
    StepLimit,
    /// The run spent [`Limits::max_tokens`].
    TokenBudget,
    /// The run passed [`Limits::max_wall_secs`].
    WallTime,
    /// An operator denied a call; the run's changes were undone.
    Denied {
        /// The call (`N.I:NAME`).
        call: String,
        /// Who denied it and why.
        reason: String,
    },
    /// An operator cancelled the run; its changes were undone.
    Cancelled {
        /// Who cancelled it and why.
        reason: String,
    },
    /// The model could not be asked (after the client's retries).
    Error {
        /// What went wrong.
        message: String,
    },
}

impl StopReason {
    /// A short name: `end_turn`, `step_limit`, `token_budget`, `wall_time`, `denied`,
    /// `cancelled`, `error`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::EndTurn => "end_turn",
            Self::StepLimit => "step_limit",
            Self::TokenBudget => "token_budget",
            Self::WallTime => "wall_time",
            Self::Denied { .. } => "denied",
            Self::Cancelled { .. } => "cancelled",
            Self::Error { .. } => "error",
        }
    }

    fn aborts(&self) -> bool {
        matches!(self, Self::Denied { .. } | Self::Cancelled { .. })
    }
}

/// An operator's decision on a call that needs approval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Approved (true) or denied.
    pub approved: bool,
    /// Who decided.
    pub operator: String,
    /// Why (empty when no reason was given).
    #[serde(default)]
    pub reason: String,
    /// When.
    pub at: DateTime<Utc>,
}

/// A tool call's recorded result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallOutcome {
    /// Whether the tool produced a result (false: a [`ToolFailure`]).
    pub ok: bool,
    /// What the model reads.
    pub content: String,
}

/// One tool call of a run, with everything recorded about it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallRecord {
    /// The model answer it belongs to (1-based).
    pub step: u32,
    /// Its place among that answer's calls (1-based).
    pub index: u32,
    /// The model's id for it.
    pub id: String,
    /// The tool.
    pub tool: String,
    /// The arguments as the model wrote them.
    pub arguments: String,
    /// What the tool does to the world (`None` for an unknown tool).
    pub effect: Option<Effect>,
    /// When the call began to wait for approval, for a call that needs one.
    #[serde(default)]
    pub requested_at: Option<DateTime<Utc>>,
    /// The operator's decision, for a call that needs one.
    #[serde(default)]
    pub decision: Option<Decision>,
    /// The result, once the call finished.
    #[serde(default)]
    pub outcome: Option<CallOutcome>,
    /// The tool's output as JSON, kept for a call that changed state so it can be undone.
    #[serde(default)]
    pub output: Option<Value>,
    /// Whether the call was undone.
    #[serde(default)]
    pub undone: bool,
}

impl CallRecord {
    /// `N.I:NAME`.
    pub fn label(&self) -> String {
        format!("{}.{}:{}", self.step, self.index, self.tool)
    }

    /// The log's step name for the call.
    pub fn step_name(&self) -> String {
        format!("tool-{}", self.label())
    }

    fn approval_step(&self) -> String {
        format!("approve-{}", self.label())
    }

    fn needs_approval(&self) -> bool {
        self.effect.is_some_and(Effect::needs_approval)
    }
}

/// A run's whole state: the saga context of every record of its log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// Who the run acts for (the token is never stored).
    pub caller: Caller,
    /// The model it was started with.
    pub model: String,
    /// Its limits.
    pub limits: Limits,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// The conversation, tool results included once a step's calls are all done.
    pub messages: Vec<Message>,
    /// Model answers so far.
    pub steps: u32,
    /// Tokens so far.
    pub usage: Usage,
    /// Every tool call, in order.
    pub calls: Vec<CallRecord>,
    /// Why it stopped, once it did.
    #[serde(default)]
    pub stop: Option<StopReason>,
    /// The model's final answer.
    #[serde(default)]
    pub answer: Option<String>,
}

impl RunState {
    /// The prompt the run started with.
    pub fn prompt(&self) -> &str {
        self.messages
            .iter()
            .find_map(|m| match m {
                Message::User { content } => Some(content.as_str()),
                _ => None,
            })
            .unwrap_or("")
    }

    /// Time spent waiting for operators' decisions, which the wall-time limit does not count.
    pub fn waited(&self) -> chrono::Duration {
        self.calls
            .iter()
            .filter_map(|c| Some(c.decision.as_ref()?.at - c.requested_at?))
            .filter(|d| *d > chrono::Duration::zero())
            .fold(chrono::Duration::zero(), |sum, d| sum + d)
    }

    /// When the wall-time limit passes: the start, plus the limit, plus the time spent waiting
    /// for decisions.
    pub fn deadline(&self) -> DateTime<Utc> {
        let limit = i64::try_from(self.limits.max_wall_secs).unwrap_or(i64::MAX / 4);
        self.started_at
            + chrono::Duration::try_seconds(limit).unwrap_or(chrono::Duration::MAX / 4)
            + self.waited()
    }

    fn pending(&self) -> Vec<usize> {
        (0..self.calls.len())
            .filter(|&i| self.calls[i].outcome.is_none())
            .collect()
    }
}

/// How [`Agent::drive`] left a run.
#[derive(Debug, Clone, PartialEq)]
pub enum RunOutcome {
    /// The run ended.
    Finished {
        /// Why.
        stop: StopReason,
        /// The model's answer, if it gave one.
        answer: Option<String>,
    },
    /// The run waits for an operator's decision on these calls.
    AwaitingApproval {
        /// The calls.
        calls: Vec<CallRecord>,
    },
    /// Undoing a call failed for good: the run is `Stuck` and an operator must act (the
    /// change is still in place).
    Stuck {
        /// The log's step whose undo failed.
        step: String,
        /// The last error.
        error: String,
    },
}

/// What a run does, as it happens (for a CLI to print).
#[derive(Debug, Clone)]
pub enum RunEvent {
    /// The model answered.
    Answer {
        /// Which answer (1-based).
        step: u32,
        /// Its text.
        content: Option<String>,
        /// The calls it asks for.
        tool_calls: Vec<ToolCall>,
        /// How long the model took.
        took: Duration,
    },
    /// A call finished.
    CallFinished {
        /// The call, with its outcome.
        call: CallRecord,
        /// How long it took.
        took: Duration,
    },
    /// A call waits for approval.
    AwaitingApproval {
        /// The call.
        call: CallRecord,
    },
    /// A call that changed state was undone.
    Undone {
        /// The call.
        call: CallRecord,
    },
    /// The run ended.
    Stopped {
        /// Why.
        stop: StopReason,
    },
}

/// Why the agent could not act on a run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The run log failed (storage, or another process holds the run).
    #[error(transparent)]
    Log(#[from] SagaError),
    /// No run has that id.
    #[error("no agent run {0}")]
    NotFound(SagaId),
    /// The run belongs to another user.
    #[error("run {0} acts for another user")]
    WrongCaller(SagaId),
    /// The request does not fit the run's state.
    #[error("{0}")]
    Invalid(String),
}

type Observer = Arc<dyn Fn(&RunEvent) + Send + Sync>;

/// Runs agent loops durably on a saga log.
pub struct Agent<S> {
    store: Arc<S>,
    llm: Arc<dyn Llm>,
    tools: ToolRegistry,
    limits: Limits,
    lease: Lease,
    system: Option<String>,
    observer: Option<Observer>,
}

impl<S> std::fmt::Debug for Agent<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("model", &self.llm.model())
            .field("tools", &self.tools)
            .field("limits", &self.limits)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

/// The lease owner an agent uses unless told otherwise: stable per machine, so a run that a
/// killed process held is resumed at once by the next process on the same machine (the log's
/// sequence numbers still keep two writers from interleaving).
pub fn default_owner() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("agent@{host}")
}

struct Log<'a, S> {
    store: &'a S,
    id: SagaId,
    seq: u64,
    lease: &'a Lease,
}

impl<S: SagaStore> Log<'_, S> {
    async fn append(&mut self, transition: Transition, state: &RunState) -> Result<(), AgentError> {
        let record = SagaRecord {
            seq: self.seq + 1,
            transition,
            context: serde_json::to_value(state).map_err(SagaError::from)?,
            at: Utc::now(),
        };
        self.store.append(self.id, &record, self.lease).await?;
        self.seq += 1;
        Ok(())
    }
}

impl<S: SagaStore> Agent<S> {
    /// An agent asking `llm`, with `tools`, logging to `store`.
    pub fn new(store: Arc<S>, llm: Arc<dyn Llm>, tools: ToolRegistry) -> Self {
        Self {
            store,
            llm,
            tools,
            limits: Limits::default(),
            lease: Lease::new(default_owner(), trellis_saga::LEASE_DEFAULT),
            system: None,
            observer: None,
        }
    }

    /// Limits for runs started from now on.
    #[must_use]
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The lease owner and duration (see [`default_owner`]).
    #[must_use]
    pub fn with_lease(mut self, lease: Lease) -> Self {
        self.lease = lease;
        self
    }

    /// A system prompt for runs started from now on.
    #[must_use]
    pub fn with_system_prompt(mut self, prompt: impl Into<String>) -> Self {
        self.system = Some(prompt.into());
        self
    }

    /// Calls `observer` with each [`RunEvent`].
    #[must_use]
    pub fn on_event(mut self, observer: impl Fn(&RunEvent) + Send + Sync + 'static) -> Self {
        self.observer = Some(Arc::new(observer));
        self
    }

    /// The log.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The tools.
    pub fn tools(&self) -> &ToolRegistry {
        &self.tools
    }

    fn emit(&self, event: RunEvent) {
        if let Some(observer) = &self.observer {
            observer(&event);
        }
    }

    /// Records a new run for `caller` asking `prompt`, without running it.
    ///
    /// # Errors
    /// A log error.
    pub async fn start(&self, caller: &Caller, prompt: &str) -> Result<SagaId, AgentError> {
        if prompt.trim().is_empty() {
            return Err(AgentError::Invalid("the prompt is empty".into()));
        }
        let mut messages = Vec::new();
        if let Some(system) = &self.system {
            messages.push(Message::System {
                content: system.clone(),
            });
        }
        messages.push(Message::User {
            content: prompt.to_owned(),
        });
        let state = RunState {
            caller: Caller {
                bearer: None,
                ..caller.clone()
            },
            model: self.llm.model().to_owned(),
            limits: self.limits,
            started_at: Utc::now(),
            messages,
            steps: 0,
            usage: Usage::default(),
            calls: Vec::new(),
            stop: None,
            answer: None,
        };
        let id = SagaId::new();
        let first = SagaRecord {
            seq: 1,
            transition: Transition::Started {
                steps: Vec::new(),
                pivot: None,
            },
            context: serde_json::to_value(&state).map_err(SagaError::from)?,
            at: Utc::now(),
        };
        self.store
            .create(id, DEFINITION, VERSION, &first, &self.lease)
            .await?;
        metrics::counter!("trellis_agent_runs_started_total").increment(1);
        Ok(id)
    }

    /// Starts a run and drives it (see [`drive`](Self::drive)).
    ///
    /// # Errors
    /// As [`drive`](Self::drive).
    pub async fn run(
        &self,
        caller: &Caller,
        prompt: &str,
    ) -> Result<(SagaId, RunOutcome), AgentError> {
        let id = self.start(caller, prompt).await?;
        let outcome = self.drive(id, caller).await?;
        Ok((id, outcome))
    }

    /// Loads a run.
    ///
    /// # Errors
    /// [`AgentError::NotFound`] or a log error.
    pub async fn load(&self, id: SagaId) -> Result<(SagaInstance, RunState), AgentError> {
        load(&*self.store, id).await
    }

    /// Takes the run (its lease) and carries it on from its log until it ends or waits for an
    /// approval. `caller` must be the user the run acts for (its token is what the tools use).
    ///
    /// # Errors
    /// [`AgentError::WrongCaller`], [`SagaError::Leased`] when another process is driving the
    /// run, or a log error.
    pub async fn drive(&self, id: SagaId, caller: &Caller) -> Result<RunOutcome, AgentError> {
        self.store.claim(id, &self.lease).await?;
        let result = self.drive_claimed(id, caller).await;
        // Waiting for an operator, or done: let others (an operator's CLI) write at once.
        if let Err(error) = self.store.release(id, self.lease.owner()).await {
            tracing::warn!(%error, run = %id, "cannot release the run's lease");
        }
        result
    }

    async fn drive_claimed(&self, id: SagaId, caller: &Caller) -> Result<RunOutcome, AgentError> {
        let (instance, mut state) = self.load(id).await?;
        if state.caller.subject != caller.subject {
            return Err(AgentError::WrongCaller(id));
        }
        let mut log = Log {
            store: &*self.store,
            id,
            seq: instance.last().seq,
            lease: &self.lease,
        };
        match instance.status {
            SagaStatus::Stuck => return Ok(stuck(&instance)),
            SagaStatus::Completed | SagaStatus::Failed => return Ok(finished(&state)),
            SagaStatus::Compensating => {
                if state.stop.is_none() {
                    state.stop = Some(cancel_reason(&instance));
                }
                return self.abort(&mut log, &mut state, caller).await;
            }
            SagaStatus::Running => {}
        }
        loop {
            if let Some(stop) = state.stop.clone() {
                return if stop.aborts() {
                    self.abort(&mut log, &mut state, caller).await
                } else {
                    self.finish(&mut log, &state).await
                };
            }
            let pending = state.pending();
            if !pending.is_empty() {
                // Approvals first: every call of the step waits until each call that needs a
                // decision has one.
                let mut waiting = Vec::new();
                for &i in &pending {
                    if !state.calls[i].needs_approval() || state.calls[i].decision.is_some() {
                        continue;
                    }
                    if state.calls[i].requested_at.is_none() {
                        state.calls[i].requested_at = Some(Utc::now());
                        let step = state.calls[i].approval_step();
                        log.append(Transition::StepExecuting { step, attempt: 1 }, &state)
                            .await?;
                    }
                    let call = state.calls[i].clone();
                    self.emit(RunEvent::AwaitingApproval { call: call.clone() });
                    waiting.push(call);
                }
                if !waiting.is_empty() {
                    return Ok(RunOutcome::AwaitingApproval { calls: waiting });
                }
                if let Some(denied) = pending
                    .iter()
                    .map(|&i| &state.calls[i])
                    .find(|c| c.decision.as_ref().is_some_and(|d| !d.approved))
                {
                    let decision = denied.decision.clone().unwrap_or_else(|| unreachable!());
                    state.stop = Some(StopReason::Denied {
                        call: denied.label(),
                        reason: format!("{}: {}", decision.operator, decision.reason)
                            .trim_end_matches([':', ' '])
                            .to_owned(),
                    });
                    continue;
                }
                self.run_calls(&mut log, &mut state, caller, &pending)
                    .await?;
                continue;
            }
            if let Some(stop) = self.limit_reached(&state) {
                state.stop = Some(stop);
                continue;
            }
            self.ask(&mut log, &mut state).await?;
        }
    }

    fn limit_reached(&self, state: &RunState) -> Option<StopReason> {
        let limits = &state.limits;
        if state.steps >= limits.max_steps {
            Some(StopReason::StepLimit)
        } else if state.usage.total() >= limits.max_tokens {
            Some(StopReason::TokenBudget)
        } else if Utc::now() >= state.deadline() {
            Some(StopReason::WallTime)
        } else {
            None
        }
    }

    fn wall_left(state: &RunState) -> Duration {
        (state.deadline() - Utc::now())
            .to_std()
            .unwrap_or(Duration::ZERO)
    }

    /// Asks the model for the next answer and records it.
    async fn ask(&self, log: &mut Log<'_, S>, state: &mut RunState) -> Result<(), AgentError> {
        let step = state.steps + 1;
        let name = format!("llm-{step}");
        log.append(
            Transition::StepExecuting {
                step: name.clone(),
                attempt: 1,
            },
            state,
        )
        .await?;
        let specs: Vec<ToolSpec> = self.tools.specs().cloned().collect();
        let request = ChatRequest {
            messages: &state.messages,
            tools: &specs,
            max_tokens: state.limits.max_answer_tokens,
        };
        let started = tokio::time::Instant::now();
        let answer = renewing(
            &*self.store,
            log.id,
            &self.lease,
            tokio::time::timeout(Self::wall_left(state), self.llm.complete(request)),
        )
        .await;
        let took = started.elapsed();
        metrics::histogram!("trellis_agent_llm_request_duration_seconds")
            .record(took.as_secs_f64());
        let reply = match answer {
            Ok(Ok(reply)) => reply,
            Ok(Err(error)) => return self.llm_failed(log, state, &name, &error).await,
            Err(_) => {
                state.stop = Some(StopReason::WallTime);
                log.append(
                    Transition::StepFailed {
                        step: name,
                        attempt: 1,
                        retryable: false,
                        error: "the run's wall-time limit passed while the model answered".into(),
                    },
                    state,
                )
                .await?;
                return Ok(());
            }
        };
        state.steps = step;
        state.usage.prompt_tokens += reply.usage.prompt_tokens;
        state.usage.completion_tokens += reply.usage.completion_tokens;
        state.messages.push(Message::Assistant {
            content: reply.content.clone(),
            tool_calls: reply.tool_calls.clone(),
        });
        if reply.tool_calls.is_empty() {
            state.answer = reply.content.clone();
            state.stop = Some(StopReason::EndTurn);
        }
        for (i, call) in reply.tool_calls.iter().enumerate() {
            let index = u32::try_from(i + 1).unwrap_or(u32::MAX);
            let mut record = CallRecord {
                step,
                index,
                id: call.id.clone(),
                tool: call.name.clone(),
                arguments: call.arguments.clone(),
                effect: self.tools.spec(&call.name).map(|s| s.effect),
                requested_at: None,
                decision: None,
                outcome: None,
                output: None,
                undone: false,
            };
            if i >= CALLS_PER_STEP_MAX {
                record.outcome = Some(CallOutcome {
                    ok: false,
                    content: serde_json::json!({ "error": format!(
                        "too many tool calls in one answer; at most {CALLS_PER_STEP_MAX} run"
                    )})
                    .to_string(),
                });
            }
            state.calls.push(record);
        }
        close_step(state, step);
        log.append(Transition::StepSucceeded { step: name }, state)
            .await?;
        self.emit(RunEvent::Answer {
            step,
            content: reply.content,
            tool_calls: reply.tool_calls,
            took,
        });
        Ok(())
    }

    async fn llm_failed(
        &self,
        log: &mut Log<'_, S>,
        state: &mut RunState,
        name: &str,
        error: &LlmError,
    ) -> Result<(), AgentError> {
        state.stop = Some(StopReason::Error {
            message: error.to_string(),
        });
        log.append(
            Transition::StepFailed {
                step: name.to_owned(),
                attempt: 1,
                retryable: error.is_retryable(),
                error: error.to_string(),
            },
            state,
        )
        .await
    }

    /// Runs a step's pending calls in parallel, recording each as it finishes.
    async fn run_calls(
        &self,
        log: &mut Log<'_, S>,
        state: &mut RunState,
        caller: &Caller,
        pending: &[usize],
    ) -> Result<(), AgentError> {
        for &i in pending {
            log.append(
                Transition::StepExecuting {
                    step: state.calls[i].step_name(),
                    attempt: 1,
                },
                state,
            )
            .await?;
        }
        let within = Self::wall_left(state).max(Duration::from_secs(1));
        let mut running: FuturesUnordered<_> = pending
            .iter()
            .map(|&i| {
                let call = state.calls[i].clone();
                let ctx = ToolContext::new(
                    caller.clone(),
                    within,
                    format!("{}:{}.{}", log.id, call.step, call.index),
                );
                let tools = self.tools.clone();
                async move {
                    let started = tokio::time::Instant::now();
                    let result = tools.call_json(&call.tool, &call.arguments, &ctx).await;
                    (i, result, started.elapsed())
                }
            })
            .collect();
        let store = &*self.store;
        let id = log.id;
        let lease = self.lease.clone();
        loop {
            let next = renewing(store, id, &lease, running.next()).await;
            let Some((i, result, took)) = next else { break };
            let call = &mut state.calls[i];
            let changes = call.effect.is_some_and(Effect::changes_state);
            let (outcome, output) = match result {
                Ok(value) => (
                    CallOutcome {
                        ok: true,
                        content: value.to_string(),
                    },
                    changes.then_some(value),
                ),
                Err(failure) => (
                    CallOutcome {
                        ok: false,
                        content: failure.to_model_text(),
                    },
                    None,
                ),
            };
            call.outcome = Some(outcome);
            call.output = output;
            let name = call.step_name();
            let record = call.clone();
            let step = record.step;
            close_step(state, step);
            log.append(Transition::StepSucceeded { step: name }, state)
                .await?;
            metrics::histogram!("trellis_agent_tool_call_duration_seconds")
                .record(took.as_secs_f64());
            self.emit(RunEvent::CallFinished { call: record, took });
        }
        Ok(())
    }

    async fn finish(
        &self,
        log: &mut Log<'_, S>,
        state: &RunState,
    ) -> Result<RunOutcome, AgentError> {
        let stop = state.stop.clone().unwrap_or(StopReason::EndTurn);
        match &stop {
            StopReason::Error { message } => {
                log.append(
                    Transition::Failed {
                        step: format!("llm-{}", state.steps + 1),
                        error: message.clone(),
                    },
                    state,
                )
                .await?;
            }
            _ => log.append(Transition::Completed, state).await?,
        }
        metrics::counter!("trellis_agent_runs_total", "stop" => stop.kind()).increment(1);
        self.emit(RunEvent::Stopped { stop });
        Ok(finished(state))
    }

    /// Undoes, in reverse order, every call that changed state, then ends the run `Failed`.
    async fn abort(
        &self,
        log: &mut Log<'_, S>,
        state: &mut RunState,
        caller: &Caller,
    ) -> Result<RunOutcome, AgentError> {
        let stop = state.stop.clone().unwrap_or(StopReason::Cancelled {
            reason: "cancelled".into(),
        });
        let (failed_step, why) = match &stop {
            StopReason::Denied { call, reason } => {
                (format!("approve-{call}"), format!("denied by {reason}"))
            }
            other => ("run".to_owned(), format!("{other:?}")),
        };
        let instance = self
            .store
            .load(log.id)
            .await?
            .ok_or(AgentError::NotFound(log.id))?;
        if instance.status != SagaStatus::Compensating {
            log.append(
                Transition::Compensating {
                    failed_step: failed_step.clone(),
                    error: why.clone(),
                },
                state,
            )
            .await?;
        }
        for i in (0..state.calls.len()).rev() {
            let call = state.calls[i].clone();
            let Some(output) = call.output.clone() else {
                continue;
            };
            if call.undone || !call.outcome.as_ref().is_some_and(|o| o.ok) {
                continue;
            }
            let ctx = ToolContext::new(
                caller.clone(),
                crate::tool::TOOL_TIMEOUT_MAX,
                format!("{}:{}.{}:undo", log.id, call.step, call.index),
            );
            let args = crate::tool::parse_arguments(&call.arguments).unwrap_or(Value::Null);
            let mut attempt = 0;
            loop {
                attempt += 1;
                log.append(
                    Transition::StepCompensating {
                        step: call.step_name(),
                        attempt,
                    },
                    state,
                )
                .await?;
                match self
                    .tools
                    .undo(&call.tool, args.clone(), output.clone(), &ctx)
                    .await
                {
                    Ok(()) => {
                        state.calls[i].undone = true;
                        log.append(
                            Transition::StepCompensated {
                                step: call.step_name(),
                            },
                            state,
                        )
                        .await?;
                        self.emit(RunEvent::Undone {
                            call: state.calls[i].clone(),
                        });
                        break;
                    }
                    Err(error) => {
                        log.append(
                            Transition::CompensationFailed {
                                step: call.step_name(),
                                attempt,
                                retryable: error.is_fault(),
                                error: error.to_string(),
                            },
                            state,
                        )
                        .await?;
                        if !error.is_fault() || attempt >= UNDO_ATTEMPTS {
                            log.append(
                                Transition::Stuck {
                                    step: call.step_name(),
                                    compensating: true,
                                    error: error.to_string(),
                                },
                                state,
                            )
                            .await?;
                            metrics::counter!("trellis_agent_runs_total", "stop" => "stuck")
                                .increment(1);
                            return Ok(RunOutcome::Stuck {
                                step: call.step_name(),
                                error: error.to_string(),
                            });
                        }
                        tokio::time::sleep(Duration::from_millis(200) * attempt).await;
                    }
                }
            }
        }
        log.append(
            Transition::Failed {
                step: failed_step,
                error: why,
            },
            state,
        )
        .await?;
        metrics::counter!("trellis_agent_runs_total", "stop" => stop.kind()).increment(1);
        self.emit(RunEvent::Stopped { stop });
        Ok(finished(state))
    }
}

/// When every call of `step` has its outcome, appends their results to the conversation in
/// the model's order.
fn close_step(state: &mut RunState, step: u32) {
    let calls: Vec<&CallRecord> = state.calls.iter().filter(|c| c.step == step).collect();
    if calls.is_empty() || calls.iter().any(|c| c.outcome.is_none()) {
        return;
    }
    let results: Vec<Message> = calls
        .iter()
        .map(|c| Message::Tool {
            tool_call_id: c.id.clone(),
            content: c
                .outcome
                .as_ref()
                .map(|o| o.content.clone())
                .unwrap_or_default(),
        })
        .collect();
    state.messages.extend(results);
}

fn finished(state: &RunState) -> RunOutcome {
    RunOutcome::Finished {
        stop: state.stop.clone().unwrap_or(StopReason::EndTurn),
        answer: state.answer.clone(),
    }
}

fn stuck(instance: &SagaInstance) -> RunOutcome {
    let (step, error) = instance
        .records
        .iter()
        .rev()
        .find_map(|r| match &r.transition {
            Transition::Stuck { step, error, .. } => Some((step.clone(), error.clone())),
            _ => None,
        })
        .unwrap_or_default();
    RunOutcome::Stuck { step, error }
}

fn cancel_reason(instance: &SagaInstance) -> StopReason {
    let reason = instance
        .records
        .iter()
        .rev()
        .find_map(|r| match &r.transition {
            Transition::Cancelled { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .unwrap_or_else(|| "cancelled".into());
    StopReason::Cancelled { reason }
}

/// Runs `work`, renewing the run's lease every third of its duration meanwhile.
async fn renewing<S: SagaStore, T>(
    store: &S,
    id: SagaId,
    lease: &Lease,
    work: impl std::future::Future<Output = T>,
) -> T {
    let mut work = std::pin::pin!(work);
    let period = (lease.duration() / 3).max(Duration::from_millis(30));
    loop {
        tokio::select! {
            done = &mut work => return done,
            () = tokio::time::sleep(period) => {
                if let Err(error) = store.renew(id, lease).await {
                    tracing::warn!(%error, run = %id, "cannot renew the run's lease");
                }
            }
        }
    }
}

async fn load<S: SagaStore>(store: &S, id: SagaId) -> Result<(SagaInstance, RunState), AgentError> {
    let instance = store.load(id).await?.ok_or(AgentError::NotFound(id))?;
    if instance.definition != DEFINITION {
        return Err(AgentError::NotFound(id));
    }
    let state = instance.context::<RunState>()?;
    Ok((instance, state))
}

/// Records an operator's decision on a run's call waiting for approval (`call` = `N.I` or
/// `N.I:NAME`; `None` decides every call waiting). The run goes on when it is next driven.
///
/// # Errors
/// [`AgentError::Invalid`] when no call waits (or `call` names none), [`SagaError::Leased`]
/// when a process holds the run, or a log error.
pub async fn decide<S: SagaStore>(
    store: &S,
    id: SagaId,
    call: Option<&str>,
    approved: bool,
    operator: &str,
    reason: &str,
) -> Result<Vec<CallRecord>, AgentError> {
    let lease = Lease::new(format!("operator:{operator}"), trellis_saga::OPERATOR_LEASE);
    store.claim(id, &lease).await?;
    let result = async {
        let (instance, mut state) = load(store, id).await?;
        if instance.status != SagaStatus::Running {
            return Err(AgentError::Invalid(format!(
                "run {id} is {}, not waiting for approval",
                instance.status.as_str()
            )));
        }
        let waiting: Vec<usize> = (0..state.calls.len())
            .filter(|&i| {
                let c = &state.calls[i];
                c.outcome.is_none() && c.needs_approval() && c.decision.is_none()
            })
            .filter(|&i| {
                call.is_none_or(|wanted| {
                    let label = state.calls[i].label();
                    label == wanted || label.split(':').next() == Some(wanted)
                })
            })
            .collect();
        if waiting.is_empty() {
            return Err(AgentError::Invalid(match call {
                Some(c) => format!("run {id} has no call {c} waiting for approval"),
                None => format!("run {id} has no call waiting for approval"),
            }));
        }
        let mut log = Log {
            store,
            id,
            seq: instance.last().seq,
            lease: &lease,
        };
        let mut decided = Vec::new();
        for i in waiting {
            state.calls[i].decision = Some(Decision {
                approved,
                operator: operator.to_owned(),
                reason: reason.to_owned(),
                at: Utc::now(),
            });
            let step = state.calls[i].approval_step();
            let transition = if approved {
                Transition::StepSucceeded { step }
            } else {
                Transition::StepFailed {
                    step,
                    attempt: 1,
                    retryable: false,
                    error: format!("denied by {operator}: {reason}"),
                }
            };
            log.append(transition, &state).await?;
            decided.push(state.calls[i].clone());
        }
        Ok(decided)
    }
    .await;
    if let Err(error) = store.release(id, lease.owner()).await {
        tracing::warn!(%error, run = %id, "cannot release the run's lease");
    }
    result
}

/// Approves a run's waiting call(s); see [`decide`].
///
/// # Errors
/// As [`decide`].
pub async fn approve<S: SagaStore>(
    store: &S,
    id: SagaId,
    call: Option<&str>,
    operator: &str,
) -> Result<Vec<CallRecord>, AgentError> {
    decide(store, id, call, true, operator, "").await
}

/// Denies a run's waiting call(s); the run is aborted when next driven; see [`decide`].
///
/// # Errors
/// As [`decide`].
pub async fn deny<S: SagaStore>(
    store: &S,
    id: SagaId,
    call: Option<&str>,
    operator: &str,
    reason: &str,
) -> Result<Vec<CallRecord>, AgentError> {
    decide(store, id, call, false, operator, reason).await
}

/// Cancels an active run: when next driven, its changes are undone and it ends `Failed`.
///
/// # Errors
/// [`AgentError::Invalid`] when the run has ended, [`SagaError::Leased`] when a process holds
/// it, or a log error.
pub async fn cancel<S: SagaStore>(
    store: &S,
    id: SagaId,
    operator: &str,
    reason: &str,
) -> Result<(), AgentError> {
    let lease = Lease::new(format!("operator:{operator}"), trellis_saga::OPERATOR_LEASE);
    store.claim(id, &lease).await?;
    let result = async {
        let (instance, mut state) = load(store, id).await?;
        if instance.status != SagaStatus::Running {
            return Err(AgentError::Invalid(format!(
                "run {id} is {}; only a running run can be cancelled",
                instance.status.as_str()
            )));
        }
        let reason = format!("{operator}: {reason}");
        state.stop = Some(StopReason::Cancelled {
            reason: reason.clone(),
        });
        let mut log = Log {
            store,
            id,
            seq: instance.last().seq,
            lease: &lease,
        };
        log.append(Transition::Cancelled { step: None, reason }, &state)
            .await
    }
    .await;
    if let Err(error) = store.release(id, lease.owner()).await {
        tracing::warn!(%error, run = %id, "cannot release the run's lease");
    }
    result
}

/// Agent runs, newest last, `limit` at most.
///
/// # Errors
/// A log error.
pub async fn list<S: SagaStore>(
    store: &S,
    status: Option<SagaStatus>,
    limit: usize,
) -> Result<Vec<SagaSummary>, AgentError> {
    let mut filter = SagaFilter::new()
        .with_definition(DEFINITION)
        .with_limit(limit);
    if let Some(status) = status {
        filter = filter.with_status(status);
    }
    Ok(store.list(&filter).await?)
}

/// One step of a run as `trellis agent show` prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepTiming {
    /// The log's step name (`llm-1`, `tool-1.1:get_order`, `approve-…`).
    pub step: String,
    /// When it began.
    pub started: DateTime<Utc>,
    /// When it ended (`None` while in flight or waiting).
    pub ended: Option<DateTime<Utc>>,
    /// How it ended: `succeeded`, `failed: …`, `compensated`, or `None`.
    pub outcome: Option<String>,
}

/// Each step's timing, from a run's log.
pub fn timings(instance: &SagaInstance) -> Vec<StepTiming> {
    let mut out: Vec<StepTiming> = Vec::new();
    let open = |out: &mut Vec<StepTiming>, step: &str, at: DateTime<Utc>| {
        out.push(StepTiming {
            step: step.to_owned(),
            started: at,
            ended: None,
            outcome: None,
        });
    };
    let close = |out: &mut Vec<StepTiming>, step: &str, at: DateTime<Utc>, outcome: String| {
        if let Some(t) = out
            .iter_mut()
            .rev()
            .find(|t| t.step == step && t.ended.is_none())
        {
            t.ended = Some(at);
            t.outcome = Some(outcome);
        }
    };
    for record in &instance.records {
        let at = record.at;
        match &record.transition {
            Transition::StepExecuting { step, .. } => open(&mut out, step, at),
            Transition::StepSucceeded { step } => close(&mut out, step, at, "succeeded".into()),
            Transition::StepFailed { step, error, .. } => {
                close(&mut out, step, at, format!("failed: {error}"));
            }
            Transition::StepCompensating { step, .. } => {
                open(&mut out, &format!("undo {step}"), at);
            }
            Transition::StepCompensated { step } => {
                close(&mut out, &format!("undo {step}"), at, "undone".into());
            }
            Transition::CompensationFailed { step, error, .. } => {
                close(
                    &mut out,
                    &format!("undo {step}"),
                    at,
                    format!("failed: {error}"),
                );
            }
            _ => {}
        }
    }
    out
}

impl From<ToolFailure> for AgentError {
    fn from(failure: ToolFailure) -> Self {
        Self::Invalid(failure.to_string())
    }
}
