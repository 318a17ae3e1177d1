//! Bus events of the order flow. Each travels as the `data` of a trellis-bus envelope whose
//! `type` is the constant below and whose `subject` and `correlation_id` are the order id.

use serde::{Deserialize, Serialize};

use crate::api::OrderItem;

/// Topic the orders service publishes order lifecycle events to.
pub const TOPIC_ORDERS: &str = "shop.orders";

/// `order.created`.
pub const ORDER_CREATED: &str = "order.created";
/// `order.confirmed`.
pub const ORDER_CONFIRMED: &str = "order.confirmed";
/// `order.cancelled`.
pub const ORDER_CANCELLED: &str = "order.cancelled";

/// `order.created`: an order was accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCreated {
    /// Order id.
    pub order_id: String,
    /// Owner.
    pub user_id: String,
    /// Lines.
    pub items: Vec<OrderItem>,
    /// Total in cents.
    pub total_cents: i64,
}

/// `order.confirmed` / `order.cancelled`: an order ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderEnded {
    /// Order id.
    pub order_id: String,
    /// Owner.
    pub user_id: String,
    /// `CONFIRMED` or `CANCELLED`.
    pub status: String,
    /// Why it was cancelled.
    pub reason: Option<String>,
}
