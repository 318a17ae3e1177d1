//! The MCP server (trellis_agent::mcp) seen by rmcp's own client, over an in-process byte
//! stream as on stdio, and by plain HTTP requests as any client of either protocol era sends
//! them. Clients nobody here wrote (the Python SDK, the MCP inspector) run in `.ci/mcp.sh`.

use std::sync::Arc;
use std::time::Duration;

use rmcp::ServiceExt;
use rmcp::model::{
    CallToolRequestParams, CallToolResult, ClientConfig, ProtocolVersion, RequestMetaObject,
};
use rmcp::service::RunningService;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use trellis_agent::mcp::{self, CallerFn, HttpConfig, McpServer, Unauthorized};
use trellis_agent::{Caller, Effect, Tool, ToolContext, ToolError, ToolRegistry};

// --- tools -----------------------------------------------------------------------------

struct Add;

#[derive(Deserialize, JsonSchema)]
struct Numbers {
    a: i64,
    b: i64,
}

#[derive(Serialize, Deserialize)]
struct Sum {
    sum: i64,
}

impl Tool for Add {
    type Input = Numbers;
    type Output = Sum;
    fn name(&self) -> &str {
        "add"
    }
    fn description(&self) -> &str {
        "Adds two integers."
    }
    async fn execute(&self, input: Numbers, _ctx: &ToolContext) -> Result<Sum, ToolError> {
        input
            .a
            .checked_add(input.b)
            .map(|sum| Sum { sum })
            .ok_or_else(|| ToolError::refused("the sum overflows"))
    }
}

/// Says who it acts for, and with which idempotency key.
struct WhoAmI;

#[derive(Deserialize, JsonSchema)]
struct Nothing {}

#[derive(Serialize, Deserialize)]
struct Identity {
    subject: String,
    role: String,
    bearer: Option<String>,
    key: String,
}

impl Tool for WhoAmI {
    type Input = Nothing;
    type Output = Identity;
    fn name(&self) -> &str {
        "whoami"
    }
    fn description(&self) -> &str {
        "Who the call acts for."
    }
    fn effect(&self) -> Effect {
        Effect::Changes { approval: false }
    }
    async fn execute(&self, _input: Nothing, ctx: &ToolContext) -> Result<Identity, ToolError> {
        let caller = ctx.caller();
        Ok(Identity {
            subject: caller.subject.clone(),
            role: caller.role.clone(),
            bearer: caller.bearer.clone(),
            key: ctx.idempotency_key().to_owned(),
        })
    }
}

/// Always refuses.
struct Refuse;

impl Tool for Refuse {
    type Input = Nothing;
    type Output = Sum;
    fn name(&self) -> &str {
        "refuse"
    }
    fn description(&self) -> &str {
        "Refuses."
    }
    async fn execute(&self, _input: Nothing, _ctx: &ToolContext) -> Result<Sum, ToolError> {
        Err(ToolError::refused("order 42 is not yours"))
    }
}

/// Returns a list (not an object).
struct List;

impl Tool for List {
    type Input = Nothing;
    type Output = Vec<u32>;
    fn name(&self) -> &str {
        "list"
    }
    fn description(&self) -> &str {
        "Lists."
    }
    async fn execute(&self, _input: Nothing, _ctx: &ToolContext) -> Result<Vec<u32>, ToolError> {
        Ok(vec![1, 2, 3])
    }
}

fn registry() -> ToolRegistry {
    ToolRegistry::builder()
        .tool(Add)
        .and_then(|b| b.tool(WhoAmI))
        .and_then(|b| b.tool(Refuse))
        .and_then(|b| b.tool(List))
        .expect("the test tools register")
        .build()
}

fn args(value: Value) -> serde_json::Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

fn text_of(result: &CallToolResult) -> String {
    result
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect::<Vec<_>>()
        .join("")
}

// --- over a byte stream, as on stdio -----------------------------------------------------

type Client = RunningService<rmcp::RoleClient, ClientConfig>;

/// A server on one end of an in-process pipe, rmcp's client on the other, negotiating
/// `version`.
async fn connect(caller: Caller, version: ProtocolVersion) -> Client {
    let (client_end, server_end) = tokio::io::duplex(64 * 1024);
    let (read, write) = tokio::io::split(server_end);
    tokio::spawn(mcp::serve_io(
        McpServer::new(registry(), caller),
        read,
        write,
    ));
    let mut config = ClientConfig::default();
    config.protocol_version = version;
    config
        .serve(client_end)
        .await
        .expect("the client completes the handshake")
}

