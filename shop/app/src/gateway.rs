//! The gateway's configuration for the shop, and the hook that serves the merged OpenAPI
//! document.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use trellis_gateway::{GatewayBody, GatewayHooks, HookDecision, RequestCtx};

/// Requests per second one user (or, for unauthenticated calls, one IP) may make.
pub const RATE_PER_CLIENT: u32 = 500;

/// The gateway configuration routing DESIGN.md's public API to the services at `addrs`
/// (keyed by service name), listening on `listen`.
pub fn config_toml(listen: SocketAddr, addrs: &BTreeMap<&'static str, SocketAddr>) -> String {
    let addr = |name: &str| addrs.get(name).map(ToString::to_string).unwrap_or_default();
    let mut toml = format!(
        r#"
[server]
listen = "{listen}"
admin_endpoints = true
worker_threads = 1

[auth.shop]
type = "jwt"
jwks_url = "http://{users}/.well-known/jwks.json"
jwks_refetch_min_interval_ms = 1000
issuers = ["trellis-shop"]
audiences = ["trellis-shop"]
claims_to_headers = {{ sub = "x-user-id", role = "x-user-role" }}

[rate_limits.per_user]
key = "jwt_sub"
requests_per_second = {RATE_PER_CLIENT}
burst = {burst}

[rate_limits.per_ip]
key = "ip"
requests_per_second = {RATE_PER_CLIENT}
burst = {burst}
"#,
        users = addr("users"),
        burst = RATE_PER_CLIENT * 2,
    );
    for name in [
        "users",
        "products",
        "inventory",
        "orders",
        "payments",
        "shipping",
        "payment-provider",
    ] {
        toml.push_str(&format!(
            "\n[clusters.{name}]\nendpoints = [\"{}\"]\nload_balancing = \"least_outstanding\"\n",
            addr(name)
        ));
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
rate_limit = "per_ip""#,
        r#"name = "token"
path_exact = "/api/auth/token"
methods = ["POST"]
cluster = "users"
rate_limit = "per_ip""#,
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
timeout_ms = 15000"#,
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
        r#"name = "provider-admin"
path_exact = "/api/admin/provider"
methods = ["GET", "PUT"]
cluster = "payment-provider"
strip_prefix = "/api/admin/provider"
add_prefix = "/admin/config"
auth = ["shop"]
required_roles = ["admin"]"#,
    ];
    for route in routes {
        toml.push_str("\n[[routes]]\n");
        toml.push_str(route);
        toml.push('\n');
    }
    toml
}

/// Answers `GET /openapi.json` at the gateway with the whole public API: the services'
/// documents merged.
#[derive(Debug)]
pub struct OpenApiHook {
    document: Arc<Bytes>,
}

impl OpenApiHook {
    /// The hook serving the merged document.
    pub fn new() -> Self {
        let document = serde_json::to_vec_pretty(&crate::openapi()).unwrap_or_default();
        Self {
            document: Arc::new(Bytes::from(document)),
        }
    }
}

impl Default for OpenApiHook {
    fn default() -> Self {
        Self::new()
    }
}

impl GatewayHooks for OpenApiHook {
    fn request_filter(
        &self,
        ctx: &mut RequestCtx,
        _request: &mut http::request::Parts,
    ) -> HookDecision {
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
