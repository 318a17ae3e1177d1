//! A scripted OpenAI-compatible chat-completions server that plays the model in tests, so an
//! agent (and its tools, and its durability) is tested without a model or the internet. Each
//! request takes the next [`Turn`] of the script; every request body is kept for assertions.
//! Feature `testing`.
//!
//! ```
//! use trellis_agent::testing::{Script, Turn, text};
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let model = Script::start(vec![Turn::Answer(text("hello"))]).await;
//! // OpenAiConfig::new(model.base_url(), "scripted") points a client at it.
//! assert!(model.base_url().ends_with("/v1"));
//! # }
//! ```

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tokio::sync::Notify;

/// What the scripted model does with one request.
pub enum Turn {
    /// Answers this body.
    Answer(Value),
    /// Answers with a status and an error body.
    Status(u16),
    /// Never answers (the test kills the run meanwhile); `Script::hung` is notified.
    Hang,
    /// Answers what the function returns for the request's body.
    With(Box<dyn Fn(&Value) -> Value + Send>),
}

impl std::fmt::Debug for Turn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Answer(v) => f.debug_tuple("Answer").field(v).finish(),
            Self::Status(code) => f.debug_tuple("Status").field(code).finish(),
            Self::Hang => f.write_str("Hang"),
            Self::With(_) => f.write_str("With(..)"),
        }
    }
}

impl std::fmt::Debug for Script {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Script")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// What answers once the script ran out.
type Fallback = Box<dyn Fn(&Value) -> Turn + Send>;

#[derive(Default)]
struct Inner {
    turns: VecDeque<Turn>,
    requests: Vec<Value>,
    /// Served when the script has run out.
    fallback: Option<Fallback>,
}

/// The server's handle.
#[derive(Clone)]
pub struct Script {
    inner: Arc<Mutex<Inner>>,
    /// Notified when a [`Turn::Hang`] is served.
    pub hung: Arc<Notify>,
    /// The server's address.
    pub addr: SocketAddr,
}

impl Script {
    /// Starts the server on a free loopback port with `turns`.
    ///
    /// # Panics
    /// When no loopback port can be bound.
    pub async fn start(turns: Vec<Turn>) -> Self {
        let inner = Arc::new(Mutex::new(Inner {
            turns: turns.into(),
            ..Inner::default()
        }));
        let hung = Arc::new(Notify::new());
        let state = (inner.clone(), hung.clone());
        let app = axum::Router::new()
            .route("/v1/chat/completions", post(complete))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free loopback port");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { inner, hung, addr }
    }

    /// The base URL to give [`crate::OpenAiConfig::new`] (ends with `/v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Every request after the script ran out gets what `f` says.
    pub fn otherwise(&self, f: impl Fn(&Value) -> Turn + Send + 'static) {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .fallback = Some(Box::new(f));
    }

    /// Appends a turn to the script.
    pub fn push(&self, turn: Turn) {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .turns
            .push_back(turn);
    }

    /// Every request body received so far.
    pub fn requests(&self) -> Vec<Value> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .requests
            .clone()
    }
}

type AppState = (Arc<Mutex<Inner>>, Arc<Notify>);

async fn complete(State((inner, hung)): State<AppState>, Json(body): Json<Value>) -> Response {
    let turn = {
        let mut inner = inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        inner.requests.push(body.clone());
        match inner.turns.pop_front() {
            Some(turn) => turn,
            None => match &inner.fallback {
                Some(f) => f(&body),
                None => Turn::Status(599),
            },
        }
    };
    match turn {
        Turn::Answer(value) => Json(value).into_response(),
        Turn::With(f) => Json(f(&body)).into_response(),
        Turn::Status(code) => (
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            Json(json!({"error": {"message": format!("scripted {code}")}})),
        )
            .into_response(),
        Turn::Hang => {
            hung.notify_one();
            std::future::pending::<Response>().await
        }
    }
}

/// A chat-completions answer with text.
pub fn text(content: &str) -> Value {
    json!({
        "id": "chatcmpl-1", "object": "chat.completion", "model": "scripted",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    })
}

/// A chat-completions answer asking for tool calls: `(id, name, arguments JSON text)`.
pub fn calls(calls: &[(&str, &str, &str)]) -> Value {
    let tool_calls: Vec<Value> = calls
        .iter()
        .map(|(id, name, args)| {
            json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}})
        })
        .collect();
    json!({
        "id": "chatcmpl-2", "object": "chat.completion", "model": "scripted",
        "choices": [{"index": 0, "finish_reason": "tool_calls",
                     "message": {"role": "assistant", "content": null, "tool_calls": tool_calls}}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 8, "total_tokens": 28}
    })
}

/// The `tool` messages of a request, as `(tool_call_id, content)`.
pub fn tool_results(request: &Value) -> Vec<(String, String)> {
    request["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["role"] == "tool")
        .map(|m| {
            (
                m["tool_call_id"].as_str().unwrap_or_default().to_owned(),
                m["content"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}
