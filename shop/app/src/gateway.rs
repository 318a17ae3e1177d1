//! The gateway's configuration for the shop, and its hooks: the merged OpenAPI document,
//! and the identity token the services believe (see [`trellis_service::auth`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use trellis_gateway::{GatewayBody, GatewayHooks, HookDecision, RequestCtx};
use trellis_service::auth::{IDENTITY_HEADER, ServiceKey, Signer};
use trellis_service::{ROLE_CUSTOMER, USER_ID_HEADER, USER_ROLE_HEADER};

/// Requests per second one user (or, for unauthenticated calls, one IP) may make.
pub const RATE_PER_CLIENT: u32 = 500;
/// The gateway route of the admin console's pages: everything under `/admin` but the login
/// page and the assets, for administrators only (see [`ShopHooks`]).
pub const CONSOLE_ROUTE: &str = "console";

/// The gateway configuration routing DESIGN.md's public API to the services at `addrs`
/// (keyed by service name), listening on `listen`, with its operator endpoints (`/metrics`,
/// `/healthz`, `/readyz`) only on `operator_listen`. When `addrs` names a `console`, `/admin`
/// is routed to it: the login page and assets to anyone (rate limited), the rest
/// ([`CONSOLE_ROUTE`]) to administrators.
pub fn config_toml(
    listen: SocketAddr,
    operator_listen: SocketAddr,
    addrs: &BTreeMap<&'static str, SocketAddr>,
) -> String {
    let replicas = addrs
        .iter()
        .map(|(name, addr)| (*name, vec![*addr]))
        .collect();
    config_toml_with_replicas(listen, operator_listen, &replicas)
}

/// How often the gateway checks each replica's `/readyz` when a service has several.
const REPLICA_HEALTH_INTERVAL_MS: u64 = 1_000;

