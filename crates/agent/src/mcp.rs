//! An MCP server for a [`ToolRegistry`]: the same tools an agent loop calls, offered to any
//! Model Context Protocol client, over stdio or streamable HTTP.
//!
//! Built on the official Rust SDK (rmcp, pinned `~3.11`), which speaks the protocol; this
//! module only maps the registry onto it:
//!
//! - `tools/list` lists [`ToolRegistry::specs`] (name, description, the input's JSON Schema,
//!   and a read-only hint from the tool's [`Effect`](crate::Effect));
//! - `tools/call` runs [`ToolRegistry::call`]: arguments are validated against the schema and
//!   the call runs behind the tool's timeout and breaker. Whatever goes wrong with the call (an
//!   unknown tool, bad arguments, a timeout, the tool's own refusal) comes back as a tool
//!   result with `isError: true` and [`ToolFailure::to_model_text`], which a client shows
//!   to its model; protocol errors are kept for requests that cannot be served at all (no
//!   caller on an HTTP request that reached the service unauthenticated).
//!
//! # Who a call acts as
//!
//! Every call runs with a [`Caller`], whose bearer token tools pass on to the services, so an
//! MCP client can never do more than its user could:
//!
//! - on stdio ([`serve_stdio`], [`serve_io`]) one fixed caller, given at start (the `trellis
//!   mcp` command reads the user's token from an environment variable);
//! - over HTTP ([`http_service`], [`http_router`]) a caller per HTTP request, derived from
//!   the request's head by a [`CallerFn`] the application chooses (the shop takes the
//!   subject and role from the identity its gateway signed, and the bearer token from
//!   `Authorization`). [`http_router`] refuses a request its function refuses with `401`
//!   before any MCP processing.
//!
//! # Idempotency keys
//!
//! A durable agent run derives each call's key from the run and the call. MCP has no run: a
//! client sends independent requests, and the JSON-RPC request id is a per-connection counter
//! (two sessions both send id `1`), so it cannot be a key. A client that wants a retried
//! call to act once sends its own key in the request's `_meta` under [`IDEMPOTENCY_META_KEY`]
//! (1 to [`IDEMPOTENCY_KEY_MAX`] visible ASCII characters); without one, every call gets a
//! fresh UUIDv7 key, so a retry by the client is a new call.
//!
//! # HTTP: stateless, so any replica answers
//!
//! The HTTP service keeps no sessions (`legacy_session_mode = false`, no session manager):
//! each POST carries everything needed to answer it, so a load balancer may send a client's
//! requests to different replicas. Clients of the current protocol revision (2026-07-28,
//! without `initialize`) and of the older ones (2024-11-05 to 2025-11-25, with `initialize`)
//! are both served: an older client's `initialize` is answered without a session id, which
//! the older revisions allow, and its later requests are served one by one. Answers are plain
//! JSON rather than an event stream (nothing here sends notifications before the result).
//!
//! The `Host` header is checked against [`HttpConfig::allowed_hosts`] (loopback by default,
//! as rmcp does, against DNS rebinding of a local server). Behind a gateway, which forwards
//! the client's `Host`, name the public host names, or allow any host when every request must
//! carry a credential anyway ([`HttpConfig::allow_any_host`]).

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode, header};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    ListToolsResult, PaginatedRequestParams, ProtocolVersion, RequestMetaObject,
    ServerCapabilities, ServerConfig, Tool as McpTool, ToolAnnotations,
};
use rmcp::service::{RequestContext, RoleServer};
use rmcp::transport::StreamableHttpServerConfig;
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::{ErrorData, ServerHandler, ServiceExt};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};

pub use rmcp::transport::StreamableHttpService;

use crate::tool::{Caller, TOOL_TIMEOUT_MAX, ToolContext, ToolFailure, ToolRegistry, ToolSpec};

/// The `_meta` key a client puts its own idempotency key under, in a `tools/call` request.
pub const IDEMPOTENCY_META_KEY: &str = "trellis/idempotencyKey";
/// The longest idempotency key a client may send.
pub const IDEMPOTENCY_KEY_MAX: usize = 128;
/// The largest HTTP request body the HTTP service reads.
pub const HTTP_BODY_MAX_BYTES: usize = 1024 * 1024;
/// The server name clients see.
pub const SERVER_NAME: &str = "trellis";

/// Why an HTTP request has no caller: the request is refused with `401` and this message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unauthorized(pub String);

/// Derives the caller of one HTTP request from its head (headers, and the extensions earlier
/// middleware put there, such as a verified identity).
pub type CallerFn =
    Arc<dyn Fn(&http::request::Parts) -> Result<Caller, Unauthorized> + Send + Sync + 'static>;

