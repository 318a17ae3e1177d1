//! The inventory service's part in the choreographed order saga (see
//! `shop_contracts::events` for the whole flow).
//!
//! - `order.created` (of a choreographed order): reserve every line or none →
//!   `inventory.reserved` (with what payments needs) or `inventory.failed` (`out_of_stock`).
//! - `shipment.created`: commit the reservation → `inventory.committed`.
//! - `payment.failed`, `payment.refunded` (compensations): release →
//!   `inventory.released`.
//!
//! Every effect is local (the service's own stock tables), so it runs in the inbox's
//! transaction (`trellis_service::choreography`, "local effects"): the stock change, the inbox
//! record, the choreography log entry and the next event commit together or not at all, and a
//! redelivery after a crash finds the stock as it was before.

use shop_contracts::api::reason;
use shop_contracts::events::{self, OrderCreated, OrderProgress, StepDone, StepFailed};
use trellis_service::choreography::{
    Choreography, ChoreographyDb, Envelope, HandlerError, Message, NextEvent, Participant,
    PrepareFuture, Tx, local,
};

use crate::stock::{self, Reserved, StockError};

/// The choreography's name in the log.
pub const FLOW: &str = "place-order";

/// The inventory service as a participant.
pub(crate) struct InventoryParticipant;

fn flow<D: ChoreographyDb>() -> Choreography<D> {
    Choreography::new(FLOW, "shop.inventory")
        .step(events::ORDER_CREATED, "inventory", |connection, trigger| {
            Box::pin(reserve(D::tx(connection), trigger))
        })
        .step(events::SHIPMENT_CREATED, "commit", |connection, trigger| {
            Box::pin(commit(D::tx(connection), trigger))
        })
        .compensation(
            events::PAYMENT_FAILED,
            "inventory",
            |connection, trigger| Box::pin(release(D::tx(connection), trigger)),
        )
        .compensation(
            events::PAYMENT_REFUNDED,
            "inventory",
            |connection, trigger| Box::pin(release(D::tx(connection), trigger)),
        )
}

fn failure(error: StockError) -> HandlerError {
    match error {
        StockError::Db(e) => HandlerError::transient("database", e),
        other => HandlerError::permanent("inventory", other),
    }
}

/// The event `kind` with `data`, published on the topic named like it.
fn emit(kind: &str, data: impl serde::Serialize) -> Result<Option<NextEvent>, HandlerError> {
    let data = serde_json::to_value(data)
        .map_err(|e| HandlerError::permanent("serialize", format!("{kind}: {e}")))?;
    Ok(Some(NextEvent::new(kind, kind, data)))
}

fn order_created(trigger: &Envelope) -> Result<OrderCreated, HandlerError> {
    serde_json::from_value(trigger.data.clone())
        .map_err(|e| HandlerError::permanent("bad_event", e))
}

async fn reserve(tx: Tx<'_>, trigger: &Envelope) -> Result<Option<NextEvent>, HandlerError> {
    let order_id = trigger.subject.as_str();
    let order = order_created(trigger)?;
    let lines = order
        .items
        .iter()
        .map(|item| (item.product_id.clone(), item.quantity))
        .collect();
    match stock::reserve_in(tx, order_id, lines).await {
        Ok(Reserved::Yes) => emit(
            events::INVENTORY_RESERVED,
            OrderProgress {
                order_id: order_id.to_owned(),
                user_id: order.user_id,
                items: order.items,
                total_cents: order.total_cents,
            },
        ),
        Ok(Reserved::OutOfStock) => emit(
            events::INVENTORY_FAILED,
            StepFailed {
                order_id: order_id.to_owned(),
                reason: reason::OUT_OF_STOCK.to_owned(),
                error: "not enough stock for every line".to_owned(),
            },
        ),
        // Lines this service refuses: the order cannot be served either.
        Err(error @ StockError::Invalid { .. }) => emit(
            events::INVENTORY_FAILED,
            StepFailed {
                order_id: order_id.to_owned(),
                reason: reason::OUT_OF_STOCK.to_owned(),
                error: error.to_string(),
            },
        ),
        Err(error) => Err(failure(error)),
    }
}

async fn commit(tx: Tx<'_>, trigger: &Envelope) -> Result<Option<NextEvent>, HandlerError> {
    let order_id = trigger.subject.as_str();
    let state = stock::commit_in(tx, order_id).await.map_err(failure)?;
    emit(
        events::INVENTORY_COMMITTED,
        StepDone {
            order_id: order_id.to_owned(),
            state,
        },
    )
}

async fn release(tx: Tx<'_>, trigger: &Envelope) -> Result<Option<NextEvent>, HandlerError> {
    let order_id = trigger.subject.as_str();
    let state = stock::release_in(tx, order_id).await.map_err(failure)?;
    emit(
        events::INVENTORY_RELEASED,
        StepDone {
            order_id: order_id.to_owned(),
            state,
        },
    )
}

impl Participant for InventoryParticipant {
    fn group(&self) -> &str {
        "inventory"
    }

    fn choreography<D: ChoreographyDb>(&self) -> Choreography<D> {
        flow()
    }

    /// Only says whether the delivery is for this service: the work is the effects'.
    fn prepare<'a>(&'a self, message: &'a Message) -> PrepareFuture<'a> {
        Box::pin(async move {
            let envelope = &message.envelope;
            let ours = match envelope.kind.as_str() {
                // An orchestrated order's saga calls this service itself.
                events::ORDER_CREATED => order_created(envelope)?.choreographed,
                events::SHIPMENT_CREATED | events::PAYMENT_FAILED | events::PAYMENT_REFUNDED => {
                    true
                }
                _ => false,
            };
            Ok(ours.then(local))
        })
    }
}
