//! Typed tools, their JSON Schema, and the registry that validates and runs them.
//!
//! A [`Tool`] has a name, a description, an input type whose JSON Schema schemars derives, an
//! output type, and an async `execute` that receives a [`ToolContext`] (who is calling, until
//! when, and an idempotency key). The [`ToolRegistry`] holds tools by name, validates a call's
//! arguments against the tool's schema before it runs, and runs it behind a timeout, a circuit
//! breaker per tool and a bound on concurrent calls. Whatever goes wrong (an unknown tool,
//! arguments that do not fit, a timeout, an open breaker, the tool's own error) comes back as a
//! [`ToolFailure`] the model can read and act on; nothing a model sends can crash the loop.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;
use trellis_resilience::{Bulkhead, CircuitBreaker, Outcome, SlidingWindow};

/// A boxed future, as the registry stores tools behind one object type.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The longest a tool call may run, whatever the tool asks for.
pub const TOOL_TIMEOUT_MAX: Duration = Duration::from_secs(120);
/// The timeout of a tool that does not set one.
pub const TOOL_TIMEOUT_DEFAULT: Duration = Duration::from_secs(15);
/// The default bound on tool calls running at once, across all tools of a registry.
pub const CONCURRENT_CALLS_DEFAULT: usize = 16;
/// The largest argument document a call may carry, in bytes of JSON.
pub const ARGUMENTS_MAX_BYTES: usize = 64 * 1024;

/// Who a tool acts for. Tools that call a service pass [`Caller::bearer`] on, so a tool can
/// never do what its caller could not.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    /// The caller's id (a user id, or a service name).
    pub subject: String,
    /// The caller's role (`customer`, `admin`, ...), as the issuer of the token said.
    pub role: String,
    /// The caller's bearer token, if tools should act with it. Never written to a run's log.
    #[serde(skip)]
    pub bearer: Option<String>,
}

impl Caller {
    /// A caller with a subject and a role and no token.
    pub fn new(subject: impl Into<String>, role: impl Into<String>) -> Self {
        Self {
            subject: subject.into(),
            role: role.into(),
            bearer: None,
        }
    }

    /// The same caller, acting with `token`.
    #[must_use]
    pub fn with_bearer(mut self, token: impl Into<String>) -> Self {
        self.bearer = Some(token.into());
        self
    }
}

impl fmt::Debug for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Caller")
            .field("subject", &self.subject)
            .field("role", &self.role)
            .field("bearer", &self.bearer.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// What a tool call knows about its circumstances.
#[derive(Debug, Clone)]
pub struct ToolContext {
    caller: Caller,
    deadline: Instant,
    idempotency_key: String,
}

impl ToolContext {
    /// A context for `caller`, due `within` from now, with the call's idempotency key.
    pub fn new(caller: Caller, within: Duration, idempotency_key: impl Into<String>) -> Self {
        Self {
            caller,
            deadline: Instant::now() + within,
            idempotency_key: idempotency_key.into(),
        }
    }

    /// Who the call acts for.
    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    /// When the call must be done (the registry cancels it then).
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Time left until the deadline (zero once it passed).
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// A key stable across retries of this one call (in a durable run: derived from the run
    /// and the call). Tools that change state hand it to the service (an `Idempotency-Key`
    /// header), so a retried call does not act twice.
    pub fn idempotency_key(&self) -> &str {
        &self.idempotency_key
    }

    fn with_deadline(&self, deadline: Instant) -> Self {
        Self {
            deadline: deadline.min(self.deadline),
            ..self.clone()
        }
    }
}

/// What a tool does to the world, which decides how a durable run treats its calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    /// Reads only: safe to repeat, nothing to undo.
    ReadOnly,
    /// Changes state: runs with an idempotency key, and its [`Tool::undo`] runs when the run is
    /// aborted. `approval` says whether an operator must approve each call first.
    Changes {
        /// Whether each call waits for an operator's approval.
        approval: bool,
    },
}

impl Effect {
    /// Whether the tool changes state.
    pub fn changes_state(self) -> bool {
        matches!(self, Self::Changes { .. })
    }