/// As [`config_toml`], with every replica of each service (the first one also serves the
/// JWKS and the revocation feed, for the users service). A service with several replicas is
/// balanced across them (least outstanding requests), each checked on `/readyz` every second
/// and taken out after one failed check or five failed requests in a row, back after one
/// passed check.
pub fn config_toml_with_replicas(
    listen: SocketAddr,
    operator_listen: SocketAddr,
    addrs: &BTreeMap<&'static str, Vec<SocketAddr>>,
) -> String {
    let addr = |name: &str| {
        addrs
            .get(name)
            .and_then(|a| a.first())
            .map(ToString::to_string)
            .unwrap_or_default()
    };
    let mut toml = format!(
        r#"
[server]
listen = "{listen}"
admin_endpoints = true
admin_listen = "{operator_listen}"
worker_threads = 1

[auth.shop]
type = "jwt"
jwks_url = "http://{users}/.well-known/jwks.json"
jwks_refetch_min_interval_ms = 1000
issuers = ["trellis-shop"]
audiences = ["trellis-shop"]
claims_to_headers = {{ sub = "x-user-id", role = "x-user-role" }}
# A logout (or a reused refresh token) is refused here within half a second.
revocations_url = "http://{users}/api/auth/revocations"
revocations_refresh_ms = 500

[rate_limits.per_user]
key = "jwt_sub"
requests_per_second = {RATE_PER_CLIENT}
burst = {burst}

[rate_limits.per_ip]
key = "ip"
requests_per_second = {RATE_PER_CLIENT}
burst = {burst}

# Logins and registrations hash a password: one address gets a fair share of the users
# service's hashing slots, and is told to come back (429, Retry-After) before any hashing.
[rate_limits.login_per_address]
key = "ip"
requests_per_second = {login_rate}
burst = {login_burst}
"#,
        users = addr("users"),
        burst = RATE_PER_CLIENT * 2,
        login_rate = shop_users::LOGIN_RATE_PER_ADDRESS,
        login_burst = shop_users::LOGIN_RATE_PER_ADDRESS * 2,
    );
    let console = addrs.contains_key("console");
    for name in [
        "users",
        "products",
        "inventory",
        "orders",
        "payments",
        "shipping",
        "payment-provider",
        "mcp",
        "console",
    ] {
        if name == "console" && !console {
            continue;
        }
        let endpoints: Vec<String> = match addrs.get(name) {
            Some(list) if !list.is_empty() => list.iter().map(|a| format!("\"{a}\"")).collect(),
            _ => vec!["\"\"".to_owned()],
        };
        toml.push_str(&format!(
            "\n[clusters.{name}]\nendpoints = [{}]\nload_balancing = \"least_outstanding\"\n",
            endpoints.join(", ")
        ));
        if endpoints.len() > 1 {
            toml.push_str(&format!(
                "[clusters.{name}.health_check]\npath = \"/readyz\"\n\
                 interval_ms = {REPLICA_HEALTH_INTERVAL_MS}\ntimeout_ms = 500\n\
                 healthy_threshold = 1\nunhealthy_threshold = 1\n"
            ));
        }
    }
    let routes: &[&str] = &[
        r#"name = "openapi"
path_exact = "/openapi.json"
methods = ["GET"]
cluster = "users""#,
        r#"name = "jwks"
path_exact = "/.well-known/jwks.json"
methods = ["GET"]
cluster = "users""#,
        r#"name = "register"
path_exact = "/api/users"
methods = ["POST"]
cluster = "users"
rate_limit = "login_per_address""#,
        r#"name = "token"
path_exact = "/api/auth/token"
methods = ["POST"]
cluster = "users"
rate_limit = "login_per_address""#,
        r#"name = "refresh"
path_exact = "/api/auth/refresh"
methods = ["POST"]
cluster = "users"
rate_limit = "login_per_address""#,
        r#"name = "logout"
path_exact = "/api/auth/logout"
methods = ["POST"]
cluster = "users"
auth = ["shop"]
rate_limit = "per_user""#,
        r#"name = "rotate-key"
path_exact = "/api/auth/keys/rotate"
methods = ["POST"]
cluster = "users"
auth = ["shop"]
required_roles = ["admin"]"#,
        r#"name = "me"
path_exact = "/api/users/me"
methods = ["GET"]
cluster = "users"
auth = ["shop"]
rate_limit = "per_user""#,
        r#"name = "products-read"
path_prefix = "/api/products"
methods = ["GET", "HEAD"]
cluster = "products"
rate_limit = "per_ip"
retry = { attempts = 2, on_statuses = [502, 503] }"#,
        r#"name = "products-write"
path_exact = "/api/products"
methods = ["POST"]
cluster = "products"
auth = ["shop"]
required_roles = ["admin"]"#,
        r#"name = "inventory"
path_prefix = "/api/inventory"
cluster = "inventory"
auth = ["shop"]
required_roles = ["admin"]"#,
        r#"name = "orders"
path_prefix = "/api/orders"
cluster = "orders"
auth = ["shop"]
rate_limit = "per_user"
timeout_ms = 15000
# A replica that died refuses connections: the order goes to another one (a connect error
# means nothing was sent; orders' bodies are read whole to be sent again). Only reads are
# retried after a 502/503.
retry = { attempts = 2, on_statuses = [502, 503] }"#,
        r#"name = "mcp"
path_exact = "/mcp"
cluster = "mcp"
auth = ["shop"]
rate_limit = "per_user"
timeout_ms = 30000"#,
        r#"name = "payments"
path_prefix = "/api/payments"
cluster = "payments"
auth = ["shop"]
required_roles = ["admin"]"#,
        r#"name = "shipments"
path_prefix = "/api/shipments"
cluster = "shipping"
auth = ["shop"]
required_roles = ["admin"]"#,
        r#"name = "dlq"
path_prefix = "/api/admin/dlq"
cluster = "orders"
strip_prefix = "/api/admin/dlq"
add_prefix = "/admin/dlq"
auth = ["shop"]
required_roles = ["admin"]"#,
        r#"name = "saga-admin"
path_prefix = "/api/admin/sagas"
cluster = "orders"
strip_prefix = "/api/admin/sagas"
add_prefix = "/admin/saga/sagas"
auth = ["shop"]
required_roles = ["admin"]"#,
        r#"name = "order-saga-admin"
path_prefix = "/api/admin/orders"
methods = ["GET"]
cluster = "orders"
strip_prefix = "/api/admin/orders"
add_prefix = "/admin/orders"
auth = ["shop"]
required_roles = ["admin"]"#,
        r#"name = "provider-admin"
path_exact = "/api/admin/provider"
methods = ["GET", "PUT"]
cluster = "payment-provider"
strip_prefix = "/api/admin/provider"
add_prefix = "/admin/config"
auth = ["shop"]
required_roles = ["admin"]"#,
    ];
    // The console: the login page and its assets for anyone, the rest for administrators
    // (first match wins, so these come before the `/admin` prefix).
    let console_routes: &[&str] = &[
        r#"name = "console-login"
path_exact = "/admin/login"
methods = ["GET", "POST"]
cluster = "console"
rate_limit = "login_per_address""#,
        r#"name = "console-assets"
path_prefix = "/admin/assets"
methods = ["GET", "HEAD"]
cluster = "console"
rate_limit = "per_ip""#,
        r#"name = "console"
path_prefix = "/admin"
cluster = "console"
auth = ["shop"]
required_roles = ["admin"]
rate_limit = "per_user"
timeout_ms = 20000"#,
    ];
    let console_routes = if console { console_routes } else { &[] };
    for route in routes.iter().chain(console_routes) {
        toml.push_str("\n[[routes]]\n");
        toml.push_str(route);
        toml.push('\n');
    }
    toml
}

