//! The reference shop's agent tools: search, read, cancel and place orders, list products and
//! check stock, each acting as the user who calls it.
//!
//! # Overview
//! Six [`trellis_agent::Tool`]s, each with a description for a model, a JSON Schema derived
//! from its input type, and a compact JSON result (ids, statuses, totals in cents, dates):
//!
//! | tool | input | effect |
//! | --- | --- | --- |
//! | `search_orders` | `status`, `placed_from`, `placed_to`, `customer_id` (admins), `limit`, `cursor` | read |
//! | `get_order` | `order_id` | read |
//! | `cancel_order` | `order_id` | changes, needs approval, no undo |
//! | `list_products` | `query`, `limit`, `cursor` | read |
//! | `check_stock` | `product_id` | read |
//! | `place_order` | `items` (`product_id`, `quantity`) | changes, needs approval, undone by cancelling |
//!
//! # Who the tools act as
//! Every tool calls the shop's public API through the gateway ([`ShopClient`]) with the
//! caller's own bearer token ([`trellis_agent::Caller::bearer`]), never a service directly
//! and never with an identity of its own. The gateway verifies the token and the services
//! decide, as for any client, what that user may see and do: another customer's order reads
//! as not found, a customer naming another customer in `search_orders` is refused, and only
//! an admin may search any customer's orders. An agent can therefore never do what its user
//! could not. A caller without a token is refused ("not logged in") by the order tools; the
//! catalogue tools read the public catalogue, which the shop shows anyone.
//!
//! Answers map to [`trellis_agent::ToolError`]: a 4xx is `refused` with the shop's own
//! message ("no such order"), which the model can act on; a 5xx, a connection failure or a
//! timeout is `unavailable` and counts against the tool's circuit breaker. Every request has a
//! timeout ([`client::REQUEST_TIMEOUT`], cut to the call's deadline) and every answer a size
//! bound ([`client::RESPONSE_BYTES_MAX`]).
//!
//! `place_order` sends the call's idempotency key ([`trellis_agent::ToolContext::idempotency_key`])
//! as the `Idempotency-Key` header, so a retried call answers the order placed first; its
//! undo cancels that order and accepts one that is cancelled already.
//!
//! # How it fits
//! trellis-agent owns the tool trait, the registry (argument validation, timeouts, a breaker
//! per tool, a bound on concurrent calls), the agent loop and the MCP server; this crate only
//! supplies the shop's tools, built by [`registry`] or added to a builder by [`register`]. It
//! depends on no shop service: it speaks HTTP to the gateway like any client. No feature
//! flags.
//!
//! # Example
//! ```
//! # fn demo() -> Result<(), shop_agent::SetupError> {
//! let tools = shop_agent::registry("http://127.0.0.1:8080")?;
//! let names: Vec<&str> = tools.specs().map(|spec| spec.name.as_str()).collect();
//! assert_eq!(
//!     names,
//!     ["cancel_order", "check_stock", "get_order", "list_products", "place_order", "search_orders"]
//! );
//! assert!(tools.spec("place_order").is_some_and(|spec| spec.effect.needs_approval()));
//! # Ok(()) }
//! # demo().expect("the tools register");
//! ```
//! A call, as the agent loop or the MCP server makes it, for a logged-in user:
//! ```no_run
//! # async fn demo(token: String) -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use trellis_agent::{Caller, ToolContext};
//!
//! let tools = shop_agent::registry("http://127.0.0.1:8080")?;
//! let caller = Caller::new("user-id", "customer").with_bearer(token);
//! let ctx = ToolContext::new(caller, Duration::from_secs(30), "run-1:call-1");
//! let pending = tools
//!     .call_json("search_orders", r#"{"status": "pending", "placed_from": "2026-01-01"}"#, &ctx)
//!     .await?;
//! println!("{pending}");
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

pub mod catalogue;
pub mod client;
pub mod orders;

use trellis_agent::tool::RegistryError;
use trellis_agent::{ToolRegistry, ToolRegistryBuilder};

pub use catalogue::{CheckStock, ListProducts};
pub use client::{SetupError, ShopClient};
pub use orders::{CancelOrder, GetOrder, OrderStatus, PlaceOrder, SearchOrders};

/// A registry of the six shop tools, calling the gateway at `gateway` (its public URL, such as
/// `http://127.0.0.1:8080`).
///
/// # Errors
/// [`SetupError`] for a gateway URL that is not `http(s)://host[:port][/prefix]`, or an HTTP
/// client that cannot be built.
pub fn registry(gateway: &str) -> Result<ToolRegistry, SetupError> {
    let client = ShopClient::new(gateway)?;
    Ok(register(ToolRegistry::builder(), &client)?.build())
}

/// Adds the six shop tools, calling the shop through `client`, to `builder` (which may hold
/// other tools, or set its own bound on concurrent calls).
///
/// # Errors
/// [`RegistryError`] when `builder` already holds a tool of one of these names.
pub fn register(
    builder: ToolRegistryBuilder,
    client: &ShopClient,
) -> Result<ToolRegistryBuilder, RegistryError> {
    builder
        .tool(SearchOrders::new(client.clone()))?
        .tool(GetOrder::new(client.clone()))?
        .tool(CancelOrder::new(client.clone()))?
        .tool(ListProducts::new(client.clone()))?
        .tool(CheckStock::new(client.clone()))?
        .tool(PlaceOrder::new(client.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tool_registers_with_an_object_schema_and_a_description() {
        // The registry accepts all six (names valid, schemas objects), each described.
        let tools = registry("http://127.0.0.1:8080").expect("registers");
        assert_eq!(tools.specs().count(), 6);
        for spec in tools.specs() {
            assert_eq!(spec.input_schema["type"], "object", "{}", spec.name);
            assert!(spec.description.len() > 40, "{}", spec.name);
        }
    }

    #[test]
    fn the_status_filter_lists_the_shops_statuses() {
        // The model sees the statuses it may ask for, as an enum.
        let tools = registry("http://127.0.0.1:8080").expect("registers");
        let schema = &tools
            .spec("search_orders")
            .expect("search_orders")
            .input_schema;
        let text = schema.to_string();
        for status in ["pending", "confirmed", "cancelled"] {
            assert!(text.contains(&format!("\"{status}\"")), "{text}");
        }
        let fields: Vec<&String> = schema["properties"]
            .as_object()
            .map(|p| p.keys().collect())
            .unwrap_or_default();
        assert_eq!(
            fields,
            [
                "cursor",
                "customer_id",
                "limit",
                "placed_from",
                "placed_to",
                "status"
            ]
        );
    }

    #[test]
    fn only_state_changing_tools_need_approval() {
        // cancel_order and place_order wait for approval; the rest only read.
        let tools = registry("http://127.0.0.1:8080").expect("registers");
        let approval: Vec<&str> = tools
            .specs()
            .filter(|s| s.effect.needs_approval())
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(approval, ["cancel_order", "place_order"]);
        let schema = &tools.spec("place_order").expect("place_order").input_schema;
        assert!(
            schema.to_string().contains("How many units"),
            "field docs reach the schema: {schema}"
        );
    }
}
