//! The model side: a chat transcript, the [`Llm`] trait, and [`OpenAiClient`], a client for
//! any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp's server, Ollama,
//! LM Studio, LiteLLM, ...).
//!
//! # Why our own client
//! The request is one POST and the answer a few fields, but servers that speak "the OpenAI
//! format" bend it: `finish_reason` empty or missing, `arguments` as an object instead of a
//! string, `content` absent instead of null, no `usage`. The client reads answers leniently
//! (through `serde_json::Value`) and fails only when neither text nor tool calls are there;
//! async-openai's strict types refuse such answers (see ../shared/DEPENDENCIES.md). Calls run
//! behind trellis-resilience: a retry policy with a budget (429, 408 and 5xx answers and
//! transport errors are retried; other 4xx are not) around a circuit breaker on the endpoint.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use trellis_resilience::{
    Backoff, CircuitBreaker, Outcome, ResilienceError, RetryBudget, RetryPolicy, SlidingWindow,
};

use crate::tool::{BoxFuture, ToolSpec};

/// The largest answer body the client reads.
pub const RESPONSE_MAX_BYTES: usize = 4 * 1024 * 1024;
/// The default time limit of one chat-completions request.
pub const REQUEST_TIMEOUT_DEFAULT: Duration = Duration::from_secs(120);

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Message {
    /// Instructions to the model.
    System {
        /// The text.
        content: String,
    },
    /// What the user said.
    User {
        /// The text.
        content: String,
    },
    /// The model's answer: text, tool calls, or both.
    Assistant {
        /// The text, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        content: Option<String>,
        /// The tools the model asks to call.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        tool_calls: Vec<ToolCall>,
    },
    /// A tool call's result.
    Tool {
        /// The call this answers.
        tool_call_id: String,
        /// The result (JSON text, or an `{"error": ..}` object).
        content: String,
    },
}

/// A tool call the model asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The model's id for the call; the result names it.
    pub id: String,
    /// The tool.
    pub name: String,
    /// The arguments, as the JSON text the model wrote.
    pub arguments: String,
}

/// Tokens a request used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens of the prompt.
    pub prompt_tokens: u64,
    /// Tokens of the answer.
    pub completion_tokens: u64,
}

impl Usage {
    /// Both together.
    pub fn total(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}

/// What a request asks the model.
#[derive(Debug, Clone, Copy)]
pub struct ChatRequest<'a> {
    /// The conversation so far.
    pub messages: &'a [Message],
    /// The tools the model may call.
    pub tools: &'a [ToolSpec],
    /// The most tokens the answer may have.
    pub max_tokens: Option<u32>,
}

/// The model's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// The text, if any.
    pub content: Option<String>,
    /// The tool calls, if any.
    pub tool_calls: Vec<ToolCall>,
    /// Why the model stopped (`stop`, `tool_calls`, `length`, or whatever the server says).
    pub finish_reason: String,
    /// Tokens used, as the server reported (zero when it did not).
    pub usage: Usage,
}

/// Why the model gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LlmError {
    /// The endpoint failed in a way that may pass (a 5xx, 429, a transport error, a timeout),
    /// and the retries allowed were spent.
    #[error("the model endpoint is unavailable: {0}")]
    Unavailable(String),
    /// The endpoint refused the request (a 4xx other than 408 and 429): retrying the same
    /// request will not help.
    #[error("the model endpoint refused the request ({status}): {message}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The server's message.
        message: String,
    },
    /// The circuit breaker on the endpoint is open.
    #[error("the model endpoint's circuit breaker is open; next trial in {0:?}")]
    BreakerOpen(Duration),
    /// The answer could not be read.
    #[error("the model's answer could not be read: {0}")]
    Malformed(String),
}

impl LlmError {
    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::BreakerOpen(_))
    }
}

/// A chat model that can call tools.
pub trait Llm: Send + Sync + 'static {
    /// Answers the conversation.
    fn complete<'a>(&'a self, request: ChatRequest<'a>) -> BoxFuture<'a, Result<Reply, LlmError>>;

    /// The model's name, for logs and the run's record.
    fn model(&self) -> &str;
}

/// Where [`OpenAiClient`] sends requests.
#[derive(Clone)]
pub struct OpenAiConfig {
    /// The API's base URL, up to and including `/v1` (the client appends
    /// `/chat/completions`).
    pub base_url: String,
    /// The bearer key, if the endpoint needs one.
    pub api_key: Option<String>,
    /// The model name.
    pub model: String,
    /// The time limit of one request.
    pub timeout: Duration,
}

