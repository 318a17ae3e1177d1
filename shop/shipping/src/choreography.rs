//! The shipping service's part in the choreographed order saga (see
//! `shop_contracts::events` for the whole flow).
//!
//! - `order.shipping_started`: create the shipment (idempotent by order id) →
//!   `shipment.created`, or `shipment.failed` (`shipping_failed`) when the order's shipment was
//!   cancelled before it existed or its lines are refused.

use shop_contracts::api::reason;
use shop_contracts::events::{self, ShippingStarted, StepDone, StepFailed};
use shop_contracts::proto::shipping_server::Shipping as _;
use shop_contracts::proto::{CreateShipmentRequest, Line};
use tonic::Code;
use trellis_service::choreography::{
    Choreography, ChoreographyDb, HandlerError, Message, Participant, PrepareFuture, emit_prepared,
    next,
};

use crate::service::ShippingService;
use crate::store::CREATED;

/// The choreography's name in the log.
pub const FLOW: &str = "place-order";

/// The shipping service as a participant.
pub(crate) struct ShippingParticipant {
    pub(crate) service: ShippingService,
}

fn flow<D: ChoreographyDb>() -> Choreography<D> {
    Choreography::new(FLOW, "shop.shipping").step(
        events::ORDER_SHIPPING_STARTED,
        "shipping",
        emit_prepared::<D::Connection>,
    )
}

fn failed(order_id: &str, error: String) -> Result<serde_json::Value, HandlerError> {
    next(
        events::SHIPMENT_FAILED,
        StepFailed {
            order_id: order_id.to_owned(),
            reason: reason::SHIPPING_FAILED.to_owned(),
            error,
        },
    )
}

impl ShippingParticipant {
    async fn act(&self, message: &Message) -> Result<Option<serde_json::Value>, HandlerError> {
        if message.envelope.kind != events::ORDER_SHIPPING_STARTED {
            return Ok(None);
        }
        let order_id = message.envelope.subject.as_str();
        let started: ShippingStarted = serde_json::from_value(message.envelope.data.clone())
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
        let outcome = match self
            .service
            .create_shipment(tonic::Request::new(request))
            .await
        {
            Ok(answer) if answer.get_ref().status == CREATED => next(
                events::SHIPMENT_CREATED,
                StepDone {
                    order_id: order_id.to_owned(),
                    state: CREATED.to_owned(),
                },
            )?,
            Ok(answer) => failed(
                order_id,
                format!("the shipment is {}", answer.get_ref().status),
            )?,
            Err(status) if status.code() == Code::InvalidArgument => {
                failed(order_id, status.message().to_owned())?
            }
            Err(status) => return Err(HandlerError::transient("shipping", status.message())),
        };
        Ok(Some(outcome))
    }
}

impl Participant for ShippingParticipant {
    fn group(&self) -> &str {
        "shipping"
    }

    fn choreography<D: ChoreographyDb>(&self) -> Choreography<D> {
        flow()
    }

    fn prepare<'a>(&'a self, message: &'a Message) -> PrepareFuture<'a> {
        Box::pin(self.act(message))
    }
}
