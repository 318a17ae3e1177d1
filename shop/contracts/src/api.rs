//! The public REST API's request and answer shapes (DESIGN.md). Fields may be added, never
//! renamed. Money is integer cents.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Most lines one order may have.
pub const ORDER_LINES_MAX: usize = 50;
/// Most units of one product per line.
pub const LINE_QUANTITY_MAX: i64 = 1_000;
/// Longest product name, in characters.
pub const PRODUCT_NAME_MAX: usize = 200;
/// Highest price, in cents.
pub const PRICE_CENTS_MAX: i64 = 100_000_000;
/// Highest stock total of one product.
pub const STOCK_MAX: i64 = 1_000_000_000;
/// Default and largest page size of list calls.
pub const PAGE_LIMIT_DEFAULT: u32 = 20;
/// Largest page size of list calls.
pub const PAGE_LIMIT_MAX: u32 = 100;

/// `{"error":{"code","message"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The inside of [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable snake_case code.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
}

/// `POST /api/users`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterUser {
    /// Login email; unique.
    pub email: String,
    /// At least 8 characters.
    pub password: String,
    /// Display name.
    pub name: String,
}

/// A user as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct UserView {
    /// User id.
    pub id: String,
    /// Login email.
    pub email: String,
    /// Display name.
    pub name: String,
    /// `customer` or `admin`.
    #[serde(default)]
    pub role: String,
}

/// `POST /api/auth/token`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// Login email.
    pub email: String,
    /// Password.
    pub password: String,
}

/// The answer to `POST /api/auth/token`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TokenResponse {
    /// A JWT (EdDSA) for `Authorization: Bearer`.
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds until it expires.
    pub expires_in: u64,
    /// An opaque token for `POST /api/auth/refresh`: used once, it is exchanged for a new
    /// access token and a new refresh token; presented a second time, it ends the session.
    /// Empty from an issuer without sessions.
    #[serde(default)]
    pub refresh_token: String,
    /// Seconds until the refresh token (and so the session) expires.
    #[serde(default)]
    pub refresh_expires_in: u64,
}

/// `POST /api/auth/refresh`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    /// The refresh token of the last token answer.
    pub refresh_token: String,
}

/// `POST /api/auth/keys/rotate` (admin).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateKeyRequest {
    /// Seconds from now until the new key starts signing (it is published at once, so every
    /// verifier knows it first); the service's default when absent.
    #[serde(default)]
    pub activate_in_s: Option<u64>,
    /// Stop publishing every older key at once, so every token they signed is refused (for a
    /// key that leaked). Without it, an older key stays published until the tokens it signed
    /// have expired.
    #[serde(default)]
    pub retire_previous: bool,
}

/// The answer to `POST /api/auth/keys/rotate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RotatedKey {
    /// The new key's id (the `kid` of the tokens it signs).
    pub kid: String,
    /// When it starts signing, Unix seconds.
    pub active_from: u64,
    /// How many older keys were retired at once.
    pub retired: u64,
}

/// A product in a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ProductView {
    /// Product id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Price in cents.
    pub price_cents: i64,
    /// Units available to order now.
    pub available: i64,
}

/// `GET /api/products` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ProductPage {
    /// This page.
    pub items: Vec<ProductView>,
    /// Pass as `cursor` for the next page; absent on the last.
    pub next_cursor: Option<String>,
}

/// `POST /api/products` (admin).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProduct {
    /// Name, 1 to 200 characters.
    pub name: String,
    /// Price in cents, 0 to 100,000,000.
    pub price_cents: i64,
    /// Initial stock total.
    #[serde(default)]
    pub stock: i64,
}

/// `PUT /api/inventory/{product_id}` (admin).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetStock {
    /// New total; not below what is reserved.
    pub total: i64,
}

/// A product's stock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StockView {
    /// Product id.
    pub product_id: String,
    /// All units.
    pub total: i64,
    /// Held for orders in progress.
    pub reserved: i64,
    /// `total - reserved`.
    pub available: i64,
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderItem {
    /// Product id.
    pub product_id: String,
    /// Units, 1 to 1,000.
    pub quantity: i64,
}

/// `POST /api/orders`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceOrder {
    /// 1 to 50 lines, each product once.
    pub items: Vec<OrderItem>,
}