#[tokio::test]
async fn tools_are_listed_with_their_schemas_and_hints() {
    let client = connect(
        Caller::new("u1", "customer"),
        ProtocolVersion::LATEST_WITH_INITIALIZE,
    )
    .await;
    let info = client.peer_info().expect("the server introduced itself");
    let server = info.server_info.as_ref().expect("server info");
    assert_eq!(server.name, "trellis");
    assert!(info.capabilities.tools.is_some());

    let tools = client.list_all_tools().await.expect("tools/list");
    let names: Vec<&str> = tools.iter().map(|t| &*t.name).collect();
    assert_eq!(names, ["add", "list", "refuse", "whoami"]);
    let add = &tools[0];
    assert_eq!(add.description.as_deref(), Some("Adds two integers."));
    assert_eq!(add.input_schema.get("type"), Some(&json!("object")));
    assert_eq!(add.input_schema["required"], json!(["a", "b"]));
    let hints = |i: usize| tools[i].annotations.as_ref().and_then(|a| a.read_only_hint);
    assert_eq!(hints(0), Some(true), "add reads only");
    assert_eq!(hints(3), Some(false), "whoami is declared to change state");
    client.cancel().await.expect("the client closes");
}

#[tokio::test]
async fn a_call_returns_text_and_structured_content() {
    let client = connect(
        Caller::new("u1", "customer"),
        ProtocolVersion::LATEST_WITH_INITIALIZE,
    )
    .await;
    let result = client
        .call_tool(CallToolRequestParams::new("add").with_arguments(args(json!({"a": 2, "b": 40}))))
        .await
        .expect("tools/call");
    assert_eq!(result.is_error, Some(false));
    assert_eq!(
        serde_json::from_str::<Value>(&text_of(&result)).unwrap(),
        json!({"sum": 42})
    );
    assert_eq!(result.structured_content, Some(json!({"sum": 42})));

    // A result that is not an object is text only: older clients require an object there.
    let result = client
        .call_tool(CallToolRequestParams::new("list"))
        .await
        .expect("tools/call");
    assert_eq!(text_of(&result), "[1,2,3]");
    assert_eq!(result.structured_content, None);
    client.cancel().await.expect("the client closes");
}

#[tokio::test]
async fn failures_are_tool_errors_the_model_reads_not_protocol_errors() {
    let client = connect(Caller::new("u1", "customer"), ProtocolVersion::V_2024_11_05).await;
    let call = |name: &'static str, arguments: Value| {
        let client = &client;
        async move {
            client
                .call_tool(CallToolRequestParams::new(name).with_arguments(args(arguments)))
                .await
                .unwrap_or_else(|e| {
                    panic!("{name}: a tool failure must not be a protocol error: {e}")
                })
        }
    };

    let bad = call("add", json!({"a": "two", "b": 40})).await;
    assert_eq!(bad.is_error, Some(true));
    assert!(
        text_of(&bad).contains("invalid arguments"),
        "{}",
        text_of(&bad)
    );
    assert!(
        text_of(&bad).contains("/a"),
        "the message names the field: {}",
        text_of(&bad)
    );

    let unknown = call("drop_tables", json!({})).await;
    assert_eq!(unknown.is_error, Some(true));
    assert!(
        text_of(&unknown).contains("unknown tool `drop_tables`"),
        "{}",
        text_of(&unknown)
    );

    let refused = call("refuse", json!({})).await;
    assert_eq!(refused.is_error, Some(true));
    assert_eq!(
        serde_json::from_str::<Value>(&text_of(&refused)).unwrap(),
        json!({"error": "order 42 is not yours."})
    );

    let overflow = call("add", json!({"a": i64::MAX, "b": 1})).await;
    assert_eq!(overflow.is_error, Some(true));
    assert!(text_of(&overflow).contains("overflows"));

    // The connection is still good.
    let ok = call("add", json!({"a": 1, "b": 1})).await;
    assert_eq!(ok.structured_content, Some(json!({"sum": 2})));
    client.cancel().await.expect("the client closes");
}

fn identity(result: &CallToolResult) -> Value {
    assert_eq!(result.is_error, Some(false), "{}", text_of(result));
    result.structured_content.clone().expect("an object")
}

