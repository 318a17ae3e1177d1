//! gRPC `Products`: prices for the orders service.

use axum::Router;
use shop_contracts::proto::products_server::{Products, ProductsServer};
use shop_contracts::proto::{PriceItemsRequest, PriceItemsResponse, ProductPrice};
use tonic::{Request, Response, Status};

use crate::{PRICE_ITEMS_IDS_MAX, State, catalogue};

#[derive(Debug)]
struct ProductsService {
    state: State,
}

#[tonic::async_trait]
impl Products for ProductsService {
    async fn price_items(
        &self,
        request: Request<PriceItemsRequest>,
    ) -> Result<Response<PriceItemsResponse>, Status> {
        let ids = request.into_inner().product_ids;
        if ids.len() > PRICE_ITEMS_IDS_MAX {
            return Err(Status::invalid_argument(format!(
                "at most {PRICE_ITEMS_IDS_MAX} products per call"
            )));
        }
        let mut unique = ids.clone();
        unique.sort();
        unique.dedup();
        let found = catalogue::by_ids(&self.state.db, &unique)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "PriceItems failed");
                Status::unavailable("the products database did not answer")
            })?;
        let mut products = Vec::with_capacity(ids.len());
        for id in &ids {
            let product = found
                .get(id)
                .ok_or_else(|| Status::not_found(format!("unknown product {id}")))?;
            products.push(ProductPrice {
                id: product.id.clone(),
                name: product.name.clone(),
                price_cents: product.price_cents,
            });
        }
        Ok(Response::new(PriceItemsResponse { products }))
    }
}

pub(crate) fn router(state: State) -> Router {
    tonic::service::Routes::new(ProductsServer::new(ProductsService { state })).into_axum_router()
}
