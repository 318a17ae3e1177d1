//! The order tools: search, read, cancel and place orders, as the caller.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use trellis_agent::{Effect, Tool, ToolContext, ToolError};

use crate::client::{Login, Request, ShopClient};

/// The pattern of an id in the shop (a UUID), in the schema the model reads.
pub(crate) const ID_PATTERN: &str =
    "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$";
/// The most orders one search returns (the shop's page bound).
pub const SEARCH_LIMIT_MAX: u32 = 100;
/// The orders one search returns when the model does not say.
pub const SEARCH_LIMIT_DEFAULT: u32 = 20;
/// The most lines one order may have (the shop's own bound).
pub const ORDER_LINES_MAX: usize = 50;
/// The largest quantity of one line (the shop's own bound).
pub const LINE_QUANTITY_MAX: u32 = 1_000;

/// An order's status, as the tools show it and take it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OrderStatus {
    /// Accepted; stock, payment and shipment are being arranged. Still cancellable.
    Pending,
    /// Paid and shipped; can no longer be cancelled.
    Confirmed,
    /// Ended without a sale; `reason` says why.
    Cancelled,
}

impl OrderStatus {
    /// The shop's spelling (`PENDING`, ...).
    fn as_api(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Confirmed => "CONFIRMED",
            Self::Cancelled => "CANCELLED",
        }
    }
}

/// The shop's order, as `GET /api/orders/{id}` and the listing answer it (the fields the
/// tools use).
#[derive(Debug, Deserialize)]
struct ApiOrder {
    id: String,
    user_id: String,
    status: String,
    items: Vec<ApiLine>,
    total_cents: i64,
    reason: Option<String>,
    timeline: Vec<ApiTimelineEntry>,
}

#[derive(Debug, Deserialize)]
struct ApiLine {
    product_id: String,
    quantity: i64,
    price_cents: i64,
}

#[derive(Debug, Deserialize)]
struct ApiTimelineEntry {
    step: String,
    outcome: String,
    at: String,
}

#[derive(Debug, Deserialize)]
struct ApiOrderPage {
    items: Vec<ApiOrder>,
    next_cursor: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ApiAccepted {
    id: String,
}

impl ApiOrder {
    fn status(&self) -> Result<OrderStatus, ToolError> {
        match self.status.as_str() {
            "PENDING" => Ok(OrderStatus::Pending),
            "CONFIRMED" => Ok(OrderStatus::Confirmed),
            "CANCELLED" => Ok(OrderStatus::Cancelled),
            other => Err(ToolError::unavailable(format!(
                "the shop answered an order status this tool does not know: {other}"
            ))),
        }
    }

    /// When the order was placed: its first timeline entry (`order` / `created`).
    fn placed_at(&self) -> Option<String> {
        self.timeline
            .iter()
            .find(|e| e.step == "order" && e.outcome == "created")
            .map(|e| e.at.clone())
    }

    fn summary(self) -> Result<OrderSummary, ToolError> {
        Ok(OrderSummary {
            status: self.status()?,
            placed_at: self.placed_at(),
            lines: self.items.len(),
            units: self.items.iter().map(|l| l.quantity).sum(),
            id: self.id,
            customer_id: self.user_id,
            total_cents: self.total_cents,
            reason: self.reason,
        })
    }

    fn details(self) -> Result<OrderDetails, ToolError> {
        Ok(OrderDetails {
            status: self.status()?,
            placed_at: self.placed_at(),
            id: self.id,
            customer_id: self.user_id,
            total_cents: self.total_cents,
            reason: self.reason,
            items: self
                .items
                .into_iter()
                .map(|l| OrderLine {
                    product_id: l.product_id,
                    quantity: l.quantity,
                    price_cents: l.price_cents,
                })
                .collect(),
            timeline: self
                .timeline
                .into_iter()
                .map(|e| TimelineEntry {
                    step: e.step,
                    outcome: e.outcome,
                    at: e.at,
                })
                .collect(),
        })
    }
}

/// Refuses an id that is not a UUID before any request (the schema says so too; this holds
/// for a caller that skips the registry's validation).
pub(crate) fn check_id<'a>(what: &str, id: &'a str) -> Result<&'a str, ToolError> {
    let id = id.trim();
    uuid::Uuid::parse_str(id)
        .map(|_| id)
        .map_err(|_| ToolError::refused(format!("{what} must be a UUID, as the shop gives them")))
}

/// `search_orders`: the caller's orders by status and placement time; an admin may name a
/// customer.
#[derive(Debug, Clone)]
pub struct SearchOrders {
    client: ShopClient,
}