/// The shop's gateway hooks.
///
/// - `GET /openapi.json` is answered with the whole public API: the services' documents
///   merged.
/// - On the admin console's route ([`CONSOLE_ROUTE`]), a request without an `Authorization`
///   header has the console's session cookie moved into one (`Bearer …`) before the gateway
///   authenticates it, so the gateway checks the token and the admin role exactly as for an
///   API call (401 for a bad or expired token, 403 for a customer's). A request with neither
///   is sent to the login page (303). The cookie is accepted on that route only, where it is
///   `SameSite=Strict`; the API routes take the header alone.
/// - Every request sent upstream carries, in [`IDENTITY_HEADER`], a token signed with the
///   shop's [`ServiceKey`] naming the user the gateway authenticated (from the identity
///   headers the gateway set after verifying the user's JWT; it always strips client-sent
///   copies of those), or no token at all for an anonymous request. A client-sent token is
///   always removed. The services believe only that token.
#[derive(Debug)]
pub struct ShopHooks {
    document: Arc<Bytes>,
    signer: Signer,
}

impl ShopHooks {
    /// The hooks, signing with `service_key`.
    pub fn new(service_key: &ServiceKey) -> Self {
        let document = serde_json::to_vec_pretty(&crate::openapi()).unwrap_or_default();
        Self {
            document: Arc::new(Bytes::from(document)),
            signer: service_key.signer("gateway"),
        }
    }
}

impl GatewayHooks for ShopHooks {
    fn upstream_request_filter(&self, ctx: &RequestCtx, request: &mut http::request::Parts) {
        request.headers.remove(IDENTITY_HEADER);
        if ctx.subject.is_none() {
            return;
        }
        let header = |name: &str| {
            request
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
        };
        let Some(user_id) = header(USER_ID_HEADER) else {
            return;
        };
        let role = header(USER_ROLE_HEADER).unwrap_or(ROLE_CUSTOMER);
        match self.signer.token(user_id, role) {
            Ok(token) => {
                request.headers.insert(IDENTITY_HEADER, token);
            }
            // Cannot happen with the claims it signs; the service then answers 401.
            Err(error) => tracing::error!(%error, "cannot sign the caller's identity"),
        }
    }

    fn request_filter(
        &self,
        ctx: &mut RequestCtx,
        request: &mut http::request::Parts,
    ) -> HookDecision {
        if &*ctx.route == CONSOLE_ROUTE {
            return console_credential(request);
        }
        if &*ctx.route != "openapi" {
            return HookDecision::Continue;
        }
        let body: GatewayBody = Full::new((*self.document).clone())
            .map_err(|never| match never {})
            .boxed();
        let mut response = Response::new(body);
        *response.status_mut() = StatusCode::OK;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        HookDecision::Respond(response)
    }
}

/// The console's session cookie as the request's bearer token, or a redirect to the login page
/// when the request carries no credential at all.
fn console_credential(request: &mut http::request::Parts) -> HookDecision {
    if request.headers.contains_key(header::AUTHORIZATION) {
        return HookDecision::Continue;
    }
    let bearer = shop_console::session_token(&request.headers)
        .and_then(|token| http::HeaderValue::from_str(&format!("Bearer {token}")).ok());
    match bearer {
        Some(value) => {
            request.headers.insert(header::AUTHORIZATION, value);
            HookDecision::Continue
        }
        None => {
            let body: GatewayBody = Full::new(Bytes::new())
                .map_err(|never| match never {})
                .boxed();
            let mut response = Response::new(body);
            *response.status_mut() = StatusCode::SEE_OTHER;
            response.headers_mut().insert(
                header::LOCATION,
                http::HeaderValue::from_static(shop_console::LOGIN_PATH),
            );
            HookDecision::Respond(response)
        }
    }
}
