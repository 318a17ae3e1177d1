//! A scripted OpenAI-compatible chat-completions server: it plays the model in the tests.
//! Each request takes the next entry of the script; every request body is kept.

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
pub(crate) enum Turn {
    /// Answers this body.
    Answer(Value),
    /// Answers with a status and an error body.
    Status(u16),
    /// Never answers (the test kills the run meanwhile); `Script::hung` is notified.
    Hang,
    /// Answers what the function returns for the request's body.
    With(Box<dyn Fn(&Value) -> Value + Send>),
}

#[derive(Default)]
struct Inner {
    turns: VecDeque<Turn>,
    requests: Vec<Value>,
    /// Served when the script has run out.
    fallback: Option<Box<dyn Fn(&Value) -> Turn + Send>>,
}

/// The server's handle.
#[derive(Clone)]
pub(crate) struct Script {
    inner: Arc<Mutex<Inner>>,
    pub(crate) hung: Arc<Notify>,
    pub(crate) addr: SocketAddr,
}

impl Script {
    pub(crate) async fn start(turns: Vec<Turn>) -> Self {
        let inner = Arc::new(Mutex::new(Inner {
            turns: turns.into(),
            ..Inner::default()
        }));
        let hung = Arc::new(Notify::new());
        let state = (inner.clone(), hung.clone());
        let app = axum::Router::new()
            .route("/v1/chat/completions", post(complete))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { inner, hung, addr }
    }

    pub(crate) fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Every later request (after the script) gets what `f` says.
    pub(crate) fn otherwise(&self, f: impl Fn(&Value) -> Turn + Send + 'static) {
        self.inner.lock().unwrap().fallback = Some(Box::new(f));
    }

    pub(crate) fn push(&self, turn: Turn) {
        self.inner.lock().unwrap().turns.push_back(turn);
    }

    pub(crate) fn requests(&self) -> Vec<Value> {
        self.inner.lock().unwrap().requests.clone()
    }
}

type AppState = (Arc<Mutex<Inner>>, Arc<Notify>);

async fn complete(State((inner, hung)): State<AppState>, Json(body): Json<Value>) -> Response {
    let turn = {
        let mut inner = inner.lock().unwrap();
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
            StatusCode::from_u16(code).unwrap(),
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
pub(crate) fn text(content: &str) -> Value {
    json!({
        "id": "chatcmpl-1", "object": "chat.completion", "model": "scripted",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    })
}

/// A chat-completions answer asking for tool calls: `(id, name, arguments JSON text)`.
pub(crate) fn calls(calls: &[(&str, &str, &str)]) -> Value {
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
pub(crate) fn tool_results(request: &Value) -> Vec<(String, String)> {
    request["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "tool")
        .map(|m| {
            (
                m["tool_call_id"].as_str().unwrap().to_owned(),
                m["content"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}