    /// Whether a call waits for approval.
    pub fn needs_approval(self) -> bool {
        matches!(self, Self::Changes { approval: true })
    }
}

/// A tool's own failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolError {
    message: String,
    fault: bool,
}

impl ToolError {
    /// The request was refused for a reason the model can act on (not found, not allowed, out
    /// of stock). It says nothing about the tool's health.
    pub fn refused(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            fault: false,
        }
    }

    /// The tool or what it calls is failing (a 5xx, a refused connection): counts against the
    /// tool's circuit breaker.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            fault: true,
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether this is a fault of the tool (see [`unavailable`](Self::unavailable)).
    pub fn is_fault(&self) -> bool {
        self.fault
    }
}

impl fmt::Display for ToolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ToolError {}

/// A typed tool.
///
/// ```
/// use schemars::JsonSchema;
/// use serde::{Deserialize, Serialize};
/// use trellis_agent::{Tool, ToolContext, ToolError};
///
/// struct Add;
///
/// #[derive(Deserialize, JsonSchema)]
/// struct Numbers { a: i64, b: i64 }
///
/// #[derive(Serialize, Deserialize)]
/// struct Sum { sum: i64 }
///
/// impl Tool for Add {
///     type Input = Numbers;
///     type Output = Sum;
///     fn name(&self) -> &str { "add" }
///     fn description(&self) -> &str { "Adds two integers." }
///     async fn execute(&self, input: Numbers, _ctx: &ToolContext) -> Result<Sum, ToolError> {
///         input.a.checked_add(input.b).map(|sum| Sum { sum }).ok_or_else(|| ToolError::refused("overflow"))
///     }
/// }
/// ```
pub trait Tool: Send + Sync + 'static {
    /// The arguments, as the model sends them. Its schemars schema is what the model sees and
    /// what arguments are validated against; it must describe a JSON object.
    type Input: DeserializeOwned + JsonSchema + Send + 'static;
    /// The result, as the model reads it (keep it compact). Read back when a call is undone.
    type Output: Serialize + DeserializeOwned + Send + 'static;

    /// The tool's name: letters, digits, `_` and `-`, at most 64 characters.
    fn name(&self) -> &str;

    /// What the tool does, for the model.
    fn description(&self) -> &str;

    /// Whether the tool changes state and needs approval. Read-only by default.
    fn effect(&self) -> Effect {
        Effect::ReadOnly
    }

    /// The longest one call may take (capped at [`TOOL_TIMEOUT_MAX`]).
    fn timeout(&self) -> Duration {
        TOOL_TIMEOUT_DEFAULT
    }

    /// Runs the tool.
    fn execute(
        &self,
        input: Self::Input,
        ctx: &ToolContext,
    ) -> impl Future<Output = Result<Self::Output, ToolError>> + Send;

    /// Undoes a call that succeeded with `output`, when the run it belongs to is aborted. Must
    /// accept undoing something already undone. Nothing to undo by default.
    fn undo(
        &self,
        input: Self::Input,
        output: Self::Output,
        ctx: &ToolContext,
    ) -> impl Future<Output = Result<(), ToolError>> + Send {
        let _ = (input, output, ctx);
        async { Ok(()) }
    }
}

/// A tool as the model and an MCP client see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    /// The name.
    pub name: String,
    /// The description.
    pub description: String,
    /// The JSON Schema of the arguments (an object schema).
    pub input_schema: Value,
    /// What the tool does to the world.
    pub effect: Effect,
}

/// Why a tool call produced no result. Every variant reads as a message the model can act on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", content = "message", rename_all = "snake_case")]
pub enum ToolFailure {
    /// No tool has that name.
    #[error("unknown tool `{0}`")]
    UnknownTool(String),
    /// The arguments do not fit the tool's schema (or are not JSON).
    #[error("invalid arguments: {0}")]
    InvalidArguments(String),
    /// The call did not finish in time and was cancelled.
    #[error("the tool did not answer within {0}")]
    Timeout(String),
    /// The tool's breaker is open or the registry is at its bound on concurrent calls.
    #[error("the tool is unavailable: {0}")]
    Unavailable(String),
    /// The tool refused or failed.
    #[error("{0}")]
    Failed(String),
}

