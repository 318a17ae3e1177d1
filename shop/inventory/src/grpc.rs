//! gRPC `Inventory`: reservations by order id, stock levels.

use axum::Router;
use shop_contracts::proto::inventory_server::{Inventory, InventoryServer};
use shop_contracts::proto::{
    GetStockRequest, GetStockResponse, OrderRef, ReservationState, ReserveRequest, ReserveResponse,
    SetStockRequest, Stock,
};
use tonic::{Request, Response, Status};
use trellis_service::Db;

use crate::stock::{self, Level, Reserved, StockError};

#[derive(Debug)]
struct InventoryService {
    db: Db,
}

impl From<StockError> for Status {
    fn from(e: StockError) -> Self {
        match e {
            StockError::Invalid { code, message } => {
                Status::invalid_argument(format!("{code}: {message}"))
            }
            e @ StockError::BelowReserved { .. } => {
                Status::failed_precondition(format!("below_reserved: {e}"))
            }
            e @ StockError::UnknownOrder(_) => Status::not_found(e.to_string()),
            e @ StockError::WrongState { .. } => Status::failed_precondition(e.to_string()),
            e @ StockError::Mismatch { .. } => {
                Status::already_exists(format!("reservation_mismatch: {e}"))
            }
            StockError::Db(e) => {
                tracing::error!(error = %e, "inventory database error");
                Status::unavailable("the inventory database did not answer")
            }
        }
    }
}

fn stock_message(product_id: String, level: Level) -> Stock {
    Stock {
        product_id,
        total: level.total,
        reserved: level.reserved,
        available: level.total - level.reserved,
    }
}

#[tonic::async_trait]
impl Inventory for InventoryService {
    async fn reserve(
        &self,
        request: Request<ReserveRequest>,
    ) -> Result<Response<ReserveResponse>, Status> {
        let request = request.into_inner();
        let lines = request
            .lines
            .into_iter()
            .map(|l| (l.product_id, l.quantity))
            .collect();
        let answer = stock::reserve(&self.db, &request.order_id, lines).await?;
        metrics::counter!(
            "shop_inventory_reservations_total",
            "outcome" => if answer == Reserved::Yes { "reserved" } else { "out_of_stock" }
        )
        .increment(1);
        Ok(Response::new(match answer {
            Reserved::Yes => ReserveResponse {
                reserved: true,
                reason: String::new(),
            },
            Reserved::OutOfStock => ReserveResponse {
                reserved: false,
                reason: shop_contracts::api::reason::OUT_OF_STOCK.to_owned(),
            },
        }))
    }

    async fn release(
        &self,
        request: Request<OrderRef>,
    ) -> Result<Response<ReservationState>, Status> {
        let state = stock::release(&self.db, &request.into_inner().order_id).await?;
        Ok(Response::new(ReservationState { state }))
    }

    async fn commit(
        &self,
        request: Request<OrderRef>,
    ) -> Result<Response<ReservationState>, Status> {
        let state = stock::commit(&self.db, &request.into_inner().order_id).await?;
        Ok(Response::new(ReservationState { state }))
    }

    async fn set_stock(
        &self,
        request: Request<SetStockRequest>,
    ) -> Result<Response<Stock>, Status> {
        let request = request.into_inner();
        let level = stock::set_total(&self.db, &request.product_id, request.total).await?;
        Ok(Response::new(stock_message(request.product_id, level)))
    }

    async fn get_stock(
        &self,
        request: Request<GetStockRequest>,
    ) -> Result<Response<GetStockResponse>, Status> {
        let ids = request.into_inner().product_ids;
        let levels = stock::levels(&self.db, &ids).await?;
        Ok(Response::new(GetStockResponse {
            stock: ids
                .into_iter()
                .zip(levels)
                .map(|(id, level)| stock_message(id, level))
                .collect(),
        }))
    }
}

pub(crate) fn router(db: Db) -> Router {
    tonic::service::Routes::new(InventoryServer::new(InventoryService { db })).into_axum_router()
}
