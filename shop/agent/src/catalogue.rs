//! The catalogue tools: list products, and check one product's stock.
//!
//! Both read the public catalogue (`GET /api/products`, `GET /api/products/{id}`), which the
//! shop serves to anyone, so they work for a caller without a token as well; with one, the
//! token is sent as for every tool.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use trellis_agent::{Tool, ToolContext, ToolError};

use crate::client::{Login, Request, ShopClient};
use crate::orders::{ID_PATTERN, check_id};

/// The most products one listing returns (the shop's page bound).
pub const PRODUCTS_LIMIT_MAX: u32 = 100;
/// The products one listing returns when the model does not say.
pub const PRODUCTS_LIMIT_DEFAULT: u32 = 20;

/// The shop's product, as `GET /api/products` answers it.
#[derive(Debug, Deserialize)]
struct ApiProduct {
    id: String,
    name: String,
    price_cents: i64,
    available: i64,
}

#[derive(Debug, Deserialize)]
struct ApiProductPage {
    items: Vec<ApiProduct>,
    next_cursor: Option<String>,
}

/// `list_products`: the catalogue, optionally filtered by name.
#[derive(Debug, Clone)]
pub struct ListProducts {
    client: ShopClient,
}

impl ListProducts {
    /// The tool, calling the shop through `client`.
    pub fn new(client: ShopClient) -> Self {
        Self { client }
    }
}

/// Arguments of `list_products`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListProductsInput {
    /// Only products whose name contains this text (case-insensitive).
    #[schemars(length(max = 100))]
    pub query: Option<String>,
    /// How many products to return (1 to 100, default 20).
    #[schemars(range(min = 1, max = 100))]
    pub limit: Option<u32>,
    /// `next_cursor` of a previous listing with the same query, for the page after it.
    #[schemars(length(min = 1, max = 200))]
    pub cursor: Option<String>,
}

/// One product.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Product {
    /// The product's id (what place_order and check_stock take).
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its unit price, in cents.
    pub price_cents: i64,
    /// Units that can be ordered now.
    pub available: i64,
}

/// What `list_products` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListProductsOutput {
    /// The products, in catalogue order.
    pub products: Vec<Product>,
    /// Pass as `cursor` to get the next page; absent when there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

impl Tool for ListProducts {
    type Input = ListProductsInput;
    type Output = ListProductsOutput;

    fn name(&self) -> &str {
        "list_products"
    }

    fn description(&self) -> &str {
        "Lists the shop's products, optionally those whose name contains `query`: each \
         product's id (for place_order), name, unit price in cents and units available now."
    }

    async fn execute(
        &self,
        input: ListProductsInput,
        ctx: &ToolContext,
    ) -> Result<ListProductsOutput, ToolError> {
        let limit = input
            .limit
            .unwrap_or(PRODUCTS_LIMIT_DEFAULT)
            .clamp(1, PRODUCTS_LIMIT_MAX);
        let query = input
            .query
            .map(|q| q.trim().to_owned())
            .filter(|q| !q.is_empty());
        let url = self.client.url(
            &["api", "products"],
            &[
                ("q", query),
                ("limit", Some(limit.to_string())),
                ("cursor", input.cursor),
            ],
        );
        let page: ApiProductPage = self
            .client
            .send(ctx, Login::Optional, Request::get(url))
            .await?;
        Ok(ListProductsOutput {
            products: page
                .items
                .into_iter()
                .map(ApiProduct::into_product)
                .collect(),
            next_cursor: page.next_cursor,
        })
    }
}

impl ApiProduct {
    fn into_product(self) -> Product {
        Product {
            id: self.id,
            name: self.name,
            price_cents: self.price_cents,
            available: self.available,
        }
    }
}

/// `check_stock`: how many units of one product can be ordered now.
///
/// It reads the public `GET /api/products/{id}` through the gateway, which tells anyone a
/// product's `available` units, rather than the admin-only `GET /api/inventory/{id}`. The
/// stock level a customer's agent needs is already public, so no route was widened: the
/// inventory route, which also shows totals and reservations and sets stock, stays admin-only,
/// and a customer's agent learns exactly what the shop's own product page tells that customer.
#[derive(Debug, Clone)]
pub struct CheckStock {
    client: ShopClient,
}

impl CheckStock {
    /// The tool, calling the shop through `client`.
    pub fn new(client: ShopClient) -> Self {
        Self { client }
    }
}

/// Arguments of `check_stock`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckStockInput {
    /// The product's id (a UUID, as list_products returns it).
    #[schemars(pattern(ID_PATTERN))]
    pub product_id: String,
}

/// What `check_stock` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockLevel {
    /// The product.
    pub product_id: String,
    /// Its name.
    pub name: String,
    /// Units that can be ordered now (stock not held for other orders).
    pub available: i64,
    /// Whether at least one unit can be ordered now.
    pub in_stock: bool,
}

impl Tool for CheckStock {
    type Input = CheckStockInput;
    type Output = StockLevel;

    fn name(&self) -> &str {
        "check_stock"
    }

    fn description(&self) -> &str {
        "Tells how many units of one product can be ordered now (its id from list_products)."
    }

    async fn execute(
        &self,
        input: CheckStockInput,
        ctx: &ToolContext,
    ) -> Result<StockLevel, ToolError> {
        let id = check_id("product_id", &input.product_id)?;
        let url = self.client.url(&["api", "products", id], &[]);
        let product: ApiProduct = self
            .client
            .send(ctx, Login::Optional, Request::get(url))
            .await?;
        Ok(StockLevel {
            in_stock: product.available > 0,
            product_id: product.id,
            name: product.name,
            available: product.available,
        })
    }
}