impl ToolFailure {
    /// The text a model reads as the call's result.
    pub fn to_model_text(&self) -> String {
        let hint = match self {
            Self::UnknownTool(_) => " Call one of the tools you were given.",
            Self::InvalidArguments(_) => " Fix the arguments and call again.",
            Self::Timeout(_) | Self::Unavailable(_) => " It may work later.",
            Self::Failed(_) => "",
        };
        serde_json::json!({ "error": format!("{self}.{hint}").trim_end() }).to_string()
    }

    /// A short, stable name, for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::UnknownTool(_) => "unknown_tool",
            Self::InvalidArguments(_) => "invalid_arguments",
            Self::Timeout(_) => "timeout",
            Self::Unavailable(_) => "unavailable",
            Self::Failed(_) => "failed",
        }
    }
}

/// A registration the registry refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tool `{name}`: {problem}")]
pub struct RegistryError {
    name: String,
    problem: String,
}

trait DynTool: Send + Sync {
    fn call<'a>(&'a self, args: Value, ctx: &'a ToolContext) -> BoxFuture<'a, CallResult>;
    fn undo<'a>(
        &'a self,
        args: Value,
        output: Value,
        ctx: &'a ToolContext,
    ) -> BoxFuture<'a, Result<(), ToolError>>;
}

type CallResult = Result<Value, CallError>;

enum CallError {
    Arguments(String),
    Tool(ToolError),
}

struct Typed<T>(T);

impl<T: Tool> DynTool for Typed<T> {
    fn call<'a>(&'a self, args: Value, ctx: &'a ToolContext) -> BoxFuture<'a, CallResult> {
        Box::pin(async move {
            let input: T::Input =
                serde_json::from_value(args).map_err(|e| CallError::Arguments(e.to_string()))?;
            let output = self.0.execute(input, ctx).await.map_err(CallError::Tool)?;
            serde_json::to_value(output).map_err(|e| {
                CallError::Tool(ToolError::unavailable(format!(
                    "the tool's result could not be written as JSON: {e}"
                )))
            })
        })
    }

    fn undo<'a>(
        &'a self,
        args: Value,
        output: Value,
        ctx: &'a ToolContext,
    ) -> BoxFuture<'a, Result<(), ToolError>> {
        Box::pin(async move {
            let input: T::Input = serde_json::from_value(args)
                .map_err(|e| ToolError::refused(format!("recorded arguments: {e}")))?;
            let output: T::Output = serde_json::from_value(output)
                .map_err(|e| ToolError::refused(format!("recorded result: {e}")))?;
            self.0.undo(input, output, ctx).await
        })
    }
}

struct Entry {
    tool: Box<dyn DynTool>,
    spec: ToolSpec,
    validator: jsonschema::Validator,
    breaker: CircuitBreaker,
    timeout: Duration,
}

/// Tools by name, each validated and guarded when called. Cheap to clone (shared).
#[derive(Clone)]
pub struct ToolRegistry {
    tools: Arc<BTreeMap<String, Entry>>,
    bulkhead: Bulkhead,
}