impl fmt::Debug for OpenAiConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiConfig")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("model", &self.model)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl OpenAiConfig {
    /// A configuration for `model` at `base_url`, without a key.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            api_key: None,
            model: model.into(),
            timeout: REQUEST_TIMEOUT_DEFAULT,
        }
    }

    /// The configuration the usual environment variables give: `OPENAI_BASE_URL` (or
    /// `OPENAI_API_BASE`; default `https://api.openai.com/v1`), `OPENAI_API_KEY` and
    /// `OPENAI_MODEL` (default `gpt-4o-mini`).
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        Self {
            base_url: var("OPENAI_BASE_URL")
                .or_else(|| var("OPENAI_API_BASE"))
                .unwrap_or_else(|| "https://api.openai.com/v1".to_owned()),
            api_key: var("OPENAI_API_KEY"),
            model: var("OPENAI_MODEL").unwrap_or_else(|| "gpt-4o-mini".to_owned()),
            timeout: REQUEST_TIMEOUT_DEFAULT,
        }
    }
}

/// A client for an OpenAI-compatible `chat/completions` endpoint, with tool calls and parallel
/// tool calls, retries with a budget and a circuit breaker.
#[derive(Debug, Clone)]
pub struct OpenAiClient {
    http: reqwest::Client,
    url: String,
    config: OpenAiConfig,
    retry: RetryPolicy,
    breaker: CircuitBreaker,
}

enum Attempt {
    Open(Duration),
    Retry(String),
    Refused(u16, String),
    Malformed(String),
}

impl OpenAiClient {
    /// A client with the default policies: 4 attempts (200 ms backoff doubling to 5 s) within
    /// a budget of one retry per five requests (10 banked), and a breaker that opens when half
    /// of the last 10 requests failed (at least 4) and tries again after 30 s.
    ///
    /// # Errors
    /// When the HTTP client cannot be built (no TLS backend) or the base URL is empty.
    pub fn new(config: OpenAiConfig) -> Result<Self, LlmError> {
        if config.base_url.trim().is_empty() {
            return Err(LlmError::Refused {
                status: 0,
                message: "the base URL is empty".into(),
            });
        }
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| LlmError::Unavailable(format!("HTTP client: {e}")))?;
        let retry = RetryPolicy::builder()
            .name("llm")
            .max_attempts(4)
            .backoff(Backoff {
                initial: Duration::from_millis(200),
                ..Backoff::default()
            })
            .budget(RetryBudget::new(0.2, 10, 10))
            .build()
            .map_err(|e| LlmError::Unavailable(e.to_string()))?;
        let breaker = CircuitBreaker::builder("llm")
            .sliding_window(SlidingWindow::Count(10))
            .minimum_calls(4)
            .failure_rate_threshold(0.5)
            .open_duration(Duration::from_secs(30))
            .build()
            .map_err(|e| LlmError::Unavailable(e.to_string()))?;
        let url = format!("{}/chat/completions", config.base_url.trim_end_matches('/'));
        Ok(Self {
            http,
            url,
            config,
            retry,
            breaker,
        })
    }

    /// Replaces the retry policy.
    #[must_use]
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Replaces the circuit breaker.
    #[must_use]
    pub fn with_breaker(mut self, breaker: CircuitBreaker) -> Self {
        self.breaker = breaker;
        self
    }

    /// The breaker on the endpoint, to observe or operate it.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    /// The request body for `request`.
    pub fn body(&self, request: &ChatRequest<'_>) -> Value {
        let messages: Vec<Value> = request.messages.iter().map(wire_message).collect();
        let mut body = json!({ "model": self.config.model, "messages": messages });
        if !request.tools.is_empty() {
            let tools: Vec<Value> = request
                .tools
                .iter()
                .map(|t| {
                    json!({ "type": "function", "function": {
                        "name": t.name, "description": t.description, "parameters": t.input_schema,
                    }})
                })
                .collect();
            body["tools"] = Value::Array(tools);
            body["parallel_tool_calls"] = Value::Bool(true);
        }
        if let Some(max) = request.max_tokens {
            body["max_tokens"] = json!(max);
        }
        body
    }

    async fn attempt(&self, body: &Value) -> Result<Reply, Attempt> {
        let permit = self
            .breaker
            .try_acquire()
            .map_err(|e| Attempt::Open(e.retry_after().unwrap_or_default()))?;
        let mut request = self.http.post(&self.url).json(body);
        if let Some(key) = &self.config.api_key {
            request = request.bearer_auth(key);
        }
        let result = async {
            let response = request
                .send()
                .await
                .map_err(|e| Attempt::Retry(transport_error(&e)))?;
            let status = response.status();
            let bytes = read_limited(response).await?;
            if status.is_success() {
                parse_reply(&bytes).map_err(Attempt::Malformed)
            } else {
                let message = error_message(&bytes);
                if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
                    Err(Attempt::Retry(format!("{status}: {message}")))
                } else {
                    Err(Attempt::Refused(status.as_u16(), message))
                }
            }
        }
        .await;
        permit.record(match &result {
            Ok(_) | Err(Attempt::Refused(..)) => Outcome::Success,
            Err(_) => Outcome::Failure,
        });
        result
    }
}

