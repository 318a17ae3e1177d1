//! The inventory service's part in the choreographed order saga (see
//! `shop_contracts::events` for the whole flow).
//!
//! - `order.created` (of a choreographed order): reserve every line or none →
//!   `inventory.reserved` (with what payments needs) or `inventory.failed` (`out_of_stock`).
//! - `shipment.created`: commit the reservation → `inventory.committed`.
//! - `payment.failed`, `payment.refunded` (compensations): release →
//!   `inventory.released`.
//!
//! The work is the service's own idempotent operations keyed by order id, run before the
//! inbox transaction that emits the next event (`trellis_service::choreography`).

use shop_contracts::api::reason;
use shop_contracts::events::{self, OrderCreated, OrderProgress, StepDone, StepFailed};
use trellis_service::Db;
use trellis_service::choreography::{
    Choreography, ChoreographyDb, HandlerError, Message, Participant, PrepareFuture, emit_prepared,
    next,
};

use crate::stock::{self, Reserved, StockError};

/// The choreography's name in the log.
pub const FLOW: &str = "place-order";

/// The inventory service as a participant.
pub(crate) struct InventoryParticipant {
    pub(crate) db: Db,
}

fn flow<D: ChoreographyDb>() -> Choreography<D> {
    let emit = emit_prepared::<D::Connection>;
    Choreography::new(FLOW, "shop.inventory")
        .step(events::ORDER_CREATED, "inventory", emit)
        .step(events::SHIPMENT_CREATED, "commit", emit)
        .compensation(events::PAYMENT_FAILED, "inventory", emit)
        .compensation(events::PAYMENT_REFUNDED, "inventory", emit)
}

fn failure(error: StockError) -> HandlerError {
    match error {
        StockError::Db(e) => HandlerError::transient("database", e),
        other => HandlerError::permanent("inventory", other),
    }
}

impl InventoryParticipant {
    async fn act(&self, message: &Message) -> Result<Option<serde_json::Value>, HandlerError> {
        let order_id = message.envelope.subject.as_str();
        let outcome = match message.envelope.kind.as_str() {
            events::ORDER_CREATED => {
                let order: OrderCreated = serde_json::from_value(message.envelope.data.clone())
                    .map_err(|e| HandlerError::permanent("bad_event", e))?;
                if !order.choreographed {
                    // Its saga calls this service itself.
                    return Ok(None);
                }
                let lines = order
                    .items
                    .iter()
                    .map(|item| (item.product_id.clone(), item.quantity))
                    .collect();
                match stock::reserve(&self.db, order_id, lines).await {
                    Ok(Reserved::Yes) => next(
                        events::INVENTORY_RESERVED,
                        OrderProgress {
                            order_id: order_id.to_owned(),
                            user_id: order.user_id,
                            items: order.items,
                            total_cents: order.total_cents,
                        },
                    )?,
                    Ok(Reserved::OutOfStock) => next(
                        events::INVENTORY_FAILED,
                        StepFailed {
                            order_id: order_id.to_owned(),
                            reason: reason::OUT_OF_STOCK.to_owned(),
                            error: "not enough stock for every line".to_owned(),
                        },
                    )?,
                    // Lines this service refuses: the order cannot be served either.
                    Err(error @ StockError::Invalid { .. }) => next(
                        events::INVENTORY_FAILED,
                        StepFailed {
                            order_id: order_id.to_owned(),
                            reason: reason::OUT_OF_STOCK.to_owned(),
                            error: error.to_string(),
                        },
                    )?,
                    Err(error) => return Err(failure(error)),
                }
            }
            events::SHIPMENT_CREATED => {
                let state = stock::commit(&self.db, order_id).await.map_err(failure)?;
                next(
                    events::INVENTORY_COMMITTED,
                    StepDone {
                        order_id: order_id.to_owned(),
                        state,
                    },
                )?
            }
            events::PAYMENT_FAILED | events::PAYMENT_REFUNDED => {
                let state = stock::release(&self.db, order_id).await.map_err(failure)?;
                next(
                    events::INVENTORY_RELEASED,
                    StepDone {
                        order_id: order_id.to_owned(),
                        state,
                    },
                )?
            }
            _ => return Ok(None),
        };
        Ok(Some(outcome))
    }
}

impl Participant for InventoryParticipant {
    fn group(&self) -> &str {
        "inventory"
    }

    fn choreography<D: ChoreographyDb>(&self) -> Choreography<D> {
        flow()
    }

    fn prepare<'a>(&'a self, message: &'a Message) -> PrepareFuture<'a> {
        Box::pin(self.act(message))
    }
}