impl fmt::Debug for ToolRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ToolRegistry")
            .field("tools", &self.tools.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Builds a [`ToolRegistry`].
pub struct ToolRegistryBuilder {
    tools: BTreeMap<String, Entry>,
    concurrent: usize,
}

impl fmt::Debug for ToolRegistryBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ToolRegistryBuilder")
            .field("tools", &self.tools.keys().collect::<Vec<_>>())
            .field("concurrent", &self.concurrent)
            .finish()
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl ToolRegistryBuilder {
    /// Adds a tool.
    ///
    /// # Errors
    /// A [`RegistryError`] when the name is taken or not a valid tool name, or the input's
    /// schema is not an object schema.
    pub fn tool<T: Tool>(mut self, tool: T) -> Result<Self, RegistryError> {
        let name = tool.name().to_owned();
        let refuse = |problem: &str| RegistryError {
            name: name.clone(),
            problem: problem.to_owned(),
        };
        if !valid_name(&name) {
            return Err(refuse(
                "a name is 1 to 64 letters, digits, `_` or `-` characters",
            ));
        }
        if self.tools.contains_key(&name) {
            return Err(refuse("a tool of that name is registered already"));
        }
        let schema = serde_json::to_value(schemars::schema_for!(T::Input))
            .map_err(|e| refuse(&format!("schema: {e}")))?;
        if schema.get("type").and_then(Value::as_str) != Some("object") {
            return Err(refuse("the input must be a struct (a JSON object schema)"));
        }
        let validator = jsonschema::validator_for(&schema)
            .map_err(|e| refuse(&format!("schema does not compile: {e}")))?;
        let breaker = CircuitBreaker::builder(&format!("tool:{name}"))
            .sliding_window(SlidingWindow::Count(20))
            .minimum_calls(5)
            .failure_rate_threshold(0.5)
            .open_duration(Duration::from_secs(30))
            .build()
            .map_err(|e| refuse(&format!("breaker: {e}")))?;
        let spec = ToolSpec {
            name: name.clone(),
            description: tool.description().to_owned(),
            input_schema: schema,
            effect: tool.effect(),
        };
        let timeout = tool.timeout().min(TOOL_TIMEOUT_MAX);
        self.tools.insert(
            name,
            Entry {
                tool: Box::new(Typed(tool)),
                spec,
                validator,
                breaker,
                timeout,
            },
        );
        Ok(self)
    }

    /// The bound on calls running at once across the registry (at least 1); calls above it
    /// wait up to a second, then fail as unavailable.
    #[must_use]
    pub fn concurrent_calls(mut self, bound: usize) -> Self {
        self.concurrent = bound.max(1);
        self
    }

    /// The registry.
    pub fn build(self) -> ToolRegistry {
        let bulkhead = Bulkhead::new(
            "agent-tools",
            self.concurrent,
            self.concurrent * 4,
            Duration::from_secs(1),
        )
        .unwrap_or_else(|_| unreachable!("concurrent is at least 1"));
        ToolRegistry {
            tools: Arc::new(self.tools),
            bulkhead,
        }
    }
}

impl ToolRegistry {
    /// An empty builder.
    pub fn builder() -> ToolRegistryBuilder {
        ToolRegistryBuilder {
            tools: BTreeMap::new(),
            concurrent: CONCURRENT_CALLS_DEFAULT,
        }
    }

    /// Every tool's spec, by name.
    pub fn specs(&self) -> impl Iterator<Item = &ToolSpec> {
        self.tools.values().map(|e| &e.spec)
    }

    /// One tool's spec.
    pub fn spec(&self, name: &str) -> Option<&ToolSpec> {
        self.tools.get(name).map(|e| &e.spec)
    }

    /// The circuit breaker guarding `name`, to observe or operate it.
    pub fn breaker(&self, name: &str) -> Option<&CircuitBreaker> {
        self.tools.get(name).map(|e| &e.breaker)
    }

    /// Parses `arguments` (a JSON text, as models send them) and calls the tool.
    pub async fn call_json(
        &self,
        name: &str,
        arguments: &str,
        ctx: &ToolContext,
    ) -> Result<Value, ToolFailure> {
        let args = parse_arguments(arguments)?;
        self.call(name, args, ctx).await
    }

    /// Validates `args` against the tool's schema and runs it within its timeout (and the
    /// context's deadline), behind its breaker and the registry's bound on concurrent calls.
    pub async fn call(
        &self,
        name: &str,
        args: Value,
        ctx: &ToolContext,
    ) -> Result<Value, ToolFailure> {
        let result = self.call_inner(name, args, ctx).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(failure) => failure.kind(),
        };
        metrics::counter!("trellis_agent_tool_calls_total", "tool" => self.metric_name(name), "outcome" => outcome).increment(1);
        result
    }

    fn metric_name(&self, name: &str) -> String {
        if self.tools.contains_key(name) {
            name.to_owned()
        } else {
            "unknown".to_owned()
        }
    }

    async fn call_inner(
        &self,
        name: &str,
        args: Value,
        ctx: &ToolContext,
    ) -> Result<Value, ToolFailure> {
        let entry = self.entry(name)?;
        entry.validate(&args)?;
        let permit = entry
            .breaker
            .try_acquire()
            .map_err(|e| ToolFailure::Unavailable(e.to_string()))?;
        let _slot = self
            .bulkhead
            .acquire::<()>()
            .await
            .map_err(|_| ToolFailure::Unavailable("too many tool calls at once".into()))?;
        let deadline = Instant::now() + entry.timeout;
        let ctx = ctx.with_deadline(deadline);
        let limit = ctx.remaining();
        match tokio::time::timeout_at(ctx.deadline(), entry.tool.call(args, &ctx)).await {
            Err(_) => {
                permit.record(Outcome::Failure);
                Err(ToolFailure::Timeout(format!("{limit:?}")))
            }
            Ok(Ok(value)) => {
                permit.record(Outcome::Success);
                Ok(value)
            }
            Ok(Err(CallError::Arguments(message))) => {
                permit.record(Outcome::Ignored);
                Err(ToolFailure::InvalidArguments(message))
            }
            Ok(Err(CallError::Tool(error))) => {
                permit.record(if error.is_fault() {
                    Outcome::Failure
                } else {
                    Outcome::Success
                });
                Err(ToolFailure::Failed(error.message))
            }
        }
    }

    /// Undoes a call that returned `output` (see [`Tool::undo`]), within the tool's timeout.
    ///
    /// # Errors
    /// The tool's error, or a timeout, as a [`ToolError`].
    pub async fn undo(
        &self,
        name: &str,
        args: Value,
        output: Value,
        ctx: &ToolContext,
    ) -> Result<(), ToolError> {
        let entry = self
            .entry(name)
            .map_err(|e| ToolError::refused(e.to_string()))?;
        let ctx = ctx.with_deadline(Instant::now() + entry.timeout);
        match tokio::time::timeout_at(ctx.deadline(), entry.tool.undo(args, output, &ctx)).await {
            Ok(result) => result,
            Err(_) => Err(ToolError::unavailable(format!(
                "undo did not finish within {:?}",
                entry.timeout
            ))),
        }
    }

    fn entry(&self, name: &str) -> Result<&Entry, ToolFailure> {
        self.tools.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.tools.keys().map(String::as_str).collect();
            ToolFailure::UnknownTool(format!("{name}` (the tools are: {}", known.join(", ")))
        })
    }
}