impl PlaceOrder {
    /// Checks the shape: `Err((code, message))` names the first problem.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.items.is_empty() {
            return Err(("empty_order", "an order needs at least one item".into()));
        }
        if self.items.len() > ORDER_LINES_MAX {
            return Err((
                "too_many_items",
                format!("an order has at most {ORDER_LINES_MAX} lines"),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, item) in self.items.iter().enumerate() {
            if item.product_id.trim().is_empty() || item.product_id.len() > 64 {
                return Err((
                    "invalid_product_id",
                    format!("items[{i}].product_id must be a product id"),
                ));
            }
            if !(1..=LINE_QUANTITY_MAX).contains(&item.quantity) {
                return Err((
                    "invalid_quantity",
                    format!("items[{i}].quantity must be between 1 and {LINE_QUANTITY_MAX}"),
                ));
            }
            if !seen.insert(item.product_id.as_str()) {
                return Err((
                    "duplicate_product",
                    format!("items[{i}].product_id repeats an earlier line"),
                ));
            }
        }
        Ok(())
    }
}

/// Order status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OrderStatus {
    /// Accepted; the saga is running.
    Pending,
    /// Paid and shipped.
    Confirmed,
    /// Ended without a sale; `reason` says why.
    Cancelled,
}

impl OrderStatus {
    /// `PENDING`, `CONFIRMED` or `CANCELLED`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Confirmed => "CONFIRMED",
            Self::Cancelled => "CANCELLED",
        }
    }

    /// Parses `as_str`'s output.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "PENDING" => Some(Self::Pending),
            "CONFIRMED" => Some(Self::Confirmed),
            "CANCELLED" => Some(Self::Cancelled),
            _ => None,
        }
    }
}

/// Why an order was cancelled.
pub mod reason {
    /// Inventory could not reserve every line.
    pub const OUT_OF_STOCK: &str = "out_of_stock";
    /// The provider declined the charge.
    pub const PAYMENT_DECLINED: &str = "payment_declined";
    /// The provider was down or the breaker open.
    pub const PAYMENT_UNAVAILABLE: &str = "payment_unavailable";
    /// The shipment could not be created.
    pub const SHIPPING_FAILED: &str = "shipping_failed";
    /// The customer cancelled.
    pub const CANCELLED_BY_USER: &str = "cancelled_by_user";
}

/// `202` answer to `POST /api/orders` and `POST /api/orders/{id}/cancel`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OrderAccepted {
    /// Order id.
    pub id: String,
    /// `PENDING`.
    pub status: OrderStatus,
}

/// One entry of an order's timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TimelineEntry {
    /// What happened: `created`, `inventory`, `payment`, `shipping`, `confirmed`, …
    pub step: String,
    /// How it went: `ok`, `failed`, `compensated`, or a reason.
    pub outcome: String,
    /// RFC 3339 time.
    pub at: String,
}

/// `GET /api/orders/{id}` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OrderView {
    /// Order id.
    pub id: String,
    /// Owner.
    #[serde(default)]
    pub user_id: String,
    /// Status.
    pub status: OrderStatus,
    /// Lines.
    pub items: Vec<OrderLineView>,
    /// Total in cents.
    pub total_cents: i64,
    /// Why it was cancelled.
    pub reason: Option<String>,
    /// What happened, in order.
    pub timeline: Vec<TimelineEntry>,
}

/// A priced order line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OrderLineView {
    /// Product id.
    pub product_id: String,
    /// Units.
    pub quantity: i64,
    /// Unit price when ordered, in cents.
    pub price_cents: i64,
}

/// `GET /api/orders` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OrderPage {
    /// This page, newest first.
    pub items: Vec<OrderView>,
    /// Pass as `cursor` for the next page; absent on the last.
    pub next_cursor: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(items: &[(&str, i64)]) -> PlaceOrder {
        PlaceOrder {
            items: items
                .iter()
                .map(|(p, q)| OrderItem {
                    product_id: (*p).into(),
                    quantity: *q,
                })
                .collect(),
        }
    }

    #[test]
    fn validation_names_the_problem() {
        assert_eq!(order(&[]).validate().unwrap_err().0, "empty_order");
        assert_eq!(
            order(&[("p", 0)]).validate().unwrap_err().0,
            "invalid_quantity"
        );
        assert_eq!(
            order(&[("p", 1), ("p", 2)]).validate().unwrap_err().0,
            "duplicate_product"
        );
        assert_eq!(
            order(&[("", 1)]).validate().unwrap_err().0,
            "invalid_product_id"
        );
        assert!(order(&[("p", 1), ("q", 1000)]).validate().is_ok());
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(serde_json::from_str::<PlaceOrder>(r#"{"items":[],"x":1}"#).is_err());
    }
}
