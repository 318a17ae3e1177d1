//! Bus events of the order flow. Each travels as the `data` of a trellis-bus envelope whose
//! `type` is the constant below, published on the topic of the same name, and whose `subject`
//! and `correlation_id` are the order id.
//!
//! The orders service publishes `order.*` in both saga styles. The other events exist only in
//! the choreographed style ([`SagaStyle::Choreography`]), where they are the whole flow:
//!
//! ```text
//! order.created ─inventory─▶ inventory.reserved ─payments─▶ payment.completed
//!   ─orders─▶ order.shipping_started ─shipping─▶ shipment.created
//!   ─inventory─▶ inventory.committed ─orders─▶ order.confirmed
//! ```
//!
//! Failures: `inventory.failed` (orders cancels), `payment.failed` (inventory releases, then
//! orders cancels), `order.failed` (the customer cancelled before the pivot: payments refunds,
//! inventory releases, orders cancels), `shipment.failed` (payments refunds, inventory
//! releases, orders cancels). Every `*.failed` carries a [`StepFailed`]; the order is
//! cancelled last, after its compensations, as in the orchestrated style.

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
/// `order.shipping_started`: the order passed its point of no return (choreography).
pub const ORDER_SHIPPING_STARTED: &str = "order.shipping_started";
/// `order.failed`: the order's own step failed (a customer's cancel reached it before
/// shipping); its compensations run (choreography).
pub const ORDER_FAILED: &str = "order.failed";
/// `inventory.reserved`.
pub const INVENTORY_RESERVED: &str = "inventory.reserved";
/// `inventory.failed`.
pub const INVENTORY_FAILED: &str = "inventory.failed";
/// `inventory.released` (a compensation).
pub const INVENTORY_RELEASED: &str = "inventory.released";
/// `inventory.committed`.
pub const INVENTORY_COMMITTED: &str = "inventory.committed";
/// `payment.completed`.
pub const PAYMENT_COMPLETED: &str = "payment.completed";
/// `payment.failed`.
pub const PAYMENT_FAILED: &str = "payment.failed";
/// `payment.refunded` (a compensation; also when there was nothing to refund).
pub const PAYMENT_REFUNDED: &str = "payment.refunded";
/// `shipment.created`.
pub const SHIPMENT_CREATED: &str = "shipment.created";
/// `shipment.failed`.
pub const SHIPMENT_FAILED: &str = "shipment.failed";

/// How the order saga runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaStyle {
    /// The orders service drives every step over gRPC with trellis-saga's engine.
    #[default]
    Orchestrated,
    /// Every service reacts to the others' events on the bus; nothing drives the flow.
    Choreography,
}

impl SagaStyle {
    /// `orchestrated` or `choreography`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Orchestrated => "orchestrated",
            Self::Choreography => "choreography",
        }
    }
}

impl std::str::FromStr for SagaStyle {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "orchestrated" => Ok(Self::Orchestrated),
            "choreography" | "choreographed" => Ok(Self::Choreography),
            other => Err(format!(
                "unknown saga style {other:?}: expected orchestrated or choreography"
            )),
        }
    }
}

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
    /// Whether the order's saga is choreographed: the participants act on `order.created`
    /// only then (an orchestrated order's participants are called by its saga).
    #[serde(default)]
    pub choreographed: bool,
}

/// `inventory.reserved` and `payment.completed`: the order so far, with what the next
/// participant needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderProgress {
    /// Order id.
    pub order_id: String,
    /// Owner.
    pub user_id: String,
    /// Lines.
    pub items: Vec<OrderItem>,
    /// Total in cents.
    pub total_cents: i64,
}

/// `order.shipping_started`: what shipping needs to create the shipment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShippingStarted {
    /// Order id.
    pub order_id: String,
    /// Owner.
    pub user_id: String,
    /// Lines.
    pub items: Vec<OrderItem>,
}

/// Every `*.failed` event: which order, why (one of [`crate::api::reason`]) and the detail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepFailed {
    /// Order id.
    pub order_id: String,
    /// The cancellation reason it leads to.
    pub reason: String,
    /// What happened, for people.
    pub error: String,
}

/// `inventory.committed`, `inventory.released`, `payment.refunded`, `shipment.created`: a
/// step done, with its resulting state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepDone {
    /// Order id.
    pub order_id: String,
    /// The participant's state for the order after the step (`committed`, `released`,
    /// `refunded`, `none`, `created`).
    pub state: String,
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
