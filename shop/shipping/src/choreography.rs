//! The shipping service's part in the choreographed order saga (see
//! `shop_contracts::events` for the whole flow).
//!
//! - `order.shipping_started`: create the shipment (idempotent by order id) →
//!   `shipment.created`, or `shipment.failed` (`shipping_failed`) when the order's shipment was
//!   cancelled before it existed or its lines are refused.
//!
//! The effect is local (the service's own `shipments` table), so it runs in the inbox's
//! transaction: the shipment, the inbox record, the log entry and the next event commit
//! together (`trellis_service::choreography`, "local effects").

use shop_contracts::api::reason;
use shop_contracts::events::{self, ShippingStarted, StepDone, StepFailed};
use shop_contracts::proto::{CreateShipmentRequest, Line};
use trellis_service::choreography::{
    Choreography, ChoreographyDb, Envelope, HandlerError, Message, NextEvent, Participant,
    PrepareFuture, Tx, local,
};

use crate::service::{check_id, lines_json};
use crate::store::{self, CREATED};

/// The choreography's name in the log.
pub const FLOW: &str = "place-order";

/// The shipping service as a participant.
pub(crate) struct ShippingParticipant;

fn flow<D: ChoreographyDb>() -> Choreography<D> {
    Choreography::new(FLOW, "shop.shipping").step(
        events::ORDER_SHIPPING_STARTED,
        "shipping",
        |connection, trigger| Box::pin(create(D::tx(connection), trigger)),
    )
}

/// The event `kind` with `data`, published on the topic named like it.
fn emit(kind: &str, data: impl serde::Serialize) -> Result<Option<NextEvent>, HandlerError> {
    let data = serde_json::to_value(data)
        .map_err(|e| HandlerError::permanent("serialize", format!("{kind}: {e}")))?;
    Ok(Some(NextEvent::new(kind, kind, data)))
}

fn failed(order_id: &str, error: String) -> Result<Option<NextEvent>, HandlerError> {
    emit(
        events::SHIPMENT_FAILED,
        StepFailed {
            order_id: order_id.to_owned(),
            reason: reason::SHIPPING_FAILED.to_owned(),
            error,
        },
    )
}

fn database(e: sqlx::Error) -> HandlerError {
    HandlerError::transient("database", e)
}

async fn create(mut tx: Tx<'_>, trigger: &Envelope) -> Result<Option<NextEvent>, HandlerError> {
    let order_id = trigger.subject.as_str();
    let started: ShippingStarted = serde_json::from_value(trigger.data.clone())
        .map_err(|e| HandlerError::permanent("bad_event", e))?;
    let request = CreateShipmentRequest {
        order_id: order_id.to_owned(),
        user_id: started.user_id,
        lines: started
            .items
            .into_iter()
            .map(|item| Line {
                product_id: item.product_id,
                quantity: item.quantity,
            })
            .collect(),
    };
    // Lines or ids this service refuses: the order cannot be shipped.
    let checked = check_id("order_id", &request.order_id)
        .and_then(|()| check_id("user_id", &request.user_id))
        .and_then(|()| lines_json(&request));
    let lines = match checked {
        Ok(lines) => lines,
        Err(status) => return failed(order_id, status.message().to_owned()),
    };
    let id = uuid::Uuid::now_v7().to_string();
    let row = store::NewShipment {
        order_id,
        id: &id,
        user_id: &request.user_id,
        lines: &lines,
        status: CREATED,
    };
    let inserted = store::insert_if_absent_in(tx.reborrow(), &row)
        .await
        .map_err(database)?;
    let status = if inserted {
        metrics::counter!("shop_shipping_shipments_total", "outcome" => CREATED).increment(1);
        CREATED.to_owned()
    } else {
        // A cancellation reached the order first, or the saga's gRPC call made it: what is
        // recorded decides.
        store::get_in(tx, order_id)
            .await
            .map_err(database)?
            .map(|row| row.status)
            .ok_or_else(|| HandlerError::transient("shipping", "the shipment row vanished"))?
    };
    if status == CREATED {
        emit(
            events::SHIPMENT_CREATED,
            StepDone {
                order_id: order_id.to_owned(),
                state: CREATED.to_owned(),
            },
        )
    } else {
        failed(order_id, format!("the shipment is {status}"))
    }
}

impl Participant for ShippingParticipant {
    fn group(&self) -> &str {
        "shipping"
    }

    fn choreography<D: ChoreographyDb>(&self) -> Choreography<D> {
        flow()
    }

    /// Only says whether the delivery is for this service: the work is the effect's.
    fn prepare<'a>(&'a self, message: &'a Message) -> PrepareFuture<'a> {
        Box::pin(async move {
            Ok((message.envelope.kind == events::ORDER_SHIPPING_STARTED).then(local))
        })
    }
}
