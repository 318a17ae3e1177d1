//! The gRPC `Shipping` service.

use shop_contracts::api::{LINE_QUANTITY_MAX, ORDER_LINES_MAX, OrderItem};
use shop_contracts::proto::shipping_server::Shipping;
use shop_contracts::proto::{CreateShipmentRequest, OrderRef, Shipment};
use tonic::{Request, Response, Status};
use trellis_service::Db;

use crate::store::{self, CANCELLED, CREATED};

/// Longest order, user or product id, in bytes.
pub const ID_BYTES_MAX: usize = 128;

/// The gRPC `Shipping` service.
#[derive(Debug, Clone)]
pub(crate) struct ShippingService {
    pub(crate) db: Db,
}

pub(crate) fn check_id(field: &str, value: &str) -> Result<(), Status> {
    if value.trim().is_empty() || value.len() > ID_BYTES_MAX {
        return Err(Status::invalid_argument(format!(
            "{field} must be 1 to {ID_BYTES_MAX} bytes"
        )));
    }
    Ok(())
}

fn db_error(e: sqlx::Error) -> Status {
    tracing::error!(error = %e, "shipping database error");
    Status::unavailable("the shipping database failed")
}

fn none(order_id: &str) -> Shipment {
    Shipment {
        id: String::new(),
        order_id: order_id.to_owned(),
        status: "none".to_owned(),
    }
}

fn answer(row: &store::Shipment) -> Shipment {
    Shipment {
        id: row.id.clone(),
        order_id: row.order_id.clone(),
        status: row.status.clone(),
    }
}

/// The lines as stored: a JSON array of `{product_id, quantity}`.
pub(crate) fn lines_json(request: &CreateShipmentRequest) -> Result<String, Status> {
    if request.lines.is_empty() || request.lines.len() > ORDER_LINES_MAX {
        return Err(Status::invalid_argument(format!(
            "a shipment has 1 to {ORDER_LINES_MAX} lines"
        )));
    }
    let mut items = Vec::with_capacity(request.lines.len());
    for (i, line) in request.lines.iter().enumerate() {
        check_id(&format!("lines[{i}].product_id"), &line.product_id)?;
        if !(1..=LINE_QUANTITY_MAX).contains(&line.quantity) {
            return Err(Status::invalid_argument(format!(
                "lines[{i}].quantity must be between 1 and {LINE_QUANTITY_MAX}"
            )));
        }
        items.push(OrderItem {
            product_id: line.product_id.clone(),
            quantity: line.quantity,
        });
    }
    serde_json::to_string(&items).map_err(|e| Status::internal(e.to_string()))
}

#[tonic::async_trait]
impl Shipping for ShippingService {
    async fn create_shipment(
        &self,
        request: Request<CreateShipmentRequest>,
    ) -> Result<Response<Shipment>, Status> {
        let request = request.into_inner();
        check_id("order_id", &request.order_id)?;
        check_id("user_id", &request.user_id)?;
        let lines = lines_json(&request)?;
        let id = uuid::Uuid::now_v7().to_string();
        let row = store::NewShipment {
            order_id: &request.order_id,
            id: &id,
            user_id: &request.user_id,
            lines: &lines,
            status: CREATED,
        };
        let inserted = store::insert_if_absent(&self.db, &row)
            .await
            .map_err(db_error)?;
        if inserted {
            metrics::counter!("shop_shipping_shipments_total", "outcome" => CREATED).increment(1);
        }
        if inserted {
            return Ok(Response::new(Shipment {
                id,
                order_id: request.order_id,
                status: CREATED.to_owned(),
            }));
        }
        // A repeat answers what is recorded: the first shipment, or its cancellation.
        let row = store::get(&self.db, &request.order_id)
            .await
            .map_err(db_error)?
            .ok_or_else(|| Status::internal("the shipment row vanished"))?;
        Ok(Response::new(answer(&row)))
    }

    async fn cancel_shipment(
        &self,
        request: Request<OrderRef>,
    ) -> Result<Response<Shipment>, Status> {
        let order_id = request.into_inner().order_id;
        check_id("order_id", &order_id)?;
        if store::cancel(&self.db, &order_id).await.map_err(db_error)? {
            metrics::counter!("shop_shipping_shipments_total", "outcome" => CANCELLED).increment(1);
        }
        let row = store::get(&self.db, &order_id).await.map_err(db_error)?;
        match row {
            Some(row) if row.exists() => Ok(Response::new(answer(&row))),
            Some(_) => Ok(Response::new(none(&order_id))),
            None => {
                // Record the cancellation, so a create arriving late does not ship.
                let tombstone = store::NewShipment {
                    order_id: &order_id,
                    id: "",
                    user_id: "",
                    lines: "[]",
                    status: CANCELLED,
                };
                store::insert_if_absent(&self.db, &tombstone)
                    .await
                    .map_err(db_error)?;
                // A create may have won the race; answer what is recorded now.
                match store::get(&self.db, &order_id).await.map_err(db_error)? {
                    Some(row) if row.exists() => {
                        if store::cancel(&self.db, &order_id).await.map_err(db_error)? {
                            metrics::counter!("shop_shipping_shipments_total", "outcome" => CANCELLED)
                                .increment(1);
                        }
                        let row = store::get(&self.db, &order_id)
                            .await
                            .map_err(db_error)?
                            .ok_or_else(|| Status::internal("the shipment row vanished"))?;
                        Ok(Response::new(answer(&row)))
                    }
                    _ => Ok(Response::new(none(&order_id))),
                }
            }
        }
    }

    async fn get_shipment(&self, request: Request<OrderRef>) -> Result<Response<Shipment>, Status> {
        let order_id = request.into_inner().order_id;
        check_id("order_id", &order_id)?;
        match store::get(&self.db, &order_id).await.map_err(db_error)? {
            Some(row) if row.exists() => Ok(Response::new(answer(&row))),
            _ => Ok(Response::new(none(&order_id))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shop_contracts::proto::Line;

    fn request(lines: &[(&str, i64)]) -> CreateShipmentRequest {
        CreateShipmentRequest {
            order_id: "o".into(),
            user_id: "u".into(),
            lines: lines
                .iter()
                .map(|(p, q)| Line {
                    product_id: (*p).into(),
                    quantity: *q,
                })
                .collect(),
        }
    }

    #[test]
    fn lines_are_stored_as_json_and_bad_ones_named() {
        assert_eq!(
            lines_json(&request(&[("p1", 2)])).expect("valid"),
            r#"[{"product_id":"p1","quantity":2}]"#
        );
        let err = lines_json(&request(&[("p1", 1), ("p2", 1_001)])).unwrap_err();
        assert!(
            err.message().contains("lines[1].quantity"),
            "{}",
            err.message()
        );
    }
}