/// The token of an `Authorization: Bearer TOKEN` header, if the request has one.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// A [`CallerFn`] that acts with the request's bearer token and knows nothing else about the
/// caller (empty subject and role): for tools that only pass the token on to services which
/// check it themselves. A request without a bearer token is refused.
pub fn bearer_caller() -> CallerFn {
    Arc::new(|parts: &http::request::Parts| {
        bearer_token(&parts.headers)
            .map(|token| Caller::default().with_bearer(token))
            .ok_or_else(|| {
                Unauthorized("this endpoint needs an `Authorization: Bearer` token".into())
            })
    })
}

/// Settings of the HTTP service.
#[derive(Clone)]
pub struct HttpConfig {
    caller: CallerFn,
    allowed_hosts: Vec<String>,
    allowed_origins: Vec<String>,
    max_body_bytes: usize,
    instructions: Option<String>,
}

impl fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpConfig")
            .field("allowed_hosts", &self.allowed_hosts)
            .field("allowed_origins", &self.allowed_origins)
            .field("max_body_bytes", &self.max_body_bytes)
            .finish_non_exhaustive()
    }
}

impl HttpConfig {
    /// Callers derived by `caller`; loopback hosts only; any origin; bodies up to
    /// [`HTTP_BODY_MAX_BYTES`].
    pub fn new(caller: CallerFn) -> Self {
        Self {
            caller,
            allowed_hosts: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            allowed_origins: Vec::new(),
            max_body_bytes: HTTP_BODY_MAX_BYTES,
            instructions: None,
        }
    }

    /// Accept only these `Host` values: host names, or `host:port` authorities. An empty list
    /// is refused here (it would mean any host): say [`allow_any_host`](Self::allow_any_host).
    #[must_use]
    pub fn allowed_hosts(mut self, hosts: impl IntoIterator<Item = impl Into<String>>) -> Self {
        let hosts: Vec<String> = hosts
            .into_iter()
            .map(Into::into)
            .filter(|h| !h.trim().is_empty())
            .collect();
        if !hosts.is_empty() {
            self.allowed_hosts = hosts;
        }
        self
    }

    /// Accept any `Host`. Sound when every request must carry a credential a browser page on
    /// a rebound name cannot have (a bearer token, a gateway-signed identity).
    #[must_use]
    pub fn allow_any_host(mut self) -> Self {
        self.allowed_hosts.clear();
        self
    }

    /// Accept a request carrying an `Origin` header only from these origins
    /// (`https://app.example.com:443`); requests without `Origin` (non-browser clients) pass.
    /// By default any origin is accepted.
    #[must_use]
    pub fn allowed_origins(mut self, origins: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.allowed_origins = origins.into_iter().map(Into::into).collect();
        self
    }

    /// The largest request body read (at least 1 KiB); larger ones get `413`.
    #[must_use]
    pub fn max_body_bytes(mut self, bytes: usize) -> Self {
        self.max_body_bytes = bytes.max(1024);
        self
    }

    /// Instructions the server gives clients at initialization (how to use the tools).
    #[must_use]
    pub fn instructions(mut self, text: impl Into<String>) -> Self {
        self.instructions = Some(text.into());
        self
    }

    fn rmcp_config(&self) -> StreamableHttpServerConfig {
        let mut config = StreamableHttpServerConfig::default()
            .with_legacy_session_mode(false)
            .with_json_response(true)
            .with_sse_keep_alive(None)
            .with_max_request_body_bytes(self.max_body_bytes)
            .with_allowed_origins(self.allowed_origins.clone());
        config = if self.allowed_hosts.is_empty() {
            config.disable_allowed_hosts()
        } else {
            config.with_allowed_hosts(self.allowed_hosts.clone())
        };
        config
    }
}

/// How the server learns who calls.
#[derive(Clone)]
enum Identity {
    /// One caller for the whole connection (stdio).
    Fixed(Caller),
    /// A caller per HTTP request.
    PerRequest(CallerFn),
}

/// The caller [`http_router`]'s middleware resolved for a request, carried to the handler in
/// the request's extensions.
#[derive(Clone)]
struct ResolvedCaller(Caller);

/// The MCP server of a [`ToolRegistry`]: an rmcp [`ServerHandler`], to serve on any rmcp
/// transport. Cheap to clone.
#[derive(Clone)]
pub struct McpServer {
    registry: ToolRegistry,
    identity: Identity,
    instructions: Option<Arc<str>>,
}