impl SearchOrders {
    /// The tool, calling the shop through `client`.
    pub fn new(client: ShopClient) -> Self {
        Self { client }
    }
}

/// Arguments of `search_orders`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SearchOrdersInput {
    /// Only orders in this status.
    pub status: Option<OrderStatus>,
    /// Only orders placed at or after this moment: an RFC 3339 time (2026-01-31T09:30:00Z) or
    /// a date (2026-01-31, from its start, UTC).
    #[schemars(length(min = 10, max = 40))]
    pub placed_from: Option<String>,
    /// Only orders placed at or before this moment: an RFC 3339 time or a date (through its
    /// end, UTC).
    #[schemars(length(min = 10, max = 40))]
    pub placed_to: Option<String>,
    /// Only this customer's orders. Admins only: a customer always sees just their own orders
    /// and is refused another customer's id. Leave it out to search your own orders (for an
    /// admin: everyone's).
    #[schemars(length(min = 1, max = 200))]
    pub customer_id: Option<String>,
    /// How many orders to return, newest first (1 to 100, default 20).
    #[schemars(range(min = 1, max = 100))]
    pub limit: Option<u32>,
    /// `next_cursor` of a previous search with the same filters, for the page after it.
    #[schemars(length(min = 1, max = 200))]
    pub cursor: Option<String>,
}

/// One order in a search result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderSummary {
    /// The order id.
    pub id: String,
    /// Whose order it is.
    pub customer_id: String,
    /// Its status.
    pub status: OrderStatus,
    /// When it was placed (RFC 3339, UTC), if the shop's timeline says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placed_at: Option<String>,
    /// The total, in cents.
    pub total_cents: i64,
    /// How many lines (distinct products) it has.
    pub lines: usize,
    /// How many units across its lines.
    pub units: i64,
    /// Why it was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What `search_orders` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SearchOrdersOutput {
    /// The orders found, newest first.
    pub orders: Vec<OrderSummary>,
    /// Pass as `cursor` to get the next page; absent when there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

impl Tool for SearchOrders {
    type Input = SearchOrdersInput;
    type Output = SearchOrdersOutput;

    fn name(&self) -> &str {
        "search_orders"
    }

    fn description(&self) -> &str {
        "Searches the user's orders, newest first, optionally by status (pending, confirmed, \
         cancelled) and by when they were placed (placed_from / placed_to: a date or an RFC \
         3339 time). Returns each order's id, status, placement time, total in cents and size; \
         use get_order for an order's lines and history. Admins may pass customer_id to \
         search one customer's orders."
    }

    async fn execute(
        &self,
        input: SearchOrdersInput,
        ctx: &ToolContext,
    ) -> Result<SearchOrdersOutput, ToolError> {
        let limit = input
            .limit
            .unwrap_or(SEARCH_LIMIT_DEFAULT)
            .clamp(1, SEARCH_LIMIT_MAX);
        let url = self.client.url(
            &["api", "orders"],
            &[
                ("status", input.status.map(|s| s.as_api().to_owned())),
                ("placed_from", input.placed_from),
                ("placed_to", input.placed_to),
                ("user_id", input.customer_id),
                ("limit", Some(limit.to_string())),
                ("cursor", input.cursor),
            ],
        );
        let page: ApiOrderPage = self
            .client
            .send(ctx, Login::Required, Request::get(url))
            .await?;
        Ok(SearchOrdersOutput {
            orders: page
                .items
                .into_iter()
                .map(ApiOrder::summary)
                .collect::<Result<_, _>>()?,
            next_cursor: page.next_cursor,
        })
    }
}

/// Arguments of the tools that name one order.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderRef {
    /// The order's id (a UUID, as search_orders or place_order return it).
    #[schemars(pattern(ID_PATTERN))]
    pub order_id: String,
}

/// `get_order`: one order of the caller, with its lines and history.
#[derive(Debug, Clone)]
pub struct GetOrder {
    client: ShopClient,
}

impl GetOrder {
    /// The tool, calling the shop through `client`.
    pub fn new(client: ShopClient) -> Self {
        Self { client }
    }
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    /// The product.
    pub product_id: String,
    /// Units ordered.
    pub quantity: i64,
    /// The unit price charged, in cents.
    pub price_cents: i64,
}

/// One step of an order's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineEntry {
    /// What was done (`order`, `reserve_stock`, `charge_payment`, ...).
    pub step: String,
    /// How it went.
    pub outcome: String,
    /// When (RFC 3339, UTC).
    pub at: String,
}