impl Entry {
    fn validate(&self, args: &Value) -> Result<(), ToolFailure> {
        let problems: Vec<String> = self
            .validator
            .iter_errors(args)
            .take(5)
            .map(|e| {
                let at = e.instance_path().to_string();
                if at.is_empty() {
                    e.to_string()
                } else {
                    format!("{at}: {e}")
                }
            })
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ToolFailure::InvalidArguments(problems.join("; ")))
        }
    }
}

/// Parses a model's argument text: JSON, an object, at most [`ARGUMENTS_MAX_BYTES`]. An empty
/// text is an empty object (some models send `""` for a tool without parameters).
///
/// # Errors
/// [`ToolFailure::InvalidArguments`] naming the problem.
pub fn parse_arguments(arguments: &str) -> Result<Value, ToolFailure> {
    if arguments.len() > ARGUMENTS_MAX_BYTES {
        return Err(ToolFailure::InvalidArguments(format!(
            "the arguments are {} bytes; the limit is {ARGUMENTS_MAX_BYTES}",
            arguments.len()
        )));
    }
    if arguments.trim().is_empty() {
        return Ok(Value::Object(serde_json::Map::new()));
    }
    let value: Value = serde_json::from_str(arguments)
        .map_err(|e| ToolFailure::InvalidArguments(format!("the arguments are not JSON: {e}")))?;
    if !value.is_object() {
        return Err(ToolFailure::InvalidArguments(
            "the arguments must be a JSON object".into(),
        ));
    }
    Ok(value)
}
