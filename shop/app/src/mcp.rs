//! The shop's MCP endpoint: the six shop tools (shop-agent) over streamable HTTP, as the `mcp`
//! upstream the gateway routes `/mcp` to (see docs/decisions/0010-mcp-at-the-gateway.md).
//!
//! The gateway authenticates the caller's bearer token (route `mcp`, `auth = ["shop"]`, rate
//! limited per user) and signs the identity this service believes ([`protect`]); a request
//! that reaches the service another way, without that identity, gets 401 before any MCP
//! processing. Each call acts as that caller: subject and role from the verified identity, and
//! the bearer token from the `Authorization` header the gateway forwards, which the tools use
//! to call the shop's public API back through the gateway, so an MCP client can never do what
//! its user could not. The service is stateless (no MCP sessions), so the gateway may balance
//! a client's requests over any number of replicas.

use std::sync::Arc;

use trellis_agent::Caller;
use trellis_agent::mcp::{HttpConfig, Unauthorized, bearer_token};
use trellis_service::auth::{ServiceKey, protect};

/// The path the endpoint is served at, on the gateway and on the service alike.
pub const MCP_PATH: &str = "/mcp";

const INSTRUCTIONS: &str = "Tools of the trellis shop, acting as the logged-in user: search and \
read their orders, list products and check stock, place and cancel orders. Amounts are integer \
cents. place_order and cancel_order change state: confirm them with the user first.";

/// The MCP router of the shop, its tools calling the gateway at `gateway_url`.
///
/// # Errors
/// The message of a gateway URL shop-agent refuses.
pub(crate) fn router(gateway_url: &str, service_key: &ServiceKey) -> Result<axum::Router, String> {
    let registry = shop_agent::registry(gateway_url).map_err(|e| e.to_string())?;
    // Any Host: the gateway forwards the public one, and a request is answered only with an
    // identity the gateway signed, which a page on a rebound DNS name cannot have.
    let config = HttpConfig::new(Arc::new(caller_of))
        .allow_any_host()
        .instructions(INSTRUCTIONS);
    let router = trellis_agent::mcp::http_router(MCP_PATH, registry, &config);
    // `protect` goes outside: it verifies the identity token before the caller is derived.
    Ok(protect(router, service_key))
}

/// The caller of a request [`protect`] let through: the identity the gateway signed, acting
/// with the bearer token the gateway verified and forwarded.
fn caller_of(parts: &http::request::Parts) -> Result<Caller, Unauthorized> {
    let verified = parts
        .extensions
        .get::<trellis_service::Caller>()
        .ok_or_else(|| {
            Unauthorized(
                "MCP is served through the gateway at /mcp, with a user's bearer token".into(),
            )
        })?;
    let token = bearer_token(&parts.headers).ok_or_else(|| {
        Unauthorized("the tools act with the caller's `Authorization: Bearer` token".into())
    })?;
    Ok(Caller::new(verified.user_id.clone(), verified.role.clone()).with_bearer(token))
}
