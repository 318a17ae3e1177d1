//! Default ports (DESIGN.md) and service names.

/// The gateway.
pub const GATEWAY: u16 = 8080;
/// The gateway's operator listener (`/metrics`, `/healthz`, `/readyz`), on loopback by default.
pub const GATEWAY_OPERATOR: u16 = 8089;
/// The users service.
pub const USERS: u16 = 8101;
/// The products service.
pub const PRODUCTS: u16 = 8102;
/// The inventory service.
pub const INVENTORY: u16 = 8103;
/// The orders service.
pub const ORDERS: u16 = 8104;
/// The payments service.
pub const PAYMENTS: u16 = 8105;
/// The shipping service.
pub const SHIPPING: u16 = 8106;
/// The MCP endpoint of the shop's agent tools (the gateway serves it at `/mcp`).
pub const MCP: u16 = 8107;
/// The admin console (`trellis serve console`; the gateway serves it at `/admin`).
pub const CONSOLE: u16 = 8108;
/// The payment provider simulator.
pub const PAYMENT_PROVIDER: u16 = 8190;

/// Every service `trellis serve` knows, with its default port.
pub const SERVICES: &[(&str, u16)] = &[
    ("users", USERS),
    ("products", PRODUCTS),
    ("inventory", INVENTORY),
    ("orders", ORDERS),
    ("payments", PAYMENTS),
    ("shipping", SHIPPING),
    ("payment-provider", PAYMENT_PROVIDER),
    ("mcp", MCP),
    ("console", CONSOLE),
];