impl fmt::Debug for McpServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let identity = match &self.identity {
            Identity::Fixed(caller) => format!("{caller:?}"),
            Identity::PerRequest(_) => "per HTTP request".to_owned(),
        };
        f.debug_struct("McpServer")
            .field("registry", &self.registry)
            .field("identity", &identity)
            .finish()
    }
}

impl McpServer {
    /// A server whose every call acts as `caller` (stdio, or any one-user transport).
    pub fn new(registry: ToolRegistry, caller: Caller) -> Self {
        Self {
            registry,
            identity: Identity::Fixed(caller),
            instructions: None,
        }
    }

    /// A server that derives the caller of each call from the HTTP request that carried it.
    /// Calls that did not come over HTTP are refused.
    pub fn per_request(registry: ToolRegistry, caller: CallerFn) -> Self {
        Self {
            registry,
            identity: Identity::PerRequest(caller),
            instructions: None,
        }
    }

    /// Instructions given to clients at initialization.
    #[must_use]
    pub fn with_instructions(mut self, text: impl Into<String>) -> Self {
        self.instructions = Some(text.into().into());
        self
    }

    /// The tools, as MCP lists them.
    pub fn tools(&self) -> Vec<McpTool> {
        self.registry.specs().map(to_mcp_tool).collect()
    }

    fn caller(&self, context: &RequestContext<RoleServer>) -> Result<Caller, ErrorData> {
        match &self.identity {
            Identity::Fixed(caller) => Ok(caller.clone()),
            Identity::PerRequest(derive) => {
                let Some(parts) = context.extensions.get::<http::request::Parts>() else {
                    return Err(ErrorData::invalid_request(
                        "this server serves calls made over HTTP only",
                        None,
                    ));
                };
                if let Some(ResolvedCaller(caller)) = parts.extensions.get::<ResolvedCaller>() {
                    return Ok(caller.clone());
                }
                derive(parts).map_err(|Unauthorized(message)| {
                    ErrorData::invalid_request(format!("unauthenticated: {message}"), None)
                })
            }
        }
    }

    async fn run_call(
        &self,
        request: CallToolRequestParams,
        meta: &RequestMetaObject,
        caller: Caller,
    ) -> CallToolResult {
        let key = match idempotency_key(&request, meta) {
            Ok(key) => key,
            Err(failure) => return failure_result(&failure),
        };
        let args = Value::Object(request.arguments.unwrap_or_default());
        // The registry bounds the call by the tool's own timeout; this is the outer bound.
        let ctx = ToolContext::new(caller, TOOL_TIMEOUT_MAX, key);
        match self.registry.call(&request.name, args, &ctx).await {
            Ok(value) => success_result(value),
            Err(failure) => {
                tracing::debug!(tool = %request.name, kind = failure.kind(), "MCP tool call failed");
                failure_result(&failure)
            }
        }
    }
}

fn to_mcp_tool(spec: &ToolSpec) -> McpTool {
    let schema = match &spec.input_schema {
        Value::Object(map) => map.clone(),
        // The registry admits object schemas only; be safe rather than panic.
        _ => serde_json::Map::from_iter([("type".to_owned(), Value::from("object"))]),
    };
    let annotations = if spec.effect.changes_state() {
        ToolAnnotations::new().read_only(false)
    } else {
        ToolAnnotations::new()
            .read_only(true)
            .destructive(false)
            .idempotent(true)
    };
    McpTool::new(
        spec.name.clone(),
        spec.description.clone(),
        Arc::new(schema),
    )
    .with_annotations(annotations)
}

fn success_result(value: Value) -> CallToolResult {
    let mut result = CallToolResult::success(vec![ContentBlock::text(value.to_string())]);
    // Structured content must be an object for clients of the older revisions.
    if value.is_object() {
        result.structured_content = Some(value);
    }
    result
}

fn failure_result(failure: &ToolFailure) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(failure.to_model_text())])
}

/// The call's idempotency key: the client's (in `_meta`, which rmcp hands over in the request
/// context), or a fresh UUIDv7.
fn idempotency_key(
    request: &CallToolRequestParams,
    meta: &RequestMetaObject,
) -> Result<String, ToolFailure> {
    let sent = meta.get(IDEMPOTENCY_META_KEY).or_else(|| {
        request
            .meta
            .as_ref()
            .and_then(|meta| meta.get(IDEMPOTENCY_META_KEY))
    });
    match sent {
        None | Some(Value::Null) => Ok(format!("mcp-{}", uuid::Uuid::now_v7())),
        Some(Value::String(key))
            if !key.is_empty()
                && key.len() <= IDEMPOTENCY_KEY_MAX
                && key.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Ok(format!("mcp-{key}"))
        }
        Some(_) => Err(ToolFailure::InvalidArguments(format!(
            "_meta.{IDEMPOTENCY_META_KEY} must be 1 to {IDEMPOTENCY_KEY_MAX} visible ASCII characters"
        ))),
    }
}