#[tokio::test]
async fn a_stdio_server_acts_as_its_fixed_caller_with_a_key_per_call() {
    let caller = Caller::new("u7", "customer").with_bearer("token-of-u7");
    let client = connect(caller, ProtocolVersion::LATEST_WITH_INITIALIZE).await;
    let first = identity(
        &client
            .call_tool(CallToolRequestParams::new("whoami"))
            .await
            .unwrap(),
    );
    let second = identity(
        &client
            .call_tool(CallToolRequestParams::new("whoami"))
            .await
            .unwrap(),
    );
    assert_eq!(first["subject"], "u7");
    assert_eq!(first["role"], "customer");
    assert_eq!(first["bearer"], "token-of-u7");
    assert_ne!(
        first["key"], second["key"],
        "without a client key every call is a new one"
    );

    // The client's own key makes a retried call the same call.
    let keyed = || {
        let mut params = CallToolRequestParams::new("whoami");
        let mut meta = RequestMetaObject::new();
        meta.insert(mcp::IDEMPOTENCY_META_KEY.to_owned(), json!("retry-me-1"));
        params.meta = Some(meta);
        params
    };
    let a = identity(&client.call_tool(keyed()).await.unwrap());
    let b = identity(&client.call_tool(keyed()).await.unwrap());
    assert_eq!(a["key"], b["key"]);
    assert!(a["key"].as_str().unwrap().ends_with("retry-me-1"));

    // A key that cannot be one is an error the client reads.
    let mut params = CallToolRequestParams::new("whoami");
    let mut meta = RequestMetaObject::new();
    meta.insert(mcp::IDEMPOTENCY_META_KEY.to_owned(), json!("has spaces"));
    params.meta = Some(meta);
    let bad = client.call_tool(params).await.unwrap();
    assert_eq!(bad.is_error, Some(true));
    assert!(text_of(&bad).contains(mcp::IDEMPOTENCY_META_KEY));
    client.cancel().await.expect("the client closes");
}

// --- over HTTP -----------------------------------------------------------------------------

/// The caller for `Bearer good-TOKEN`: subject TOKEN's suffix; anything else is refused.
fn test_caller() -> CallerFn {
    Arc::new(|parts: &http::request::Parts| {
        let token = mcp::bearer_token(&parts.headers)
            .ok_or_else(|| Unauthorized("no bearer token".into()))?;
        let subject = token
            .strip_prefix("good-")
            .ok_or_else(|| Unauthorized("the token is not valid".into()))?;
        Ok(Caller::new(subject, "customer").with_bearer(token))
    })
}

/// One replica: the router on a free loopback port.
async fn replica(config: HttpConfig) -> String {
    let router = mcp::http_router("/mcp", registry(), &config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    format!("http://{addr}/mcp")
}

struct Post<'a> {
    url: &'a str,
    token: Option<&'a str>,
    version: Option<&'a str>,
    host: Option<&'a str>,
    extra: Vec<(&'a str, String)>,
}

impl<'a> Post<'a> {
    fn to(url: &'a str) -> Self {
        Self {
            url,
            token: Some("good-alice"),
            version: None,
            host: None,
            extra: Vec::new(),
        }
    }

    async fn send(&self, body: Value) -> (u16, http::HeaderMap, String) {
        let client = reqwest::Client::new();
        let mut request = client
            .post(self.url)
            .header("accept", "application/json, text/event-stream")
            .header("content-type", "application/json")
            .timeout(Duration::from_secs(10))
            .body(body.to_string());
        if let Some(token) = self.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        if let Some(version) = self.version {
            request = request.header("mcp-protocol-version", version);
        }
        if let Some(host) = self.host {
            request = request.header("host", host);
        }
        for (name, value) in &self.extra {
            request = request.header(*name, value);
        }
        let response = request.send().await.expect("the server answers");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        (status, headers, response.text().await.unwrap_or_default())
    }
}

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn initialize(version: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": version,
        "capabilities": {},
        "clientInfo": {"name": "raw-http-test", "version": "0"}
    }})
}

#[tokio::test]
async fn http_refuses_a_request_without_a_caller_before_mcp() {
    let url = replica(HttpConfig::new(test_caller())).await;
    for token in [None, Some("forged")] {
        let post = Post {
            token,
            ..Post::to(&url)
        };
        let (status, headers, body) = post.send(initialize("2025-06-18")).await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(headers["www-authenticate"], "Bearer");
        assert_eq!(json_of(&body)["error"]["code"], "unauthenticated");
    }
}