/// What `get_order` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderDetails {
    /// The order id.
    pub id: String,
    /// Whose order it is.
    pub customer_id: String,
    /// Its status.
    pub status: OrderStatus,
    /// When it was placed (RFC 3339, UTC), if the shop's timeline says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placed_at: Option<String>,
    /// The total, in cents.
    pub total_cents: i64,
    /// Why it was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Its lines.
    pub items: Vec<OrderLine>,
    /// What happened to it, oldest first.
    pub timeline: Vec<TimelineEntry>,
}

impl Tool for GetOrder {
    type Input = OrderRef;
    type Output = OrderDetails;

    fn name(&self) -> &str {
        "get_order"
    }

    fn description(&self) -> &str {
        "Shows one of the user's orders: status, total in cents, why it was cancelled, its \
         lines (product, quantity, unit price) and its history (stock, payment, shipping \
         steps). An order that is not the user's reads as not found."
    }

    async fn execute(&self, input: OrderRef, ctx: &ToolContext) -> Result<OrderDetails, ToolError> {
        let id = check_id("order_id", &input.order_id)?;
        let url = self.client.url(&["api", "orders", id], &[]);
        let order: ApiOrder = self
            .client
            .send(ctx, Login::Required, Request::get(url))
            .await?;
        order.details()
    }
}

/// `cancel_order`: asks the shop to cancel one of the caller's pending orders.
#[derive(Debug, Clone)]
pub struct CancelOrder {
    client: ShopClient,
}

impl CancelOrder {
    /// The tool, calling the shop through `client`.
    pub fn new(client: ShopClient) -> Self {
        Self { client }
    }
}

/// What `cancel_order` and an undone `place_order` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelOutput {
    /// The order.
    pub order_id: String,
    /// Always `cancellation_requested`: the shop refunds and releases the stock, then the
    /// order reads `cancelled` (check with get_order).
    pub status: String,
}

/// Asks the shop to cancel `id` as the context's caller.
async fn request_cancel(
    client: &ShopClient,
    id: &str,
    ctx: &ToolContext,
) -> Result<CancelOutput, ToolError> {
    let url = client.url(&["api", "orders", id, "cancel"], &[]);
    let accepted: ApiAccepted = client
        .send(ctx, Login::Required, Request::post_empty(url))
        .await?;
    Ok(CancelOutput {
        order_id: accepted.id,
        status: "cancellation_requested".to_owned(),
    })
}

impl Tool for CancelOrder {
    type Input = OrderRef;
    type Output = CancelOutput;

    fn name(&self) -> &str {
        "cancel_order"
    }

    fn description(&self) -> &str {
        "Cancels one of the user's pending orders: the payment is refunded and the stock \
         released. Refused once the order is confirmed (shipping began) or already cancelled. \
         Cannot be undone."
    }

    fn effect(&self) -> Effect {
        // A cancelled order cannot be restored; placing a new one is a decision for the user.
        Effect::Changes { approval: true }
    }

    async fn execute(&self, input: OrderRef, ctx: &ToolContext) -> Result<CancelOutput, ToolError> {
        let id = check_id("order_id", &input.order_id)?;
        request_cancel(&self.client, id, ctx).await
    }
}

/// `place_order`: places an order as the caller; undone by cancelling it.
#[derive(Debug, Clone)]
pub struct PlaceOrder {
    client: ShopClient,
}

impl PlaceOrder {
    /// The tool, calling the shop through `client`.
    pub fn new(client: ShopClient) -> Self {
        Self { client }
    }
}

/// One line to order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderLineInput {
    /// The product's id (a UUID, as list_products returns it).
    #[schemars(pattern(ID_PATTERN))]
    pub product_id: String,
    /// How many units (1 to 1000).
    #[schemars(range(min = 1, max = 1000))]
    pub quantity: u32,
}

/// Arguments of `place_order`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceOrderInput {
    /// The lines: 1 to 50, each product at most once.
    #[schemars(length(min = 1, max = 50))]
    pub items: Vec<OrderLineInput>,
}

/// What `place_order` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacedOrder {
    /// The new order's id.
    pub order_id: String,
    /// `pending`: the shop now reserves stock, charges and ships; get_order shows how it ends
    /// (`confirmed`, or `cancelled` with a reason such as `out_of_stock`).
    pub status: OrderStatus,
}

impl Tool for PlaceOrder {
    type Input = PlaceOrderInput;
    type Output = PlacedOrder;

    fn name(&self) -> &str {
        "place_order"
    }

    fn description(&self) -> &str {
        "Places an order for the user and charges their account: items are product ids (from \
         list_products) with quantities. Answers the order id with status pending; the shop \
         then reserves stock, takes payment and ships, and the order ends confirmed or \
         cancelled with a reason (get_order shows which)."
    }