impl ServerHandler for McpServer {
    fn get_info(&self) -> ServerConfig {
        let mut implementation = Implementation::new(SERVER_NAME, env!("CARGO_PKG_VERSION"));
        implementation.title = Some("trellis tools".to_owned());
        let config = ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(implementation);
        match &self.instructions {
            Some(text) => config.with_instructions(text.to_string()),
            None => config,
        }
    }

    fn supported_protocol_versions(&self) -> Cow<'static, [ProtocolVersion]> {
        // Every revision the SDK knows, from 2024-11-05 to the current one.
        Cow::Borrowed(ProtocolVersion::KNOWN_VERSIONS)
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(self.tools()))
    }

    fn get_tool(&self, name: &str) -> Option<McpTool> {
        self.registry.spec(name).map(to_mcp_tool)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let caller = self.caller(&context)?;
        tokio::select! {
            result = self.run_call(request, &context.meta, caller) => Ok(result.into()),
            () = context.ct.cancelled() => Err(ErrorData::invalid_request("the call was cancelled", None)),
        }
    }
}

/// Why a stdio (or other byte-stream) server stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The client never completed the handshake, or the stream failed before it did.
    #[error("MCP initialization failed: {0}")]
    Initialize(String),
    /// The server task failed.
    #[error("the MCP server stopped: {0}")]
    Stopped(String),
}

/// Serves `registry` on this process's stdin and stdout, every call acting as `caller`, until
/// the client closes stdin. Nothing else may write to stdout meanwhile (logs go to stderr).
///
/// # Errors
/// [`ServeError`] when the client does not complete the handshake or the server fails.
pub async fn serve_stdio(registry: ToolRegistry, caller: Caller) -> Result<(), ServeError> {
    let (read, write) = rmcp::transport::stdio();
    serve_io(McpServer::new(registry, caller), read, write).await
}

/// Serves `server` on a byte stream (newline-delimited JSON-RPC, as on stdio) until the
/// client closes it.
///
/// # Errors
/// As [`serve_stdio`].
pub async fn serve_io<R, W>(server: McpServer, read: R, write: W) -> Result<(), ServeError>
where
    R: AsyncRead + Send + Unpin + 'static,
    W: AsyncWrite + Send + Unpin + 'static,
{
    let running = server
        .serve((read, write))
        .await
        .map_err(|e| ServeError::Initialize(e.to_string()))?;
    let reason = running
        .waiting()
        .await
        .map_err(|e| ServeError::Stopped(e.to_string()))?;
    tracing::debug!(?reason, "MCP connection closed");
    Ok(())
}

/// The streamable-HTTP MCP service of `registry`, stateless (see the [module docs](self)): a
/// tower service to mount with `Router::nest_service` / `route_service`. Each call's caller
/// comes from `config`'s [`CallerFn`]; a call it refuses gets a protocol error. Use
/// [`http_router`] to refuse unauthenticated requests with `401` before MCP sees them.
pub fn http_service(
    registry: ToolRegistry,
    config: &HttpConfig,
) -> StreamableHttpService<McpServer, NeverSessionManager> {
    let mut server = McpServer::per_request(registry, config.caller.clone());
    if let Some(text) = &config.instructions {
        server = server.with_instructions(text.clone());
    }
    StreamableHttpService::new(
        move || Ok(server.clone()),
        Arc::new(NeverSessionManager::default()),
        config.rmcp_config(),
    )
}

/// An axum router serving [`http_service`] at `path` (`/mcp`), behind a check that resolves
/// each request's caller with `config`'s [`CallerFn`] first: a request it refuses gets `401`
/// with a JSON error body and `WWW-Authenticate: Bearer`, and never reaches MCP.
pub fn http_router(path: &str, registry: ToolRegistry, config: &HttpConfig) -> axum::Router {
    let service = http_service(registry, config);
    axum::Router::new()
        .route_service(path, service)
        .layer(axum::middleware::from_fn_with_state(
            config.caller.clone(),
            authenticate,
        ))
}

async fn authenticate(State(derive): State<CallerFn>, request: Request, next: Next) -> Response {
    let (mut parts, body) = request.into_parts();
    match derive(&parts) {
        Ok(caller) => {
            parts.extensions.insert(ResolvedCaller(caller));
            next.run(Request::from_parts(parts, body)).await
        }
        Err(Unauthorized(message)) => {
            let body = serde_json::json!({
                "error": { "code": "unauthenticated", "message": message }
            });
            let mut response = (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
            response
        }
    }
}