impl Llm for OpenAiClient {
    fn complete<'a>(&'a self, request: ChatRequest<'a>) -> BoxFuture<'a, Result<Reply, LlmError>> {
        Box::pin(async move {
            let body = self.body(&request);
            let retry_if =
                |result: Result<&Reply, &Attempt>| matches!(result, Err(Attempt::Retry(_)));
            match self
                .retry
                .call_if(&retry_if, None, || self.attempt(&body))
                .await
            {
                Ok(reply) => Ok(reply),
                Err(ResilienceError::Inner(Attempt::Open(retry_after))) => {
                    Err(LlmError::BreakerOpen(retry_after))
                }
                Err(ResilienceError::Inner(Attempt::Retry(message))) => {
                    Err(LlmError::Unavailable(message))
                }
                Err(ResilienceError::Inner(Attempt::Refused(status, message))) => {
                    Err(LlmError::Refused { status, message })
                }
                Err(ResilienceError::Inner(Attempt::Malformed(message))) => {
                    Err(LlmError::Malformed(message))
                }
                Err(other) => Err(LlmError::Unavailable(other.kind().replace('_', " "))),
            }
        })
    }

    fn model(&self) -> &str {
        &self.config.model
    }
}

fn transport_error(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        "the request timed out".to_owned()
    } else if error.is_connect() {
        "cannot connect".to_owned()
    } else {
        error.to_string()
    }
}

async fn read_limited(mut response: reqwest::Response) -> Result<Vec<u8>, Attempt> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| Attempt::Retry(transport_error(&e)))?
    {
        if body.len() + chunk.len() > RESPONSE_MAX_BYTES {
            return Err(Attempt::Malformed(format!(
                "the answer is larger than {RESPONSE_MAX_BYTES} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn error_message(body: &[u8]) -> String {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let message = parsed.as_ref().and_then(|v| {
        v.pointer("/error/message")
            .or_else(|| v.get("error"))
            .or_else(|| v.get("message"))
            .and_then(Value::as_str)
            .map(str::to_owned)
    });
    message.unwrap_or_else(|| {
        let text = String::from_utf8_lossy(body);
        text.chars().take(300).collect()
    })
}

fn wire_message(message: &Message) -> Value {
    match message {
        Message::System { content } => json!({ "role": "system", "content": content }),
        Message::User { content } => json!({ "role": "user", "content": content }),
        Message::Assistant {
            content,
            tool_calls,
        } => {
            let mut m = json!({ "role": "assistant", "content": content });
            if !tool_calls.is_empty() {
                m["tool_calls"] = tool_calls
                    .iter()
                    .map(|c| {
                        json!({ "id": c.id, "type": "function",
                                "function": { "name": c.name, "arguments": c.arguments } })
                    })
                    .collect();
            }
            m
        }
        Message::Tool {
            tool_call_id,
            content,
        } => json!({ "role": "tool", "tool_call_id": tool_call_id, "content": content }),
    }
}

/// Reads a chat-completions answer leniently (see the module docs).
///
/// # Errors
/// A message naming what is missing.
pub fn parse_reply(body: &[u8]) -> Result<Reply, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let choice = value
        .pointer("/choices/0")
        .ok_or("the answer has no `choices[0]`")?;
    let message = choice
        .get("message")
        .ok_or("the answer has no `choices[0].message`")?;
    let content = match message.get("content") {
        Some(Value::String(s)) => Some(s.clone()),
        // Some servers send content as parts: [{"type": "text", "text": ".."}].
        Some(Value::Array(parts)) => {
            let text: String = parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect();
            Some(text)
        }
        _ => None,
    }
    .filter(|s| !s.is_empty());
    let mut tool_calls = Vec::new();
    if let Some(calls) = message.get("tool_calls").and_then(Value::as_array) {
        for (index, call) in calls.iter().enumerate() {
            let function = call.get("function").unwrap_or(call);
            let name = function
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("tool call {index} has no name"))?;
            let arguments = match function.get("arguments") {
                Some(Value::String(s)) => s.clone(),
                None | Some(Value::Null) => String::new(),
                Some(other) => other.to_string(),
            };
            let id = call
                .get("id")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map_or_else(|| format!("call_{index}"), str::to_owned);
            tool_calls.push(ToolCall {
                id,
                name: name.to_owned(),
                arguments,
            });
        }
    }
    if content.is_none() && tool_calls.is_empty() {
        return Err("the answer has neither text nor tool calls".into());
    }
    let finish_reason = choice
        .get("finish_reason")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .unwrap_or(if tool_calls.is_empty() {
            "stop"
        } else {
            "tool_calls"
        })
        .to_owned();
    let count = |key: &str| {
        value
            .pointer(&format!("/usage/{key}"))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    Ok(Reply {
        content,
        tool_calls,
        finish_reason,
        usage: Usage {
            prompt_tokens: count("prompt_tokens"),
            completion_tokens: count("completion_tokens"),
        },
    })
}