    fn effect(&self) -> Effect {
        Effect::Changes { approval: true }
    }

    async fn execute(
        &self,
        input: PlaceOrderInput,
        ctx: &ToolContext,
    ) -> Result<PlacedOrder, ToolError> {
        if input.items.is_empty() || input.items.len() > ORDER_LINES_MAX {
            return Err(ToolError::refused(format!(
                "an order has 1 to {ORDER_LINES_MAX} lines"
            )));
        }
        let mut items = Vec::with_capacity(input.items.len());
        for line in &input.items {
            let product_id = check_id("product_id", &line.product_id)?;
            if !(1..=LINE_QUANTITY_MAX).contains(&line.quantity) {
                return Err(ToolError::refused(format!(
                    "a quantity is 1 to {LINE_QUANTITY_MAX}"
                )));
            }
            items.push(serde_json::json!({"product_id": product_id, "quantity": line.quantity}));
        }
        let url = self.client.url(&["api", "orders"], &[]);
        // The call's key: a retry of this call (a durable run resuming) answers the order
        // placed first instead of placing another.
        let request = Request::post(url, &serde_json::json!({ "items": items }))?
            .idempotency_key(ctx.idempotency_key());
        let accepted: ApiAccepted = self.client.send(ctx, Login::Required, request).await?;
        Ok(PlacedOrder {
            order_id: accepted.id,
            status: OrderStatus::Pending,
        })
    }

    /// Cancels the order placed. An order already cancelled (by the user, or by the shop for
    /// want of stock or payment) is undone already; a confirmed one can no longer be, and
    /// says so.
    async fn undo(
        &self,
        _input: PlaceOrderInput,
        output: PlacedOrder,
        ctx: &ToolContext,
    ) -> Result<(), ToolError> {
        let id = check_id("order_id", &output.order_id)?;
        let refused = match request_cancel(&self.client, id, ctx).await {
            Ok(_) => return Ok(()),
            Err(error) if error.is_fault() => return Err(error),
            Err(error) => error,
        };
        // Refused (409 not_cancellable): see whether it is cancelled already.
        let url = self.client.url(&["api", "orders", id], &[]);
        let order: ApiOrder = self
            .client
            .send(ctx, Login::Required, Request::get(url))
            .await?;
        match order.status()? {
            OrderStatus::Cancelled => Ok(()),
            OrderStatus::Confirmed => Err(ToolError::refused(format!(
                "order {id} was confirmed (shipping began) and can no longer be cancelled"
            ))),
            OrderStatus::Pending => Err(refused),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order() -> ApiOrder {
        serde_json::from_value(serde_json::json!({
            "id": "0190a000-0000-7000-8000-000000000001",
            "user_id": "user-1",
            "status": "CANCELLED",
            "items": [
                {"product_id": "p-1", "quantity": 2, "price_cents": 250},
                {"product_id": "p-2", "quantity": 1, "price_cents": 100}
            ],
            "total_cents": 600,
            "reason": "out_of_stock",
            "timeline": [
                {"step": "order", "outcome": "created", "at": "2026-01-02T12:00:00.250Z"},
                {"step": "reserve_stock", "outcome": "failed", "at": "2026-01-02T12:00:00.300Z"}
            ]
        }))
        .expect("the shop's order shape")
    }

    #[test]
    fn a_summary_keeps_what_a_model_needs_and_nothing_else() {
        // Id, owner, status, placement time, total, size and reason; no lines or history.
        let summary = serde_json::to_value(order().summary().expect("known status")).expect("json");
        assert_eq!(
            summary,
            serde_json::json!({
                "id": "0190a000-0000-7000-8000-000000000001",
                "customer_id": "user-1",
                "status": "cancelled",
                "placed_at": "2026-01-02T12:00:00.250Z",
                "total_cents": 600,
                "lines": 2,
                "units": 3,
                "reason": "out_of_stock"
            })
        );
    }

    #[test]
    fn a_status_the_tool_does_not_know_is_reported_not_guessed() {
        // A new status in the shop is a fault of this tool, not something to paper over.
        let mut odd = order();
        odd.status = "SHIPPED".to_owned();
        let error = odd.details().expect_err("unknown status");
        assert!(error.is_fault());
        assert!(error.message().contains("SHIPPED"));
    }

    #[test]
    fn an_id_that_is_not_a_uuid_is_refused_before_any_request() {
        // The registry's schema says so too; this holds for direct callers.
        assert!(check_id("order_id", "../users/me").is_err());
        assert_eq!(
            check_id("order_id", " 0190a000-0000-7000-8000-000000000001 ").expect("a uuid"),
            "0190a000-0000-7000-8000-000000000001"
        );
    }
}