#[tokio::test]
async fn http_serves_an_older_client_without_sessions_on_any_replica() {
    let (a, b) = (
        replica(HttpConfig::new(test_caller())).await,
        replica(HttpConfig::new(test_caller())).await,
    );
    // The handshake on one replica...
    let (status, headers, body) = Post::to(&a).send(initialize("2025-06-18")).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        headers.get("mcp-session-id").is_none(),
        "stateless: no session"
    );
    let init = json_of(&body);
    assert_eq!(init["result"]["protocolVersion"], "2025-06-18");
    assert_eq!(init["result"]["serverInfo"]["name"], "trellis");

    // ...and the calls on the other (no session to find there).
    let post = Post {
        version: Some("2025-06-18"),
        ..Post::to(&b)
    };
    let (status, _, body) = post
        .send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        .await;
    assert!(status == 202 || status == 200, "{status} {body}");
    let (status, _, body) = post
        .send(json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}))
        .await;
    assert_eq!(status, 200, "{body}");
    let names: Vec<String> = json_of(&body)["result"]["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .map(|t| t["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(names, ["add", "list", "refuse", "whoami"]);

    let (status, _, body) = post
        .send(json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
            "params": {"name": "whoami", "arguments": {}}}))
        .await;
    assert_eq!(status, 200, "{body}");
    let result = &json_of(&body)["result"];
    assert_eq!(result["isError"], false);
    assert_eq!(result["structuredContent"]["subject"], "alice");
    assert_eq!(result["structuredContent"]["bearer"], "good-alice");

    // Each request acts as its own caller.
    let bob = Post {
        token: Some("good-bob"),
        ..Post {
            version: Some("2025-06-18"),
            ..Post::to(&b)
        }
    };
    let (_, _, body) = bob
        .send(json!({"jsonrpc": "2.0", "id": 4, "method": "tools/call",
            "params": {"name": "whoami", "arguments": {}}}))
        .await;
    assert_eq!(
        json_of(&body)["result"]["structuredContent"]["subject"],
        "bob"
    );
}

#[tokio::test]
async fn http_serves_the_current_revision_without_initialize() {
    let url = replica(HttpConfig::new(test_caller())).await;
    let version = ProtocolVersion::LATEST.to_string();
    let meta = json!({
        "io.modelcontextprotocol/protocolVersion": version,
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "raw-http-test", "version": "0"}
    });
    let post = |method: &str, name: Option<&str>| {
        let mut extra = vec![("mcp-method", method.to_owned())];
        if let Some(name) = name {
            extra.push(("mcp-name", name.to_owned()));
        }
        Post {
            version: Some(version.as_str()),
            extra,
            ..Post::to(&url)
        }
    };
    let (status, _, body) = post("tools/list", None)
        .send(json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": meta}}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        json_of(&body)["result"]["tools"].as_array().map(Vec::len),
        Some(4),
        "{body}"
    );

    let (status, _, body) = post("tools/call", Some("refuse"))
        .send(json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
            "params": {"name": "refuse", "arguments": {}, "_meta": meta}}))
        .await;
    assert_eq!(status, 200, "{body}");
    let result = &json_of(&body)["result"];
    assert_eq!(result["isError"], true, "{body}");
    assert!(
        result["content"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .contains("not yours")
    );
}

#[tokio::test]
async fn http_checks_the_host_it_is_reached_by() {
    let loopback = replica(HttpConfig::new(test_caller())).await;
    let post = Post {
        host: Some("shop.example.com"),
        ..Post::to(&loopback)
    };
    let (status, _, body) = post.send(initialize("2025-06-18")).await;
    assert_eq!(
        status, 403,
        "a loopback-only server refuses another host: {body}"
    );

    let named = replica(HttpConfig::new(test_caller()).allowed_hosts(["shop.example.com"])).await;
    let post = Post {
        host: Some("shop.example.com"),
        ..Post::to(&named)
    };
    let (status, _, body) = post.send(initialize("2025-06-18")).await;
    assert_eq!(status, 200, "{body}");

    let any = replica(HttpConfig::new(test_caller()).allow_any_host()).await;
    let post = Post {
        host: Some("elsewhere.example.net:8443"),
        ..Post::to(&any)
    };
    let (status, _, body) = post.send(initialize("2025-06-18")).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn the_bare_service_refuses_a_call_without_a_caller_as_a_protocol_error() {
    // Without the router's check the service still never runs a tool for nobody.
    let service = mcp::http_service(registry(), &HttpConfig::new(test_caller()));
    let router = axum::Router::new().route_service("/mcp", service);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    let post = Post {
        token: None,
        version: Some("2025-06-18"),
        ..Post::to(&url)
    };
    let (status, _, body) = post
        .send(json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
            "params": {"name": "whoami", "arguments": {}}}))
        .await;
    assert_eq!(status, 200, "{body}");
    let answer = json_of(&body);
    assert!(answer.get("result").is_none(), "{body}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("unauthenticated")
    );
}
